from __future__ import annotations

import pytest
import torch

from recsys_lm.data.batches import PairBatch, RankingBatch, TwoTowerBatch
from recsys_lm.errors import ConfigError
from tests.conftest import make_datamodule


def make(tokenizer, task, **kw):
    return make_datamodule(tokenizer, task, eval_negatives=9, batch_size=4, **kw)


def test_retrieval_batches_exclude_history_and_keep_target(tokenizer):
    datamodule = make(tokenizer, "retrieval")
    dm = datamodule.data
    batch = next(iter(datamodule.test_dataloader()))
    assert isinstance(batch, RankingBatch)
    assert batch.exclude.shape == batch.relevant.shape == (len(batch.user_index), 50)
    for row, user in enumerate(batch.user_index.tolist()):
        history = dm.split.history(user, "test")
        assert batch.exclude[row, history].all()
        assert batch.exclude[row].sum() == len(set(history))
        assert batch.relevant[row].nonzero().flatten().tolist() == dm.split.test[user]
    train = next(iter(datamodule.train_dataloader()))
    assert isinstance(train, TwoTowerBatch) and train.user_ids.shape[0] == 4
    assert dm.protocol()["eval_mode"] == "full"


def test_click_eval_has_one_positive_and_n_negatives_per_user(tokenizer):
    datamodule = make(tokenizer, "click")
    dm = datamodule.data
    rows = dm.datasets["test"].rows
    users = dm.split.eval_users("test")
    assert len(rows) == len(users) * 10
    for user in users[:5]:
        mine = [r for r in rows if r[0] == user]
        assert sum(r[3] for r in mine) == 1
        seen = set(dm.split.history(user, "test")) | set(dm.split.test[user])
        assert all(r[2] not in seen for r in mine if r[3] == 0)
    batch = next(iter(datamodule.train_dataloader()))
    assert isinstance(batch, PairBatch)
    assert set(batch.token_type_ids.unique().tolist()) <= {0, 1}
    assert batch.input_ids.shape[1] <= 128
    assert dm.protocol()["eval_mode"] == "sampled-9"


def test_dynamic_padding_pads_to_the_longest_in_batch(tokenizer):
    batch = next(iter(make(tokenizer, "retrieval").train_dataloader()))
    assert batch.user_mask.sum(1).max() == batch.user_ids.shape[1]
    assert torch.all(batch.user_ids[batch.user_mask == 0] == tokenizer.pad_token_id)


def test_lengths_that_do_not_fit_the_backbone_are_refused(tokenizer):
    with pytest.raises(ConfigError, match="max_history_tokens"):
        make_datamodule(tokenizer, "retrieval", max_history_tokens=200, max_length=128)


def test_click_with_full_ranking_is_refused(tokenizer):
    with pytest.raises(ConfigError, match="data.eval_mode"):
        make_datamodule(tokenizer, "click", eval_mode="full")


def test_cold_ranking_keeps_only_cold_items_as_candidates(tokenizer):
    datamodule = make(tokenizer, "retrieval", split={"method": "cold_start"}, eval_items="cold")
    dm = datamodule.data
    cold = torch.zeros(dm.num_items, dtype=torch.bool)
    cold[sorted(dm.split.cold_items)] = True
    batch = next(iter(datamodule.test_dataloader()))
    ranked = ~batch.exclude | batch.relevant
    assert not (ranked & ~cold).any()  # no warm item competes
    assert (batch.relevant & cold).sum() == batch.relevant.sum()
    assert dm.protocol()["ranked_items"] == "cold items only"


def test_cold_ranking_needs_a_cold_start_split(tokenizer):
    with pytest.raises(ConfigError, match="data.eval_items.*cold_start"):
        make(tokenizer, "retrieval", eval_items="cold")
