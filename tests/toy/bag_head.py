"""A bag-of-items head: the mean of the user's item vectors scores every item by dot product.
It reads no text, so it ignores the backbone (a frozen one is fine)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from recsys_lm.data.batches import SequenceBatch
from recsys_lm.data.datasets.sequences import IGNORE
from recsys_lm.models.heads.base import Head
from tests.toy.task import BAG


class BagHead(Head):
    task = BAG.name
    data_sized = ("items.weight",)

    def __init__(self, hidden_size: int, dim: int = 16) -> None:
        super().__init__(hidden_size)
        self.dim = dim
        self.items = nn.Embedding(0, dim)

    def attach(self, data) -> None:
        super().attach(data)
        self.resize(
            "items.weight", (data.num_items, self.dim), lambda t: nn.init.normal_(t, 0, 0.1)
        )

    def user(self, batch: SequenceBatch) -> torch.Tensor:
        vectors = self.items(batch.items) * batch.mask.unsqueeze(-1)
        return vectors.sum(1) / batch.mask.sum(1, keepdim=True).clamp_min(1)

    def loss(self, backbone, batch: SequenceBatch) -> torch.Tensor:
        last = (batch.targets != IGNORE).float().cumsum(1).argmax(1)  # each row's final target
        target = batch.targets[torch.arange(len(last)), last]
        return F.cross_entropy(self.user(batch) @ self.items.weight.T, target)

    def evaluate(self, backbone, batch: SequenceBatch, metrics) -> None:
        metrics.update(self.user(batch) @ self.items.weight.T, batch.relevant, batch.exclude)

    def score(self, backbone, history, candidates) -> torch.Tensor:
        items = torch.as_tensor([list(history)])
        user = self.user(SequenceBatch(items, torch.ones_like(items, dtype=torch.bool)))[0]
        return self.items.weight[list(candidates)] @ user
