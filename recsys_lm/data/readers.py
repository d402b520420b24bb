"""The one reader for line-oriented raw files (JSON lines, delimited text: CSV, TSV, MovieLens'
`::`/tab/pipe files, MIND's TSV), whose errors name the file, the line and the column:

    <file>, line N, column '<name>': <value> <what is wrong>; expected <what was expected>

(`row N` instead of `line N` for Parquet, which has no lines; a problem of a whole line, such as
a wrong number of fields, names no column). `bad_value` builds that message; `Layout` says what
a delimited file holds; `read_table` (typed, fast) and `read_strings` (text, checked) read it and
point at the first bad line; `line_of` maps a data row back to its line for checks done after
parsing (a custom file's time column).

A bad line either stops the load (`on_bad_line="error"`, the default: a corrupt download should
be noticed) or is skipped and counted (`"skip"`), so the count can be reported in
`CanonicalData.dropped`. A truncated or empty file always stops the load: skipping cannot
repair it.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import pandas as pd
from pandas.errors import ParserError

from recsys_lm.errors import ConfigError, DataError

T = TypeVar("T")
ON_BAD_LINE = ("error", "skip")


class BadRecord(ValueError):
    """One line that cannot be used; the message says what is wrong and what was expected,
    `column` names the field (a JSON key) when one is to blame."""

    def __init__(self, message: str, column: str | None = None) -> None:
        super().__init__(message)
        self.column = column

    @classmethod
    def value(cls, column: str, value: object, expected: str, problem: str = "") -> BadRecord:
        return cls(_value_text(value, problem, expected), column)


def check_on_bad_line(value: str, key: str = "data.source.on_bad_line") -> None:
    if value not in ON_BAD_LINE:
        raise ConfigError(key, value, f"one of {list(ON_BAD_LINE)}")


def open_binary(file: Path) -> AbstractContextManager[IO[bytes]]:
    """Bytes of `file`, decompressed when its name ends in `.gz`."""
    return gzip.open(file, "rb") if file.suffix == ".gz" else open(file, "rb")


def read_json_lines(
    file: Path,
    required: Sequence[str],
    parse: Callable[[dict[str, Any]], T],
    on_bad_line: str = "error",
) -> tuple[list[T], int]:
    """`parse(record)` for each JSON object line of `file`, and how many bad lines were skipped.

    Lines are decoded one at a time (not through a text wrapper) so that a non-UTF-8 byte is
    reported at its own line. Only what `parse` returns is kept: raw records of a large category
    carry many unused fields.
    """
    check_on_bad_line(on_bad_line)
    rows: list[T] = []
    skipped = number = 0
    try:
        with open_binary(file) as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue  # a blank line holds no record
                try:
                    rows.append(parse(_record(raw, required)))
                except BadRecord as err:
                    if on_bad_line == "error":
                        raise DataError(f"{place(file, number, err.column)}: {err}") from err
                    skipped += 1
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(
            f"{file}: truncated or corrupt gzip after line {number} ({err}); expected a complete "
            f"gzip file of JSON lines: download it again"
        ) from err
    if not rows:
        raise DataError(
            f"{file}: no records ({skipped} bad line(s) skipped); expected one JSON object per "
            f"line with keys {list(required)}"
        )
    return rows, skipped


def _record(raw: bytes, required: Sequence[str]) -> dict[str, Any]:
    """One line as a JSON object that has every `required` key (not null, not empty)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRecord(
            f"byte {raw[err.start]:#04x} at column {err.start + 1} is not UTF-8; expected "
            f"UTF-8 text"
        ) from err
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadRecord(
            f"not valid JSON ({err.msg} at column {err.colno}); expected one JSON object per line"
        ) from err
    if not isinstance(record, dict):
        raise BadRecord(f"a JSON {type(record).__name__}; expected a JSON object")
    missing = [key for key in required if record.get(key) in (None, "")]
    if missing:
        raise BadRecord(f"missing key(s) {missing}; expected keys {list(required)}")
    return record


def integer(record: dict[str, Any], key: str) -> int:
    """`record[key]` as an int (JSON numbers and numeric strings), else a BadRecord naming it."""
    value = record[key]
    try:
        if isinstance(value, bool):
            raise TypeError(value)
        number = float(value) if isinstance(value, str) else value
        if number != int(number):
            raise ValueError(value)
        return int(number)
    except (TypeError, ValueError, OverflowError) as err:
        raise BadRecord.value(key, value, "an integer") from err


