"""The LightningDataModule: a thin layer that turns a `PreparedData` into loaders.

Under DDP (or FSDP) the loaders shard the data themselves, one share per process (the
Trainer's `use_distributed_sampler` is off, conf/trainer/default.yaml):
  * training: every process draws the same seeded order of the epoch (ResumableLoader) and
    takes every world-th sample of it from its rank on (`RankShard`), the order padded by
    wrapping around so that every process runs the same number of steps;
  * evaluation: row i goes to process i % world, without padding (Lightning's
    `UnrepeatedDistributedSampler`), so every row is evaluated exactly once and the metric
    sets, combined across processes, equal a single process's (recsys_lm/metrics.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler
from transformers.trainer_pt_utils import LengthGroupedSampler

from recsys_lm.data.prepared import PreparedData, prepare
from recsys_lm.data.settings import DataSettings
from recsys_lm.data.task import Task
from recsys_lm.errors import DataError


class RankShard(Sampler[int]):
    """Process `rank`'s share of another sampler's order: positions rank, rank + world, ...
    of it, the order first padded by wrapping around to a multiple of `world`, so every
    process gets ceil(n / world) samples (a few samples twice per epoch, as with PyTorch's
    DistributedSampler) and they step together. Every process must draw the same order
    (the same seeded generator), which ResumableLoader ensures."""

    def __init__(self, sampler: Sampler[int], rank: int, world: int) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.sampler, self.rank, self.world = sampler, rank, world

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.world)

    def __iter__(self) -> Iterator[int]:
        order = list(self.sampler)
        if not order:
            return iter(())
        padded = len(self) * self.world
        order += (order * math.ceil(padded / len(order)))[: padded - len(order)]
        return iter(order[self.rank :: self.world])


def eval_shard(dataset: Sized, rank: int, world: int, name: str = "evaluation") -> Sampler | None:
    """Process `rank`'s rows of an evaluation set: rows rank, rank + world, ..., each row in
    exactly one process, nothing repeated. None in a single process (all rows, in order)."""
    if world <= 1:
        return None
    if len(dataset) < world:
        raise DataError(
            f"the {name} set has {len(dataset)} rows, fewer than the {world} processes: each "
            "needs at least one (run it on fewer devices)"
        )
    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)


class _SkippingBatchSampler(BatchSampler):
    """A BatchSampler that can drop its first `skip` batches (indices only: no data is read)."""

    def __init__(self, sampler, batch_size: int) -> None:
        super().__init__(sampler, batch_size, drop_last=False)
        self.skip = 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch


class ResumableLoader(DataLoader):
    """A training DataLoader whose position survives a restart.

    Epoch `e` (counted by the loader: one per iteration) draws its order from the sampler's
    generator seeded with (seed, e), so the order depends on the epoch alone, not on how the
    previous epoch ended. `state_dict` is that epoch and the number of batches served in it;
    `load_state_dict` makes the next iteration replay the epoch's order from the next batch.
    Lightning saves this state in every checkpoint and restores it on resume (`fit_loop`'s
    `combined_loader` state) for any loader with these two methods. A sized loader is not
    pre-fetched by Lightning, so "served" is exactly "trained on" when a checkpoint is
    written."""

    def __init__(
        self, dataset: Dataset, batch_size: int, sampler, generator, seed: int, **kwargs
    ) -> None:
        super().__init__(
            dataset, batch_sampler=_SkippingBatchSampler(sampler, batch_size), **kwargs
        )
        self.order_generator, self.seed = generator, int(seed)
        self._epoch, self._served = -1, 0  # no epoch started yet
        self._pending: dict | None = None

    def __iter__(self):
        if self._pending is not None:
            self._epoch, self._served = self._pending["epoch"], self._pending["served"]
            self._pending = None
        else:
            self._epoch, self._served = self._epoch + 1, 0
        self.order_generator.manual_seed((self.seed * 1_000_003 + self._epoch) % 2**63)
        self.batch_sampler.skip = self._served
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict:
        if self._served >= len(self):  # finished: the next iteration starts the next epoch
            return {"epoch": self._epoch + 1, "served": 0}
        return {"epoch": self._epoch, "served": self._served}

    def load_state_dict(self, state: dict) -> None:
        self._pending = {"epoch": int(state["epoch"]), "served": int(state["served"])}


class RecDataModule(L.LightningDataModule):
    """Prepares the data once (`setup`) and serves the task's datasets as loaders."""

    def __init__(
        self, source: Any, settings: DataSettings, task: Task, tokenizer: Any, max_length: int
    ) -> None:
        super().__init__()
        self.source, self.settings, self.task = source, settings, task
        self.tokenizer, self.max_length = tokenizer, max_length
        self.data: PreparedData | None = None
        self._train_loader: ResumableLoader | None = None
        self._train_loader_state: dict | None = None  # restored before the loader exists

    def prepare_data(self) -> None:
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = prepare(
                self.source, self.settings, self.task, self.tokenizer, self.max_length
            )

    # -- loaders ----------------------------------------------------------------------------
    def processes(self) -> tuple[int, int]:
        """(this process's rank, how many processes) of the Trainer running this datamodule:
        (0, 1) without one or in a single process."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

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
        # A seeded generator: each epoch draws a new order, the same on every rerun, and a
        # resumed run continues the interrupted epoch's order (ResumableLoader seeds it).
        generator = torch.Generator()
        rank, world = self.processes()
        if self.settings.length_grouping:
            # Batches of similar length waste less compute on padding; order stays random.
            # Under DDP a group is one step of every process (RankShard splits it evenly).
            sampler = LengthGroupedSampler(
                self.settings.batch_size * world, lengths=dataset.lengths(), generator=generator
            )
        else:
            sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
        if world > 1:  # the same order in every process (same seed): each takes its share
            sampler = RankShard(sampler, rank, world)
        workers = self.settings.num_workers
        loader = ResumableLoader(
            dataset,
            self.settings.batch_size,
            sampler,
            generator,
            self.settings.seed,
            collate_fn=dataset.collate,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
        if self._train_loader_state is not None:
            loader.load_state_dict(self._train_loader_state)
            self._train_loader_state = None
        self._train_loader = loader
        return loader

    # -- checkpointed state -----------------------------------------------------------------
    # The training loader's position travels in the datamodule's checkpoint entry. Lightning
    # also keeps a stateful loader's state in its fit loop, but applies it only when the loop
    # builds the loader; `estimated_stepping_batches` (the LR schedule) builds it earlier, so
    # that copy would be ignored on resume. This one is applied either way.
    def state_dict(self) -> dict:
        if self._train_loader is None:
            return {}
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        state = state_dict.get("train_loader")
        if state is None:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state)
        else:
            self._train_loader_state = state

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def eval_dataloader(self, name: str) -> DataLoader | None:
        """A loader over any prepared evaluation set by name (e.g. `test_new_items`), or None
        when this data has no such set."""
        dataset = self.data.datasets.get(name)
        if dataset is None:
            return None
        rank, world = self.processes()
        sampler = eval_shard(dataset, rank, world, name) if len(dataset) else None
        return self._loader(dataset, self.settings.eval_batch_size, sampler)

    def item_dataloader(self) -> DataLoader:
        return self._loader(self.data.items, self.settings.eval_batch_size)
