from __future__ import annotations

import math

import pytest
import torch

from recsys_lm.metrics import ClickMetrics, RankingMetrics


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


def test_click_auroc():
    metrics = ClickMetrics()
    metrics.update(torch.tensor([0.9, 0.2, 0.6, 0.1]), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert metrics.compute()["auroc"] == pytest.approx(1.0)