def number_or_nan(record: dict[str, Any], key: str) -> float:
    """An optional numeric field (a rating): NaN when absent, a BadRecord when not a number."""
    value = record.get(key)
    if value is None:
        return float("nan")
    try:
        if isinstance(value, bool):
            raise TypeError(value)
        return float(value)
    except (TypeError, ValueError) as err:
        raise BadRecord.value(key, value, "a number") from err


# --- the message ----------------------------------------------------------------------------


def place(
    file: Path | str, line: int | None = None, column: str | None = None, row: int | None = None
) -> str:
    """`<file>, line N, column '<name>'` with the parts that are known (`row N`: Parquet)."""
    parts = [str(file)]
    if line is not None:
        parts.append(f"line {line}")
    elif row is not None:
        parts.append(f"row {row}")
    if column is not None:
        parts.append(f"column {column!r}")
    return ", ".join(parts)


def bad_value(
    file: Path | str,
    line: int | None,
    column: str | None,
    value: object,
    expected: str,
    problem: str = "",
    row: int | None = None,
) -> DataError:
    """The DataError for one bad value: `<file>, line N, column 'c': 'v' <problem>; expected ...`."""
    return DataError(f"{place(file, line, column, row)}: {_value_text(value, problem, expected)}")


def _value_text(value: object, problem: str, expected: str) -> str:
    shown = value.item() if hasattr(value, "item") else value  # numpy scalars read as plain
    return f"{shown!r}{' ' + problem if problem else ''}; expected {expected}"


# --- delimited text ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """What one line of a delimited text file holds: for reading it and for naming a bad line."""

    columns: tuple[
        str, ...
    ]  # field names in file order; with a header, the names that must be there
    sep: str = ","  # one character, or several (MovieLens-1M's "::")
    header: bool = False  # the first line names the columns
    quoting: bool = True  # "..." may wrap a field (CSV); False: quotes are literal (TSV, MovieLens)
    numeric: tuple[str, ...] = ()  # columns whose every value must be a number
    required: tuple[str, ...] | None = None  # columns that must not be empty; None: all of them
    encoding: str = "utf-8"
    describe: str = ""  # one line in words, for "expected ..." (default: built from the above)

    @property
    def must_fill(self) -> tuple[str, ...]:
        return self.columns if self.required is None else self.required

    @property
    def expected(self) -> str:
        if self.describe:
            return self.describe
        sep = {",": "comma", "\t": "tab"}.get(self.sep, repr(self.sep))
        return f"{len(self.columns)} {sep}-separated fields ({','.join(self.columns)})"


def read_table(
    source: Path | io.BytesIO, layout: Layout, file: Path | None = None, **read_csv
) -> pd.DataFrame:
    """pd.read_csv(source, **read_csv), typed and fast; when it fails, the error names the first
    line that breaks `layout` (scanned only then) and what was expected.

    `file`: the real file when `source` is a rewritten buffer (MovieLens-1M's "::" -> tab).
    With `layout.header`, only `layout.columns` are read and a missing one is named.
    """
    file = file or Path(source if isinstance(source, (str, Path)) else source.name)
    if layout.header:
        check_header(file, layout)
        read_csv.setdefault("usecols", list(layout.columns))
    try:
        return pd.read_csv(source, **read_csv)
    except (ValueError, ParserError) as err:  # UnicodeDecodeError is a ValueError
        found = find_bad_line(file, layout)
        where = f"{file}, {found}" if found else f"{file}: {str(err).strip()}"
        raise DataError(f"{where}; expected {layout.expected}") from err


