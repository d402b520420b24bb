"""Torch datasets per task: index tuples in, batch dataclasses out (via the token cache)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from recsys_lm.data.batches import ItemBatch, PairBatch, RankingBatch, TwoTowerBatch, pad
from recsys_lm.data.split import Split
from recsys_lm.data.text import TokenCache


def sample_negatives(
    rng: np.random.Generator, num_items: int, avoid: set[int], n: int
) -> list[int]:
    """`n` distinct items drawn uniformly from those not in `avoid`."""
    available = num_items - len(avoid)
    if n > available:
        n = available
    out: list[int] = []
    chosen: set[int] = set()
    while len(out) < n:
        for item in rng.integers(0, num_items, size=2 * (n - len(out)) + 4).tolist():
            if item not in avoid and item not in chosen:
                chosen.add(item)
                out.append(item)
                if len(out) == n:
                    break
    return out


class ClickSet(Dataset):
    """(user, history, candidate, label) rows; negatives sampled once with a fixed seed."""

    def __init__(
        self,
        rows: list[tuple[int, list[int], int, float]],
        cache: TokenCache,
        max_history_tokens: int,
    ) -> None:
        self.rows, self.cache, self.budget = rows, cache, max_history_tokens

    @classmethod
    def for_training(
        cls, split: Split, num_items: int, negatives: int, seed: int, cache, budget: int
    ) -> ClickSet:
        rng = np.random.default_rng(seed)
        rows = []
        for user, seq in enumerate(split.train):
            seen = set(seq)
            for t in range(1, len(seq)):
                rows.append((user, seq[:t], seq[t], 1.0))
                for neg in sample_negatives(rng, num_items, seen, negatives):
                    rows.append((user, seq[:t], neg, 0.0))
        return cls(rows, cache, budget)

    @classmethod
    def for_eval(
        cls, split: Split, stage: str, num_items: int, negatives: int, seed: int, cache, budget: int
    ) -> ClickSet:
        rng = np.random.default_rng(seed + (1 if stage == "val" else 2))
        rows = []
        for user in split.eval_users(stage):
            history = split.history(user, stage)
            target = split.val[user] if stage == "val" else split.test[user]
            everything = set(split.history(user, "test")) | {split.test[user]}
            rows.append((user, history, target, 1.0))
            for neg in sample_negatives(rng, num_items, everything, negatives):
                rows.append((user, history, neg, 0.0))
        return cls(rows, cache, budget)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return self.rows[index]

    def collate(self, rows) -> PairBatch:
        ids, types = zip(
            *(
                self.cache.layout.pair(self.cache.history(h, self.budget), self.cache.item_ids[i])
                for _, h, i, _ in rows
            ),
            strict=True,
        )
        input_ids, mask = pad(list(ids), self.cache.pad_id)
        token_types, _ = pad(list(types), 0)
        return PairBatch(
            input_ids=input_ids,
            attention_mask=mask,
            token_type_ids=token_types,
            labels=torch.tensor([r[3] for r in rows], dtype=torch.float32),
            user_index=torch.tensor([r[0] for r in rows]),
            item_index=torch.tensor([r[2] for r in rows]),
        )

    @property
    def item_index(self) -> np.ndarray:
        return np.array([r[2] for r in self.rows])

    @property
    def labels(self) -> np.ndarray:
        return np.array([r[3] for r in self.rows])


class TwoTowerSet(Dataset):
    """Every (history prefix, next item) of the training sequences."""

    def __init__(self, split: Split, cache: TokenCache, budget: int) -> None:
        self.split, self.cache, self.budget = split, cache, budget
        self.rows = [(u, t) for u, seq in enumerate(split.train) for t in range(1, len(seq))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        user, t = self.rows[index]
        seq = self.split.train[user]
        return seq[:t], seq[t]

    def collate(self, rows) -> TwoTowerBatch:
        layout = self.cache.layout
        users = [layout.single(self.cache.history(h, self.budget))[0] for h, _ in rows]
        items = [layout.single(self.cache.item_ids[i])[0] for _, i in rows]
        user_ids, user_mask = pad(users, self.cache.pad_id)
        item_ids, item_mask = pad(items, self.cache.pad_id)
        return TwoTowerBatch(
            user_ids, user_mask, item_ids, item_mask, torch.tensor([i for _, i in rows])
        )


class RankingSet(Dataset):
    """Evaluation users for full ranking: history, held-out target, items to exclude."""

    def __init__(
        self, split: Split, stage: str, num_items: int, cache: TokenCache, budget: int
    ) -> None:
        self.split, self.stage, self.num_items = split, stage, num_items
        self.cache, self.budget = cache, budget
        self.users = split.eval_users(stage)

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, index: int):
        user = self.users[index]
        target = self.split.val[user] if self.stage == "val" else self.split.test[user]
        return user, self.split.history(user, self.stage), target

    def collate(self, rows) -> RankingBatch:
        users = [
            self.cache.layout.single(self.cache.history(h, self.budget))[0] for _, h, _ in rows
        ]
        user_ids, user_mask = pad(users, self.cache.pad_id)
        exclude = torch.zeros((len(rows), self.num_items), dtype=torch.bool)
        for row, (_, history, _) in enumerate(rows):
            exclude[row, history] = True
        return RankingBatch(
            user_ids,
            user_mask,
            torch.tensor([r[2] for r in rows]),
            exclude,
            torch.tensor([r[0] for r in rows]),
        )


class ItemSet(Dataset):
    """The whole catalogue, for precomputing item embeddings."""

    def __init__(self, num_items: int, cache: TokenCache) -> None:
        self.num_items, self.cache = num_items, cache

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, rows: list[int]) -> ItemBatch:
        items = [self.cache.layout.single(self.cache.item_ids[i])[0] for i in rows]
        ids, mask = pad(items, self.cache.pad_id)
        return ItemBatch(ids, mask, torch.tensor(rows))
