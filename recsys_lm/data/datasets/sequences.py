"""Item-index sequences for the sequential head (SASRec-style) and the ID-only baseline.

Histories are cut to the most recent `max_len` items and left-padded, so position -1 is the
latest item for every user; positions are then embedded by recency, the same in training and
at serving time.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from recsys_lm.data.batches import SequenceBatch, pad
from recsys_lm.data.datasets.examples import RankingSet
from recsys_lm.data.split import Split, replay_sample
from recsys_lm.data.text import TokenCache

IGNORE = -100  # cross-entropy's ignore_index: no target at padding


def left_pad(sequences: list[list[int]], value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] tensor and its bool mask, each row right-aligned (T = longest row)."""
    width = max(1, max(len(s) for s in sequences))
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        if seq:
            out[row, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = True
    return out, mask


def windows(sequence: list[int], max_len: int) -> list[list[int]]:
    """Chunks of at most max_len + 1 items (inputs plus the shifted targets), taken from the
    end backwards, so long histories train on all their transitions, not just the last ones."""
    return [sequence[start:end] for start, end in spans(len(sequence), max_len)]


def spans(length: int, max_len: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk `windows` cuts from a sequence of this length."""
    out = []
    end = length
    while end >= 2:
        start = max(0, end - max_len - 1)
        out.append((start, end))
        end = start + 1 if start > 0 else 0
    return out


class SequenceSet(Dataset):
    """Training windows of every user's training sequence: predict each next item."""

    def __init__(
        self,
        split: Split,
        max_len: int,
        cache: TokenCache | None = None,
        replay: float = 1.0,
        seed: int = 0,
    ) -> None:
        """With `split.fresh_from` (a refresh): the windows whose last target is fresh plus
        a `replay` x as large seeded sample of the older ones."""
        self.max_len, self.cache = max_len, cache
        cut = [(u, a, b) for u, seq in enumerate(split.train) for a, b in spans(len(seq), max_len)]
        if split.fresh_from is not None:
            fresh = [split.is_fresh(u, b - 1) for u, _, b in cut]
            cut = [cut[i] for i in replay_sample(fresh, replay, seed)]
        self.rows = [split.train[u][a:b] for u, a, b in cut]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> list[int]:
        return self.rows[index]

    def lengths(self) -> list[int]:
        return [len(w) for w in self.rows]

    def collate(self, rows: list[list[int]]) -> SequenceBatch:
        items, mask = left_pad([w[:-1] for w in rows])
        targets, _ = left_pad([w[1:] for w in rows], IGNORE)
        batch = SequenceBatch(items, mask, targets)
        seen = torch.cat([items[mask], targets[targets != IGNORE]])
        batch.unique = torch.unique(seen)
        if self.cache is not None:
            texts = [self.cache.layout.single(self.cache.item_ids[i])[0] for i in batch.unique]
            batch.unique_ids, batch.unique_mask = pad(texts, self.cache.pad_id)
        return batch


class SequenceRankingSet(RankingSet):
    """Evaluation users as item sequences, with the same relevant/exclude masks (full ranking
    or sampled candidates) as every other ranking task."""

    def __init__(self, split: Split, stage: str, num_items: int, max_len: int, **options) -> None:
        super().__init__(split, stage, num_items, cache=None, budget=0, **options)
        self.max_len = max_len

    def collate(self, rows) -> SequenceBatch:
        items, mask = left_pad([history[-self.max_len :] for _, history, _, _ in rows])
        relevant, exclude = self.masks(rows)
        return SequenceBatch(
            items,
            mask,
            relevant=relevant,
            exclude=exclude,
            user_index=torch.tensor([r[0] for r in rows]),
        )
