from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys_lm.data.filters import k_core
from recsys_lm.data.negatives import NegativeSampler
from recsys_lm.data.sources.sample import SampleSource
from recsys_lm.errors import ConfigError
from tests.conftest import make_datamodule


def test_uniform_negatives_avoid_the_users_items_and_are_distinct():
    sampler = NegativeSampler(20)
    rng = np.random.default_rng(0)
    out = sampler.sample(rng, 0, 1, avoid={1, 2, 3}, n=10)
    assert len(out) == len(set(out)) == 10 and not set(out) & {1, 2, 3}
    assert len(sampler.sample(rng, 0, 1, avoid=set(range(18)), n=5)) == 2  # only 2 left


def test_popularity_negatives_follow_counts():
    counts = np.array([1000, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    sampler = NegativeSampler(10, "popularity", counts, alpha=1.0)
    rng = np.random.default_rng(0)
    firsts = [sampler.sample(rng, 0, 9, {9}, 1)[0] for _ in range(200)]
    assert firsts.count(0) > 150  # item 0 holds ~99% of the mass


def test_native_negatives_come_from_the_same_impression():
    sampler = NegativeSampler(
        10, "native", impressions={"i1": [4, 5, 6]}, shown_with={(0, 1): "i1"}
    )
    rng = np.random.default_rng(0)
    assert set(sampler.sample(rng, 0, 1, {1}, 3)) == {4, 5, 6}
    topped_up = sampler.sample(rng, 0, 1, {1}, 5)  # 3 native + 2 uniform
    assert {4, 5, 6} <= set(topped_up) and len(topped_up) == 5
    with pytest.raises(ConfigError, match="impression"):
        NegativeSampler(10, "native")


def test_k_core_is_iterated_until_stable():
    frame = pd.DataFrame({"user_id": [1, 1, 1, 2, 2, 3], "item_id": [1, 2, 3, 1, 2, 1]})
    kept, dropped = k_core(frame, min_user=2, min_item=2)
    # item 3 goes (1 interaction), user 3 goes (1 interaction); then everyone has >= 2.
    assert sorted(kept["user_id"].unique()) == [1, 2]
    assert sorted(kept["item_id"].unique()) == [1, 2]
    assert sum(dropped.values()) == 2


def test_sampled_retrieval_eval_ranks_only_the_candidates(tokenizer):
    dm = make_datamodule(
        tokenizer,
        "retrieval",
        SampleSource(num_users=30, num_items=80),
        eval_mode="sampled",
        eval_negatives=9,
    )
    batch = next(iter(dm.test_dataloader()))
    assert ((~batch.exclude).sum(1) == 10).all()  # 1 held-out + 9 negatives
    assert (batch.relevant & ~batch.exclude).sum(1).eq(1).all()
    assert dm.data.protocol()["eval_mode"] == "sampled-9"


def test_length_grouping_batches_similar_lengths(tokenizer):
    dm = make_datamodule(
        tokenizer,
        "click",
        SampleSource(num_users=60, num_items=80),
        batch_size=8,
        length_grouping=True,
    )
    lengths = np.array(dm.data.datasets["train"].lengths())
    spread = [
        np.ptp(lengths[idx])
        for idx in np.array_split(list(dm.train_dataloader().sampler), len(lengths) // 8)
    ]
    assert np.median(spread) < np.ptp(lengths) / 2


def test_filters_and_splits_are_recorded_in_the_protocol(tokenizer):
    dm = make_datamodule(
        tokenizer,
        "retrieval",
        SampleSource(num_users=40, num_items=80),
        split={"method": "cold_start", "test_ratio": 0.2, "val_ratio": 0.1},
        filter={"min_user_interactions": 12, "min_item_interactions": 2},
    )
    protocol = dm.data.protocol()
    assert protocol["split_method"] == "cold_start" and protocol["cold_items"] > 0
    assert protocol["filter"]["min_user_interactions"] == 12
    assert any("below" in reason for reason in protocol["dropped"])
