"""Line-oriented raw files (JSON lines, optionally gzipped; headerless CSV) read with errors that
name the file, the line and what was expected.

A bad line either stops the load (`on_bad_line="error"`, the default: a corrupt download should
be noticed) or is skipped and counted (`"skip"`), so the count can be reported in
`CanonicalData.dropped`. A truncated or empty file always stops the load: skipping cannot
repair it.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any, TypeVar

import pandas as pd
from pandas.errors import ParserError

from recsys_lm.errors import ConfigError, DataError

T = TypeVar("T")
ON_BAD_LINE = ("error", "skip")


class BadRecord(ValueError):
    """One line that cannot be used; the message says what is wrong and what was expected."""


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
                        raise DataError(f"{file}, line {number}: {err}") from err
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
        raise BadRecord(f"key '{key}' = {value!r}; expected an integer") from err


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
        raise BadRecord(f"key '{key}' = {value!r}; expected a number") from err


def read_headerless_csv(
    file: Path, columns: Sequence[str], numeric: Sequence[str], on_bad_line: str = "error"
) -> tuple[pd.DataFrame, int]:
    """A comma-separated file with no header and exactly `columns`; `numeric` columns parsed.

    Every field is read as text first, so a missing field (too few commas) or a non-number is
    reported with its line and column instead of becoming NaN. Returns the frame and how many
    bad lines were skipped.
    """
    check_on_bad_line(on_bad_line)
    expected = f"{len(columns)} comma-separated fields ({','.join(columns)})"
    try:
        frame = pd.read_csv(
            file,
            header=None,
            names=list(columns),
            dtype=str,
            keep_default_na=False,  # an empty field stays "" and is reported, not read as NaN
            skip_blank_lines=False,  # keeps row i on line i + 1 for the messages
            on_bad_lines="error" if on_bad_line == "error" else "skip",
        )
    except ParserError as err:  # more fields than columns; pandas names the line
        raise DataError(f"{file}: {str(err).strip()}; expected {expected}") from err
    except UnicodeDecodeError as err:  # pandas gives a position in its buffer, not a line
        raise DataError(f"{file}, {_undecodable_line(file)}; expected UTF-8 text") from err
    too_long = _count_lines(file) - len(frame) if on_bad_line == "skip" else 0
    bad = _bad_csv_rows(frame, columns, numeric)
    if bad.any() and on_bad_line == "error":
        raise DataError(
            f"{file}, {_describe_bad_row(frame, bad, columns, numeric)}; expected {expected}"
        )
    frame = frame[~bad].reset_index(drop=True)
    if frame.empty:
        raise DataError(f"{file}: no records; expected {expected}")
    for column in numeric:
        frame[column] = pd.to_numeric(frame[column])
    return frame, too_long + int(bad.sum())


def _bad_csv_rows(frame: pd.DataFrame, columns: Sequence[str], numeric: Sequence[str]) -> pd.Series:
    bad = pd.Series(False, index=frame.index)
    for column in columns:
        bad |= frame[column].str.strip() == ""
    for column in numeric:
        bad |= pd.to_numeric(frame[column], errors="coerce").isna()
    return bad


def _describe_bad_row(
    frame: pd.DataFrame, bad: pd.Series, columns: Sequence[str], numeric: Sequence[str]
) -> str:
    """'line N: column X ...' for the first bad row (rows map to lines: nothing was skipped)."""
    row = int(bad.idxmax())
    for column in columns:
        value = frame.at[row, column]
        if value.strip() == "":
            return f"line {row + 1}: column '{column}' is empty (a missing field?)"
        if column in numeric and pd.isna(pd.to_numeric(value, errors="coerce")):
            return f"line {row + 1}: column '{column}' = {value!r} is not a number"
    return f"line {row + 1}: unreadable row"


def _undecodable_line(file: Path) -> str:
    """'line N: byte 0x.. at column C is not UTF-8' for the first line that does not decode."""
    with open_binary(file) as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"line {number}: byte {raw[err.start]:#04x} at column {err.start + 1} is not UTF-8"
    return "a byte sequence that is not UTF-8"


def _count_lines(file: Path) -> int:
    """Lines in `file` (a last line without a newline counts), for the skipped-line count."""
    count, last = 0, b"\n"
    with open_binary(file) as handle:
        while block := handle.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")
