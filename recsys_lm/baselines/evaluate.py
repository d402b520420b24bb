"""How every baseline is measured: with the same rows, masks and metric set as the model.

A ranking baseline is a `Scorer`: given a batch of users and the histories they may be judged
on, it returns a score for every item, [B, n_items]. `StageEvaluation` reads those scores for
both kinds of ranking rows (whole rows with `RankingSet.masks` for ranking, the candidate's
column for click rows). The pointwise tasks (rating, behaviour) have no items to rank: their
baselines are `PointPredictor`s, predicting each held-out interaction's rating [B] or class
scores [B, n_classes] from (user, item), fed to the same metrics as the head.

`StageEvaluation` is the only code that feeds a baseline's scores to metrics: `evaluate_scores`
runs it over a whole stage, and ID-SASRec's validation inside Lightning runs it batch by batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch.utils.data import DataLoader

from recsys_lm.baselines.popularity import ItemScores
from recsys_lm.data.datasets.examples import ClickSet, RankingSet
from recsys_lm.data.datasets.points import PointSet
from recsys_lm.data.prepared import PreparedData

EVAL_BATCH = 256


class Scorer(Protocol):
    def __call__(self, users: Sequence[int], histories: Sequence[list[int]]) -> torch.Tensor:
        """Scores [len(users), n_items]; higher ranks first."""


class PointPredictor(Protocol):
    def __call__(self, users: Sequence[int], items: Sequence[int]) -> torch.Tensor:
        """Ratings [B] (rating) or class scores [B, n_classes] (behaviour)."""


class StageEvaluation:
    """The task's metric set over one stage's rows, fed one batch of raw rows at a time."""

    def __init__(self, data: PreparedData, stage: str) -> None:
        self.dataset = data.datasets[stage]
        self.metrics = data.task.metrics(data.k)

    def batches(self) -> DataLoader:
        """The stage's rows in order, EVAL_BATCH at a time, uncollated (lists of rows)."""
        return DataLoader(self.dataset, batch_size=EVAL_BATCH, shuffle=False, collate_fn=list)

    def update(self, rows: list, scorer: Scorer | PointPredictor) -> None:
        if isinstance(self.dataset, PointSet):  # (user, history, item, target)
            self._update_points(rows, scorer)
            return
        users = [row[0] for row in rows]
        scores = scorer(users, [row[1] for row in rows])
        if isinstance(self.dataset, ClickSet):  # (user, history, candidate, label)
            candidates = torch.tensor([row[2] for row in rows])
            picked = scores[torch.arange(len(rows)), candidates]
            self.metrics.update(picked, torch.tensor([row[3] for row in rows], dtype=torch.float32))
        else:
            assert isinstance(self.dataset, RankingSet)
            relevant, exclude = self.dataset.masks(rows)
            self.metrics.update(scores, relevant, exclude)

    def _update_points(self, rows: list, predictor: PointPredictor) -> None:
        users, items = [row[0] for row in rows], [row[2] for row in rows]
        targets = torch.tensor([row[3] for row in rows], dtype=self.dataset.targets.dtype)
        self.metrics.update(predictor(users, items), targets)

    def compute(self) -> dict[str, float]:
        return self.metrics.compute()

    def reset(self) -> None:
        self.metrics.reset()


def evaluate_scores(
    data: PreparedData, stage: str, scorer: Scorer | PointPredictor | torch.Tensor
) -> dict[str, float]:
    """Metrics of `stage` for a scorer, a point predictor, or a fixed per-item score vector."""
    evaluation = StageEvaluation(data, stage)
    if isinstance(scorer, torch.Tensor):
        scorer = ItemScores(scorer)
    for rows in evaluation.batches():
        evaluation.update(rows, scorer)
    return evaluation.compute()


def evaluate_points(data: PreparedData, stage: str, predictor: PointPredictor) -> dict[str, float]:
    """Metrics of `stage` for a pointwise predictor, over the head's own evaluation rows."""
    if not isinstance(data.datasets[stage], PointSet):
        raise TypeError(f"task `{data.task.name}` has no pointwise rows to predict")
    return evaluate_scores(data, stage, predictor)
