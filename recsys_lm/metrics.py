"""Metrics through torchmetrics, fed the same way for the model and for every baseline.

Each metric set measures what this process was fed, unless `across_processes()` was called:
its `compute` then first gathers (list states: scores, labels) or sums (counts, error sums)
the states of every process of the default process group, so under DDP, where each process
is fed its own share of the evaluation rows (every row once: an unpadded split, see
`recsys_lm.data.datamodule`), the result is the one a single process would get over all
the rows. RecsysLM's validation and test metrics do this; a baseline, scored by one process
alone, must not (the others would never answer).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy, MulticlassF1Score
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR, RetrievalNormalizedDCG


class Metrics(Protocol):
    """What a task's metric set offers (each also has an `update` with the task's inputs)."""

    def compute(self) -> dict[str, float]: ...

    def reset(self) -> None: ...

    def across_processes(self, enabled: bool = True) -> Metrics: ...


class _Synced:
    """Whether a metric set's `compute` gathers every process's state first: handed to each
    torchmetrics object as its `distributed_available_fn`, read at every compute."""

    def __init__(self) -> None:
        self.enabled = False

    def __call__(self) -> bool:
        return self.enabled and dist.is_available() and dist.is_initialized()


class MetricSet(nn.Module):
    """A task's torchmetrics collection, local to this process until `across_processes`."""

    def __init__(self) -> None:
        super().__init__()
        self.synced = _Synced()

    def across_processes(self, enabled: bool = True) -> MetricSet:
        """Make `compute` combine the states of every process of the default process group
        (a no-op while none is initialized); returns the set."""
        self.synced.enabled = enabled
        return self

    def _options(self) -> dict:
        """Keyword arguments of every torchmetrics object of the set."""
        return {"distributed_available_fn": self.synced}

    def compute(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.metrics.compute().items()}

    def reset(self) -> None:
        self.metrics.reset()


class ClickMetrics(MetricSet):
    """AUROC over every (user, candidate) pair: the positive and its sampled negatives."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics = MetricCollection({"auroc": BinaryAUROC(**self._options())})

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        self.metrics.update(scores.float(), labels.long())


class RankingMetrics(MetricSet):
    """NDCG@k, HR@k, MRR and MRR@k over each user's candidate list.

    Excluded items (the user's history, or in sampled mode everything but the sampled
    candidates) are removed before ranking; every remaining item competes with the held-out
    ones. HR@k counts a user as a hit if any held-out item is in the top k; MRR uses the
    first relevant item. Each row is one query (user); the mean is over queries.

    Across processes, the n-th row this process is fed is query `n * world + rank`: ids
    unique over the processes, and under the strided unpadded split (row i to process
    i % world, in order) exactly the row's index in the evaluation set, so the gathered
    queries come out in the single-process order.
    """

    def __init__(self, k: int = 10) -> None:
        super().__init__()
        self.k = k
        options = self._options()
        self.metrics = MetricCollection(
            {
                f"ndcg@{k}": RetrievalNormalizedDCG(top_k=k, **options),
                f"hr@{k}": RetrievalHitRate(top_k=k, **options),
                "mrr": RetrievalMRR(**options),
                f"mrr@{k}": RetrievalMRR(top_k=k, **options),
            }
        )
        self._queries = 0
        # (scores, relevant, queries) of the kept entries of each batch, fed to torchmetrics
        # as one update at compute: its retrieval states are lists gathered element by
        # element across processes, so every process must hold the same number (one).
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

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
        if self.synced():
            queries = queries * dist.get_world_size() + dist.get_rank()
        indexes = queries.unsqueeze(1).expand_as(scores)
        self._pending.append((scores[keep], relevant[keep], indexes[keep]))

    def compute(self) -> dict[str, float]:
        if self._pending:
            scores, relevant, indexes = (torch.cat(p) for p in zip(*self._pending, strict=True))
            self._pending = []
            self.metrics.update(scores, relevant, indexes=indexes)
        return super().compute()

    def reset(self) -> None:
        super().reset()
        self._queries = 0
        self._pending = []


class RatingMetrics(MetricSet):
    """RMSE and MAE between predicted and true ratings, over every held-out interaction."""

    def __init__(self) -> None:
        super().__init__()
        options = self._options()
        self.metrics = MetricCollection(
            {
                "rmse": MeanSquaredError(squared=False, **options),
                "mae": MeanAbsoluteError(**options),
            }
        )

    def update(self, predictions: torch.Tensor, ratings: torch.Tensor) -> None:
        self.metrics.update(predictions.float(), ratings.float())


class BehaviourMetrics(MetricSet):
    """Accuracy (share of interactions whose class is the arg-max) and macro-F1 (unweighted
    mean of per-class F1, so rare behaviours count as much as frequent ones).

    The classes come from the data, so the metrics are built at the first update, sized by
    the scores' last dimension ([B, n_classes] logits, probabilities or one-hot votes).
    Across processes, every process must be fed at least one row (the unpadded split gives
    each one a row while the set has as many rows as processes).
    """

    def __init__(self) -> None:
        super().__init__()
        self.metrics: MetricCollection | None = None

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        if self.metrics is None:
            classes = scores.shape[-1]
            self.metrics = MetricCollection(
                {
                    "accuracy": MulticlassAccuracy(classes, average="micro", **self._options()),
                    "macro_f1": MulticlassF1Score(classes, average="macro", **self._options()),
                }
            ).to(scores.device)
        self.metrics.update(scores.float(), labels.long())

    def compute(self) -> dict[str, float]:
        return {} if self.metrics is None else super().compute()

    def reset(self) -> None:
        if self.metrics is not None:
            super().reset()
