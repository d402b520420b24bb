"""Prepared data: a source in canonical form -> filter -> split -> token cache -> task datasets.

`prepare(source, settings, task, tokenizer)` runs the pipeline once and returns a
`PreparedData`: what the task builders, the baselines, export and serving receive (never the
DataModule, which only turns it into loaders).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from torch.utils.data import Dataset

from recsys_lm.data.appended import append_interactions
from recsys_lm.data.cache import CachedSource
from recsys_lm.data.canonical import CanonicalData
from recsys_lm.data.datasets.examples import ItemSet, RankingSet
from recsys_lm.data.filters import k_core
from recsys_lm.data.negatives import NegativeSampler
from recsys_lm.data.settings import DataSettings
from recsys_lm.data.split import Split, make_split
from recsys_lm.data.task import Task
from recsys_lm.data.text import TokenCache, render
from recsys_lm.errors import ConfigError, DataError

log = logging.getLogger(__name__)
# Interaction columns carried through the split: targets some tasks read (rating, behaviour
# heads; TALLRec) and a source's own split (`part`, data.split.method=predefined).
SPLIT_ATTRS = ("rating", "behaviour")
STAGES = ("train", "val", "test")
# A prequential split's test rows whose item is new (first seen in the tested window), for
# models and baselines alike: ranked among all items (datasets[NEW_ITEMS], metrics.json
# `test_new_items`) and among the new items only (NEW_AMONG_NEW: the cold-start question).
NEW_ITEMS = "test_new_items"
NEW_AMONG_NEW = "test_new_items_among_new"
EXTRA_TESTS = (NEW_ITEMS, NEW_AMONG_NEW)


@dataclass
class PreparedData:
    """One dataset, filtered, split and tokenized for one task."""

    settings: DataSettings
    task: Task
    eval_mode: str  # data.eval_mode, or the task's default
    data: CanonicalData
    split: Split
    item_ids: np.ndarray  # item index -> the source's item id
    user_ids: np.ndarray  # user index -> the source's user id
    tokens: TokenCache
    sampler: NegativeSampler
    item_counts: np.ndarray  # training interactions per item
    filtered: dict[str, int]  # rows the k-core filter removed
    targets: Any = None  # pointwise tasks' target space (Task.targets)
    datasets: dict[str, Dataset] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.data.name

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def seed(self) -> int:
        return self.settings.seed

    @property
    def k(self) -> int:
        return self.settings.k

    @property
    def items(self) -> ItemSet:
        """The whole catalogue as a dataset of item texts (item embeddings, serving)."""
        return ItemSet(self.num_items, self.tokens)

    def user_index(self, user_id: Any) -> int:
        """Index of a source user id (as in the raw data)."""
        found = np.flatnonzero(self.user_ids == user_id)
        if not len(found):
            raise DataError(f"dataset `{self.name}`: no user {user_id!r}")
        return int(found[0])

    def history(self, user: int) -> list[int]:
        """Everything `user` interacted with, in time order (train, then val, then test): what
        a served model reads for the user's next item."""
        return self.split.train[user] + self.split.val[user] + self.split.test[user]

    def rank_items(self) -> list[int] | None:
        """Items allowed to compete in full ranking: `cold` keeps only items no training
        interaction mentions (the cold-start question: which new item will the user take?)."""
        if self.settings.eval_items == "all":
            return None
        if not self.split.cold_items:
            raise ConfigError(
                "data.eval_items",
                self.settings.eval_items,
                "`all` unless data.split.method=cold_start (this split has no cold items)",
            )
        return sorted(self.split.cold_items)

    def protocol(self) -> dict:
        """How the reported metrics were obtained; written into metrics.json. Ranking fields
        (k, negatives, excluded history) appear only where something is ranked."""
        settings, split, task = self.settings, self.split, self.task
        out: dict[str, Any] = {
            "dataset": self.name,
            "task": task.name,
            "split": split.description,
            "split_method": settings.split.method,
            "eval_mode": self._eval_mode_label(),
        }
        if task.ranked:
            out["k"] = settings.k
            out["negatives"] = {"sampler": settings.negatives.sampler, **self.sampler.drawn}
            out["exclude_seen"] = self.eval_mode == "full"
            out["ranked_items"] = "cold items only" if settings.eval_items == "cold" else "all"
        if task.protocol is not None:
            out.update(task.protocol(self))
        if self.targets is not None:
            out["targets"] = self.targets.protocol()
        parts = (split.train, split.val, split.test)
        out.update(
            {
                "monitor": f"val/{task.monitor_metric(settings.k)}",
                "users": int(len(self.user_ids)),
                "items": int(self.num_items),
                "interactions": int(sum(len(seq) for part in parts for seq in part)),
                "eval_users": {s: len(split.eval_users(s)) for s in ("val", "test")},
                "cold_items": len(split.cold_items),
                **self._prequential(),
                "filter": {
                    "min_user_interactions": settings.filter.min_user_interactions,
                    "min_item_interactions": settings.filter.min_item_interactions,
                },
                "dropped": {**self.data.dropped, **self.filtered},
            }
        )
        return out

    def _prequential(self) -> dict:
        """Rolling protocol: its windows, rows, the new items and their share of the rows."""
        if not self.split.prequential:
            return {}
        rows = {s: len(self.datasets[s]) for s in ("val", "test", NEW_ITEMS) if s in self.datasets}
        out = {
            "prequential": True,
            "rolling": self.split.details,
            "eval_rows": rows,
            "new_items": len(self.split.cold_items),  # what NEW_AMONG_NEW ranks among
        }
        if rows.get("test"):
            out["new_item_share"] = rows.get(NEW_ITEMS, 0) / rows["test"]
        return out

    def _eval_mode_label(self) -> str:
        if self.eval_mode == "sampled":
            return f"sampled-{self.settings.eval_negatives}"
        return self.eval_mode


