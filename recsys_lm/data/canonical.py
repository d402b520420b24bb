"""The canonical form every source is turned into: users, items with text, timed interactions."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from recsys_lm.errors import DataError

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
OPTIONAL_INTERACTION_COLUMNS = ("rating", "label", "behaviour", "impression_id", "part")
# A source's own split (`data.split.method=predefined`): which part each interaction is in.
PARTS = ("train", "val", "test")
# Bump when the canonical form or its validation rules change: cached entries (validated when
# written, not on read) then miss instead of skipping the new rules.
VERSION = 2
LATEST_SECONDS = 4_102_444_800  # 2100-01-01: later "seconds" are almost always milliseconds


@dataclass
class CanonicalData:
    """One dataset in canonical form.

    items: `item_id` plus text columns (title, category, ...), one row per item.
    interactions: `user_id`, `item_id`, `timestamp` (int seconds) and optional
    `rating` / `label` / `behaviour` / `impression_id` / `part` (the source's own split:
    "train" | "val" | "test", used by `data.split.method=predefined`).
    users: `user_id` plus optional attributes; derived from interactions when absent.
    impressions: what was shown with what was clicked, where a source logs it (native negatives).
    dropped: how many raw rows each explicit policy removed, e.g. {"html title": 3155}.
    """

    name: str
    items: pd.DataFrame
    interactions: pd.DataFrame
    users: pd.DataFrame | None = None
    # Native candidate lists (MIND): impression_id, user_id, item_id, timestamp, label.
    impressions: pd.DataFrame | None = None
    # Rows a source dropped under an explicit policy: reason -> count (reported, never silent).
    dropped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()
        if self.users is None:
            self.users = pd.DataFrame({"user_id": self.interactions["user_id"].unique()})

    def validate(self) -> None:
        """Check columns, ids and types; the message names the dataset and the column."""
        where = f"dataset `{self.name}`"
        missing = [c for c in INTERACTION_COLUMNS if c not in self.interactions.columns]
        if missing:
            raise DataError(f"{where}: interactions lack column(s) {missing}")
        if "item_id" not in self.items.columns:
            raise DataError(f"{where}: items lack column 'item_id'")
        if self.interactions.empty:
            raise DataError(f"{where}: no interactions")
        if self.items["item_id"].duplicated().any():
            dup = self.items.loc[self.items["item_id"].duplicated(), "item_id"].iloc[0]
            raise DataError(f"{where}: items has duplicate item_id {_plain(dup)!r}")
        if not pd.api.types.is_integer_dtype(self.interactions["timestamp"]):
            raise DataError(
                f"{where}: column 'timestamp' must be integer seconds, "
                f"got {self.interactions['timestamp'].dtype}"
            )
        times = self.interactions["timestamp"]
        if times.min() < 0 or times.max() > LATEST_SECONDS:
            raise DataError(
                f"{where}: column 'timestamp' must be unix seconds between 1970 and 2100, got "
                f"{int(times.min())} .. {int(times.max())} (milliseconds? divide by 1000)"
            )
        self._validate_parts(where)
        known = self.interactions["item_id"].isin(self.items["item_id"])
        if not known.all():
            bad = self.interactions.loc[~known, "item_id"].iloc[0]
            raise DataError(
                f"{where}: {int((~known).sum())} interaction(s) name item ids absent from "
                f"the items table (first: {_plain(bad)!r})"
            )

    def _validate_parts(self, where: str) -> None:
        if "part" not in self.interactions.columns:
            return
        part = self.interactions["part"]
        bad = ~part.isin(PARTS)
        if bad.any():
            raise DataError(
                f"{where}: column 'part' holds {_plain(part[bad].iloc[0])!r} "
                f"({int(bad.sum())} row(s)); expected one of {list(PARTS)}"
            )

    @property
    def text_columns(self) -> list[str]:
        return [c for c in self.items.columns if c != "item_id"]


def _plain(value: object) -> object:
    """numpy scalars as plain Python values, so messages read `9`, not `np.int64(9)`."""
    return value.item() if hasattr(value, "item") else value


def latest_train_as_val(interactions: pd.DataFrame) -> pd.DataFrame:
    """For sources that ship train and test but no validation part (MovieLens-100K's folds, a
    custom split without a val file): each user's latest "train" interaction (file order
    breaks ties) becomes "val" when the user has another train interaction left."""
    train = interactions[interactions["part"] == "train"]
    ordered = train.sort_values(["user_id", "timestamp"], kind="stable")
    by_user = ordered.groupby("user_id", sort=False)
    last = (by_user.cumcount(ascending=False) == 0) & (by_user["item_id"].transform("size") > 1)
    part = interactions["part"].copy()
    part[last[last].index] = "val"
    return interactions.assign(part=part)