def read_strings(
    file: Path, layout: Layout, on_bad_line: str = "error"
) -> tuple[pd.DataFrame, int]:
    """A headerless file of exactly `layout.columns`, every field as text, `layout.numeric`
    parsed: a missing field or a non-number is named (pandas would make it NaN) or, with
    `on_bad_line="skip"`, dropped and counted. Returns the frame and the skipped count."""
    check_on_bad_line(on_bad_line)
    try:
        frame = pd.read_csv(
            file,
            sep=layout.sep,
            header=None,
            names=list(layout.columns),
            dtype=str,
            encoding=layout.encoding,
            quoting=csv.QUOTE_MINIMAL if layout.quoting else csv.QUOTE_NONE,
            keep_default_na=False,  # an empty field stays "" and is reported, not read as NaN
            on_bad_lines="error" if on_bad_line == "error" else "skip",
        )
    except (ValueError, ParserError) as err:  # too many fields, or not UTF-8
        found = find_bad_line(file, layout)
        where = f"{file}, {found}" if found else f"{file}: {str(err).strip()}"
        raise DataError(f"{where}; expected {layout.expected}") from err
    too_long = len(list(records(file, layout))) - len(frame) if on_bad_line == "skip" else 0
    bad = _bad_rows(frame, layout)
    if bad.any() and on_bad_line == "error":
        found = find_bad_line(file, layout)
        raise DataError(f"{file}, {found or 'a bad line'}; expected {layout.expected}")
    frame = frame[~bad].reset_index(drop=True)
    if frame.empty:
        raise DataError(f"{file}: no records; expected {layout.expected}")
    for column in layout.numeric:
        frame[column] = pd.to_numeric(frame[column])
    return frame, too_long + int(bad.sum())


def _bad_rows(frame: pd.DataFrame, layout: Layout) -> pd.Series:
    bad = pd.Series(False, index=frame.index)
    for column in layout.must_fill:
        bad |= frame[column].str.strip() == ""
    for column in layout.numeric:
        bad |= pd.to_numeric(frame[column], errors="coerce").isna()
    return bad


def check_header(file: Path, layout: Layout) -> list[str]:
    """The header's names; a DataError naming what `layout.columns` lacks from it."""
    try:
        first = next(iter(records(file, layout, data_only=False)), (1, []))[1]
    except (OSError, ValueError):
        return []  # cannot be scanned (zstd): pandas' own error will have to do
    missing = [c for c in layout.columns if c not in first]
    if missing:
        raise DataError(
            f"{file}, line 1: no column(s) {missing} in the header; it has {first}, "
            f"expected {','.join(layout.columns)}"
        )
    return first


def find_bad_line(file: Path, layout: Layout) -> str | None:
    """'line N[, column 'c']: why' for the first line that breaks `layout`, else None.

    Python-speed: called only after a fast parse failed, to say where and why."""
    try:
        return _scan_for_bad_line(file, layout)
    except (OSError, ValueError):
        return None  # cannot be scanned (zstd): the caller falls back to pandas' message


def _scan_for_bad_line(file: Path, layout: Layout) -> str | None:
    undecodable = _undecodable_line(file, layout.encoding)
    if undecodable:
        return undecodable
    rows = records(file, layout, data_only=False)
    names = list(layout.columns)
    for number, fields in rows:
        if layout.header and number == 1:
            names = fields
            continue
        if len(fields) != len(names):
            return f"line {number}: {len(fields)} fields instead of {len(names)}"
        for column in layout.columns:
            value = fields[names.index(column)] if column in names else ""
            problem = _field_problem(value, column in layout.numeric, column in layout.must_fill)
            if problem:
                return f"line {number}, column {column!r}: {value!r} {problem}"
    return None


def _field_problem(value: str, numeric: bool, must_fill: bool) -> str:
    if value.strip() == "" and (numeric or must_fill):
        return "is empty (a missing field?)"
    if numeric and pd.isna(pd.to_numeric(value, errors="coerce")):
        return "is not a number"
    return ""


def line_of(file: Path, layout: Layout, row: int) -> int | None:
    """The line where data row `row` (0-based, blank lines skipped as pandas does) starts; None
    when the file cannot be scanned (an unknown compression)."""
    try:
        for index, (number, _) in enumerate(records(file, layout)):
            if index == row:
                return number
    except (OSError, ValueError):
        return None
    return None


