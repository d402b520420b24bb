"""Baselines: popularity and item-kNN through the one evaluation path of the language model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys_lm.baselines import (
    BASELINES,
    BiasBaseline,
    ItemKNN,
    ItemMajority,
    evaluate_scores,
    popularity_scores,
    run_baselines,
)
from recsys_lm.data.datamodule import RecDataModule
from recsys_lm.data.points import RatingTargets
from recsys_lm.data.sample import SampleSource
from recsys_lm.errors import ConfigError

# 4 users, 5 items. Items 0 and 1 always go together; item 4 is the most popular.
TRAIN = [[0, 1, 4], [0, 1, 4], [2, 4], [2, 3, 4]]


def make(tokenizer, task="retrieval", **kw):
    modes = {"retrieval": "full", "click": "sampled"}
    kw.setdefault("eval_mode", modes.get(task, "pointwise"))
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


def test_bias_baseline_matches_a_hand_computation():
    # Ratings (user, item, r): (0, 0, 5), (0, 1, 3), (1, 0, 4); mu = 4.
    users, items, ratings = np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([5.0, 3.0, 4.0])
    targets = RatingTargets(mean=4.0, std=1.0, low=1.0, high=5.0, missing=0)
    plain = BiasBaseline(users, items, ratings, 3, 3, targets, reg_item=0.0, reg_user=0.0)
    # b_0 = (1 + 0) / 2, b_1 = -1; b_u0 = ((1 - .5) + (-1 + 1)) / 2, b_u1 = (0 - .5) / 1.
    assert plain([0, 1, 2], [0, 1, 2]).tolist() == pytest.approx([4.75, 2.5, 4.0])
    shrunk = BiasBaseline(users, items, ratings, 3, 3, targets, reg_item=1.0, reg_user=1.0)
    # b_0 = 1 / (1 + 2); b_u0 = ((1 - 1/3) + (-1 + 1/2)) / (1 + 2) = 1/18.
    assert shrunk([0], [0]).item() == pytest.approx(4 + 1 / 3 + 1 / 18)
    high = RatingTargets(mean=4.0, std=1.0, low=1.0, high=4.5, missing=0)
    assert BiasBaseline(users, items, ratings, 3, 3, high, 0.0, 0.0)([0], [0]).item() == 4.5


def test_item_majority_votes_per_item_and_falls_back_to_the_global_class():
    # Item 0: classes 2, 2, 1; item 1: class 0 once; item 3: a 0/1 tie; item 2: unseen.
    items, labels = np.array([0, 0, 0, 1, 3, 3, 4, 4]), np.array([2, 2, 1, 0, 0, 1, 1, 1])
    majority = ItemMajority(items, labels, num_items=5, classes=3)
    votes = majority([0] * 4, [0, 1, 2, 3])
    assert votes.argmax(1).tolist() == [2, 0, 1, 1]  # class 1 is the most frequent overall
    assert votes.sum(1).tolist() == [1.0] * 4  # one-hot


def test_bias_baseline_beats_the_global_mean_on_the_sample_data(tokenizer):
    dm = make(tokenizer, "rating")
    mean = dm.targets.mean
    global_mean = lambda users, items: torch.full((len(users),), mean)  # noqa: E731
    for stage in ("val", "test"):
        bias = evaluate_scores(dm, stage, BASELINES["bias"](dm))
        flat = evaluate_scores(dm, stage, global_mean)
        assert bias["rmse"] < flat["rmse"] - 0.05 and bias["mae"] < flat["mae"]


def test_item_majority_beats_the_majority_class_on_the_sample_data(tokenizer):
    dm = make(tokenizer, "behaviour")
    top = int(np.argmax(dm.targets.train_counts))
    always = lambda users, items: torch.nn.functional.one_hot(  # noqa: E731
        torch.full((len(users),), top), len(dm.targets.classes)
    ).float()
    for stage in ("val", "test"):
        per_item = evaluate_scores(dm, stage, BASELINES["item_majority"](dm))
        flat = evaluate_scores(dm, stage, always)
        assert per_item["macro_f1"] > flat["macro_f1"]
        assert per_item["accuracy"] >= flat["accuracy"] - 0.02


def test_baselines_that_do_not_apply_are_skipped_with_the_reason(tokenizer):
    dm = make(tokenizer, "rating", source={"num_users": 20, "num_items": 30})
    result = run_baselines(dm, ["popularity", "bias"])
    assert "task `rating`" in result["popularity"]["skipped"]
    assert "baselines=['bias']" in result["popularity"]["skipped"]
    assert set(result["bias"]) == {"val", "test"} and "rmse" in result["bias"]["test"]
    click = make(tokenizer, "click", source={"num_users": 20, "num_items": 30})
    assert (
        "baselines=['popularity', 'item_knn', 'sasrec']"
        in run_baselines(click, ["bias"])["bias"]["skipped"]
    )


@pytest.mark.parametrize("head", ["retrieval", "click"])
def test_id_sasrec_baseline_from_the_command_line(config, head):
    """ID-SASRec trains inside the run and is scored on the run's own rows and metrics."""
    from recsys_lm.train import train

    result = train(
        config(
            [
                f"head={head}",
                "baselines=[popularity,sasrec]",
                "baseline_options.sasrec.max_epochs=2",
                "baseline_options.sasrec.eval_every=1",
                "baseline_options.sasrec.dim=16",
                "export_model=false",
            ]
        )
    )
    sasrec = result["baselines"]["sasrec"]
    assert set(sasrec["test"]) == set(result["test"])
    assert all(0.0 <= v <= 1.0 for v in sasrec["test"].values())


def test_popularity_ties_are_not_broken_by_item_index():
    """Items with equal counts (all cold items in a cold-start split) must not be ordered by
    their ids, which often follow release order or popularity; the order is fixed by a seed."""
    scores = popularity_scores(np.array([3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]))
    assert scores.argmax() == 10 and scores.argsort(descending=True)[1] == 0
    zero = scores[1:10]
    assert not torch.equal(zero.argsort(), torch.arange(9)) and not torch.equal(
        zero.argsort(descending=True), torch.arange(9)
    )
    assert torch.equal(scores, popularity_scores(np.array([3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5])))
