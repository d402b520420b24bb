"""ID-only SASRec (Kang & McAuley, ICDM 2018) as a baseline, trained inside the framework.

It is the sequential head with learned item IDs instead of text (`SequentialHead(text=False,
id_embedding=True)`), trained on the same split's training sequences with a full softmax
(cross-entropy over the catalogue, which beats SASRec's original one-negative BCE; Klenitskiy
& Vasilev, RecSys 2023), early-stopped on the validation metric of the run's own task, and
then scored like every other baseline.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import DataLoader

from recsys_lm.data.batches import SequenceBatch
from recsys_lm.data.sequences import SequenceSet, left_pad
from recsys_lm.errors import ConfigError
from recsys_lm.models.heads.sequential import SequentialHead

log = logging.getLogger(__name__)


class IDSASRec:
    """A `Scorer` (see recsys_lm.baselines): histories -> scores for every item."""

    def __init__(
        self,
        datamodule,
        dim: int = 64,
        num_layers: int = 2,
        num_heads: int = 2,
        dropout: float = 0.2,
        max_len: int = 50,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int = 128,
        max_epochs: int = 200,
        eval_every: int = 5,
        patience: int = 3,
        seed: int = 0,
        device: str | None = None,
    ) -> None:
        if max_epochs < 1 or eval_every < 1:
            raise ConfigError(
                "baseline_options.sasrec",
                {"max_epochs": max_epochs, "eval_every": eval_every},
                "positive max_epochs and eval_every",
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = SequentialHead(
                0, dim, num_layers, num_heads, dropout, max_len, text=False, id_embedding=True
            )
            self.model.attach(datamodule.num_items)
        self.model.to(self.device)
        self.max_len = max_len
        self.history: list[dict] = []  # (epoch, validation metric) per evaluation
        self._fit(datamodule, lr, weight_decay, batch_size, max_epochs, eval_every, patience, seed)

    def _fit(self, dm, lr, weight_decay, batch_size, max_epochs, eval_every, patience, seed):
        from recsys_lm.baselines import evaluate_scores  # baselines imports this module

        data = SequenceSet(dm.split, self.max_len)
        loader = DataLoader(
            data,
            batch_size=batch_size,
            shuffle=True,
            collate_fn=data.collate,
            generator=torch.Generator().manual_seed(seed),
        )
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        best, best_state, waited = float("-inf"), None, 0
        for epoch in range(1, max_epochs + 1):
            self.model.train()
            for batch in loader:
                loss = self.model.loss(None, move_data_to_device(batch, self.device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if epoch % eval_every and epoch != max_epochs:
                continue
            metrics = evaluate_scores(dm, "val", self)
            value = metrics.get(f"ndcg@{dm.k}", metrics.get("auroc", float("nan")))
            self.history.append({"epoch": epoch, "val": value, "loss": loss.item()})
            log.info("ID-SASRec epoch %d: loss %.4f, val %.4f", epoch, loss.item(), value)
            if value > best:
                best, best_state, waited = value, copy.deepcopy(self.model.state_dict()), 0
            else:
                waited += 1
                if waited >= patience:
                    break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        self.model.eval()

    @torch.no_grad()
    def __call__(self, users: Sequence[int], histories: Sequence[list[int]]) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        items, mask = left_pad([list(h)[-self.max_len :] for h in histories])
        self.model.index_catalogue(None, [])  # ID vectors as they are now (also mid-training)
        batch = move_data_to_device(SequenceBatch(items, mask), self.device)
        scores = self.model.score_catalogue(None, batch)
        self.model.train(was_training)
        return scores.float().cpu()
