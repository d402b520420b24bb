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
from recsys_lm.data.text import PromptText, TokenCache, render
from recsys_lm.errors import ConfigError

log = logging.getLogger(__name__)
# pointwise: one prediction per held-out interaction, nothing ranked (rating, behaviour heads).
EVAL_MODES = ("full", "sampled", "pointwise")
EVAL_ITEMS = ("all", "cold")
SPLIT_ATTRS = ("rating", "behaviour")  # interaction columns carried through the split
CLICK_LABELS = ("sampled", "rating")  # data.click_labels: sampled negatives | explicit ratings
# Splits whose parts are in time order per user (train, then val, then test): rating-labelled
# click samples read the interactions before them as history.
TIME_ORDERED_SPLITS = ("leave_one_out", "temporal")


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
        click_labels: str = "sampled",
        rating_threshold: float = 3.0,
        history_items: int | None = None,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        max_test_samples: int | None = None,
        prompt: dict | None = None,
        k: int = 10,
        num_workers: int = 0,
        seed: int = 0,
        root: str | None = None,
        split: dict | None = None,
        filter: dict | None = None,  # noqa: A002 - the config key's name
        negatives: dict | None = None,
        length_grouping: bool = False,
        max_sequence_length: int = 50,
        eval_items: str = "all",
        use_cache: bool = True,
        cache_dir: str = "~/.cache/recsys_lm",
        behaviour: dict | None = None,
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
        self.click_labels, self.rating_threshold = click_labels, rating_threshold
        self.history_items = history_items
        self.max_samples = {"train": max_train_samples, "val": max_val_samples}
        self.max_samples["test"] = max_test_samples
        self.prompt = PromptText(**(prompt or {}))
        self.num_workers, self.seed = num_workers, seed
        self.split_options = {"method": "leave_one_out", **(split or {})}
        self._check_click_labels()
        self.filter_options = {
            "min_user_interactions": 0,
            "min_item_interactions": 0,
            **(filter or {}),
        }
        self.negative_options = {"sampler": "uniform", "alpha": 0.75, **(negatives or {})}
        self.length_grouping = length_grouping
        self.max_sequence_length = max_sequence_length
        if eval_items not in EVAL_ITEMS:
            raise ConfigError("data.eval_items", eval_items, f"one of {list(EVAL_ITEMS)}")
        self.eval_items = eval_items
        self.use_cache, self.cache_dir = use_cache, cache_dir
        self._check_lengths()
        self.data: CanonicalData | None = None
        self.split: Split | None = None
        # Behaviour head: which column gives the classes (see data.behaviour in loader.yaml).
        self.behaviour_options = {
            "column": "auto",
            "rating_bounds": [3, 4],
            "rating_classes": ["negative", "neutral", "positive"],
            **(behaviour or {}),
        }
        self.targets = None  # pointwise tasks' target space (rating stats, classes), in setup

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

    def _check_lengths(self, prompt_tokens: int = 0) -> None:
        need = self.max_history_tokens + self.max_item_tokens + 4 + prompt_tokens
        if need > self.max_length:
            words = f" + data.prompt's {prompt_tokens} tokens" if prompt_tokens else ""
            raise ConfigError(
                "data.max_history_tokens",
                self.max_history_tokens,
                f"max_history_tokens + max_item_tokens + special tokens{words} <= "
                f"backbone.max_length ({self.max_length}); got {need}",
            )

    def _check_click_labels(self) -> None:
        if self.click_labels not in CLICK_LABELS:
            raise ConfigError("data.click_labels", self.click_labels, f"one of {CLICK_LABELS}")
        for stage, size in self.max_samples.items():
            if size is not None and size < 1:
                raise ConfigError(f"data.max_{stage}_samples", size, "a positive count or null")
        if self.history_items is not None and self.history_items < 1:
            raise ConfigError("data.history_items", self.history_items, "a positive count or null")
        method = self.split_options["method"]
        if self.click_labels == "rating" and method not in TIME_ORDERED_SPLITS:
            raise ConfigError(
                "data.split.method",
                method,
                f"one of {TIME_ORDERED_SPLITS} with data.click_labels=rating: a sample's history "
                "is the interactions before it in time",
            )

    def _check_ratings(self) -> None:
        if (
            self.task == "click"
            and self.click_labels == "rating"
            and "rating" not in self.split.attrs
        ):
            raise ConfigError(
                "data.click_labels",
                "rating",
                f"a dataset with explicit ratings; {self.data.name} has no rating column "
                "(use data.click_labels=sampled)",
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
            prompt=self.prompt,
        )
        self._check_lengths(self.cache.prompt_overhead)
        self._check_ratings()
        self.item_counts = self.split.counts(self.num_items)
        self.sampler = self._sampler(item_index, users)
        if TASKS[self.task].targets is not None:
            self.targets = TASKS[self.task].targets(self)
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

    def rank_items(self) -> list[int] | None:
        """Items allowed to compete in full ranking: `cold` keeps only items no training
        interaction mentions (the cold-start question: which new item will the user take?)."""
        if self.eval_items == "all":
            return None
        if not self.split.cold_items:
            raise ConfigError(
                "data.eval_items",
                self.eval_items,
                "`all` unless data.split.method=cold_start (this split has no cold items)",
            )
        return sorted(self.split.cold_items)

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
            "eval_mode": sampled if self.eval_mode == "sampled" else self.eval_mode,
            "negatives": {"sampler": self.negative_options["sampler"], **self.sampler.drawn},
            "k": self.k,
            "exclude_seen": self.task in ("retrieval", "sequential") and self.eval_mode == "full",
            "task": self.task,
            **(self._click_protocol() if self.task == "click" else {}),
            **({"targets": self.targets.protocol()} if self.targets is not None else {}),
            "users": int(len(self.user_ids)),
            "items": int(self.num_items),
            "interactions": int(
                sum(map(len, self.split.train))
                + sum(map(len, self.split.val))
                + sum(map(len, self.split.test))
            ),
            "eval_users": {s: len(self.split.eval_users(s)) for s in ("val", "test")},
            "cold_items": len(self.split.cold_items),
            "ranked_items": "cold items only" if self.eval_items == "cold" else "all",
            "filter": dict(self.filter_options),
            "dropped": {**self.data.dropped, **self.filtered},
        }

    def _click_protocol(self) -> dict:
        """Where click labels came from, and the sample counts when any were capped."""
        out: dict = {"click_labels": self.click_labels}
        if self.click_labels == "rating":
            # Every held-out rated interaction is a sample: nothing is sampled or ranked.
            out["eval_mode"] = f"rating>{self.rating_threshold:g}"
            out["history_items"] = self.history_items
            out["labels"] = (
                f"one sample per rated interaction of each part, positive when rating > "
                f"{self.rating_threshold:g}; history = the user's "
                f"{self.history_items or 'all'} previous interactions in time (any part); "
                "capped parts are seeded random subsets (TALLRec, Bao et al. 2023)"
            )
        if self.click_labels == "rating" or any(self.max_samples.values()):
            out["samples"] = {s: len(d) for s, d in self.datasets.items()}
            out["max_samples"] = dict(self.max_samples)
            out["positives"] = {s: int(d.labels.sum()) for s, d in self.datasets.items()}
        return out


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
