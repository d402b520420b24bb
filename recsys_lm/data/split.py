"""Splitting interactions into train / validation / test, chosen by `data.split.method`.

Every split returns per-user item sequences in time order. Held-out items are lists, so one
user may have several (temporal, random and predefined splits) or exactly one (leave-one-out).

`predefined` is the source's own split: the frame's `part` column ("train" | "val" | "test"),
which a source fills from a split column, separate files or shipped folds (see
recsys_lm/data/sources/base.py).

`rolling` cuts the log by global time into an initial period and K later windows and tests
one of them prequentially: each interaction is its own evaluation row, ranked given the
user's history up to that moment, among the items that exist by then (`Split.eval_row`).
With `fresh_after` it also marks the training interactions newer than a model's data cut-off
(`Split.fresh_from`): a refresh trains on those plus a replay sample of the rest.
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
    # Rolling protocol: val and test rows are single interactions in time (prequential).
    prequential: bool = False
    # Per stage ("val", "test"), per user: each held-out interaction's time (prequential).
    times: dict[str, list[list[int]]] = field(default_factory=dict)
    # Item -> time of its first interaction in the log: a prequential row ranks only the
    # items that exist at its time. None: every item always competes.
    born: np.ndarray | None = None
    # Per user: index into `train` from which interactions are newer than a model's data
    # cut-off (refresh). None: every training interaction is equally new.
    fresh_from: list[int] | None = None
    # What the protocol reports about itself (window bounds, sizes); into metrics.json.
    details: dict = field(default_factory=dict)

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

    def eval_rows(self, stage: str) -> list[tuple[int, int | None]]:
        """(user, position) of each evaluation row: one per user (position None) or, in a
        prequential split, one per held-out interaction that has some history before it."""
        if not self.prequential:
            return [(user, None) for user in self.eval_users(stage)]
        out = []
        for user in range(len(self.train)):
            before = len(self.history(user, stage))
            held = len(self.targets(user, stage))
            out.extend((user, j) for j in range(held) if before + j > 0)
        return out

    def eval_row(self, user: int, position: int | None, stage: str):
        """(user, history, targets, time): what one evaluation row ranks. Prequential rows
        see the earlier held-out interactions of the same stage as history, and carry
        their time (items born later do not compete)."""
        history, targets = self.history(user, stage), self.row_targets(user, position, stage)
        if position is None:
            return user, history, targets, None
        time = self.times[stage][user][position]
        return user, history + self.targets(user, stage)[:position], targets, time

    def row_targets(self, user: int, position: int | None, stage: str) -> list[int]:
        """The held-out items one evaluation row ranks (`eval_row` without the history)."""
        targets = self.targets(user, stage)
        return targets if position is None else [targets[position]]

    def is_fresh(self, user: int, position: int) -> bool:
        """Whether training interaction `position` of `user` is newer than the cut-off."""
        return self.fresh_from is None or position >= self.fresh_from[user]

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


def replay_sample(fresh: np.ndarray, replay: float, seed: int) -> np.ndarray:
    """Indices of the training rows a refresh uses: every fresh row plus a seeded sample of
    `replay` x as many older ones (all of them when there are fewer), in row order."""
    fresh = np.asarray(fresh, dtype=bool)
    old = np.flatnonzero(~fresh)
    take = min(len(old), int(round(replay * fresh.sum())))
    picked = np.random.default_rng(seed).choice(old, size=take, replace=False)
    return np.sort(np.concatenate([np.flatnonzero(fresh), picked]))


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


def window_bounds(
    times: np.ndarray,
    windows: int,
    initial_ratio: float,
    window_days: float | None = None,
    cuts: list[int] | None = None,
) -> list[float]:
    """Start times of the K windows plus the end (K + 1 values, increasing): `cuts` as
    given, else windows of `window_days` ending after the last interaction, else K windows
    of equal interaction counts after the first `initial_ratio` of the log."""
    last = float(times.max()) + 1
    if cuts:
        starts = [float(c) for c in cuts]
        if any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
            raise ConfigError("data.split.cuts", cuts, "increasing Unix times")
        return [*starts, max(last, starts[-1] + 1)]
    if window_days is not None:
        if window_days <= 0:
            raise ConfigError("data.split.window_days", window_days, "a positive duration")
        span = window_days * 86_400
        return [last - (windows - k) * span for k in range(windows)] + [last]
    if not 0 < initial_ratio < 1:
        raise ConfigError("data.split.initial_ratio", initial_ratio, "a fraction between 0 and 1")
    ordered = np.sort(times)
    shares = [initial_ratio + k * (1 - initial_ratio) / windows for k in range(windows)]
    return [float(ordered[min(len(ordered) - 1, int(q * len(ordered)))]) for q in shares] + [last]


def rolling(
    frame: pd.DataFrame,
    num_users: int,
    windows: int = 4,
    window: int = 0,
    initial_ratio: float = 0.5,
    window_days: float | None = None,
    cuts: list[int] | None = None,
    val_ratio: float = 0.25,
    fresh_after: int | None = None,
    **_,
) -> Split:
    """The rolling time protocol: test = window `window` of `windows`, ranked prequentially;
    validation = the latest interactions before it (val_ratio x the test window's size);
    training = everything older. Later windows are the future: not read at all."""
    if windows < 1:
        raise ConfigError("data.split.windows", windows, "a positive number of windows")
    bounds = window_bounds(frame["timestamp"].to_numpy(), windows, initial_ratio, window_days, cuts)
    if not 0 <= window < len(bounds) - 1:
        raise ConfigError("data.split.window", window, f"a window index in [0, {len(bounds) - 1})")
    frame = _ordered(frame)
    times = frame["timestamp"].to_numpy()
    born = _first_seen(frame)
    start, end = bounds[window], bounds[window + 1]
    frame, times = frame[times < end].reset_index(drop=True), times[times < end]
    test = times >= start
    if not test.any() or test.all():
        raise ConfigError(
            "data.split",
            {"window": window, "start": start},
            "a window with data before it and in it",
        )
    n_val = max(1, int(round(val_ratio * test.sum())))
    t_val = np.sort(times[~test])[-min(n_val, int((~test).sum()))]
    val = ~test & (times >= t_val)
    new_items = (born >= start) & (born < end)  # first interaction inside the test window
    split = _from_masks(
        frame,
        num_users,
        val,
        test,
        f"rolling by time: window {window} of {len(bounds) - 1} tested prequentially; "
        f"validation the latest {int(val.sum())} interactions before it",
        cold_items={int(i) for i in np.flatnonzero(new_items)},
        prequential=True,
        born=born,
    )
    split.times = {
        stage: _sequences(frame, num_users, mask, "timestamp")
        for stage, mask in (("val", val), ("test", test))
    }
    train_times = _sequences(frame, num_users, ~(val | test), "timestamp")
    if fresh_after is not None:
        split.fresh_from = [int(np.searchsorted(t, fresh_after, side="right")) for t in train_times]
    split.details = {
        "window": window,
        "windows": len(bounds) - 1,
        "bounds": [int(b) for b in bounds],
        "test_interactions": int(test.sum()),
        "val_interactions": int(val.sum()),
        "val_start": int(t_val),
        "train_interactions": int((~(val | test)).sum()),
        "fresh_after": fresh_after,
        "fresh_interactions": None
        if split.fresh_from is None
        else int(sum(len(t) - f for t, f in zip(train_times, split.fresh_from, strict=True))),
    }
    return split


def _first_seen(frame: pd.DataFrame) -> np.ndarray:
    """Item -> time of its first interaction (inf for items never seen)."""
    size = int(frame["item"].max()) + 1
    born = np.full(size, np.inf)
    first = frame.groupby("item")["timestamp"].min()
    born[first.index.to_numpy()] = first.to_numpy()
    return born


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
    "rolling": rolling,
}
# Options of the rolling protocol only (the other splits ignore them).
ROLLING_ONLY = ("windows", "window", "initial_ratio", "window_days", "cuts", "fresh_after")


def make_split(frame: pd.DataFrame, num_users: int, method: str, **options) -> Split:
    """`frame` has integer `user`, `item`, `timestamp` columns; any other column (rating,
    behaviour) is split alongside and kept in `Split.attrs`."""
    if method not in SPLITS:
        raise ConfigError("data.split.method", method, f"one of {list(SPLITS)}")
    for key in ("val_ratio", "test_ratio"):
        value = options.get(key, 0.1)
        if not 0 < value < 1:
            raise ConfigError(f"data.split.{key}", value, "a fraction between 0 and 1")
    if method != "rolling" and options.get("fresh_after") is not None:
        raise ConfigError(
            "data.split.fresh_after", options["fresh_after"], "null unless method=rolling"
        )
    return SPLITS[method](frame, num_users, **options)
