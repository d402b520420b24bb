"""Rating head: a cross-encoder reads history + candidate and predicts the user's rating."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from recsys_lm.data.batches import PairBatch
from recsys_lm.data.datasets.points import RatingTargets
from recsys_lm.data.prepared import PreparedData
from recsys_lm.metrics import RatingMetrics
from recsys_lm.models.backbone import Backbone
from recsys_lm.models.heads.base import PairHead


class RatingHead(PairHead):
    """Pooled pair encoding -> dropout -> linear -> standardised rating z; MSE on z.

    rating = mean + std * z, with the training ratings' mean and std (`attach`), so the
    regressor starts at the training mean (zero bias, small weights) instead of spending its
    first steps finding the scale; MSE on z is the rating MSE divided by std^2. Evaluation
    clamps predictions to the ratings' range: no rating lies outside it.
    """

    task = "rating"

    def __init__(self, hidden_size: int, dropout: float = 0.1) -> None:
        super().__init__(hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.regressor = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.regressor.weight, std=0.02)
        nn.init.zeros_(self.regressor.bias)
        # Statistics of the training ratings; buffers, so checkpoints and exports keep them.
        self.register_buffer("mean", torch.tensor(0.0))
        self.register_buffer("std", torch.tensor(1.0))
        self.register_buffer("low", torch.tensor(float("-inf")))
        self.register_buffer("high", torch.tensor(float("inf")))

    def attach(self, data: PreparedData) -> None:
        super().attach(data)
        targets: RatingTargets = data.targets
        for name in ("mean", "std", "low", "high"):
            getattr(self, name).fill_(getattr(targets, name))

    def standardised(self, backbone: Backbone, batch: PairBatch) -> torch.Tensor:
        pooled = backbone(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        return self.regressor(self.dropout(pooled)).squeeze(-1).float()

    def forward(self, backbone: Backbone, batch: PairBatch) -> torch.Tensor:
        """Predicted ratings [B], clamped to the rating range."""
        rating = self.mean + self.std * self.standardised(backbone, batch)
        return rating.clamp(self.low, self.high)

    def loss(self, backbone: Backbone, batch: PairBatch) -> torch.Tensor:
        target = (batch.labels.float() - self.mean) / self.std
        return F.mse_loss(self.standardised(backbone, batch), target)

    def evaluate(self, backbone: Backbone, batch: PairBatch, metrics: RatingMetrics) -> None:
        metrics.update(self(backbone, batch), batch.labels)
