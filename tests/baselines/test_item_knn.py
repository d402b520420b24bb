"""Item-kNN: cosine neighbours of the history's items, popularity only as a tie-break."""

from __future__ import annotations

import pytest
import torch

from recsys_lm.baselines import run_baselines
from recsys_lm.baselines.item_knn import ItemKNN
from recsys_lm.baselines.popularity import popularity_scores
from recsys_lm.errors import ConfigError

# 4 users, 5 items. Items 0 and 1 always go together; item 4 is the most popular.
TRAIN = [[0, 1, 4], [0, 1, 4], [2, 4], [2, 3, 4]]
MEDIUM = (("num_users", 80), ("num_items", 100))


def test_item_knn_scores_the_co_occurring_item_first():
    knn = ItemKNN(TRAIN, num_items=5)
    scores = knn([0], [[0]])[0]
    # cos(0, 1) = 2 / (sqrt 2 * sqrt 2) = 1; cos(0, 4) = 2 / (sqrt 2 * 2) ~ 0.71; 0 for 2, 3.
    assert scores.argmax().item() == 1
    # (plus a popularity tie-break below 1e-4)
    assert scores[1] == pytest.approx(1.0, abs=1e-4)
    assert scores[4] == pytest.approx(2**-0.5, abs=1e-4)
    # Popularity would have ranked item 4 first.
    assert popularity_scores(torch.bincount(torch.tensor(sum(TRAIN, []))).numpy()).argmax() == 4
    # Scores add up over the history: 3 is similar to 2 and 4, 0 and 1 to neither.
    both = knn([0], [[2, 4]])[0]
    assert both[3] > both[0] and both[3] > both[1]


def test_item_knn_keeps_only_the_top_neighbours():
    knn = ItemKNN(TRAIN, num_items=5, k_neighbors=1)
    scores = knn([0], [[0]])[0]
    assert scores[1] == pytest.approx(1.0, abs=1e-4)
    assert scores[4] < 1e-4  # pruned: only item 1 is kept as 0's neighbour
    with pytest.raises(ConfigError, match="k_neighbors"):
        ItemKNN(TRAIN, num_items=5, k_neighbors=0)


def test_item_knn_blocks_give_the_same_similarities():
    """The similarity matrix is built in blocks of items; the block size changes nothing."""
    whole = ItemKNN(TRAIN, num_items=5)
    blocked = ItemKNN(TRAIN, num_items=5, block_entries=5)  # one item per block
    histories = [[0], [2, 4], [3]]
    assert torch.equal(whole([0, 1, 2], histories), blocked([0, 1, 2], histories))


def test_item_knn_beats_popularity_on_the_sample_data(prepared):
    result = run_baselines(prepared(source=MEDIUM), ["popularity", "item_knn"])
    for stage in ("val", "test"):  # the sample's users follow category habits
        assert result["item_knn"][stage]["ndcg@10"] > result["popularity"][stage]["ndcg@10"] + 0.1


def test_baselines_score_click_rows_better_than_chance(prepared):
    """Click rows: each candidate's column of the scores; both rank the clicked item above
    uniformly sampled negatives more often than not."""
    result = run_baselines(prepared("click"), ["popularity", "item_knn"], {"item_knn": {}})
    for name in ("popularity", "item_knn"):
        assert set(result[name]["test"]) == {"auroc"}
        assert result[name]["test"]["auroc"] > 0.6
