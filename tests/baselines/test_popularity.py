"""Popularity: counts with a seeded tie order, scored through the one evaluation path."""

from __future__ import annotations

import numpy as np
import torch

from recsys_lm.baselines import BASELINES, evaluate_scores
from recsys_lm.baselines.popularity import popularity_scores


def test_popularity_ties_are_not_broken_by_item_index():
    """Items with equal counts (all cold items in a cold-start split) must not be ordered by
    their ids, which often follow release order or popularity; the order is fixed by a seed."""
    scores = popularity_scores(np.array([3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]))
    assert scores.argmax() == 10 and scores.argsort(descending=True)[1] == 0
    zero = scores[1:10]
    assert not torch.equal(zero.argsort(), torch.arange(9)) and not torch.equal(
        zero.argsort(descending=True), torch.arange(9)
    )
    assert torch.equal(scores, popularity_scores(np.array([3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5])))
    assert not torch.equal(scores, popularity_scores(np.array([3] + [0] * 9 + [5]), seed=1))


def test_popularity_ranks_by_training_counts(prepared):
    data = prepared()
    scores = BASELINES["popularity"].build(data)([0, 1], [[], [3]])
    assert scores.shape == (2, data.num_items) and torch.equal(scores[0], scores[1])
    order = np.argsort(-scores[0].numpy(), kind="stable")
    counts = data.item_counts[order]
    assert (np.diff(counts) <= 0).all()  # never a less popular item above a more popular one


def test_popularity_vector_and_scorer_give_the_same_metrics(prepared):
    data = prepared()
    vector = popularity_scores(data.item_counts).float()
    scorer = BASELINES["popularity"].build(data)
    assert evaluate_scores(data, "test", vector) == evaluate_scores(data, "test", scorer)