def load_canonical(source: Any, settings: DataSettings) -> CanonicalData:
    """The source's canonical form, through the Parquet cache unless data.use_cache=false,
    plus data.new_interactions (a refresh's logged behaviour) when set."""
    data = CachedSource(source, settings.cache_dir).load() if settings.use_cache else source.load()
    if settings.new_interactions:
        data = append_interactions(data, settings.new_interactions)
    return data


def prepare(
    source: Any, settings: DataSettings, task: Task, tokenizer: Any, max_length: int
) -> PreparedData:
    """Run the pipeline for `task`: canonical data -> k-core -> split -> tokens -> datasets.
    `max_length` is the backbone's longest sequence: history + item + prompt must fit it."""
    settings.check_lengths(max_length)
    eval_mode = task.eval_mode(settings.eval_mode)
    data = load_canonical(source, settings)
    interactions, filtered = k_core(
        data.interactions,
        settings.filter.min_user_interactions,
        settings.filter.min_item_interactions,
    )
    if interactions.empty:
        raise ConfigError(
            "data.filter",
            vars(settings.filter),
            f"thresholds that leave some of {data.name}'s interactions",
        )
    items = data.items.reset_index(drop=True)
    item_index = pd.Series(np.arange(len(items)), index=items["item_id"])
    users = pd.Index(interactions["user_id"].unique())
    carried = [c for c in (*SPLIT_ATTRS, "part") if c in interactions.columns]
    frame = pd.DataFrame(
        {
            "user": users.get_indexer(interactions["user_id"]),
            "item": item_index.loc[interactions["item_id"]].to_numpy(),
            "timestamp": interactions["timestamp"].to_numpy(),
            **{c: interactions[c].to_numpy() for c in carried},
        }
    )
    split_options = {k: v for k, v in vars(settings.split).items() if k != "method"}
    split = make_split(
        frame, len(users), settings.split.method, **{"seed": settings.seed, **split_options}
    )
    tokens = TokenCache(
        tokenizer,
        render(items, settings.item_template, "data.item_template"),
        render(items, settings.history_template, "data.history_template"),
        settings.max_item_tokens,
        cache_dir=settings.cache_dir if settings.use_cache else None,
        prompt=settings.prompt,
    )
    settings.check_lengths(max_length, tokens.prompt_overhead)
    item_counts = split.counts(len(items))
    prepared = PreparedData(
        settings=settings,
        task=task,
        eval_mode=eval_mode,
        data=data,
        split=split,
        item_ids=items["item_id"].to_numpy(),
        user_ids=users.to_numpy(),
        tokens=tokens,
        sampler=_sampler(data, settings, item_counts, item_index, users),
        item_counts=item_counts,
        filtered=filtered,
    )
    if task.check is not None:
        task.check(prepared)
    if task.targets is not None:
        prepared.targets = task.targets(prepared)
    prepared.datasets = {stage: task.build(prepared, stage) for stage in STAGES}
    test = prepared.datasets["test"]
    if split.prequential and isinstance(test, RankingSet):
        prepared.datasets[NEW_ITEMS] = test.new_item_rows()
        prepared.datasets[NEW_AMONG_NEW] = test.new_item_rows(among_new=True)
    return prepared


def _sampler(
    data: CanonicalData,
    settings: DataSettings,
    item_counts: np.ndarray,
    item_index: pd.Series,
    users: pd.Index,
) -> NegativeSampler:
    impressions, shown_with = {}, {}
    if settings.negatives.sampler == "native" and data.impressions is not None:
        impressions, shown_with = _impression_maps(data, item_index, users)
    return NegativeSampler(
        len(item_index),
        settings.negatives.sampler,
        item_counts,
        settings.negatives.alpha,
        impressions,
        shown_with,
    )


def _impression_maps(data: CanonicalData, item_index: pd.Series, users: pd.Index):
    """impression id -> unclicked items shown; (user, clicked item) -> its impression id."""
    shown = data.impressions[data.impressions["item_id"].isin(item_index.index)]
    item = item_index.loc[shown["item_id"]].to_numpy()
    user = users.get_indexer(shown["user_id"])
    frame = pd.DataFrame(
        {
            "imp": shown["impression_id"].to_numpy(),
            "user": user,
            "item": item,
            "label": shown["label"].to_numpy(),
        }
    )
    frame = frame[frame["user"] >= 0]
    negatives = frame[frame["label"] == 0].groupby("imp")["item"].agg(list).to_dict()
    clicks = frame[frame["label"] == 1]
    shown_with = dict(
        zip(zip(clicks["user"], clicks["item"], strict=True), clicks["imp"], strict=True)
    )
    return negatives, shown_with
