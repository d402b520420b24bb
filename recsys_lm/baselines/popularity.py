"""Popularity: every user gets the training interaction counts, ties in a seeded random order."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from recsys_lm.data.prepared import PreparedData


def popularity_scores(item_counts: np.ndarray, seed: int = 0) -> torch.Tensor:
    """Training-set interaction counts; ties broken in a fixed random order (seeded), not by
    item index: catalogues often number items by release or popularity, and an index order
    would leak that to items never seen in training (a cold-start split)."""
    counts = torch.as_tensor(item_counts, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    return counts + 0.5 * torch.rand(len(counts), generator=generator, dtype=torch.float64)


class ItemScores:
    """The same per-item score vector for every user (popularity)."""

    def __init__(self, item_scores: torch.Tensor) -> None:
        self.item_scores = item_scores.float()

    def __call__(self, users: Sequence[int], histories: Sequence[list[int]]) -> torch.Tensor:
        return self.item_scores.expand(len(users), -1)


def build(data: PreparedData) -> ItemScores:
    # The tie order's seed stays 0 (not data.seed): the reported popularity figures use it.
    return ItemScores(popularity_scores(data.item_counts))
