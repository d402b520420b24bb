"""Samples for generative ranking: a decoder reads the history prompt and is scored on (or
trained to write) the next item's text. Rows are those of the two-tower task."""

from __future__ import annotations

import torch

from recsys_lm.data.batches import CandidateBatch, LMBatch, pad
from recsys_lm.data.datasets.examples import RankingSet, TwoTowerSet
from recsys_lm.data.text import TokenCache


def lm_sequences(
    cache: TokenCache, budget: int, pairs: list[tuple[list[int], int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(history, item) pairs -> right-padded ids, mask and the mask of the item's tokens."""
    sequences, starts = zip(*(cache.continuation(h, i, budget) for h, i in pairs), strict=True)
    ids, mask = pad(list(sequences), cache.pad_id)
    target = torch.zeros_like(mask, dtype=torch.bool)
    for row, ((_, item), start) in enumerate(zip(pairs, starts, strict=True)):
        target[row, start : start + len(cache.item_ids[item])] = True
    return ids, mask, target


class NextTitleSet(TwoTowerSet):
    """Every (history prefix, next item) of the training sequences, as one LM sequence each."""

    def lengths(self) -> list[int]:
        return [
            len(self.cache.history(self.split.train[u][:t], self.budget))
            + len(self.cache.item_ids[self.split.train[u][t]])
            for u, t in self.rows
        ]

    def collate(self, rows) -> LMBatch:
        ids, mask, target = lm_sequences(self.cache, self.budget, rows)
        return LMBatch(ids, mask, target, torch.tensor([i for _, i in rows]))


class CandidateTitleSet(RankingSet):
    """Evaluation users with their sampled candidates (held-out items + negatives), one LM
    sequence per (user, candidate). Needs sampled mode: full ranking would score the whole
    catalogue with the LM for every user."""

    def collate(self, rows) -> CandidateBatch:
        pairs, query, items = [], [], []
        for row, (user, history, _, _) in enumerate(rows):
            for item in self.candidates[user]:
                pairs.append((history, item))
                query.append(row)
                items.append(item)
        ids, mask, target = lm_sequences(self.cache, self.budget, pairs)
        relevant, exclude = self.masks(rows)
        return CandidateBatch(
            ids,
            mask,
            target,
            torch.tensor(query),
            torch.tensor(items),
            relevant,
            exclude,
            torch.tensor([r[0] for r in rows]),
        )
