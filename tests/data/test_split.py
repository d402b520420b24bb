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


# -- the rolling time protocol -------------------------------------------------------------------
def _log():
    """Two users, times 10..120: item 9 first appears at 90, item 7 at 110 (the future)."""
    return pd.DataFrame(
        {
            "user": [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1],
            "item": [1, 2, 3, 1, 4, 5, 2, 6, 9, 9, 7, 8],
            "timestamp": [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120],
        }
    )


def test_rolling_tests_one_window_and_never_reads_the_future():
    split = make_split(
        _log(), 2, "rolling", windows=2, window=0, cuts=[70, 110], val_ratio=0.5, seed=0
    )
    # window 0 = [70, 110): 4 interactions; validation = the latest 2 before 70 (50, 60)
    assert split.test == [[2, 9], [6, 9]] and split.times["test"] == [[70, 90], [80, 100]]
    assert split.val == [[4], [5]] and split.train == [[1, 3], [2, 1]]
    assert 7 not in split.seen(0) and 8 not in split.seen(1)  # window 1 is not read
    assert split.details["bounds"] == [70, 110, 121] and split.details["val_start"] == 50
    assert split.cold_items == {6, 9}  # first seen inside the tested window
    later = make_split(_log(), 2, "rolling", windows=2, window=1, cuts=[70, 110], val_ratio=0.5)
    assert later.test == [[7], [8]] and later.val == [[], [9]]  # the latest 1 before 110


def test_rolling_windows_by_count_and_by_days():
    times = np.arange(100) * 86_400
    frame = pd.DataFrame({"user": np.arange(100) % 5, "item": np.arange(100), "timestamp": times})
    by_count = make_split(frame, 5, "rolling", windows=4, window=3, initial_ratio=0.6)
    assert by_count.details["test_interactions"] == 10  # 40% of the log in 4 equal windows
    by_days = make_split(frame, 5, "rolling", windows=2, window=0, window_days=10)
    # the last window ends just after the last interaction (day 99)
    assert by_days.details["bounds"] == [79 * 86_400 + 1, 89 * 86_400 + 1, 99 * 86_400 + 1]


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"windows": 2, "window": 2}, "data.split.window"),
        ({"windows": 0}, "data.split.windows"),
        ({"cuts": [50, 40]}, "data.split.cuts"),
        ({"initial_ratio": 1.5}, "data.split.initial_ratio"),
    ],
)
def test_rolling_mistakes_name_their_key(options, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make_split(_log(), 2, "rolling", **options)
    with pytest.raises(ConfigError, match="fresh_after"):
        make_split(_log(), 2, "temporal", fresh_after=5)


def test_prequential_rows_see_earlier_events_and_rank_only_items_born_by_then():
    from recsys_lm.data.datasets.examples import RankingSet

    split = make_split(_log(), 2, "rolling", windows=2, window=0, cuts=[70, 110], val_ratio=0.5)
    rows = RankingSet(split, "test", 10, cache=None, budget=0)
    assert len(rows) == 4
    assert rows[1] == (0, [1, 3, 4, 2], [9], 90)  # user 0's second test event sees the first
    relevant, exclude = rows.masks([rows[0], rows[1]])
    assert relevant[0, 2] and relevant[1, 9]
    assert exclude[0, 9] and exclude[0, 7] and exclude[0, 8]  # not born at time 70
    assert not exclude[1, 9] and exclude[1, 7]  # 9 is born at 90; 7 only at 110
    assert exclude[0, 1] and exclude[0, 3] and not exclude[0, 5]  # seen items excluded
    new = rows.new_item_rows()
    assert [row[2] for row in new] == [[9], [6], [9]] and len(rows) == 4
    among = rows.new_item_rows(among_new=True)
    _, exclude = among.masks([among[1]])  # user 1 takes item 6 at time 80
    assert exclude[0].tolist() == [i not in (6,) for i in range(10)]  # 9 is not born yet
    with pytest.raises(ConfigError, match="data.eval_mode"):
        RankingSet(split, "test", 10, None, 0, sampler=object(), negatives=2)


def test_fresh_examples_plus_a_replay_sample_train_a_refresh():
    from recsys_lm.data.datasets.sequences import SequenceSet

    frame = pd.DataFrame(
        {
            "user": np.repeat(np.arange(6), 10),
            "item": np.arange(60) % 17,
            "timestamp": np.arange(60),
        }
    )  # users 0-5 one after another: users 4 and 5 act after time 39
    base = {"windows": 1, "window": 0, "cuts": [58], "val_ratio": 0.5}
    split = make_split(frame, 6, "rolling", fresh_after=39, **base)
    assert split.fresh_from == [10, 10, 10, 10, 0, 0]
    assert split.details["fresh_interactions"] == 10 + 7
    everything = SequenceSet(make_split(frame, 6, "rolling", **base), max_len=4)
    fresh_only = SequenceSet(split, max_len=4, replay=0.0)
    replayed = SequenceSet(split, max_len=4, replay=1.0, seed=3)
    # users of 10 and 7 training items, cut into windows of 5: 3 + 2 fresh, 4 x 3 older
    assert len(fresh_only.rows) == 5 and len(everything.rows) == 17
    assert all(w[-1] == i % 17 for w, i in zip(fresh_only.rows, [49, 45, 41, 56, 52], strict=True))
    assert len(replayed.rows) == 10 and all(r in replayed.rows for r in fresh_only.rows)
    assert replayed.rows == SequenceSet(split, max_len=4, replay=1.0, seed=3).rows
