"""Click/CTR head: a cross-encoder reads history + candidate and predicts P(click)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from recsys_lm.data.batches import PairBatch
from recsys_lm.metrics import ClickMetrics
from recsys_lm.models.backbone import Backbone
from recsys_lm.models.heads.base import PairHead


class ClickHead(PairHead):
    """Pooled pair encoding -> dropout -> linear -> logit; binary cross-entropy.

    loss = -[y log p + (1 - y) log(1 - p)], p = sigmoid(logit), computed from logits for
    numerical stability. `forward` (and so `score`) gives P(click).
    """

    task = "click"

    def __init__(self, hidden_size: int, dropout: float = 0.1) -> None:
        super().__init__(hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, 1)

    def logits(self, backbone: Backbone, batch: PairBatch) -> torch.Tensor:
        pooled = backbone(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        return self.classifier(self.dropout(pooled)).squeeze(-1).float()

    def forward(self, backbone: Backbone, batch: PairBatch) -> torch.Tensor:
        """P(click) per row."""
        return torch.sigmoid(self.logits(backbone, batch))

    def loss(self, backbone: Backbone, batch: PairBatch) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self.logits(backbone, batch), batch.labels)

    def evaluate(self, backbone: Backbone, batch: PairBatch, metrics: ClickMetrics) -> None:
        metrics.update(self(backbone, batch), batch.labels)
