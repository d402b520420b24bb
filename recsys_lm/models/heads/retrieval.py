"""Two-tower retrieval head: one shared backbone encodes user histories and item texts."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from recsys_lm.data.batches import RankingBatch, TwoTowerBatch
from recsys_lm.metrics import RankingMetrics
from recsys_lm.models.backbone import Backbone


class RetrievalHead(nn.Module):
    """In-batch sampled softmax over cosine similarities divided by a temperature.

    With `logq_correction`, each in-batch candidate's logit is reduced by log of its sampling
    probability (its training frequency), so popular items are not over-penalised for being
    frequent negatives (Yi et al., RecSys 2019).
    """

    task = "retrieval"

    def __init__(
        self,
        hidden_size: int,
        projection: bool = True,
        temperature: float = 0.05,
        learn_temperature: bool = True,
        logq_correction: bool = True,
    ) -> None:
        super().__init__()
        self.projection = nn.Linear(hidden_size, hidden_size) if projection else nn.Identity()
        if projection:  # start at identity so the pretrained embedding space is kept
            nn.init.eye_(self.projection.weight)
            nn.init.zeros_(self.projection.bias)
        self.log_inv_temperature = nn.Parameter(
            torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_temperature
        )
        self.logq_correction = logq_correction
        self.register_buffer("log_prior", torch.zeros(0), persistent=False)
        self._catalogue: torch.Tensor | None = None

    def set_item_prior(self, counts: torch.Tensor) -> None:
        prior = (counts.float() + 1.0) / (counts.float() + 1.0).sum()
        self.log_prior = prior.log().to(self.log_inv_temperature.device)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_inv_temperature.clamp(max=math.log(100.0)).exp()

    def encode(self, backbone: Backbone, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(backbone(ids, mask)).float(), dim=-1)

    def loss(self, backbone: Backbone, batch: TwoTowerBatch) -> torch.Tensor:
        users = self.encode(backbone, batch.user_ids, batch.user_mask)
        items = self.encode(backbone, batch.item_ids, batch.item_mask)
        logits = users @ items.T * self.scale
        if self.logq_correction and self.log_prior.numel():
            logits = logits - self.log_prior[batch.item_index].unsqueeze(0)
        # The same item twice in a batch is not a negative for the other row.
        same = batch.item_index.unsqueeze(0) == batch.item_index.unsqueeze(1)
        eye = torch.eye(len(same), dtype=torch.bool, device=same.device)
        logits = logits.masked_fill(same & ~eye, float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))

    @torch.no_grad()
    def index_catalogue(self, backbone: Backbone, batches) -> torch.Tensor:
        """Embed every item once; evaluation ranks users against this matrix."""
        parts = []
        for batch in batches:
            parts.append(self.encode(backbone, batch.item_ids, batch.item_mask))
        self._catalogue = torch.cat(parts)
        return self._catalogue

    def score_catalogue(self, backbone: Backbone, batch: RankingBatch) -> torch.Tensor:
        if self._catalogue is None:
            raise RuntimeError("index_catalogue() must run before scoring users")
        return self.encode(backbone, batch.user_ids, batch.user_mask) @ self._catalogue.T

    def evaluate(self, backbone: Backbone, batch: RankingBatch, metrics: RankingMetrics) -> None:
        metrics.update(self.score_catalogue(backbone, batch), batch.relevant, batch.exclude)
