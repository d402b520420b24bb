"""Rating baseline: global mean plus regularised user and item biases (Koren, 2008)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from recsys_lm.data.datasets.points import RatingTargets
from recsys_lm.data.prepared import PreparedData


class BiasBaseline:
    """Baseline predictor of Koren (2008), "Factorization meets the neighborhood", sec. 2.1:
    r_ui = mu + b_u + b_i, with regularised biases estimated in one pass:
        b_i = sum_{u in R(i)} (r_ui - mu) / (reg_item + |R(i)|)
        b_u = sum_{i in R(u)} (r_ui - mu - b_i) / (reg_user + |R(u)|)
    (his lambda_2 = 25, lambda_3 = 10). Users and items without training ratings get bias 0.
    Predictions are clamped to the rating range, as the head's are.
    """

    def __init__(
        self,
        users: np.ndarray,
        items: np.ndarray,
        ratings: np.ndarray,
        num_users: int,
        num_items: int,
        targets: RatingTargets,
        reg_item: float = 25.0,
        reg_user: float = 10.0,
    ) -> None:
        ratings = ratings.astype(np.float64)
        self.mu = float(ratings.mean())
        residual = ratings - self.mu
        self.item_bias = _shrunk_mean(items, residual, num_items, reg_item)
        residual = residual - self.item_bias[items]
        self.user_bias = _shrunk_mean(users, residual, num_users, reg_user)
        self.low, self.high = targets.low, targets.high

    def __call__(self, users: Sequence[int], items: Sequence[int]) -> torch.Tensor:
        predicted = self.mu + self.user_bias[list(users)] + self.item_bias[list(items)]
        return torch.as_tensor(predicted, dtype=torch.float32).clamp(self.low, self.high)


def _shrunk_mean(index: np.ndarray, values: np.ndarray, size: int, reg: float) -> np.ndarray:
    """Per-index sum of values / (reg + count): a mean shrunk towards 0 for rare indices (and
    0 for indices without values)."""
    sums = np.bincount(index, weights=values, minlength=size)
    counts = np.bincount(index, minlength=size)
    return np.divide(sums, reg + counts, out=np.zeros(size), where=counts > 0)


def build(data: PreparedData, **options) -> BiasBaseline:
    """Fitted on the head's own training rows; `options`: reg_item, reg_user."""
    users, items, ratings = data.datasets["train"].arrays()
    return BiasBaseline(
        users, items, ratings, len(data.split.train), data.num_items, data.targets, **options
    )
