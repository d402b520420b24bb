"""Baselines: popularity and item-kNN through the one evaluation path of the language model."""

from __future__ import annotations

import pytest
import torch

from recsys_lm.baselines import (
    BASELINES,
    ItemKNN,
    evaluate_scores,
    popularity_scores,
    run_baselines,
)
from recsys_lm.data.datamodule import RecDataModule
from recsys_lm.data.sample import SampleSource
from recsys_lm.errors import ConfigError

# 4 users, 5 items. Items 0 and 1 always go together; item 4 is the most popular.
TRAIN = [[0, 1, 4], [0, 1, 4], [2, 4], [2, 3, 4]]


def make(tokenizer, task="retrieval", **kw):
    kw.setdefault("eval_mode", "full" if task == "retrieval" else "sampled")
    dm = RecDataModule(
        SampleSource(**kw.pop("source", {})), tokenizer, task, eval_negatives=9, **kw
    )
    dm.setup()
    return dm


def test_item_knn_scores_the_co_occurring_item_first():
    knn = ItemKNN(TRAIN, num_items=5)
    scores = knn([0], [[0]])[0]
    # cos(0, 1) = 2 / (sqrt 2 * sqrt 2) = 1; cos(0, 4) = 2 / (sqrt 2 * 2) ~ 0.71; 0 for 2, 3.
    assert scores.argmax().item() == 1
    assert scores[1] == pytest.approx(1.0, abs=1e-5)
    assert scores[4] == pytest.approx(2**-0.5, abs=1e-5)
    # Popularity would have ranked item 4 first.
    assert popularity_scores(torch.bincount(torch.tensor(sum(TRAIN, []))).numpy()).argmax() == 4
    # Scores add up over the history: 3 is similar to 2 and 4, 0 and 1 to neither.
    both = knn([0], [[2, 4]])[0]
    assert both[3] > both[0] and both[3] > both[1]


def test_item_knn_keeps_only_the_top_neighbours():
    knn = ItemKNN(TRAIN, num_items=5, k_neighbors=1)
    scores = knn([0], [[0]])[0]
    assert scores[1] == pytest.approx(1.0, abs=1e-5)
    assert scores[4] < 1e-5  # pruned: only item 1 is kept as 0's neighbour
    with pytest.raises(ConfigError, match="k_neighbors"):
        ItemKNN(TRAIN, num_items=5, k_neighbors=0)


def test_item_knn_beats_popularity_on_the_sample_data(tokenizer):
    dm = make(tokenizer)
    result = run_baselines(dm, ["popularity", "item_knn"])
    for stage in ("val", "test"):
        assert result["item_knn"][stage]["ndcg@10"] > result["popularity"][stage]["ndcg@10"]


def test_popularity_vector_and_scorer_give_the_same_metrics(tokenizer):
    dm = make(tokenizer, source={"num_users": 40, "num_items": 60})
    vector = popularity_scores(dm.item_counts).float()
    scorer = BASELINES["popularity"](dm)
    assert evaluate_scores(dm, "test", vector) == evaluate_scores(dm, "test", scorer)


def test_baselines_score_click_rows(tokenizer):
    dm = make(tokenizer, "click", source={"num_users": 40, "num_items": 60})
    result = run_baselines(dm, ["popularity", "item_knn"])
    for name in ("popularity", "item_knn"):
        assert 0.0 <= result[name]["test"]["auroc"] <= 1.0


def test_unknown_baseline_is_a_config_error(tokenizer):
    dm = make(tokenizer, source={"num_users": 20, "num_items": 30})
    with pytest.raises(ConfigError, match="baselines.*item_knn"):
        run_baselines(dm, ["popularity", "itemknn"])


def test_baselines_list_from_the_command_line(config):
    from recsys_lm.train import train

    result = train(config(["baselines=[popularity,item_knn]", "export_model=false"]))
    assert set(result["baselines"]) == {"popularity", "item_knn"}
    assert "ndcg@10" in result["baselines"]["item_knn"]["test"]
