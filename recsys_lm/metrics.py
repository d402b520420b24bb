"""Metrics through torchmetrics, fed the same way for the model and for every baseline."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAUROC
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR, RetrievalNormalizedDCG


class ClickMetrics(nn.Module):
    """AUROC over every (user, candidate) pair: the positive and its sampled negatives."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics = MetricCollection({"auroc": BinaryAUROC()})

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        self.metrics.update(scores.float(), labels.long())

    def compute(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.metrics.compute().items()}

    def reset(self) -> None:
        self.metrics.reset()


class RankingMetrics(nn.Module):
    """NDCG@k, HR@k, MRR and MRR@k over each user's candidate list.

    Excluded items (the user's history, or in sampled mode everything but the sampled
    candidates) are removed before ranking; every remaining item competes with the held-out
    ones. HR@k counts a user as a hit if any held-out item is in the top k; MRR uses the
    first relevant item.
    """

    def __init__(self, k: int = 10) -> None:
        super().__init__()
        self.k = k
        self.metrics = MetricCollection(
            {
                f"ndcg@{k}": RetrievalNormalizedDCG(top_k=k),
                f"hr@{k}": RetrievalHitRate(top_k=k),
                "mrr": RetrievalMRR(),
                f"mrr@{k}": RetrievalMRR(top_k=k),
            }
        )
        self._queries = 0

    def update(self, scores: torch.Tensor, relevant: torch.Tensor, exclude: torch.Tensor) -> None:
        scores = scores.float()
        keep = ~exclude | relevant
        queries = torch.arange(len(scores), device=scores.device) + self._queries
        self._queries += len(scores)
        indexes = queries.unsqueeze(1).expand_as(scores)
        self.metrics.update(scores[keep], relevant[keep], indexes=indexes[keep])

    def compute(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.metrics.compute().items()}

    def reset(self) -> None:
        self.metrics.reset()
        self._queries = 0


# Which metrics each task reports (keys are `head.task` values); each takes the cut-off k.
METRICS: dict[str, Callable[[int], nn.Module]] = {
    "click": lambda k: ClickMetrics(),
    "retrieval": RankingMetrics,
}


def build_metrics(task: str, k: int) -> nn.Module:
    return METRICS[task](k)
