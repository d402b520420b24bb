"""A user's own interactions and items (CSV, TSV or Parquet), described by a column mapping.

    interactions: {path, user, item, time, rating?, label?, behaviour?, time_format?}
    items:        {path, id, text: [column, ...]}

Paths are absolute or relative to data.root; the suffix picks the reader (.csv, .tsv,
.parquet; .gz/.bz2/.zip/.xz/.zst after .csv/.tsv are decompressed). Times become int64
unix seconds:
  * numbers: unix seconds, or milliseconds when the largest absolute value is >= 1e11
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
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from recsys_lm.data.canonical import CanonicalData
from recsys_lm.data.download import resolve_root
from recsys_lm.errors import ConfigError, DataError

INTERACTION_KEYS = {"path", "user", "item", "time"}  # required
OPTIONAL_KEYS = {"rating", "label", "behaviour", "time_format"}
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
        if set(self.items) - ITEM_KEYS:
            raise ConfigError(f"{KEY}.items", sorted(set(self.items) - ITEM_KEYS), "path, id, text")
        if self.unknown_items not in ("error", "drop"):
            raise ConfigError(f"{KEY}.unknown_items", self.unknown_items, "`error` or `drop`")

    def prepare(self) -> None:
        """Nothing to download: the files are the user's."""

    def raw_files(self) -> list[Path]:
        return [self._file("interactions"), self._file("items")]

    def load(self) -> CanonicalData:
        interactions, items = _same_id_type(self._interactions(), self._items())
        known = interactions["item_id"].isin(items["item_id"])
        dropped: dict[str, int] = {}
        if not known.all():
            interactions = self._unknown(interactions, known)
            dropped["unknown item"] = int((~known).sum())
        return CanonicalData(self.name, items, interactions, dropped=dropped)

    def _file(self, table: str) -> Path:
        raw = getattr(self, table)["path"]
        path = Path(str(raw)).expanduser()
        if not path.is_absolute():
            path = resolve_root(self.root) / path
        if not path.is_file():
            raise DataError(f"{path}: no such file (from {KEY}.{table}.path = {raw!r})")
        return path

    def _items(self) -> pd.DataFrame:
        spec, file = self.items, self._file("items")
        frame = _read(file, [spec["id"], *spec["text"]], {spec["id"]: "items.id"})
        ids = frame[spec["id"]]
        _no_missing(ids, file, spec["id"])
        if ids.duplicated().any():
            raise DataError(
                f"{file}: column {spec['id']!r} repeats item id {ids[ids.duplicated()].iloc[0]!r}"
            )
        # Missing text is an empty string, so templates never render "nan".
        text = {c: frame[c].astype("str").where(frame[c].notna(), "") for c in spec["text"]}
        return pd.DataFrame({"item_id": ids, **text}).reset_index(drop=True)

    def _interactions(self) -> pd.DataFrame:
        spec, file = self.interactions, self._file("interactions")
        wanted = {k: spec.get(k) for k in ("user", "item", "time", "rating", "label", "behaviour")}
        wanted = {k: v for k, v in wanted.items() if v is not None}
        frame = _read(
            file, list(wanted.values()), {v: f"interactions.{k}" for k, v in wanted.items()}
        )
        for key in ("user", "item", "time"):
            _no_missing(frame[spec[key]], file, spec[key])
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
        return out

    def _unknown(self, interactions: pd.DataFrame, known: pd.Series) -> pd.DataFrame:
        if self.unknown_items == "drop":
            return interactions[known].reset_index(drop=True)
        bad = interactions.loc[~known, "item_id"]
        raise DataError(
            f"{self._file('interactions')}: {len(bad)} interaction(s) name item ids absent from "
            f"{self._file('items')} (first: {bad.iloc[0]!r}, data row {bad.index[0] + 1}); set "
            f"{KEY}.unknown_items=drop to drop them (they are counted in `dropped`)"
        )


def _same_id_type(
    interactions: pd.DataFrame, items: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Parquet keeps types: int ids in one file and string ids in the other compare as strings."""
    numeric = pd.api.types.is_numeric_dtype
    if numeric(interactions["item_id"]) == numeric(items["item_id"]):
        return interactions, items
    as_text = {"item_id": lambda f: f["item_id"].astype("str")}
    return interactions.assign(**as_text), items.assign(**as_text)


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
        return pd.read_parquet(file, columns=unique)
    # Ids stay strings in text files: "007" keeps its zeros and both files agree on type.
    id_roles = ("items.id", "interactions.user", "interactions.item")
    ids = {c: "str" for c in unique if roles.get(c) in id_roles}
    try:
        return pd.read_csv(file, sep=_sep(kind), usecols=unique, dtype=ids)
    except (ValueError, pd.errors.ParserError) as err:
        raise DataError(f"{file}: could not parse columns {unique}: {err}") from err


def _header(file: Path, kind: str) -> list[str]:
    try:
        if kind in (".parquet", ".pq"):
            return list(pq.read_schema(file).names)
        return list(pd.read_csv(file, sep=_sep(kind), nrows=0).columns)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise DataError(f"{file}: cannot read its header as {kind[1:]}: {err}") from err


def _sep(kind: str) -> str:
    return "\t" if kind == ".tsv" else ","


def _no_missing(column: pd.Series, file: Path, name: str) -> None:
    empty = column.isna()
    if empty.any():
        raise DataError(
            f"{file}: column {name!r} is empty in {int(empty.sum())} row(s) (first: data row "
            f"{int(np.argmax(empty.to_numpy())) + 1})"
        )


def to_seconds(column: pd.Series, time_format: str | None, file: Path) -> pd.Series:
    """A time column -> int64 unix seconds (rules in the module docstring)."""
    if time_format in ("s", "ms"):
        numbers = _numbers(column, file)
        return _unix(numbers, 1000 if time_format == "ms" else 1)
    if time_format is None and pd.api.types.is_numeric_dtype(column):
        numbers = _numbers(column, file)
        largest = float(np.abs(numbers).max())
        if largest >= TOO_FINE:
            raise DataError(
                f"{file}: column {column.name!r} holds times up to {largest:.0f}, beyond "
                f"milliseconds (micro/nanoseconds?); convert it to seconds or milliseconds"
            )
        return _unix(numbers, 1000 if largest >= MS_FROM else 1)
    return _datetimes(column, time_format, file)


def _numbers(column: pd.Series, file: Path) -> pd.Series:
    numbers = pd.to_numeric(column, errors="coerce")
    if numbers.isna().any():
        row = int(np.argmax(numbers.isna().to_numpy()))
        raise DataError(
            f"{file}: column {column.name!r}, data row {row + 1}: {column.iloc[row]!r} is not "
            f"a unix time in numbers"
        )
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
        row = int(np.argmax(times.isna().to_numpy()))
        expected = f"format {time_format!r}" if time_format else "a date/time pandas can read"
        raise DataError(
            f"{file}: column {column.name!r}, data row {row + 1}: {column.iloc[row]!r} is not "
            f"{expected}; set {KEY}.interactions.time_format"
        )
    # Subtracting the epoch is independent of the resolution (s/ms/us/ns) pandas picked.
    seconds = (times - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    return seconds.astype("int64").reset_index(drop=True)
