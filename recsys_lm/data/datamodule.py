"""The LightningDataModule: a source in canonical form -> filter -> split -> tokens -> loaders."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from transformers.trainer_pt_utils import LengthGroupedSampler

from recsys_lm.data.cache import CachedSource
from recsys_lm.data.canonical import CanonicalData
from recsys_lm.data.examples import ItemSet
from recsys_lm.data.filters import k_core
from recsys_lm.data.negatives import NegativeSampler
from recsys_lm.data.split import Split, make_split
from recsys_lm.data.tasks import TASKS
from recsys_lm.data.text import TokenCache, render
from recsys_lm.errors import ConfigError

log = logging.getLogger(__name__)
EVAL_MODES = ("full", "sampled")
SPLIT_ATTRS = ("rating", "behaviour")  # interaction columns carried through the split


class RecDataModule(L.LightningDataModule):
    """Builds the samples a head's task needs from any source with `prepare()` and `load()`."""

    def __init__(
        self,
        source: Any,
        tokenizer: Any,
        task: str,
        item_template: str = "{title}",
        history_template: str = "{title}",
        max_item_tokens: int = 32,
        max_history_tokens: int = 64,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        train_negatives: int = 1,
        eval_negatives: int = 99,
        eval_mode: str = "full",
        k: int = 10,
        num_workers: int = 0,
        seed: int = 0,
        root: str | None = None,
        split: dict | None = None,
        filter: dict | None = None,  # noqa: A002 - the config key's name
        negatives: dict | None = None,
        length_grouping: bool = False,
        use_cache: bool = True,
        cache_dir: str = "~/.cache/recsys_lm",
    ) -> None:
        """`root` is the datasets folder; sources read it through `${data.root}`."""
        super().__init__()
        self._check_task(task, eval_mode)
        self.source, self.tokenizer, self.task = source, tokenizer, task
        self.item_template, self.history_template = item_template, history_template
        self.max_item_tokens, self.max_history_tokens = max_item_tokens, max_history_tokens
        self.max_length = max_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.train_negatives, self.eval_negatives = train_negatives, eval_negatives
        self.eval_mode, self.k = eval_mode, k
        self.num_workers, self.seed = num_workers, seed
        self.split_options = {"method": "leave_one_out", **(split or {})}
        self.filter_options = {
            "min_user_interactions": 0,
            "min_item_interactions": 0,
            **(filter or {}),
        }
        self.negative_options = {"sampler": "uniform", "alpha": 0.75, **(negatives or {})}
        self.length_grouping = length_grouping
        self.use_cache, self.cache_dir = use_cache, cache_dir
        self._check_lengths()
        self.data: CanonicalData | None = None
        self.split: Split | None = None

    @staticmethod
    def _check_task(task: str, eval_mode: str) -> None:
        if task not in TASKS:
            raise ConfigError("head.task", task, f"one of {list(TASKS)}")
        if eval_mode not in EVAL_MODES:
            raise ConfigError("data.eval_mode", eval_mode, f"one of {list(EVAL_MODES)}")
        allowed = TASKS[task].eval_modes
        if eval_mode not in allowed:
            why = f" ({TASKS[task].why})" if TASKS[task].why else ""
            raise ConfigError(
                "data.eval_mode", eval_mode, f"one of {list(allowed)} for task `{task}`{why}"
            )

    def _check_lengths(self) -> None:
        need = self.max_history_tokens + self.max_item_tokens + 4
        if need > self.max_length:
            raise ConfigError(
                "data.max_history_tokens",
                self.max_history_tokens,
                f"max_history_tokens + max_item_tokens + special tokens <= backbone.max_length "
                f"({self.max_length}); got {need}",
            )

    def prepare_data(self) -> None:
        self.source.prepare()

    # -- setup ------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        source = CachedSource(self.source, self.cache_dir) if self.use_cache else self.source
        self.data = source.load()
        interactions, self.filtered = k_core(
            self.data.interactions,
            self.filter_options["min_user_interactions"],
            self.filter_options["min_item_interactions"],
        )
        if interactions.empty:
            raise ConfigError(
                "data.filter",
                self.filter_options,
                f"thresholds that leave some of {self.data.name}'s interactions",
            )
        items = self.data.items.reset_index(drop=True)
        self.item_ids = items["item_id"].to_numpy()
        item_index = pd.Series(np.arange(len(items)), index=items["item_id"])
        users = pd.Index(interactions["user_id"].unique())
        frame = pd.DataFrame(
            {
                "user": users.get_indexer(interactions["user_id"]),
                "item": item_index.loc[interactions["item_id"]].to_numpy(),
                "timestamp": interactions["timestamp"].to_numpy(),
                # Per-interaction targets some tasks read (rating, behaviour heads; TALLRec).
                **{c: interactions[c].to_numpy() for c in SPLIT_ATTRS if c in interactions.columns},
            }
        )
        self.user_ids, self.num_items = users.to_numpy(), len(items)
        options = {k: v for k, v in self.split_options.items() if k != "method"}
        self.split = make_split(
            frame, len(users), self.split_options["method"], **{"seed": self.seed, **options}
        )
        self.cache = TokenCache(
            self.tokenizer,
            render(items, self.item_template, "data.item_template"),
            render(items, self.history_template, "data.history_template"),
            self.max_item_tokens,
            cache_dir=self.cache_dir if self.use_cache else None,
        )
        self.item_counts = self.split.counts(self.num_items)
        self.sampler = self._sampler(item_index, users)
        self.datasets = {s: self._dataset(s) for s in ("train", "val", "test")}
        self.items_set = ItemSet(self.num_items, self.cache)

    def _sampler(self, item_index: pd.Series, users: pd.Index) -> NegativeSampler:
        impressions, shown_with = {}, {}
        if self.negative_options["sampler"] == "native" and self.data.impressions is not None:
            impressions, shown_with = _impression_maps(self.data, item_index, users)
        return NegativeSampler(
            self.num_items,
            self.negative_options["sampler"],
            self.item_counts,
            self.negative_options["alpha"],
            impressions,
            shown_with,
        )

    def _dataset(self, stage: str):
        return TASKS[self.task].build(self, stage)

    # -- loaders ----------------------------------------------------------------------------
    def _loader(self, dataset, batch_size: int, sampler=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=dataset.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        # A seeded generator: each epoch draws a new order, the same on every rerun.
        generator = torch.Generator().manual_seed(self.seed)
        if self.length_grouping:
            # Batches of similar length waste less compute on padding; order stays random.
            sampler = LengthGroupedSampler(
                self.batch_size, lengths=dataset.lengths(), generator=generator
            )
        else:
            sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
        return self._loader(dataset, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["val"], self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"], self.eval_batch_size)

    def item_dataloader(self) -> DataLoader:
        return self._loader(self.items_set, self.eval_batch_size)

    def protocol(self) -> dict:
        """How the reported metrics were obtained; written into metrics.json."""
        sampled = f"sampled-{self.eval_negatives}"
        return {
            "dataset": self.source.name,
            "split": self.split.description,
            "split_method": self.split_options["method"],
            "eval_mode": "full" if self.eval_mode == "full" else sampled,
            "negatives": {"sampler": self.negative_options["sampler"], **self.sampler.drawn},
            "k": self.k,
            "exclude_seen": self.task == "retrieval" and self.eval_mode == "full",
            "task": self.task,
            "users": int(len(self.user_ids)),
            "items": int(self.num_items),
            "interactions": int(
                sum(map(len, self.split.train))
                + sum(map(len, self.split.val))
                + sum(map(len, self.split.test))
            ),
            "eval_users": {s: len(self.split.eval_users(s)) for s in ("val", "test")},
            "cold_items": len(self.split.cold_items),
            "filter": dict(self.filter_options),
            "dropped": {**self.data.dropped, **self.filtered},
        }


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
