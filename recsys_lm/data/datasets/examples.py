"""Torch datasets per task: index tuples in, batch dataclasses out (via the token cache)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch.utils.data import Dataset

from recsys_lm.data.batches import ItemBatch, PairBatch, RankingBatch, TwoTowerBatch, pad
from recsys_lm.data.negatives import NegativeSampler
from recsys_lm.data.split import PARTS, Split, replay_sample
from recsys_lm.data.text import RatedHistory, TokenCache
from recsys_lm.errors import ConfigError

STAGE_SEEDS = {"train": 0, "val": 1, "test": 2}


class ClickSet(Dataset):
    """(user, history, candidate, label) rows; negatives drawn once with a fixed seed."""

    def __init__(
        self, rows: list[tuple[int, list[int], int, float]], cache: TokenCache, budget: int
    ) -> None:
        self.rows, self.cache, self.budget = rows, cache, budget

    @classmethod
    def for_training(
        cls, split: Split, sampler: NegativeSampler, negatives: int, seed: int, cache, budget
    ) -> ClickSet:
        rng = np.random.default_rng(seed)
        rows = []
        for user, seq in enumerate(split.train):
            seen = set(seq)
            for t in range(1, len(seq)):
                rows.append((user, seq[:t], seq[t], 1.0))
                for neg in sampler.sample(rng, user, seq[t], seen, negatives):
                    rows.append((user, seq[:t], neg, 0.0))
        return cls(rows, cache, budget)

    @classmethod
    def for_eval(
        cls,
        split: Split,
        stage: str,
        sampler: NegativeSampler,
        negatives: int,
        seed: int,
        cache,
        budget,
    ) -> ClickSet:
        rng = np.random.default_rng(seed + STAGE_SEEDS[stage])
        rows = []
        for user in split.eval_users(stage):
            history = split.history(user, stage)
            everything = split.seen(user)
            for target in split.targets(user, stage):
                rows.append((user, history, target, 1.0))
                for neg in sampler.sample(rng, user, target, everything, negatives):
                    rows.append((user, history, neg, 0.0))
        return cls(rows, cache, budget)

    @classmethod
    def from_ratings(
        cls,
        split: Split,
        stage: str,
        threshold: float,
        history_items: int | None,
        cache: TokenCache,
        budget: int,
        by_rating: bool = False,
    ) -> ClickSet:
        """Explicit feedback as labels (TALLRec, Bao et al. 2023): one row per rated
        interaction in `stage`'s part, positive when rating > `threshold`, its history the
        user's `history_items` previous interactions in time, whatever part they are in.
        Interactions with fewer previous ones are skipped (TALLRec always shows n); with
        `history_items=None` every earlier interaction is history and one is enough.
        With `by_rating` each history is a `RatedHistory`: its items' own ratings (all given
        before the sample) split it into liked and disliked. Needs a split whose parts are in time order per user (train, then val, then test)."""
        need = history_items or 1
        rows = []
        for user in range(len(split.train)):
            sequence = split.train[user] + split.val[user] + split.test[user]
            verdicts = [r > threshold for p in PARTS for r in split.attr("rating", user, p)]
            start = sum(len(getattr(split, p)[user]) for p in PARTS[: PARTS.index(stage)])
            ratings = split.attr("rating", user, stage)
            for offset, (item, rating) in enumerate(
                zip(getattr(split, stage)[user], ratings, strict=True)
            ):
                t = start + offset
                if t >= need:
                    first = t - history_items if history_items else 0
                    history = sequence[first:t]
                    if by_rating:  # positions before t only: the sample's label stays unseen
                        history = RatedHistory(tuple(history), tuple(verdicts[first:t]))
                    rows.append((user, history, item, float(rating > threshold)))
        return cls(rows, cache, budget)

    def subset(self, size: int | None, seed: int) -> ClickSet:
        """A fixed random `size` rows (few-shot training, capped evaluation), in their
        original order; the same rows for the same seed. All rows when `size` is None."""
        if size is None or size >= len(self.rows):
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self.rows), size, replace=False))
        return ClickSet([self.rows[i] for i in keep], self.cache, self.budget)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return self.rows[index]

    def lengths(self) -> list[int]:
        return [
            len(self.cache.history_text(h, self.budget))
            + len(self.cache.item_ids[i])
            + self.cache.prompt_overhead
            for _, h, i, _ in self.rows
        ]

    def collate(self, rows) -> PairBatch:
        return pair_batch(rows, self.cache, self.budget, torch.float32)

    @property
    def item_index(self) -> np.ndarray:
        return np.array([r[2] for r in self.rows])

    @property
    def labels(self) -> np.ndarray:
        return np.array([r[3] for r in self.rows])


def pair_batch(rows, cache: TokenCache, budget: int, label_dtype: torch.dtype) -> PairBatch:
    """Cross-encoder batch of (user, history, item, label) rows: "history [SEP] item" (with
    the prompt's words, if any), dynamically padded."""
    pairs = [cache.pair(h, i, budget) for _, h, i, _ in rows]
    input_ids, mask = pad([ids for ids, _ in pairs], cache.pad_id)
    token_types, _ = pad([types for _, types in pairs], 0)
    return PairBatch(
        input_ids=input_ids,
        attention_mask=mask,
        token_type_ids=token_types,
        labels=torch.tensor([r[3] for r in rows], dtype=label_dtype),
        user_index=torch.tensor([r[0] for r in rows]),
        item_index=torch.tensor([r[2] for r in rows]),
    )


class TwoTowerSet(Dataset):
    """Every (history prefix, next item) of the training sequences."""

    def __init__(
        self, split: Split, cache: TokenCache, budget: int, replay: float = 1.0, seed: int = 0
    ) -> None:
        """With `split.fresh_from` (a refresh): the rows whose target is fresh plus a
        `replay` x as large seeded sample of the older ones."""
        self.split, self.cache, self.budget = split, cache, budget
        self.rows = [(u, t) for u, seq in enumerate(split.train) for t in range(1, len(seq))]
        if split.fresh_from is not None:
            fresh = [split.is_fresh(u, t) for u, t in self.rows]
            self.rows = [self.rows[i] for i in replay_sample(fresh, replay, seed)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        user, t = self.rows[index]
        seq = self.split.train[user]
        return seq[:t], seq[t]

    def lengths(self) -> list[int]:
        return [len(self.cache.history(self.split.train[u][:t], self.budget)) for u, t in self.rows]

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
    """Evaluation rows: (user, history, held-out items, time) and, in sampled mode,
    candidate negatives. One row per user, or per held-out interaction in a prequential
    split (rolling), where `time` hides the items not yet born (`Split.born`)."""

    def __init__(
        self,
        split: Split,
        stage: str,
        num_items: int,
        cache: TokenCache,
        budget: int,
        sampler: NegativeSampler | None = None,
        negatives: int = 0,
        seed: int = 0,
        rank_items: list[int] | None = None,
    ) -> None:
        """`rank_items`: in full ranking, only these items compete (e.g. the cold items of a
        cold-start split); None ranks the whole catalogue."""
        self.split, self.stage, self.num_items = split, stage, num_items
        self.cache, self.budget = cache, budget
        self.outside = None
        if rank_items is not None:
            self.outside = torch.ones(num_items, dtype=torch.bool)
            self.outside[rank_items] = False
        self.born = None
        if split.born is not None:
            self.born = torch.full((num_items,), float("inf"), dtype=torch.float64)
            self.born[: len(split.born)] = torch.as_tensor(split.born, dtype=torch.float64)
        self.rows = split.eval_rows(stage)
        self.users = list(dict.fromkeys(user for user, _ in self.rows))
        # Sampled mode: a fixed candidate list per user (targets + `negatives` per target).
        self.candidates: dict[int, list[int]] | None = None
        if sampler is not None:
            if split.prequential:
                raise ConfigError(
                    "data.eval_mode",
                    "sampled",
                    "full (or null) with data.split.method=rolling: each interaction is "
                    "ranked among all the items that exist at its time",
                )
            rng = np.random.default_rng(seed + STAGE_SEEDS[stage])
            self.candidates = {}
            for user in self.users:
                everything = split.seen(user)
                targets = split.targets(user, stage)
                negs = [
                    n for t in targets for n in sampler.sample(rng, user, t, everything, negatives)
                ]
                self.candidates[user] = targets + negs

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        user, position = self.rows[index]
        return self.split.eval_row(user, position, self.stage)

    def new_item_rows(self, among_new: bool = False) -> RankingSet:
        """The same rows restricted to those whose held-out item is new (first seen in the
        tested window: `Split.cold_items`), ranked exactly as in the whole set or, with
        `among_new`, among the new items alone (which new item will the user take?)."""
        view = copy.copy(self)
        new = self.split.cold_items
        view.rows = [
            (user, position)
            for user, position in self.rows
            if _all_in(self.split.row_targets(user, position, self.stage), new)
        ]
        if among_new:
            view.outside = torch.ones(self.num_items, dtype=torch.bool)
            view.outside[sorted(new)] = False
            if self.outside is not None:
                view.outside |= self.outside
        return view

    def masks(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(relevant, exclude) boolean matrices [B, n_items] for these rows."""
        relevant = torch.zeros((len(rows), self.num_items), dtype=torch.bool)
        exclude = torch.zeros((len(rows), self.num_items), dtype=torch.bool)
        for row, (user, history, targets, time) in enumerate(rows):
            relevant[row, targets] = True
            if self.candidates is None:
                exclude[row, history] = True
                if self.outside is not None:
                    exclude[row] |= self.outside
                if time is not None and self.born is not None:
                    exclude[row] |= self.born > time  # not in the catalogue yet
            else:
                exclude[row] = True
                exclude[row, self.candidates[user]] = False
        return relevant, exclude

    def collate(self, rows) -> RankingBatch:
        users = [
            self.cache.layout.single(self.cache.history(h, self.budget))[0] for _, h, _, _ in rows
        ]
        user_ids, user_mask = pad(users, self.cache.pad_id)
        relevant, exclude = self.masks(rows)
        return RankingBatch(
            user_ids, user_mask, relevant, exclude, torch.tensor([r[0] for r in rows])
        )


def _all_in(items: list[int], allowed: set[int]) -> bool:
    return bool(items) and all(i in allowed for i in items)


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
