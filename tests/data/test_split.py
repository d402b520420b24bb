from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys_lm.data.split import leave_one_out, make_split
from recsys_lm.errors import ConfigError


def test_leave_one_out_holds_out_the_last_two_by_time():
    frame = pd.DataFrame(
        {
            "user": [0, 0, 0, 0, 1, 1],
            "item": [5, 6, 7, 8, 1, 2],
            "timestamp": [40, 10, 30, 20, 1, 2],  # user 0 out of order on purpose
        }
    )
    split = leave_one_out(frame, num_users=2)
    assert split.train[0] == [6, 8] and split.val[0] == [7] and split.test[0] == [5]
    assert split.train[1] == [1, 2] and split.val[1] == []  # too short: training only
    assert split.eval_users("test") == [0]
    assert split.history(0, "test") == [6, 8, 7]  # the test sees the validation item
    assert split.history(0, "val") == [6, 8]
    assert split.counts(10).tolist() == [0, 1, 1, 0, 0, 0, 1, 0, 1, 0]


def _frame():
    # 20 users x 50 items, each (user, item) once, at shuffled times.
    index = np.arange(400)
    return pd.DataFrame(
        {
            "user": index % 20,
            "item": index // 8,
            "timestamp": np.random.default_rng(0).permutation(400) * 10,
        }
    )


def test_temporal_split_never_trains_on_the_future():
    frame = _frame()
    split = make_split(frame, 20, "temporal", val_ratio=0.1, test_ratio=0.2)
    pairs = zip(frame["user"], frame["item"], strict=True)
    time = dict(zip(pairs, frame["timestamp"], strict=True))
    last_train = max(time[(u, i)] for u, seq in enumerate(split.train) for i in seq)
    first_test = min(time[(u, i)] for u, seq in enumerate(split.test) for i in seq)
    assert last_train < first_test
    held = sum(map(len, split.test))
    assert abs(held - 80) <= 2  # 20% of 400


def test_cold_start_items_never_appear_in_training():
    split = make_split(_frame(), 20, "cold_start", val_ratio=0.1, test_ratio=0.2, seed=3)
    trained = {i for seq in split.train for i in seq}
    tested = {i for seq in split.test for i in seq}
    assert tested and not tested & trained
    assert tested <= split.cold_items
    assert "cold-start" in split.description


def test_random_split_is_seeded_and_sized():
    a = make_split(_frame(), 20, "random", val_ratio=0.1, test_ratio=0.1, seed=1)
    b = make_split(_frame(), 20, "random", val_ratio=0.1, test_ratio=0.1, seed=1)
    assert a.test == b.test
    assert 20 <= sum(map(len, a.test)) <= 60


def test_unknown_split_and_bad_ratio_are_config_errors():
    with pytest.raises(ConfigError, match="data.split.method"):
        make_split(_frame(), 20, "by_magic")
    with pytest.raises(ConfigError, match="data.split.test_ratio"):
        make_split(_frame(), 20, "temporal", test_ratio=1.5)


def test_predefined_split_follows_the_part_column():
    frame = pd.DataFrame(
        {
            "user": [0, 0, 0, 0, 1, 1],
            "item": [5, 6, 7, 8, 1, 2],
            "timestamp": [40, 10, 30, 20, 1, 2],
            "rating": [1.0, 2.0, 3.0, 4.0, 5.0, 4.0],
            "part": ["test", "train", "val", "train", "train", "test"],
        }
    )
    split = make_split(frame, 2, "predefined")
    assert split.train == [[6, 8], [1]] and split.val == [[7], []] and split.test == [[5], [2]]
    assert split.eval_users("val") == [0] and split.eval_users("test") == [0, 1]
    assert "part" not in split.attrs and split.attr("rating", 1, "test") == [4.0]
    assert "predefined" in split.description
    with pytest.raises(ConfigError, match="data.split.method.*part"):
        make_split(frame.drop(columns="part"), 2, "predefined")
