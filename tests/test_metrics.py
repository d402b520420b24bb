from __future__ import annotations

import math

import pytest
import torch

from recsys_lm.metrics import BehaviourMetrics, ClickMetrics, RankingMetrics, RatingMetrics


def test_ranking_metrics_match_hand_computed_values_with_exclusion():
    metrics = RankingMetrics(k=2)
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.7, 0.1],  # target 2; item 0 excluded -> target ranks 2nd
            [0.1, 0.2, 0.3, 0.4],  # target 0 ranks 4th -> outside top-2
        ]
    )
    exclude = torch.tensor([[True, False, False, False], [False, False, False, False]])
    relevant = torch.tensor([[False, False, True, False], [True, False, False, False]])
    metrics.update(scores, relevant, exclude)
    out = metrics.compute()
    assert out["hr@2"] == pytest.approx(0.5)
    assert out["ndcg@2"] == pytest.approx((1 / math.log2(3)) / 2)
    assert out["mrr"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert out["mrr@2"] == pytest.approx((1 / 2) / 2)


def test_ranking_metrics_accumulate_across_batches_and_reset():
    metrics = RankingMetrics(k=1)
    none = torch.zeros(1, 2, dtype=torch.bool)
    first, second = torch.tensor([[True, False]]), torch.tensor([[False, True]])
    metrics.update(torch.tensor([[1.0, 0.0]]), first, none)
    metrics.update(torch.tensor([[1.0, 0.0]]), second, none)
    assert metrics.compute()["hr@1"] == pytest.approx(0.5)
    metrics.reset()
    metrics.update(torch.tensor([[1.0, 0.0]]), first, none)
    assert metrics.compute()["hr@1"] == pytest.approx(1.0)


def test_ranking_metrics_read_negative_scores_by_rank():
    # Log-likelihoods and cosines are often negative; torchmetrics 1.9 alone would give the
    # relevant item a reciprocal rank of 0 for a score <= 0.
    relevant = torch.tensor([[False, True, False], [True, False, False]])
    exclude = torch.zeros_like(relevant)
    metrics = RankingMetrics(k=2)
    metrics.update(torch.tensor([[-30.0, -12.5, -4.0], [-0.2, 0.3, -0.9]]), relevant, exclude)
    assert metrics.compute()["mrr"] == pytest.approx((1 / 2 + 1 / 2) / 2)


def test_click_auroc():
    metrics = ClickMetrics()
    metrics.update(torch.tensor([0.9, 0.2, 0.6, 0.1]), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert metrics.compute()["auroc"] == pytest.approx(1.0)


def test_rating_rmse_and_mae_match_hand_computed_values():
    metrics = RatingMetrics()
    metrics.update(torch.tensor([3.0, 4.0]), torch.tensor([4.0, 4.0]))
    metrics.update(torch.tensor([5.0]), torch.tensor([2.0]))  # errors -1, 0, 3 in all
    out = metrics.compute()
    assert out["mae"] == pytest.approx(4 / 3)
    assert out["rmse"] == pytest.approx(math.sqrt(10 / 3))
    metrics.reset()
    metrics.update(torch.tensor([1.0]), torch.tensor([2.0]))
    assert metrics.compute() == pytest.approx({"mae": 1.0, "rmse": 1.0})


def test_behaviour_accuracy_and_macro_f1_match_hand_computed_values():
    metrics = BehaviourMetrics()
    assert metrics.compute() == {}  # nothing seen: no class count to build the metrics with
    # Arg-max classes 0, 1, 1, 2 against labels 0, 1, 2, 2.
    logits = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 2.0, 0], [0, 0, 2.0]])
    metrics.update(logits[:2], torch.tensor([0, 1]))
    metrics.update(logits[2:], torch.tensor([2, 2]))
    out = metrics.compute()
    assert out["accuracy"] == pytest.approx(3 / 4)
    # Per-class F1: class 0 = 1; class 1: P 1/2, R 1 -> 2/3; class 2: P 1, R 1/2 -> 2/3.
    assert out["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
