"""Co-occurring item pairs: training sequences only, window, repeats, collation."""

from __future__ import annotations

import numpy as np
import pytest

from recsys_lm.data.cooccurrence import PairSet, cooccurring_pairs
from recsys_lm.errors import ConfigError


def test_adjacent_pairs_in_sequence_order():
    pairs = cooccurring_pairs([[1, 2, 3], [4, 5]], window=1)
    assert pairs.tolist() == [[1, 2], [2, 3], [4, 5]]


def test_window_two_adds_items_one_apart():
    pairs = cooccurring_pairs([[1, 2, 3, 4]], window=2)
    assert sorted(map(tuple, pairs.tolist())) == [(1, 2), (1, 3), (2, 3), (2, 4), (3, 4)]


def test_repeats_make_no_self_pair_and_short_sequences_none():
    pairs = cooccurring_pairs([[7, 7, 8], [9], []], window=3)
    assert sorted(map(tuple, pairs.tolist())) == [(7, 8), (7, 8)]
    assert cooccurring_pairs([[1], []]).shape == (0, 2)


def test_window_below_one_is_refused():
    with pytest.raises(ConfigError, match="preadapt.window"):
        cooccurring_pairs([[1, 2]], window=0)


def test_only_training_items_enter_pairs(config):
    """A leave-one-out split's held-out items make no pair with the item before them."""
    from recsys_lm.build import build_module, check_config
    from recsys_lm.data.prepared import prepare

    cfg = config(["head=sequential", "peft=none", "freeze=head_only"])
    checked = check_config(cfg)
    backbone = build_module(cfg).backbone
    data = prepare(checked.source, checked.settings, checked.task, backbone.tokenizer, 128)
    pairs = {tuple(p) for p in cooccurring_pairs(data.split.train).tolist()}
    train_pairs = {
        (a, b) for seq in data.split.train for a, b in zip(seq, seq[1:], strict=False) if a != b
    }
    assert pairs == train_pairs
    # each user's (last training item, validation item) pair is absent unless another user
    # took the two items one after the other in training
    held_out = {
        (seq[-1], val[0]) for seq, val in zip(data.split.train, data.split.val, strict=True)
    }
    assert held_out - train_pairs, "the sample should hold some held-out-only pairs"
    assert not (held_out - train_pairs) & pairs


def test_pair_set_embeds_each_distinct_item_once(tokenizer):
    from recsys_lm.data.datasets.examples import ItemSet
    from tests.conftest import make_datamodule

    data = make_datamodule(tokenizer, "sequential").data
    pairs = np.array([[0, 1], [2, 3], [4, 0]])
    dataset = PairSet(pairs, ItemSet(data.num_items, data.tokens))
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    index = batch.items.item_index
    assert sorted(index.tolist()) == [0, 1, 2, 3, 4]  # item 0 once, though in two pairs
    assert index[batch.first].tolist() == [0, 2, 4]
    assert index[batch.second].tolist() == [1, 3, 0]
    # each row holds its own item's tokens
    own = data.items.collate([3])
    row = int((index == 3).nonzero())
    width = int(own.item_mask.sum())
    assert batch.items.item_ids[row, :width].tolist() == own.item_ids[0, :width].tolist()


def test_cold_start_items_never_enter_a_pair(config):
    """The cold-start split holds items out whole: none of them may be pre-adapted on."""
    from recsys_lm.build import build_module, check_config
    from recsys_lm.data.prepared import prepare

    cfg = config(
        ["head=sequential", "peft=none", "freeze=head_only", "data.split.method=cold_start"]
    )
    checked = check_config(cfg)
    backbone = build_module(cfg).backbone
    data = prepare(checked.source, checked.settings, checked.task, backbone.tokenizer, 128)
    pairs = cooccurring_pairs(data.split.train, window=3)
    assert data.split.cold_items and len(pairs)
    assert not set(pairs.ravel().tolist()) & data.split.cold_items
