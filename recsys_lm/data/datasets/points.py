"""Pointwise tasks: one row per interaction, with a value to predict (rating, behaviour).

`rating` regresses the interaction's explicit rating. `behaviour` classifies the interaction's
behaviour type: the `behaviour` column where a dataset has one (e.g. view / click / buy), else
a rating bucket (e.g. 1-2 negative, 3 neutral, 4-5 positive; `data.behaviour`).

The target space (rating statistics, class names) is computed once from the split, before any
dataset is built, and shared by the datasets, the head (`attach`), the baselines and the
protocol written to metrics.json. Nothing is ranked: every held-out interaction is one
prediction (eval_mode `pointwise`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from recsys_lm.data.batches import PairBatch
from recsys_lm.data.datasets.examples import pair_batch
from recsys_lm.data.settings import BehaviourSettings
from recsys_lm.data.split import PARTS, Split
from recsys_lm.data.text import TokenCache
from recsys_lm.errors import ConfigError

BEHAVIOUR_SOURCES = ("auto", "behaviour", "rating")
IMPLICIT = "head=click or head=retrieval (implicit feedback)"


@dataclass(frozen=True)
class RatingTargets:
    """Explicit ratings, regressed as they are (the head standardises with mean and std)."""

    mean: float  # over training ratings
    std: float  # over training ratings; 1.0 when they are all equal
    low: float  # smallest training rating: predictions are clamped to [low, high]
    high: float  # largest training rating
    missing: int  # interactions without a rating (left out of every stage)
    column: str = "rating"
    dtype: torch.dtype = torch.float32

    def encode(self, value: Any) -> float | None:
        return None if _missing(value) else float(value)

    def protocol(self) -> dict:
        return {
            "target": "rating",
            "source": "`rating` column",
            "train_mean": round(self.mean, 4),
            "train_std": round(self.std, 4),
            "range": [self.low, self.high],
            "missing": self.missing,
        }


@dataclass(frozen=True)
class BehaviourTargets:
    """Behaviour classes: values of the `behaviour` column, or buckets of the rating."""

    classes: tuple[str, ...]
    column: str  # the split attribute read: "behaviour" or "rating"
    bounds: tuple[float, ...]  # rating buckets: class c holds bounds[c-1] <= rating < bounds[c]
    train_counts: tuple[int, ...]  # training interactions per class (class weights, protocol)
    missing: int  # interactions without a value (left out of every stage)
    dtype: torch.dtype = torch.long

    def encode(self, value: Any) -> int | None:
        if _missing(value):
            return None
        if self.column == "rating":
            return int(np.searchsorted(self.bounds, float(value), side="right"))
        return self.classes.index(str(value))

    def protocol(self) -> dict:
        source = (
            "`behaviour` column"
            if self.column == "behaviour"
            else f"rating buckets (lower bounds {list(self.bounds)})"
        )
        return {
            "target": "behaviour",
            "source": source,
            "classes": list(self.classes),
            "train_counts": dict(zip(self.classes, self.train_counts, strict=True)),
            "missing": self.missing,
        }


Targets = RatingTargets | BehaviourTargets


def _missing(value: Any) -> bool:
    return bool(pd.isna(value))


def _values(split: Split, column: str, parts: tuple[str, ...] = PARTS) -> list:
    return [
        v
        for part in parts
        for user in range(len(split.train))
        for v in split.attr(column, user, part)
    ]


def rating_targets(split: Split, dataset: str, columns: list[str]) -> RatingTargets:
    """The rating target space of `split`; `dataset` and its interaction `columns` name what
    is missing in errors."""
    name = dataset
    if "rating" not in split.attrs:
        raise ConfigError(
            "head",
            "rating",
            f"a dataset with explicit ratings; `{name}` has no `rating` column (its "
            f"interactions have {columns}): use {IMPLICIT}, or data with ratings (e.g. "
            "data=movielens_100k, or data=custom with data.source.interactions.rating)",
        )
    train = np.array([v for v in _values(split, "rating", ("train",)) if not _missing(v)])
    if len(train) == 0:
        raise ConfigError(
            "head",
            "rating",
            f"a dataset with explicit ratings; `{name}`'s training ratings are all missing",
        )
    std = float(train.std())
    return RatingTargets(
        mean=float(train.mean()),
        std=std if std > 0 else 1.0,
        low=float(train.min()),
        high=float(train.max()),
        missing=sum(_missing(v) for v in _values(split, "rating")),
    )


def behaviour_targets(
    split: Split, options: BehaviourSettings, dataset: str, columns: list[str]
) -> BehaviourTargets:
    """The behaviour classes of `split` (data.behaviour: `options`); `dataset` and its
    interaction `columns` name what is missing in errors."""
    column = _behaviour_column(split, options.column, dataset, columns)
    if column == "behaviour":
        present = {str(v) for v in _values(split, column) if not _missing(v)}
        classes, bounds = tuple(sorted(present)), ()
        if not classes:
            raise ConfigError(
                "head", "behaviour", f"behaviour values; `{dataset}`'s are all missing"
            )
    else:
        classes, bounds = _buckets(options.rating_bounds, options.rating_classes)
    targets = BehaviourTargets(classes, column, bounds, (), 0)
    train = [targets.encode(v) for v in _values(split, column, ("train",))]
    counts = np.bincount([c for c in train if c is not None], minlength=len(classes))
    missing = sum(_missing(v) for v in _values(split, column))
    return BehaviourTargets(classes, column, bounds, tuple(int(c) for c in counts), missing)


def _behaviour_column(split: Split, wanted: str, dataset: str, columns: list[str]) -> str:
    """`auto`: the behaviour column where there is one, else the rating (buckets)."""
    if wanted not in BEHAVIOUR_SOURCES:
        raise ConfigError("data.behaviour.column", wanted, f"one of {list(BEHAVIOUR_SOURCES)}")
    have = [c for c in ("behaviour", "rating") if c in split.attrs]
    if wanted == "auto" and have:
        return have[0]
    if wanted in have:
        return wanted
    has = f"(its interactions have {columns})"
    if wanted == "auto":
        raise ConfigError(
            "head",
            "behaviour",
            "a dataset with a `behaviour` column, or a `rating` column to bucket; "
            f"`{dataset}` has neither {has}: use {IMPLICIT}",
        )
    instead = "data.behaviour.column=auto" if have else IMPLICIT
    raise ConfigError(
        "data.behaviour.column",
        wanted,
        f"a column the data has; `{dataset}` has no `{wanted}` column {has}: use {instead}",
    )


def _buckets(bounds: list, names: list) -> tuple[tuple[str, ...], tuple[float, ...]]:
    bounds, names = [float(b) for b in bounds], [str(n) for n in names]
    if any(a >= b for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ConfigError("data.behaviour.rating_bounds", bounds, "strictly increasing numbers")
    if len(names) != len(bounds) + 1:
        raise ConfigError(
            "data.behaviour.rating_classes",
            names,
            f"one name per bucket: {len(bounds) + 1} for rating_bounds {bounds}",
        )
    return tuple(names), tuple(bounds)


class PointSet(Dataset):
    """(user, history, item, target) rows -> PairBatch ("history [SEP] item", label = target).

    Training: every training interaction with a target, its history the user's earlier
    training items. Validation/test: every held-out interaction with a target, its history
    `Split.history(user, stage)`. Histories are sliced when a row is read, not stored.
    """

    def __init__(
        self, split: Split, stage: str, targets: Targets, cache: TokenCache, budget: int
    ) -> None:
        self.targets, self.cache, self.budget = targets, cache, budget
        # (user, source, cut, item, target): history = source[:cut]
        self.rows: list[tuple[int, list[int], int, int, float | int]] = []
        if stage == "train":
            for user, seq in enumerate(split.train):
                self._add(user, seq, seq, split.attr(targets.column, user, "train"), False)
        else:
            for user in split.eval_users(stage):
                values = split.attr(targets.column, user, stage)
                self._add(
                    user, split.history(user, stage), split.targets(user, stage), values, True
                )

    def _add(self, user: int, source: list[int], items: list[int], values: list, held_out: bool):
        for position, (item, value) in enumerate(zip(items, values, strict=True)):
            target = self.targets.encode(value)
            if target is not None:
                cut = len(source) if held_out else position
                self.rows.append((user, source, cut, item, target))

    def __len__(self) -> int:
        return len(self.rows)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user, item, target) of every row, for baselines fitted on the same rows."""
        users, items, targets = zip(*((r[0], r[3], r[4]) for r in self.rows), strict=True)
        return np.asarray(users), np.asarray(items), np.asarray(targets)

    def __getitem__(self, index: int) -> tuple[int, list[int], int, float | int]:
        user, source, cut, item, target = self.rows[index]
        return user, source[:cut], item, target

    def lengths(self) -> list[int]:
        return [
            len(self.cache.history(source[:cut], self.budget)) + len(self.cache.item_ids[item])
            for _, source, cut, item, _ in self.rows
        ]

    def collate(self, rows) -> PairBatch:
        return pair_batch(rows, self.cache, self.budget, self.targets.dtype)
