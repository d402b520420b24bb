"""The toy task's record: next-item ranking from the bag of a user's items, monitored on
HR@k (not the built-in tasks' NDCG@k, so a test can tell whose record is in force)."""

from __future__ import annotations

from recsys_lm.data.datasets.sequences import SequenceRankingSet, SequenceSet
from recsys_lm.data.task import Task
from recsys_lm.data.tasks import ITEM_SCORERS, ranking_candidates, register_task
from recsys_lm.metrics import RankingMetrics


def bag_dataset(data, stage: str):
    max_len = data.settings.max_sequence_length
    if stage == "train":
        return SequenceSet(data.split, max_len)
    return SequenceRankingSet(
        data.split, stage, data.num_items, max_len, **ranking_candidates(data)
    )


BAG = register_task(
    Task(
        "bag_of_items",
        bag_dataset,
        RankingMetrics,
        eval_modes=("full",),
        monitor="hr@{k}",
        baselines=ITEM_SCORERS,
        default_baselines=("popularity",),
    )
)
