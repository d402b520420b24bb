"""Per-item majority class (behaviour task)."""

from __future__ import annotations

import numpy as np
import torch

from recsys_lm.baselines import BASELINES, evaluate_scores
from recsys_lm.baselines.item_majority import ItemMajority

MEDIUM = (("num_users", 120), ("num_items", 150))


def test_item_majority_votes_per_item_and_falls_back_to_the_global_class():
    # Item 0: classes 2, 2, 1; item 1: class 0 once; item 3: a 0/1 tie; item 2: unseen.
    items, labels = np.array([0, 0, 0, 1, 3, 3, 4, 4]), np.array([2, 2, 1, 0, 0, 1, 1, 1])
    majority = ItemMajority(items, labels, num_items=5, classes=3)
    votes = majority([0] * 4, [0, 1, 2, 3])
    assert votes.argmax(1).tolist() == [2, 0, 1, 1]  # class 1 is the most frequent overall
    assert votes.sum(1).tolist() == [1.0] * 4  # one-hot


def test_item_majority_beats_the_majority_class_on_the_sample_data(prepared):
    data = prepared("behaviour", source=MEDIUM)
    top = int(np.argmax(data.targets.train_counts))
    always = lambda users, items: torch.nn.functional.one_hot(  # noqa: E731
        torch.full((len(users),), top), len(data.targets.classes)
    ).float()
    per_item = BASELINES["item_majority"].build(data)
    for stage in ("val", "test"):
        fitted = evaluate_scores(data, stage, per_item)
        flat = evaluate_scores(data, stage, always)
        assert fitted["macro_f1"] > flat["macro_f1"]
        assert fitted["accuracy"] >= flat["accuracy"] - 0.02
