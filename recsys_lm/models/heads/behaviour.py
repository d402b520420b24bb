"""Behaviour head: a cross-encoder reads history + candidate and classifies the interaction
(view / click / buy, or a rating bucket such as negative / neutral / positive)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from recsys_lm.data.batches import PairBatch
from recsys_lm.data.datasets.points import BehaviourTargets
from recsys_lm.data.prepared import PreparedData
from recsys_lm.errors import ConfigError, DataError
from recsys_lm.metrics import BehaviourMetrics
from recsys_lm.models.backbone import Backbone
from recsys_lm.models.heads.base import PairHead

WEIGHTINGS = ("none", "balanced")


class BehaviourHead(PairHead):
    """Pooled pair encoding -> dropout -> linear -> one logit per class; cross-entropy.

    The classes come from the data: `attach` sizes the classifier for them. Their names are
    the module's extra state, so checkpoints and exports carry them, and loading one resizes
    the classifier (`data_sized`) before its weights are read.

    class_weighting="balanced" weights each class's loss by n / (n_classes * count), the
    inverse of its training frequency, so rare behaviours (buy) are not drowned by views.
    `forward` gives class logits; `score` gives class probabilities [n, n_classes].
    """

    task = "behaviour"
    data_sized = ("classifier.weight", "classifier.bias")

    def __init__(self, hidden_size: int, dropout: float = 0.1, class_weighting: str = "none"):
        super().__init__(hidden_size)
        if class_weighting not in WEIGHTINGS:
            raise ConfigError("head.net.class_weighting", class_weighting, f"one of {WEIGHTINGS}")
        self.class_weighting = class_weighting
        self.dropout = nn.Dropout(dropout)
        self.classes: list[str] = []
        self.classifier = nn.Linear(hidden_size, 0)  # one output per class, sized by attach
        # Training-only: recomputed from the data on every attach, so not saved.
        self.register_buffer("class_weights", None, persistent=False)

    def attach(self, data: PreparedData) -> None:
        super().attach(data)
        targets: BehaviourTargets = data.targets
        self.set_classes(targets.classes)
        if self.class_weighting == "balanced":
            counts = torch.tensor(targets.train_counts, dtype=torch.float32).clamp_min(1.0)
            self.class_weights = counts.sum() / (len(counts) * counts)

    def set_classes(self, classes: Sequence[str]) -> None:
        """Size the classifier for `classes`; a no-op when it already has them."""
        classes = list(classes)
        if classes == self.classes:
            return
        if self.classes:
            raise DataError(
                f"behaviour head: the model was trained on classes {self.classes}, "
                f"the data has {classes}"
            )
        self.classes = classes
        bound = self.hidden_size**-0.5  # nn.Linear's own initialisation range
        self.resize("classifier.weight", (len(classes), self.hidden_size), _uniform(bound))
        self.resize("classifier.bias", (len(classes),), _uniform(bound))
        self.classifier.out_features = len(classes)  # nn.Linear's own record of its size

    def get_extra_state(self) -> dict:
        return {"classes": list(self.classes)}

    def set_extra_state(self, state: dict) -> None:
        if state.get("classes"):
            self.set_classes(state["classes"])

    def forward(self, backbone: Backbone, batch: PairBatch) -> torch.Tensor:
        """Class logits [B, n_classes]."""
        if not self.classes:
            raise RuntimeError("behaviour head has no classes yet: call attach(data) first")
        pooled = backbone(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        return self.classifier(self.dropout(pooled)).float()

    def score(self, backbone, history, candidates) -> torch.Tensor:
        """Class probabilities [len(candidates), n_classes] (classes: `self.classes`)."""
        return super().score(backbone, history, candidates).softmax(dim=-1)

    def loss(self, backbone: Backbone, batch: PairBatch) -> torch.Tensor:
        return F.cross_entropy(self(backbone, batch), batch.labels, weight=self.class_weights)

    def evaluate(self, backbone: Backbone, batch: PairBatch, metrics: BehaviourMetrics) -> None:
        metrics.update(self(backbone, batch), batch.labels)


def _uniform(bound: float):
    return lambda tensor: tensor.uniform_(-bound, bound)
