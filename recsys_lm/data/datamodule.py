"""The LightningDataModule: a thin layer that turns a `PreparedData` into loaders."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers.trainer_pt_utils import LengthGroupedSampler

from recsys_lm.data.prepared import PreparedData, prepare
from recsys_lm.data.settings import DataSettings
from recsys_lm.data.task import Task


class RecDataModule(L.LightningDataModule):
    """Prepares the data once (`setup`) and serves the task's datasets as loaders."""

    def __init__(
        self, source: Any, settings: DataSettings, task: Task, tokenizer: Any, max_length: int
    ) -> None:
        super().__init__()
        self.source, self.settings, self.task = source, settings, task
        self.tokenizer, self.max_length = tokenizer, max_length
        self.data: PreparedData | None = None

    def prepare_data(self) -> None:
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = prepare(
                self.source, self.settings, self.task, self.tokenizer, self.max_length
            )

    # -- loaders ----------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, batch_size: int, sampler=None) -> DataLoader:
        workers = self.settings.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=dataset.collate,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.data.datasets["train"]
        # A seeded generator: each epoch draws a new order, the same on every rerun.
        generator = torch.Generator().manual_seed(self.settings.seed)
        if self.settings.length_grouping:
            # Batches of similar length waste less compute on padding; order stays random.
            sampler = LengthGroupedSampler(
                self.settings.batch_size, lengths=dataset.lengths(), generator=generator
            )
        else:
            sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
        return self._loader(dataset, self.settings.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data.datasets["val"], self.settings.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.data.datasets["test"], self.settings.eval_batch_size)

    def item_dataloader(self) -> DataLoader:
        return self._loader(self.data.items, self.settings.eval_batch_size)
