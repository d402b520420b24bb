"""Splitting interactions into train / validation / test, chosen by `data.split.method`.

Every split returns per-user item sequences in time order. Held-out items are lists, so one
user may have several (temporal, random and predefined splits) or exactly one (leave-one-out).

`predefined` is the source's own split: the frame's `part` column ("train" | "val" | "test"),
which a source fills from a split column, separate files or shipped folds (see
recsys_lm/data/sources/base.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from recsys_lm.errors import ConfigError, DataError


@dataclass
class Split:
    """Per-user item sequences (indices into the item table), each in time order."""

    train: list[list[int]]
    val: list[list[int]]
    test: list[list[int]]
    description: str = ""
    # Items that never occur in training (cold-start split): ID-only models cannot score them.
    cold_items: set[int] = field(default_factory=set)
    # Per-interaction values aligned with train/val/test (e.g. "rating", "behaviour"):
    # name -> (train, val, test), each a per-user list parallel to the item sequence.
    attrs: dict[str, tuple[list[list], list[list], list[list]]] = field(default_factory=dict)

    def attr(self, name: str, user: int, part: str) -> list:
        """Values of column `name` for `user`'s items in `part` ("train", "val" or "test")."""
        return self.attrs[name][PARTS.index(part)][user]

    def targets(self, user: int, stage: str) -> list[int]:
        return self.val[user] if stage == "val" else self.test[user]

    def eval_users(self, stage: str) -> list[int]:
        """Users with something held out and some history to read."""
        return [
            u for u in range(len(self.train)) if self.targets(u, stage) and self.history(u, stage)
        ]

    def history(self, user: int, stage: str) -> list[int]:
        """What the model may see when predicting `stage`: test also sees validation items."""
        if stage == "test":
            return self.train[user] + self.val[user]
        return list(self.train[user])

    def seen(self, user: int) -> set[int]:
        """Every item the user interacted with, in any part: never a valid negative."""
        return set(self.train[user]) | set(self.val[user]) | set(self.test[user])

    def counts(self, num_items: int) -> np.ndarray:
        flat = [i for seq in self.train for i in seq]
        return np.bincount(np.asarray(flat, dtype=np.int64), minlength=num_items)


PARTS = ("train", "val", "test")
KEY_COLUMNS = ("user", "item", "timestamp")
# Not per-interaction values for the heads: `part` only says where a row goes.
NOT_ATTRS = (*KEY_COLUMNS, "part")


def _sequences(
    frame: pd.DataFrame, num_users: int, mask: np.ndarray, column: str = "item"
) -> list[list]:
    out: list[list] = [[] for _ in range(num_users)]
    for user, values in frame[mask].groupby("user", sort=False)[column]:
        out[user] = values.tolist()
    return out


def _from_masks(
    frame: pd.DataFrame,
    num_users: int,
    val: np.ndarray,
    test: np.ndarray,
    description: str,
    **extra,
) -> Split:
    """Rows flagged val or test are held out; every other row trains. Columns besides
    user/item/timestamp travel along as `Split.attrs`."""
    masks = (~(test | val), val, test)
    attrs = {
        column: tuple(_sequences(frame, num_users, m, column) for m in masks)
        for column in frame.columns
        if column not in NOT_ATTRS
    }
    return Split(
        *(_sequences(frame, num_users, m) for m in masks), description, attrs=attrs, **extra
    )


def _ordered(frame: pd.DataFrame) -> pd.DataFrame:
    # Ties in time keep file order, so the split is reproducible.
    return frame.sort_values(["user", "timestamp"], kind="stable").reset_index(drop=True)


def leave_one_out(frame: pd.DataFrame, num_users: int, min_interactions: int = 3, **_) -> Split:
    """Each user's last item is test, the one before it validation (by time)."""
    frame = _ordered(frame)
    position = frame.groupby("user").cumcount(ascending=False).to_numpy()
    length = frame.groupby("user")["item"].transform("size").to_numpy()
    enough = length >= min_interactions  # shorter users only train
    test = enough & (position == 0)
    val = enough & (position == 1)
    return _from_masks(
        frame,
        num_users,
        val,
        test,
        "leave-one-out by time (last item test, second-to-last validation)",
    )


