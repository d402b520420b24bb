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

from recsys_lm.data.examples import STAGE_SEEDS, ClickSet, RankingSet, TwoTowerSet
from recsys_lm.data.generative import CandidateTitleSet, NextTitleSet
from recsys_lm.data.points import PointSet, Targets, behaviour_targets, rating_targets
from recsys_lm.data.sequences import SequenceRankingSet, SequenceSet

if TYPE_CHECKING:
    from recsys_lm.data.datamodule import RecDataModule


@dataclass(frozen=True)
class Task:
    build: Callable[[RecDataModule, str], Dataset]  # (datamodule, "train"|"val"|"test")
    eval_modes: tuple[str, ...]  # data.eval_mode values this task supports
    why: str = ""  # said in the error when another eval_mode is asked for
    # Pointwise tasks: the target space (rating statistics, class names), computed once from
    # the split before any dataset is built; the DataModule keeps it as `targets`.
    targets: Callable[[RecDataModule], Targets] | None = None


def click_dataset(dm: RecDataModule, stage: str) -> Dataset:
    """Positives + sampled negatives (data.click_labels=sampled) or every rated interaction
    labelled by its rating (=rating, TALLRec); then a seeded subset of data.max_<stage>_samples."""
    if dm.click_labels == "rating":
        rows = ClickSet.from_ratings(
            dm.split,
            stage,
            dm.rating_threshold,
            dm.history_items,
            dm.cache,
            dm.max_history_tokens,
        )
    elif stage == "train":
        rows = ClickSet.for_training(
            dm.split, dm.sampler, dm.train_negatives, dm.seed, dm.cache, dm.max_history_tokens
        )
    else:
        rows = ClickSet.for_eval(
            dm.split,
            stage,
            dm.sampler,
            dm.eval_negatives,
            dm.seed,
            dm.cache,
            dm.max_history_tokens,
        )
    return rows.subset(dm.max_samples[stage], dm.seed + STAGE_SEEDS[stage])


def ranking_candidates(dm: RecDataModule) -> dict:
    """What a ranking evaluation ranks: the catalogue (or its cold items, data.eval_items),
    or the held-out items plus sampled negatives (data.eval_mode=sampled)."""
    return {
        "sampler": dm.sampler if dm.eval_mode == "sampled" else None,
        "negatives": dm.eval_negatives,
        "seed": dm.seed,
        "rank_items": dm.rank_items(),
    }


def retrieval_dataset(dm: RecDataModule, stage: str) -> Dataset:
    if stage == "train":
        return TwoTowerSet(dm.split, dm.cache, dm.max_history_tokens)
    return RankingSet(
        dm.split, stage, dm.num_items, dm.cache, dm.max_history_tokens, **ranking_candidates(dm)
    )


def sequential_dataset(dm: RecDataModule, stage: str) -> Dataset:
    if stage == "train":
        return SequenceSet(dm.split, dm.max_sequence_length, dm.cache)
    return SequenceRankingSet(
        dm.split, stage, dm.num_items, dm.max_sequence_length, **ranking_candidates(dm)
    )


def point_dataset(dm: RecDataModule, stage: str) -> Dataset:
    return PointSet(dm.split, stage, dm.targets, dm.cache, dm.max_history_tokens)


POINTWISE = "a value is predicted for each held-out interaction; nothing is ranked"


def generative_ranking_dataset(dm: RecDataModule, stage: str) -> Dataset:
    """Training: (history, next item) as one LM sequence; evaluation: each user's sampled
    candidates, every one continuing the user's history prompt."""
    if stage == "train":
        return NextTitleSet(dm.split, dm.cache, dm.max_history_tokens)
    return CandidateTitleSet(
        dm.split,
        stage,
        dm.num_items,
        dm.cache,
        dm.max_history_tokens,
        dm.sampler,
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
    "generative_ranking": Task(
        generative_ranking_dataset,
        ("sampled",),
        "each candidate's title is scored by a forward pass of the decoder, so full ranking "
        "costs n_items passes per user (1,682 for MovieLens-100K); rank the held-out item "
        "among data.eval_negatives sampled ones",
    ),
    "sequential": Task(sequential_dataset, ("full", "sampled")),
    "rating": Task(point_dataset, ("pointwise",), POINTWISE, targets=rating_targets),
    "behaviour": Task(point_dataset, ("pointwise",), POINTWISE, targets=behaviour_targets),
}
