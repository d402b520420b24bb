"""Pointwise rows (rating, behaviour): which interactions, which histories, which targets."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_lm.data.batches import PairBatch
from recsys_lm.data.canonical import CanonicalData
from recsys_lm.data.datasets.points import BehaviourTargets
from recsys_lm.errors import ConfigError
from tests.conftest import make_datamodule


@dataclass
class TableSource:
    """An in-memory source: 6 users x 5 interactions over 8 items, with chosen columns."""

    columns: dict  # extra interaction columns: name -> 30 values
    name: str = "table"

    def prepare(self) -> None:
        pass

    def load(self) -> CanonicalData:
        items = pd.DataFrame({"item_id": [f"i{i}" for i in range(8)]})
        items["title"] = [f"item number {i}" for i in range(8)]
        interactions = pd.DataFrame(
            {
                "user_id": [f"u{u}" for u in range(6) for _ in range(5)],
                "item_id": [f"i{(u + t) % 8}" for u in range(6) for t in range(5)],
                "timestamp": np.arange(30, dtype="int64") + 1_600_000_000,
                **self.columns,
            }
        )
        return CanonicalData(self.name, items, interactions)


def loaders(tokenizer, task, source=None, **kw):
    """The set-up RecDataModule (its loaders) for a pointwise task."""
    return make_datamodule(
        tokenizer, task, source, eval_mode="pointwise", batch_size=4, use_cache=False, **kw
    )


def make(tokenizer, task, source=None, **kw):
    return loaders(tokenizer, task, source, **kw).data


def test_training_rows_are_every_interaction_with_its_earlier_items(tokenizer):
    dm = make(tokenizer, "rating")
    rows = [dm.datasets["train"][i] for i in range(len(dm.datasets["train"]))]
    assert len(rows) == sum(map(len, dm.split.train))
    user = 3
    mine = [r for r in rows if r[0] == user]
    seq, ratings = dm.split.train[user], dm.split.attr("rating", user, "train")
    assert [r[2] for r in mine] == seq
    assert [r[1] for r in mine] == [seq[:t] for t in range(len(seq))]
    assert [r[3] for r in mine] == ratings


def test_held_out_rows_read_the_stage_history(tokenizer):
    dm = make(tokenizer, "behaviour")
    for stage in ("val", "test"):
        rows = [dm.datasets[stage][i] for i in range(len(dm.datasets[stage]))]
        users = dm.split.eval_users(stage)
        assert [r[0] for r in rows] == users  # leave-one-out: one held-out row per user
        for user, history, item, label in rows[:5]:
            assert history == dm.split.history(user, stage)
            assert [item] == dm.split.targets(user, stage)
            value = dm.split.attr("behaviour", user, stage)[0]
            assert dm.targets.classes[label] == value


def test_batches_carry_float_ratings_and_long_classes(tokenizer):
    rating = next(iter(loaders(tokenizer, "rating").train_dataloader()))
    behaviour = next(iter(loaders(tokenizer, "behaviour").val_dataloader()))
    assert isinstance(rating, PairBatch) and rating.labels.dtype == torch.float32
    assert set(rating.labels.tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert behaviour.labels.dtype == torch.long
    assert set(behaviour.labels.tolist()) <= {0, 1, 2}
    assert set(rating.token_type_ids.unique().tolist()) <= {0, 1}


def test_rating_statistics_come_from_training_and_missing_ratings_are_left_out(tokenizer):
    ratings = [float(1 + i % 5) for i in range(30)]
    ratings[7] = math.nan  # user 1's 3rd interaction: a training row
    dm = make(tokenizer, "rating", TableSource({"rating": ratings}))
    train = [v for seq in dm.split.attrs["rating"][0] for v in seq if not math.isnan(v)]
    assert dm.targets.mean == pytest.approx(np.mean(train))
    assert dm.targets.std == pytest.approx(np.std(train))
    # Each user rates 1..5 in order, so 4 and 5 are held out: the range is the training one.
    assert (dm.targets.low, dm.targets.high, dm.targets.missing) == (1.0, 3.0, 1)
    assert len(dm.datasets["train"]) == len(train)
    protocol = dm.protocol()
    assert protocol["eval_mode"] == "pointwise"
    assert protocol["targets"]["missing"] == 1


def test_rating_buckets_follow_the_bounds():
    targets = BehaviourTargets(("neg", "mid", "pos"), "rating", (3.0, 4.0), (), 0)
    assert [targets.encode(r) for r in (1, 2.5, 3, 3.5, 4, 5)] == [0, 0, 1, 1, 2, 2]
    assert targets.encode(math.nan) is None


def test_behaviour_prefers_the_behaviour_column_and_says_which(tokenizer):
    dm = make(tokenizer, "behaviour")
    assert dm.targets.classes == ("buy", "click", "view")
    assert dm.protocol()["targets"]["source"] == "`behaviour` column"
    assert sum(dm.targets.train_counts) == sum(map(len, dm.split.train))
    buckets = make(tokenizer, "behaviour", behaviour={"column": "rating"})
    assert buckets.targets.classes == ("negative", "neutral", "positive")
    assert buckets.protocol()["targets"]["source"].startswith("rating buckets")


def test_data_with_ratings_only_gets_rating_buckets(tokenizer):
    source = TableSource({"rating": [float(1 + i % 5) for i in range(30)]})
    dm = make(
        tokenizer,
        "behaviour",
        source,
        behaviour={"rating_bounds": [4], "rating_classes": ["no", "yes"]},
    )
    assert dm.targets.classes == ("no", "yes")
    assert dm.targets.train_counts == (
        sum(r < 4 for seq in dm.split.attrs["rating"][0] for r in seq),
        sum(r >= 4 for seq in dm.split.attrs["rating"][0] for r in seq),
    )


def test_rating_on_data_without_ratings_is_a_specific_config_error(tokenizer):
    with pytest.raises(ConfigError) as err:
        make(tokenizer, "rating", TableSource({}, name="clicks_only"))
    message = str(err.value)
    assert "`head` = 'rating'" in message
    assert "`clicks_only` has no `rating` column" in message
    assert "head=click or head=retrieval" in message and "data=movielens_100k" in message


def test_behaviour_on_data_without_either_column_is_a_specific_config_error(tokenizer):
    with pytest.raises(ConfigError, match="`clicks_only` has neither.*head=click"):
        make(tokenizer, "behaviour", TableSource({}, name="clicks_only"))
    only_ratings = TableSource({"rating": [3.0] * 30}, name="rated")
    with pytest.raises(ConfigError, match="data.behaviour.column.*`rated` has no `behaviour`"):
        make(tokenizer, "behaviour", only_ratings, behaviour={"column": "behaviour"})


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"column": "stars"}, "data.behaviour.column"),
        ({"rating_bounds": [4, 3]}, "data.behaviour.rating_bounds"),
        ({"rating_classes": ["low", "high"]}, "data.behaviour.rating_classes"),
    ],
)
def test_bad_behaviour_options_are_config_errors(tokenizer, options, key):
    with pytest.raises(ConfigError, match=key):
        make(tokenizer, "behaviour", behaviour={"column": "rating", **options})


def test_pointwise_tasks_refuse_ranking_eval_modes_and_vice_versa(tokenizer):
    with pytest.raises(ConfigError, match="'pointwise'.*nothing is ranked"):
        make_datamodule(tokenizer, "rating", eval_mode="full")
    with pytest.raises(ConfigError, match="task `click`"):
        make_datamodule(tokenizer, "click", eval_mode="pointwise")