def temporal(
    frame: pd.DataFrame, num_users: int, val_ratio: float = 0.1, test_ratio: float = 0.1, **_
) -> Split:
    """One global cut in time: the latest `test_ratio` of interactions are test, the
    `val_ratio` before them validation; no training example comes from the future."""
    frame = _ordered(frame)
    times = frame["timestamp"].to_numpy()
    t_val, t_test = np.quantile(times, [1 - val_ratio - test_ratio, 1 - test_ratio])
    test = times >= t_test
    val = (times >= t_val) & ~test
    return _from_masks(
        frame,
        num_users,
        val,
        test,
        f"global temporal cut (val {val_ratio:.0%}, test {test_ratio:.0%} most recent)",
    )


def random_ratio(
    frame: pd.DataFrame,
    num_users: int,
    val_ratio: float = 0.1,
    test_ratio: float = 0.1,
    seed: int = 0,
    **_,
) -> Split:
    """Interactions assigned at random (ignores time: optimistic, but the classic protocol)."""
    frame = _ordered(frame)
    draw = np.random.default_rng(seed).random(len(frame))
    test = draw < test_ratio
    val = (draw >= test_ratio) & (draw < test_ratio + val_ratio)
    return _from_masks(
        frame,
        num_users,
        val,
        test,
        f"random (val {val_ratio:.0%}, test {test_ratio:.0%} of interactions, seed {seed})",
    )


def cold_start(
    frame: pd.DataFrame,
    num_users: int,
    val_ratio: float = 0.1,
    test_ratio: float = 0.1,
    seed: int = 0,
    **_,
) -> Split:
    """A random share of items is held out entirely: their interactions are validation or
    test, and training never sees them, so only content (text) can score them."""
    frame = _ordered(frame)
    items = np.unique(frame["item"].to_numpy())
    shuffled = np.random.default_rng(seed).permutation(items)
    n_test = max(1, int(round(test_ratio * len(items))))
    n_val = max(1, int(round(val_ratio * len(items))))
    test_items = set(shuffled[:n_test].tolist())
    val_items = set(shuffled[n_test : n_test + n_val].tolist())
    test = frame["item"].isin(test_items).to_numpy()
    val = frame["item"].isin(val_items).to_numpy()
    return _from_masks(
        frame,
        num_users,
        val,
        test,
        f"cold-start items (val {val_ratio:.0%}, test {test_ratio:.0%} of items unseen in "
        f"training, seed {seed})",
        cold_items=test_items | val_items,
    )


def predefined(frame: pd.DataFrame, num_users: int, **_) -> Split:
    """The source's own split: each row goes to the part its `part` column names. Users with
    no val (or test) rows are simply not evaluated on that stage."""
    if "part" not in frame.columns:
        raise ConfigError(
            "data.split.method",
            "predefined",
            "a source that provides a split: a `part` column (custom: "
            "data.source.interactions.split or .files; MovieLens-100K: data.source.fold; "
            "MIND: data.source.splits=[MINDsmall_train,MINDsmall_dev])",
        )
    frame = _ordered(frame)
    part = frame["part"].to_numpy()
    unknown = ~np.isin(part, PARTS)
    if unknown.any():  # canonical data is validated; a frame built elsewhere may not be
        raise DataError(f"column 'part' holds {part[unknown][0]!r}; expected one of {list(PARTS)}")
    counts = {p: int((part == p).sum()) for p in PARTS}
    return _from_masks(
        frame,
        num_users,
        part == "val",
        part == "test",
        "predefined by the source ("
        + ", ".join(f"{p} {n} interactions" for p, n in counts.items())
        + ")",
    )


SPLITS: dict[str, Callable[..., Split]] = {
    "leave_one_out": leave_one_out,
    "temporal": temporal,
    "random": random_ratio,
    "cold_start": cold_start,
    "predefined": predefined,
}


def make_split(frame: pd.DataFrame, num_users: int, method: str, **options) -> Split:
    """`frame` has integer `user`, `item`, `timestamp` columns; any other column (rating,
    behaviour) is split alongside and kept in `Split.attrs`."""
    if method not in SPLITS:
        raise ConfigError("data.split.method", method, f"one of {list(SPLITS)}")
    for key in ("val_ratio", "test_ratio"):
        value = options.get(key, 0.1)
        if not 0 < value < 1:
            raise ConfigError(f"data.split.{key}", value, "a fraction between 0 and 1")
    return SPLITS[method](frame, num_users, **options)
