"""Behaviour head: a cross-encoder reads history + candidate and classifies the interaction
(view / click / buy, or a rating bucket such as negative / neutral / positive)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from recsys_lm.data.batches import PairBatch
from recsys_lm.data.points import BehaviourTargets
from recsys_lm.errors import ConfigError, DataError
from recsys_lm.metrics import BehaviourMetrics
from recsys_lm.models.backbone import Backbone

WEIGHTINGS = ("none", "balanced")


class BehaviourHead(nn.Module):
    """Pooled pair encoding -> dropout -> linear -> one logit per class; cross-entropy.

    The classes come from the data, so the classifier is built by `set_targets` (before
    training). Their names are the module's extra state: checkpoints and exports carry them,
    and loading one rebuilds the classifier before its weights are read.

    class_weighting="balanced" weights each class's loss by n / (n_classes * count), the
    inverse of its training frequency, so rare behaviours (buy) are not drowned by views.
    """

    task = "behaviour"

    def __init__(self, hidden_size: int, dropout: float = 0.1, class_weighting: str = "none"):
        super().__init__()
        if class_weighting not in WEIGHTINGS:
            raise ConfigError("head.net.class_weighting", class_weighting, f"one of {WEIGHTINGS}")
        self.hidden_size, self.class_weighting = hidden_size, class_weighting
        self.dropout = nn.Dropout(dropout)
        self.classes: list[str] = []
        self.register_module("classifier", None)
        # Training-only: recomputed from the data on every attach, so not saved.
        self.register_buffer("class_weights", None, persistent=False)

    def set_targets(self, targets: BehaviourTargets) -> None:
        self.build(targets.classes)
        if self.class_weighting == "balanced":
            counts = torch.tensor(targets.train_counts, dtype=torch.float32).clamp_min(1.0)
            self.class_weights = counts.sum() / (len(counts) * counts)

    def build(self, classes: Sequence[str]) -> None:
        """Create the classifier for `classes`; a no-op when it already has them."""
        classes = list(classes)
        if classes == self.classes:
            return
        if self.classes:
            raise DataError(
                f"behaviour head: the model was trained on classes {self.classes}, "
                f"the data has {classes}"
            )
        self.classes = classes
        self.classifier = nn.Linear(self.hidden_size, len(classes))

    def get_extra_state(self) -> dict:
        return {"classes": list(self.classes)}

    def set_extra_state(self, state: dict) -> None:
        # Runs before the children's weights are loaded (torch loads a module, then its
        # children), so the classifier exists when its weights arrive.
        if state.get("classes"):
            self.build(state["classes"])

    def forward(self, backbone: Backbone, batch: PairBatch) -> torch.Tensor:
        """Class logits [B, n_classes]."""
        if self.classifier is None:
            raise RuntimeError("behaviour head has no classes yet: call set_targets first")
        pooled = backbone(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        return self.classifier(self.dropout(pooled)).float()

    def loss(self, backbone: Backbone, batch: PairBatch) -> torch.Tensor:
        return F.cross_entropy(self(backbone, batch), batch.labels, weight=self.class_weights)

    def evaluate(self, backbone: Backbone, batch: PairBatch, metrics: BehaviourMetrics) -> None:
        metrics.update(self(backbone, batch), batch.labels)
