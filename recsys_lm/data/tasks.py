"""Which samples each task needs: one entry per task, read by the DataModule.

A head names its task (`head.task`); the task says how to build the train/val/test datasets
from a set-up `RecDataModule` and which evaluation modes make sense for it. A new task is one
builder function plus one row in `TASKS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

from recsys_lm.data.examples import ClickSet, RankingSet, TwoTowerSet

if TYPE_CHECKING:
    from recsys_lm.data.datamodule import RecDataModule


@dataclass(frozen=True)
class Task:
    build: Callable[[RecDataModule, str], Dataset]  # (datamodule, "train"|"val"|"test")
    eval_modes: tuple[str, ...]  # data.eval_mode values this task supports
    why: str = ""  # said in the error when another eval_mode is asked for


def click_dataset(dm: RecDataModule, stage: str) -> Dataset:
    if stage == "train":
        return ClickSet.for_training(
            dm.split, dm.sampler, dm.train_negatives, dm.seed, dm.cache, dm.max_history_tokens
        )
    return ClickSet.for_eval(
        dm.split,
        stage,
        dm.sampler,
        dm.eval_negatives,
        dm.seed,
        dm.cache,
        dm.max_history_tokens,
    )


def retrieval_dataset(dm: RecDataModule, stage: str) -> Dataset:
    if stage == "train":
        return TwoTowerSet(dm.split, dm.cache, dm.max_history_tokens)
    return RankingSet(
        dm.split,
        stage,
        dm.num_items,
        dm.cache,
        dm.max_history_tokens,
        dm.sampler if dm.eval_mode == "sampled" else None,
        dm.eval_negatives,
        dm.seed,
    )


TASKS: dict[str, Task] = {
    "click": Task(
        click_dataset,
        ("sampled",),
        "a cross-encoder scores sampled candidates; use head=retrieval for full ranking",
    ),
    "retrieval": Task(retrieval_dataset, ("full", "sampled")),
}