def records(file: Path, layout: Layout, data_only: bool = True) -> Iterator[tuple[int, list[str]]]:
    """(line where it starts, fields) for each non-blank record; the header too unless
    `data_only`. A quoted field may span lines: the csv module counts them."""
    with _open_text(file, layout.encoding) as handle:
        if len(layout.sep) == 1:
            quoting = csv.QUOTE_MINIMAL if layout.quoting else csv.QUOTE_NONE
            reader = csv.reader(handle, delimiter=layout.sep, quoting=quoting)
            start = 1
            for fields in reader:
                if fields and (not data_only or not layout.header or start > 1):
                    yield start, fields
                start = reader.line_num + 1
        else:
            for number, line in enumerate(handle, start=1):
                line = line.rstrip("\r\n")
                if line and (not data_only or not layout.header or number > 1):
                    yield number, line.split(layout.sep)


def _open_text(file: Path, encoding: str) -> IO[str]:
    """`file` as text, decompressed by its suffix (gz, bz2, xz, zip of one file)."""
    suffix = file.suffix.lower()
    if suffix == ".zip":
        bundle = zipfile.ZipFile(file)
        binary: IO[bytes] = bundle.open(bundle.namelist()[0])
    else:
        opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(suffix, open)
        if suffix == ".zst":
            raise ValueError("zstd files cannot be scanned for line numbers")
        binary = opener(file, "rb")
    return io.TextIOWrapper(binary, encoding=encoding, errors="replace", newline="")


def _undecodable_line(file: Path, encoding: str = "utf-8") -> str | None:
    """'line N: byte 0x.. at column C is not UTF-8' for the first line that does not decode."""
    if encoding.replace("-", "").lower() != "utf8":
        return None  # latin-1 decodes every byte
    with open_binary(file) as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return (
                    f"line {number}: byte {raw[err.start]:#04x} at column {err.start + 1} is not "
                    f"UTF-8"
                )
    return None


def check_utf8(file: Path, raw: bytes) -> None:
    """Raw bytes of a UTF-8 file; the DataError names the first line that does not decode."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        number = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{file}, line {number}: byte {raw[err.start]:#04x} at column "
            f"{err.start - line_start + 1} is not UTF-8; expected UTF-8 text"
        ) from err


def check_field_counts(file: Path, raw: bytes, layout: Layout) -> None:
    """Every line of `raw` has exactly len(layout.columns) fields (one-byte separator, no
    quoting), counted on the bytes with numpy: pandas pads short rows silently, so it cannot."""
    buf = np.frombuffer(raw, dtype=np.uint8)
    ends = np.flatnonzero(buf == ord("\n"))
    if not raw.endswith(b"\n"):
        ends = np.append(ends, len(raw))
    starts = np.concatenate(([0], ends[:-1] + 1))
    seps = np.flatnonzero(buf == ord(layout.sep))
    counts = np.searchsorted(seps, ends) - np.searchsorted(seps, starts) + 1
    bad = np.flatnonzero(counts != len(layout.columns))
    if bad.size:
        raise DataError(
            f"{file}, line {bad[0] + 1}: {counts[bad[0]]} fields instead of "
            f"{len(layout.columns)} ({bad.size} such line(s)); expected {layout.expected}"
        )


def read_strings_exact(file: Path, layout: Layout) -> pd.DataFrame:
    """A headerless, unquoted file whose data row i is line i + 1, every field as text: bytes
    checked for UTF-8 and field counts first (MIND's TSV), so later value checks can name
    `line = row + 1`."""
    raw = file.read_bytes()
    if not raw.strip():
        raise DataError(f"{file}: file is empty; expected lines of {layout.expected}")
    check_utf8(file, raw)
    check_field_counts(file, raw, layout)
    try:
        # lineterminator="\n" and keeping blank lines make row i exactly line i + 1.
        return pd.read_csv(
            io.BytesIO(raw),
            sep=layout.sep,
            header=None,
            names=list(layout.columns),
            quoting=csv.QUOTE_NONE,
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
            lineterminator="\n",
            encoding="utf-8",
        )
    except ParserError as err:
        raise DataError(f"{file}: {err}; expected {layout.expected}") from err


def first_bad(
    file: Path, column: pd.Series, bad: pd.Series | np.ndarray, expected: str, problem: str = ""
) -> DataError:
    """The error for the first True of `bad` in a frame read by `read_strings_exact` (row i is
    line i + 1); `column.name` is the column named."""
    row = int(np.flatnonzero(np.asarray(bad))[0])
    return bad_value(file, row + 1, str(column.name), column.iloc[row], expected, problem)
