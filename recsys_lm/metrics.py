"""Metrics through torchmetrics, fed the same way for the model and for every baseline."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy, MulticlassF1Score
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR, RetrievalNormalizedDCG


class Metrics(Protocol):
    """What a task's metric set offers (each also has an `update` with the task's inputs)."""

    def compute(self) -> dict[str, float]: ...

    def reset(self) -> None: ...


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
        # torchmetrics 1.9 treats a score <= 0 as "not retrieved" (Lightning-AI/torchmetrics
        # #3104): MRR read 0 for a relevant item with a negative cosine or log-likelihood.
        # Ranks depend only on order, so each row is shifted to start at 1.
        low = scores.masked_fill(~keep, float("inf")).amin(dim=1, keepdim=True)
        scores = scores - low.clamp(max=0.0) + 1.0
        queries = torch.arange(len(scores), device=scores.device) + self._queries
        self._queries += len(scores)
        indexes = queries.unsqueeze(1).expand_as(scores)
        self.metrics.update(scores[keep], relevant[keep], indexes=indexes[keep])

    def compute(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.metrics.compute().items()}

    def reset(self) -> None:
        self.metrics.reset()
        self._queries = 0


class RatingMetrics(nn.Module):
    """RMSE and MAE between predicted and true ratings, over every held-out interaction."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics = MetricCollection(
            {"rmse": MeanSquaredError(squared=False), "mae": MeanAbsoluteError()}
        )

    def update(self, predictions: torch.Tensor, ratings: torch.Tensor) -> None:
        self.metrics.update(predictions.float(), ratings.float())

    def compute(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.metrics.compute().items()}

    def reset(self) -> None:
        self.metrics.reset()


class BehaviourMetrics(nn.Module):
    """Accuracy (share of interactions whose class is the arg-max) and macro-F1 (unweighted
    mean of per-class F1, so rare behaviours count as much as frequent ones).

    The classes come from the data, so the metrics are built at the first update, sized by
    the scores' last dimension ([B, n_classes] logits, probabilities or one-hot votes).
    """

    def __init__(self) -> None:
        super().__init__()
        self.metrics: MetricCollection | None = None

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        if self.metrics is None:
            classes = scores.shape[-1]
            self.metrics = MetricCollection(
                {
                    "accuracy": MulticlassAccuracy(classes, average="micro"),
                    "macro_f1": MulticlassF1Score(classes, average="macro"),
                }
            ).to(scores.device)
        self.metrics.update(scores.float(), labels.long())

    def compute(self) -> dict[str, float]:
        if self.metrics is None:
            return {}
        return {k: float(v) for k, v in self.metrics.compute().items()}

    def reset(self) -> None:
        if self.metrics is not None:
            self.metrics.reset()
