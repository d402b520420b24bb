"""A user's own interactions and items (CSV, TSV or Parquet), described by a column mapping.

    interactions: {path | files, user, item, time, rating?, label?, behaviour?, time_format?,
                   split?}
    items:        {path, id, text: [column, ...]}

A user's own split, for `data.split.method=predefined`, becomes the canonical `part` column
("train" | "val" | "test"); it comes in one of two ways:
  * `split` names a column of the one interactions file (`path`): its values (case and
    surrounding blanks ignored) are train, val (also validation, valid, dev) or test.
  * `files: {train: a.csv, val: b.csv, test: c.csv}` replaces `path`: one file per part, each
    read with the same column mapping (part names as above; val is optional). Without a val
    file, each user's latest training interaction in time (file order breaks ties) is val when
    the user has another one to train on, as for MovieLens-100K's folds; test is exactly the
    test file.

Paths are absolute or relative to data.root; the suffix picks the reader (.csv, .tsv,
.parquet; .gz/.bz2/.zip/.xz/.zst after .csv/.tsv are decompressed). Times become int64
unix seconds:
  * numbers (or text that is mostly numbers: the rest is then reported as bad): unix seconds, or milliseconds when the largest absolute value is >= 1e11
    (1e11 s is the year 5138, 1e11 ms is March 1973, so real data cannot be ambiguous);
    values >= 1e14 (micro/nanoseconds) are refused. `time_format: s` or `ms` forces the unit.
  * datetimes (Parquet timestamp columns) and strings: strings are parsed with `time_format`
    (strftime codes, e.g. "%d/%m/%Y %H:%M") or, without it, as ISO 8601 and else by pandas'
    inference from the first value (month first); times without a zone are taken as UTC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from recsys_lm.data.canonical import CanonicalData, latest_train_as_val
from recsys_lm.data.download import resolve_root
from recsys_lm.data.readers import Layout, bad_value, line_of, read_table
from recsys_lm.errors import ConfigError, DataError

INTERACTION_KEYS = {"user", "item", "time"}  # required; plus exactly one of path / files
OPTIONAL_KEYS = {"path", "files", "rating", "label", "behaviour", "time_format", "split"}
# A split column's values -> canonical parts (compared lower-cased, stripped).
PART_NAMES = {
    **dict.fromkeys(["train"], "train"),
    **dict.fromkeys(["val", "validation", "valid", "dev"], "val"),
    **dict.fromkeys(["test"], "test"),
}
PARTS = ("train", "val", "test")  # canonical order: raw_files() and the rows follow it
ITEM_KEYS = {"path", "id", "text"}
COMPRESSION = {".gz", ".bz2", ".zip", ".xz", ".zst"}
MS_FROM = 1e11  # |time| >= this: milliseconds (see the module docstring)
TOO_FINE = 1e14  # |time| >= this: micro/nanoseconds, refused rather than guessed
KEY = "data.source"


@dataclass
class CustomSource:
    """Interactions + items files mapped onto the canonical columns by name."""

    interactions: Mapping[str, Any] = field(default_factory=dict)
    items: Mapping[str, Any] = field(default_factory=dict)
    root: str | None = None  # relative paths are taken from here (data.root)
    name: str = "custom"
    unknown_items: str = "error"  # interactions whose item is not in the items file: error | drop

    parser_version: ClassVar[int] = 1  # bump when load() gives other output for the same files

    def __post_init__(self) -> None:
        # Plain dicts/lists (not OmegaConf nodes): hashable into a cache key, printable.
        self.interactions = _mapping(self.interactions, "interactions", INTERACTION_KEYS)
        self.items = _mapping(self.items, "items", ITEM_KEYS)
        text = self.items["text"]
        self.items["text"] = [text] if isinstance(text, str) else list(text)
        unknown = set(self.interactions) - INTERACTION_KEYS - OPTIONAL_KEYS
        if unknown:
            allowed = sorted(INTERACTION_KEYS | OPTIONAL_KEYS)
            raise ConfigError(f"{KEY}.interactions", sorted(unknown), f"keys among {allowed}")
        self.interactions["files"] = _part_files(self.interactions)
        if set(self.items) - ITEM_KEYS:
            raise ConfigError(f"{KEY}.items", sorted(set(self.items) - ITEM_KEYS), "path, id, text")
        if self.unknown_items not in ("error", "drop"):
            raise ConfigError(f"{KEY}.unknown_items", self.unknown_items, "`error` or `drop`")

    def prepare(self) -> None:
        """Nothing to download: the files are the user's."""

    def raw_files(self) -> list[Path]:
        return [*(file for _, file in self._interaction_files()), self._file("items")]

    def load(self) -> CanonicalData:
        sources = self._interaction_files()
        frames = [self._interactions(file, part) for part, file in sources]
        items, *frames = _common_ids([self._items(), *frames], "item_id")
        frames = _common_ids(frames, "user_id")
        # Unknown items are checked file by file, so an error names the right file and line.
        kept = [
            self._known(file, frame, items)
            for (_, file), frame in zip(sources, frames, strict=True)
        ]
        interactions = pd.concat(kept, ignore_index=True)
        if self.interactions["files"] and "val" not in self.interactions["files"]:
            interactions = latest_train_as_val(interactions)
        unknown = sum(map(len, frames)) - len(interactions)
        dropped = {"unknown item": unknown} if unknown else {}
        return CanonicalData(self.name, items, interactions, dropped=dropped)

    def _interaction_files(self) -> list[tuple[str | None, Path]]:
        """(part, file) per interactions file: one file without a part, or one per part."""
        files = self.interactions["files"]
        if not files:
            return [(None, self._file("interactions"))]
        return [
            (part, self._path(raw, f"interactions.files.{part}")) for part, raw in files.items()
        ]

    def _file(self, table: str) -> Path:
        return self._path(getattr(self, table)["path"], f"{table}.path")

    def _path(self, raw: Any, key: str) -> Path:
        path = Path(str(raw)).expanduser()
        if not path.is_absolute():
            path = resolve_root(self.root) / path
        if not path.is_file():
            raise DataError(f"{path}: no such file (from {KEY}.{key} = {raw!r})")
        return path

    def _items(self) -> pd.DataFrame:
        spec, file = self.items, self._file("items")
        frame = _read(file, [spec["id"], *spec["text"]], {spec["id"]: "items.id"})
        ids = frame[spec["id"]]
        _no_missing(ids, file)
        if ids.duplicated().any():
            raise _bad(file, ids, ids.duplicated(), "each item id once", "is repeated")
        # Missing text is an empty string, so templates never render "nan".
        text = {c: frame[c].astype("str").where(frame[c].notna(), "") for c in spec["text"]}
        return pd.DataFrame({"item_id": ids, **text}).reset_index(drop=True)

    def _interactions(self, file: Path, part: str | None) -> pd.DataFrame:
        """One interactions file; `part` (files mode) is every row's part."""
        spec = self.interactions
        keys = ("user", "item", "time", "rating", "label", "behaviour", "split")
        wanted = {k: spec[k] for k in keys if spec.get(k) is not None}
        frame = _read(
            file, list(wanted.values()), {v: f"interactions.{k}" for k, v in wanted.items()}
        )
        for key in ("user", "item", "time"):
            _no_missing(frame[spec[key]], file)
        out = pd.DataFrame(
            {
                "user_id": frame[spec["user"]],
                "item_id": frame[spec["item"]],
                "timestamp": to_seconds(frame[spec["time"]], spec.get("time_format"), file),
            }
        )
        for key in ("rating", "label", "behaviour"):  # optional canonical columns, same names
            if key in wanted:
                out[key] = frame[wanted[key]].to_numpy()
        if "split" in wanted:
            out["part"] = to_parts(frame[wanted["split"]], file).to_numpy()
        if part is not None:
            out["part"] = part
        return out

    def _known(self, file: Path, interactions: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
        """The rows whose item is in the items file (`unknown_items=drop`), or the error."""
        known = interactions["item_id"].isin(items["item_id"])
        if known.all() or self.unknown_items == "drop":
            return interactions[known]
        raise _bad(
            file,
            interactions["item_id"].rename(self.interactions["item"]),
            ~known,
            f"item ids of {self._file('items')}, or set {KEY}.unknown_items=drop to drop them "
            f"(counted in `dropped`)",
            f"is absent from the items file ({int((~known).sum())} such interaction(s))",
        )


def _common_ids(frames: list[pd.DataFrame], column: str) -> list[pd.DataFrame]:
    """Parquet keeps types: int ids in one file and string ids in another compare as strings."""
    numeric = {pd.api.types.is_numeric_dtype(f[column]) for f in frames}
    if len(numeric) < 2:
        return frames
    return [f.assign(**{column: f[column].astype("str")}) for f in frames]


def _part_files(spec: dict[str, Any]) -> dict[str, str] | None:
    """`files` as {part: file} in train/val/test order; None when `path` is used instead."""
    path, files = spec.get("path"), spec.get("files")
    key = f"{KEY}.interactions.files"
    if path is not None and files is not None:
        raise ConfigError(
            key,
            files,
            f"null when {KEY}.interactions.path is set: one file (path) or one per part (files)",
        )
    if path is None and files is None:
        raise ConfigError(
            f"{KEY}.interactions.path",
            None,
            f"a file, or set {key} instead: {{train: <file>, val: <file>, test: <file>}}",
        )
    if files is None:
        return None
    if spec.get("split") is not None:
        raise ConfigError(
            f"{KEY}.interactions.split",
            spec["split"],
            f"null when {key} is set (the files already say each row's part): use one or the other",
        )
    return _parts_of(files, key)


def _parts_of(files: Any, key: str) -> dict[str, str]:
    shape = "a mapping {train: <file>, val: <file>, test: <file>} (val optional)"
    if not isinstance(files, Mapping):
        raise ConfigError(key, files, shape)
    parts: dict[str, str] = {}
    for name, raw in files.items():
        part = PART_NAMES.get(str(name).strip().lower())
        if part is None:
            raise ConfigError(f"{key}.{name}", raw, f"a part name: {sorted(PART_NAMES)}")
        if part in parts:
            raise ConfigError(f"{key}.{name}", raw, f"one file per part: `{part}` is given twice")
        if not isinstance(raw, str) or not raw:
            raise ConfigError(f"{key}.{name}", raw, "a file path")
        parts[part] = raw
    missing = [p for p in ("train", "test") if p not in parts]
    if missing:
        raise ConfigError(key, dict(files), f"{shape}: {missing} missing")
    return {p: parts[p] for p in PARTS if p in parts}


def _mapping(value: Any, table: str, required: set[str]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{KEY}.{table}", value, f"a mapping with keys {sorted(required)}")
    plain = {str(k): _plain(v) for k, v in value.items()}
    missing = sorted(k for k in required if plain.get(k) is None)
    if missing:
        raise ConfigError(f"{KEY}.{table}", plain, f"the key(s) {missing} set")
    return plain


def _plain(value: Any) -> Any:
    """OmegaConf lists -> list, so the config is JSON-able."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def _kind(file: Path) -> str:
    suffixes = [s.lower() for s in file.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind not in (".csv", ".tsv", ".parquet", ".pq"):
        raise ConfigError(f"{KEY}.*.path", str(file), "a .csv, .tsv or .parquet file")
    return kind


def _read(file: Path, columns: list[str], roles: dict[str, str]) -> pd.DataFrame:
    """Only `columns` of `file`; a missing one is named with its mapping key and the columns that exist."""
    kind, unique = _kind(file), list(dict.fromkeys(columns))
    header = _header(file, kind)
    missing = [c for c in unique if c not in header]
    if missing:
        named = ", ".join(f"{c!r} (mapping key {roles.get(c, 'items.text')})" for c in missing)
        raise DataError(f"{file}: no column {named}; the file has columns {header}")
    if kind in (".parquet", ".pq"):
        # pandas restores a saved index (e.g. of a filtered frame): rows must be 0..n-1, aligned
        # with the converted columns and counted as the file's rows in error messages.
        return pd.read_parquet(file, columns=unique).reset_index(drop=True)
    # Ids stay strings in text files: "007" keeps its zeros and both files agree on type.
    id_roles = ("items.id", "interactions.user", "interactions.item")
    ids = {c: "str" for c in unique if roles.get(c) in id_roles}
    layout = Layout(tuple(unique), _sep(kind), header=True, required=())
    return read_table(file, layout, sep=layout.sep, usecols=unique, dtype=ids)


def _header(file: Path, kind: str) -> list[str]:
    try:
        if kind in (".parquet", ".pq"):
            return list(pq.read_schema(file).names)
        return list(pd.read_csv(file, sep=_sep(kind), nrows=0).columns)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise DataError(f"{file}: cannot read its header as {kind[1:]}: {err}") from err


def _sep(kind: str) -> str:
    return "\t" if kind == ".tsv" else ","


def _no_missing(column: pd.Series, file: Path) -> None:
    empty = column.isna()
    if empty.any():
        problem = f"is empty ({int(empty.sum())} such row(s))"
        raise _bad(file, column, empty, "a value in every row", problem)


def _bad(
    file: Path, column: pd.Series, bad: pd.Series | np.ndarray, expected: str, problem: str = ""
) -> DataError:
    """The error naming the first True of `bad`: its line in a text file (header = line 1),
    its row in a Parquet file, the column and the value."""
    row = int(np.argmax(np.asarray(bad)))
    value = column.iloc[row]
    value = "" if pd.isna(value) else value
    name = str(column.name)
    if _kind(file) in (".parquet", ".pq"):
        return bad_value(file, None, name, value, expected, problem, row=row + 1)
    layout = Layout((), _sep(_kind(file)), header=True)
    line = line_of(file, layout, row)
    if line is None:  # a file that cannot be scanned: the data row is still exact
        return bad_value(file, None, name, value, expected, f"{problem} (data row {row + 1})")
    return bad_value(file, line, name, value, expected, problem)


def to_parts(column: pd.Series, file: Path) -> pd.Series:
    """A split column -> "train" | "val" | "test" (names in PART_NAMES)."""
    parts = column.astype("str").str.strip().str.lower().map(PART_NAMES)
    unknown = parts.isna()
    if unknown.any():
        raise _bad(file, column, unknown, f"one of {sorted(PART_NAMES)}", "is not a split name")
    return parts.reset_index(drop=True)


def to_seconds(column: pd.Series, time_format: str | None, file: Path) -> pd.Series:
    """A time column -> int64 unix seconds (rules in the module docstring)."""
    if time_format in ("s", "ms"):
        numbers = _numbers(column, file)
        return _unix(numbers, 1000 if time_format == "ms" else 1)
    if time_format is None and _mostly_numbers(column):
        numbers = _numbers(column, file)
        largest = float(np.abs(numbers).max())
        if largest >= TOO_FINE:
            raise DataError(
                f"{file}: column {column.name!r} holds times up to {largest:.0f}, beyond "
                f"milliseconds (micro/nanoseconds?); convert it to seconds or milliseconds"
            )
        return _unix(numbers, 1000 if largest >= MS_FROM else 1)
    return _datetimes(column, time_format, file)


def _mostly_numbers(column: pd.Series) -> bool:
    """Numbers, or text more than half of which reads as numbers (pandas reads a column of unix
    times with one typo as text: the typo is then the error, not the valid first value)."""
    if pd.api.types.is_numeric_dtype(column):
        return True
    if not (pd.api.types.is_object_dtype(column) or pd.api.types.is_string_dtype(column)):
        return False  # datetimes
    return bool(pd.to_numeric(column, errors="coerce").notna().mean() > 0.5)


def _numbers(column: pd.Series, file: Path) -> pd.Series:
    numbers = pd.to_numeric(column, errors="coerce")
    if numbers.isna().any():
        raise _bad(file, column, numbers.isna(), "unix seconds or milliseconds", "is not a number")
    return numbers


def _unix(numbers: pd.Series, per_second: int) -> pd.Series:
    return (numbers // per_second).astype("int64").reset_index(drop=True)


def _datetimes(column: pd.Series, time_format: str | None, file: Path) -> pd.Series:
    # Without a format: ISO 8601 first (dates and date-times may mix), then pandas' inference
    # from the first value (month first for "01/02/2020": set time_format for day first).
    formats = [time_format] if time_format else ["ISO8601", None]
    for fmt in formats:
        try:
            times = pd.to_datetime(column, format=fmt, utc=True, errors="coerce")
        except (ValueError, TypeError) as err:
            raise DataError(f"{file}: column {column.name!r}: not datetimes ({err})") from err
        if not times.isna().any():
            break
    if times.isna().any():
        shown = f"format {time_format!r}" if time_format else "a date/time pandas can read"
        expected = f"{shown} (set {KEY}.interactions.time_format)"
        raise _bad(file, column, times.isna(), expected, "is not a time")
    # Subtracting the epoch is independent of the resolution (s/ms/us/ns) pandas picked.
    seconds = (times - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    return seconds.astype("int64").reset_index(drop=True)
