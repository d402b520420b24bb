"""Two-tower retrieval head: one shared backbone encodes user histories and item texts."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from recsys_lm.data.batches import ItemBatch, RankingBatch, TwoTowerBatch, pad
from recsys_lm.data.prepared import PreparedData
from recsys_lm.metrics import RankingMetrics
from recsys_lm.models.backbone import Backbone
from recsys_lm.models.heads.base import Head, Recommendation, top_k


class RetrievalHead(Head):
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
        super().__init__(hidden_size)
        self.projection = nn.Linear(hidden_size, hidden_size) if projection else nn.Identity()
        if projection:  # start at identity so the pretrained embedding space is kept
            nn.init.eye_(self.projection.weight)
            nn.init.zeros_(self.projection.bias)
        # One element, not a 0-d scalar: FSDP (trainer=fsdp) cannot shard 0-d parameters.
        self.log_inv_temperature = nn.Parameter(
            torch.tensor([math.log(1.0 / temperature)]), requires_grad=learn_temperature
        )
        self.logq_correction = logq_correction
        self.register_buffer("log_prior", torch.zeros(0), persistent=False)
        self._item_vectors: torch.Tensor | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "log_inv_temperature"
        if key in state_dict and state_dict[key].dim() == 0:  # saved while it was 0-d
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def attach(self, data: PreparedData) -> None:
        super().attach(data)
        counts = torch.as_tensor(data.item_counts).float()
        prior = (counts + 1.0) / (counts + 1.0).sum()
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
    def on_eval_start(self, backbone: Backbone, items: Iterable[ItemBatch]) -> None:
        """Embed every item once; evaluation and `recommend` rank users against this matrix."""
        self._item_vectors = torch.cat(
            [self.encode(backbone, batch.item_ids, batch.item_mask) for batch in items]
        )

    def score_catalogue(self, backbone: Backbone, batch: RankingBatch) -> torch.Tensor:
        if self._item_vectors is None:
            raise RuntimeError("on_eval_start() must run before scoring users")
        return self.encode(backbone, batch.user_ids, batch.user_mask) @ self._item_vectors.T

    def evaluate(self, backbone: Backbone, batch: RankingBatch, metrics: RankingMetrics) -> None:
        metrics.update(self.score_catalogue(backbone, batch), batch.relevant, batch.exclude)

    # -- inference -------------------------------------------------------------------------
    ranks_by_vectors = True

    def user_vector(self, backbone: Backbone, history: Sequence[int]) -> torch.Tensor:
        return self.query_vectors(backbone, [history], None)[0]

    @torch.no_grad()
    def item_vectors(self, backbone: Backbone, items: ItemBatch) -> torch.Tensor:
        """The item tower: the same encoder as users, over the item's text."""
        return self.encode(backbone, items.item_ids, items.item_mask)

    @torch.no_grad()
    def query_vectors(self, backbone: Backbone, histories, table=None) -> torch.Tensor:
        """The user tower over each history's text (the item table is not needed)."""
        catalogue = self.require_catalogue()
        tokens = catalogue.tokens
        rows = [
            tokens.layout.single(tokens.history(list(h), catalogue.history_budget))[0]
            for h in histories
        ]
        ids, mask = pad(rows, tokens.pad_id)
        return self.encode(backbone, ids.to(backbone.device), mask.to(backbone.device))

    @torch.no_grad()
    def score(self, backbone: Backbone, history, candidates) -> torch.Tensor:
        """Cosine similarity of the user's history text and each candidate's text."""
        tokens = self.require_catalogue().tokens
        items = [tokens.layout.single(tokens.item_ids[i])[0] for i in candidates]
        ids, mask = pad(items, tokens.pad_id)
        vectors = self.encode(backbone, ids.to(backbone.device), mask.to(backbone.device))
        return vectors @ self.user_vector(backbone, history)

    @torch.no_grad()
    def recommend(self, backbone: Backbone, history, k: int = 10, exclude=()) -> Recommendation:
        """Top-k over the item matrix `on_eval_start` computed (call it once after loading)."""
        if self._item_vectors is None:
            raise RuntimeError("on_eval_start(backbone, items) must run before recommend")
        scores = self._item_vectors @ self.user_vector(backbone, history)
        return top_k(scores, k, [*history, *exclude])
