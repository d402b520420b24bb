"""Co-occurring item pairs for item-text pre-adaptation (models/preadapt.py).

Two items co-occur when one user took them within `window` steps of each other in the
*training* sequences: validation and test items never enter a pair, so pre-adaptation sees
nothing the evaluation holds out (cold-start items, which have no training interaction,
never appear either).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from recsys_lm.data.batches import ItemBatch
from recsys_lm.data.datasets.examples import ItemSet
from recsys_lm.errors import ConfigError


def cooccurring_pairs(sequences: Sequence[Sequence[int]], window: int = 1) -> np.ndarray:
    """Every (earlier, later) pair of distinct items at most `window` positions apart in one
    sequence, as an int64 array [n_pairs, 2] in sequence order (a user repeating an item
    makes no pair of it with itself)."""
    if window < 1:
        raise ConfigError("preadapt.window", window, "an integer >= 1 (1: adjacent items)")
    out = []
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        for gap in range(1, min(window, len(seq) - 1) + 1):
            pairs = np.stack([seq[:-gap], seq[gap:]], axis=1)
            out.append(pairs[pairs[:, 0] != pairs[:, 1]])
    if not out:
        return np.zeros((0, 2), dtype=np.int64)
    return np.concatenate(out)


@dataclass
class CooccurrenceBatch:
    """A batch of pairs: each distinct item's text once (`items`), and per pair the rows of
    `items` holding its anchor (`first`) and its co-occurring item (`second`)."""

    items: ItemBatch
    first: torch.Tensor
    second: torch.Tensor


class PairSet(Dataset):
    """Co-occurring pairs, collated with every distinct item of a batch embedded once (a
    popular item recurs within a batch)."""

    def __init__(self, pairs: np.ndarray, items: ItemSet) -> None:
        self.pairs, self.items = pairs, items

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[int, int]:
        first, second = self.pairs[index]
        return int(first), int(second)

    def collate(self, rows: list[tuple[int, int]]) -> CooccurrenceBatch:
        flat = np.asarray(rows, dtype=np.int64)
        distinct, position = np.unique(flat, return_inverse=True)
        position = torch.from_numpy(position.reshape(flat.shape))
        return CooccurrenceBatch(
            self.items.collate(distinct.tolist()), position[:, 0], position[:, 1]
        )
