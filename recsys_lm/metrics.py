"""Metrics through torchmetrics, fed the same way for the model and for every baseline."""

from __future__ import annotations

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
    """Full-ranking NDCG@k, HR@k, MRR and MRR@k with one held-out item per user.

    Excluded items (the user's history) are removed from the candidate list before ranking,
    so every remaining item of the catalogue competes with the target.
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

    def update(self, scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor) -> None:
        scores = scores.float()
        relevant = torch.zeros_like(scores, dtype=torch.bool)
        relevant[torch.arange(len(target)), target] = True
        keep = ~exclude | relevant
        queries = torch.arange(len(target), device=scores.device) + self._queries
        self._queries += len(target)
        indexes = queries.unsqueeze(1).expand_as(scores)
        self.metrics.update(scores[keep], relevant[keep], indexes=indexes[keep])

    def compute(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.metrics.compute().items()}

    def reset(self) -> None:
        self.metrics.reset()
        self._queries = 0


def build_metrics(task: str, k: int) -> ClickMetrics | RankingMetrics:
    return ClickMetrics() if task == "click" else RankingMetrics(k)
