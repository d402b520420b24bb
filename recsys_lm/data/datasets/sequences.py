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


def windows(sequence: list[int], max_len: int, stride: int | None = None) -> list[list[int]]:
    """Chunks of at most max_len + 1 items (inputs plus the shifted targets), taken from the
    end backwards, so long histories train on all their transitions, not just the last ones."""
    return [sequence[start:end] for start, end, _ in spans(len(sequence), max_len, stride)]


def spans(length: int, max_len: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(start, end, trained) of each window cut from a sequence of this length, from the end
    backwards: items [start, end), of which the last `trained` targets carry the loss.

    stride = None (or max_len): windows that do not overlap, every target trained once, but a
    target early in a window sees only the few items before it in that window. A smaller
    stride moves each window `stride` items back and trains only its last `stride` targets:
    still every target once, now each with up to max_len items of context (stride=1 is one
    sample per prefix, SASRec as RecBole trains it), with about max_len / stride times the
    windows (and steps) a pass."""
    stride = max_len if stride is None else stride
    if not 1 <= stride <= max_len:
        raise ValueError(f"window stride {stride} outside 1..max_len ({max_len})")
    out = []
    end = length
    while end >= 2:
        start = max(0, end - max_len - 1)
        if start == 0:  # the earliest window: every target not yet trained
            out.append((0, end, end - 1))
            break
        out.append((start, end, stride))
        end -= stride
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
        stride: int | None = None,
    ) -> None:
        """With `split.fresh_from` (a refresh): the windows whose last target is fresh plus
        a `replay` x as large seeded sample of the older ones. `stride`: see `spans`."""
        self.max_len, self.cache = max_len, cache
        cut = [
            (u, *span)
            for u, seq in enumerate(split.train)
            for span in spans(len(seq), max_len, stride)
        ]
        if split.fresh_from is not None:
            fresh = [split.is_fresh(u, b - 1) for u, _, b, _ in cut]
            cut = [cut[i] for i in replay_sample(fresh, replay, seed)]
        self.rows = [split.train[u][a:b] for u, a, b, _ in cut]
        self.trained = [n for *_, n in cut]  # per row: how many of its last targets are trained

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.rows[index], self.trained[index]

    def lengths(self) -> list[int]:
        return [len(w) for w in self.rows]

    def collate(self, rows: list[tuple[list[int], int]]) -> SequenceBatch:
        items, mask = left_pad([w[:-1] for w, _ in rows])
        # Targets before a window's last `trained` were trained by a later window (with more
        # context): ignored here, so each transition carries the loss once a pass.
        targets, _ = left_pad([[IGNORE] * (len(w) - 1 - n) + w[-n:] for w, n in rows], IGNORE)
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
