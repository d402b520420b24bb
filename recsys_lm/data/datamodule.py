"""The LightningDataModule: a source in canonical form -> split -> token cache -> loaders."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from recsys_lm.data.canonical import CanonicalData
from recsys_lm.data.examples import ClickSet, ItemSet, RankingSet, TwoTowerSet
from recsys_lm.data.split import Split, leave_one_out
from recsys_lm.data.text import TokenCache, render
from recsys_lm.errors import ConfigError

TASKS = ("click", "retrieval")


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
    ) -> None:
        """`root` is the datasets folder; sources read it through `${data.root}`."""
        super().__init__()
        if task not in TASKS:
            raise ConfigError("head.task", task, f"one of {list(TASKS)}")
        if eval_mode not in ("full", "sampled"):
            raise ConfigError("data.eval_mode", eval_mode, "`full` or `sampled`")
        if task == "retrieval" and eval_mode != "full":
            raise ConfigError(
                "data.eval_mode",
                eval_mode,
                "`full` for head=retrieval (it ranks the whole catalogue)",
            )
        if task == "click" and eval_mode != "sampled":
            raise ConfigError(
                "data.eval_mode",
                eval_mode,
                "`sampled` for head=click (a cross-encoder scores sampled "
                "candidates; use head=retrieval for full ranking)",
            )
        self.source, self.tokenizer, self.task = source, tokenizer, task
        self.item_template, self.history_template = item_template, history_template
        self.max_item_tokens, self.max_history_tokens = max_item_tokens, max_history_tokens
        self.max_length = max_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.train_negatives, self.eval_negatives = train_negatives, eval_negatives
        self.eval_mode, self.k = eval_mode, k
        self.num_workers, self.seed = num_workers, seed
        self._check_lengths()
        self.data: CanonicalData | None = None
        self.split: Split | None = None

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

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        self.data = self.source.load()
        items = self.data.items.reset_index(drop=True)
        self.item_ids = items["item_id"].to_numpy()
        item_index = pd.Series(np.arange(len(items)), index=items["item_id"])
        users = pd.Index(self.data.interactions["user_id"].unique())
        frame = pd.DataFrame(
            {
                "user": users.get_indexer(self.data.interactions["user_id"]),
                "item": item_index.loc[self.data.interactions["item_id"]].to_numpy(),
                "timestamp": self.data.interactions["timestamp"].to_numpy(),
            }
        )
        self.user_ids = users.to_numpy()
        self.num_items = len(items)
        self.split = leave_one_out(frame, len(users))
        self.cache = TokenCache(
            self.tokenizer,
            render(items, self.item_template, "data.item_template"),
            render(items, self.history_template, "data.history_template"),
            self.max_item_tokens,
        )
        self.item_counts = self.split.counts(self.num_items)
        self.datasets = {stage: self._dataset(stage) for stage in ("train", "val", "test")}
        self.items_set = ItemSet(self.num_items, self.cache)

    def _dataset(self, stage: str):
        budget, split = self.max_history_tokens, self.split
        if self.task == "click":
            if stage == "train":
                return ClickSet.for_training(
                    split, self.num_items, self.train_negatives, self.seed, self.cache, budget
                )
            return ClickSet.for_eval(
                split, stage, self.num_items, self.eval_negatives, self.seed, self.cache, budget
            )
        if stage == "train":
            return TwoTowerSet(split, self.cache, budget)
        return RankingSet(split, stage, self.num_items, self.cache, budget)

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=dataset.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["train"], self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["val"], self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"], self.eval_batch_size, shuffle=False)

    def item_dataloader(self) -> DataLoader:
        return self._loader(self.items_set, self.eval_batch_size, shuffle=False)

    def protocol(self) -> dict:
        """How the reported metrics were obtained; written into metrics.json."""
        return {
            "dataset": self.source.name,
            "split": "leave-one-out by time (last item test, second-to-last validation)",
            "eval_mode": "full" if self.eval_mode == "full" else f"sampled-{self.eval_negatives}",
            "k": self.k,
            "exclude_seen": self.task == "retrieval",
            "task": self.task,
            "users": int(len(self.user_ids)),
            "items": int(self.num_items),
            "interactions": int(len(self.data.interactions)),
            "eval_users": {s: len(self.split.eval_users(s)) for s in ("val", "test")},
        }
