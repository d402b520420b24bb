"""Koren's bias baseline (rating task)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys_lm.baselines import BASELINES, evaluate_points, evaluate_scores
from recsys_lm.baselines.bias import BiasBaseline
from recsys_lm.data.datasets.points import RatingTargets

MEDIUM = (("num_users", 120), ("num_items", 150))


def test_bias_baseline_matches_a_hand_computation():
    # Ratings (user, item, r): (0, 0, 5), (0, 1, 3), (1, 0, 4); mu = 4.
    users, items, ratings = np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([5.0, 3.0, 4.0])
    targets = RatingTargets(mean=4.0, std=1.0, low=1.0, high=5.0, missing=0)
    plain = BiasBaseline(users, items, ratings, 3, 3, targets, reg_item=0.0, reg_user=0.0)
    # b_0 = (1 + 0) / 2, b_1 = -1; b_u0 = ((1 - .5) + (-1 + 1)) / 2, b_u1 = (0 - .5) / 1.
    assert plain([0, 1, 2], [0, 1, 2]).tolist() == pytest.approx([4.75, 2.5, 4.0])
    shrunk = BiasBaseline(users, items, ratings, 3, 3, targets, reg_item=1.0, reg_user=1.0)
    # b_0 = 1 / (1 + 2); b_u0 = ((1 - 1/3) + (-1 + 1/2)) / (1 + 2) = 1/18.
    assert shrunk([0], [0]).item() == pytest.approx(4 + 1 / 3 + 1 / 18)
    high = RatingTargets(mean=4.0, std=1.0, low=1.0, high=4.5, missing=0)
    assert BiasBaseline(users, items, ratings, 3, 3, high, 0.0, 0.0)([0], [0]).item() == 4.5


def test_bias_baseline_beats_the_global_mean_on_the_sample_data(prepared):
    data = prepared("rating", source=MEDIUM)
    mean = data.targets.mean
    global_mean = lambda users, items: torch.full((len(users),), mean)  # noqa: E731
    bias = BASELINES["bias"].build(data)
    for stage in ("val", "test"):
        fitted = evaluate_points(data, stage, bias)
        flat = evaluate_scores(data, stage, global_mean)
        assert fitted["rmse"] < flat["rmse"] - 0.05 and fitted["mae"] < flat["mae"]


def test_bias_options_reach_the_model(prepared):
    data = prepared("rating", source=MEDIUM)
    free = BASELINES["bias"].build(data, reg_item=0.0, reg_user=0.0)
    default = BASELINES["bias"].build(data)
    assert np.abs(free.item_bias).max() > np.abs(default.item_bias).max()
