"""Behaviour baseline: each item's most frequent training class."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from recsys_lm.data.datasets.points import BehaviourTargets
from recsys_lm.data.prepared import PreparedData


class ItemMajority:
    """Each item's most frequent training class; items never seen in training (and ties) fall
    back to the global class frequencies."""

    def __init__(self, items: np.ndarray, labels: np.ndarray, num_items: int, classes: int):
        counts = np.zeros((num_items, classes))
        np.add.at(counts, (items, labels), 1.0)
        overall = counts.sum(axis=0) / max(counts.sum(), 1.0)
        # The global frequencies (< 1) decide only where the item's own counts tie.
        self.choice = torch.as_tensor((counts + overall).argmax(axis=1))
        self.classes = classes

    def __call__(self, users: Sequence[int], items: Sequence[int]) -> torch.Tensor:
        votes = self.choice[torch.as_tensor(list(items), dtype=torch.long)]
        return torch.nn.functional.one_hot(votes, self.classes).float()


def build(data: PreparedData) -> ItemMajority:
    """Fitted on the head's own training rows."""
    _, items, labels = data.datasets["train"].arrays()
    targets: BehaviourTargets = data.targets
    return ItemMajority(items, labels, data.num_items, len(targets.classes))
