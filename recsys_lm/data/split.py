"""Leave-one-out by time: each user's last item is test, the one before it validation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class Split:
    """Per-user item sequences in time order (indices into the item table)."""

    train: list[list[int]]  # train[u]: items before the validation item
    val: list[int]  # held-out item, -1 where the user has too few interactions
    test: list[int]

    def eval_users(self, stage: str) -> list[int]:
        held = self.val if stage == "val" else self.test
        return [u for u, item in enumerate(held) if item >= 0 and self.train[u]]

    def history(self, user: int, stage: str) -> list[int]:
        """What the model may see when predicting `stage`: test also sees the validation item."""
        if stage == "test":
            return self.train[user] + [self.val[user]]
        return list(self.train[user])

    def counts(self, num_items: int) -> np.ndarray:
        return np.bincount(
            np.concatenate([np.asarray(s, dtype=np.int64) for s in self.train] or [[]]),
            minlength=num_items,
        )


def leave_one_out(interactions: pd.DataFrame, num_users: int, min_interactions: int = 3) -> Split:
    """`interactions` has integer `user`, `item`, `timestamp`; ties keep file order."""
    ordered = interactions.sort_values(["user", "timestamp"], kind="stable")
    train: list[list[int]] = [[] for _ in range(num_users)]
    val = [-1] * num_users
    test = [-1] * num_users
    for user, items in ordered.groupby("user", sort=False)["item"]:
        seq = items.tolist()
        if len(seq) < min_interactions:
            train[user] = seq  # too short to hold anything out: training only
            continue
        train[user], val[user], test[user] = seq[:-2], seq[-2], seq[-1]
    return Split(train, val, test)
