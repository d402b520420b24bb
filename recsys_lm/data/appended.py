"""Interactions appended to a source's own: `data.new_interactions=<file>`.

`recsys_lm.refresh` collects the behaviour logged since a model was trained (the service's
event log, or a file) into one Parquet file and trains on the source plus that file. Any
table file works: `.parquet`, `.csv`, `.tsv` or `.jsonl`, with columns `user_id`, `item_id`
and `timestamp` (Unix seconds; fractions are dropped). Ids are read in the source's own id
type; an item the catalogue does not know is dropped and counted in `dropped` (the service
can log events for items added after the export; a model cannot rank them until an item
table holds their text).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from recsys_lm.data.canonical import INTERACTION_COLUMNS, CanonicalData
from recsys_lm.errors import DataError

READERS = {
    ".parquet": pd.read_parquet,
    ".csv": lambda path: pd.read_csv(path, dtype=str),
    ".tsv": lambda path: pd.read_csv(path, dtype=str, sep="\t"),
    ".jsonl": lambda path: pd.read_json(path, lines=True, dtype=False),
}
UNKNOWN_ITEM = "new interactions: item not in the catalogue"


def read_interactions(path: str | Path) -> pd.DataFrame:
    """`user_id`, `item_id`, `timestamp` rows of a table file (module doc)."""
    path = Path(path).expanduser()
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: a table file is .parquet, .csv, .tsv or .jsonl")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    frame = reader(path)
    missing = [c for c in INTERACTION_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: lacks column(s) {missing} (has {list(frame.columns)})")
    return frame[list(INTERACTION_COLUMNS)]


def append_interactions(data: CanonicalData, path: str | Path) -> CanonicalData:
    """`data` with the file's interactions added (ids cast to the source's types)."""
    new = read_interactions(path)
    base = data.interactions
    columns = {c: _cast(new[c], base[c].dtype, path, c) for c in ("user_id", "item_id")}
    columns["timestamp"] = seconds(new["timestamp"], path)
    new = pd.DataFrame(columns)
    known = new["item_id"].isin(data.items["item_id"])
    dropped = dict(data.dropped)
    if not known.all():
        dropped[UNKNOWN_ITEM] = dropped.get(UNKNOWN_ITEM, 0) + int((~known).sum())
    merged = pd.concat([base, new[known]], ignore_index=True)
    return dataclasses.replace(data, interactions=merged, users=None, dropped=dropped)


def _cast(values: pd.Series, dtype, path, column: str) -> pd.Series:
    if pd.api.types.is_integer_dtype(dtype):
        numbers = pd.to_numeric(values, errors="coerce")
        bad = numbers.isna() | (numbers != np.floor(numbers))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{path}, row {row + 1}, column '{column}': {values.iloc[row]!r} is not an "
                f"integer id (the source's ids are integers)"
            )
        return numbers.astype(dtype)
    return values.astype(str)


def seconds(values: pd.Series, path) -> pd.Series:
    """Unix seconds (fractions dropped); a value that is not a number is named by row."""
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.isna().any():
        row = int(np.flatnonzero(numbers.isna().to_numpy())[0])
        raise DataError(
            f"{path}, row {row + 1}, column 'timestamp': {values.iloc[row]!r} is not a "
            "number of seconds"
        )
    return np.floor(numbers).astype("int64")
