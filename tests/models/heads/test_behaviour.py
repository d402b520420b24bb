"""Behaviour head: classes from the data (behaviour column or rating buckets), accuracy and
macro-F1 beside the item-majority baseline, and a reload that restores the classes."""

from __future__ import annotations

import json

import pytest
import torch

from recsys_lm.build import load_model
from recsys_lm.data.datasets.points import BehaviourTargets
from recsys_lm.errors import ConfigError, DataError
from recsys_lm.models.heads.behaviour import BehaviourHead
from recsys_lm.train import train
from tests.conftest import TINY
from tests.models.heads.pointwise import (
    best_and_logged,
    fake_data,
    fresh_datamodule,
    predictions,
    train_and_keep,
)

TARGETS = BehaviourTargets(("buy", "click", "view"), "behaviour", (), (10, 30, 60), 0)


def test_classifier_is_built_from_the_targets_and_travels_in_the_state_dict():
    head = BehaviourHead(hidden_size=4, class_weighting="balanced")
    with pytest.raises(RuntimeError, match=r"attach\(data\)"):
        head(None, None)
    head.attach(fake_data(TARGETS))
    assert head.classifier.out_features == 3 and head.classifier.weight.shape == (3, 4)
    # n / (n_classes * count): 100 / (3 * [10, 30, 60]).
    assert head.class_weights.tolist() == pytest.approx([10 / 3, 10 / 9, 10 / 18])
    fresh = BehaviourHead(hidden_size=4)
    fresh.load_state_dict(head.state_dict())  # names first, then the classifier's weights
    assert fresh.classes == ["buy", "click", "view"] and fresh.classifier.out_features == 3
    assert torch.equal(fresh.classifier.weight, head.classifier.weight)
    assert "class_weights" not in head.state_dict()  # recomputed from the data, not saved
    with pytest.raises(DataError, match="trained on classes"):
        fresh.attach(fake_data(BehaviourTargets(("neg", "pos"), "rating", (4.0,), (1, 1), 0)))
    with pytest.raises(ConfigError, match="class_weighting"):
        BehaviourHead(hidden_size=4, class_weighting="inverse")


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_gpt2"])
def test_behaviour_head_trains_reports_and_reloads(config, tmp_path, monkeypatch, backbone):
    overrides = [
        "head=behaviour",
        f"backbone={backbone}",
        "baselines=[popularity,item_majority]",
        "optim.lr=1e-2",
    ]
    result, cfg, trained = train_and_keep(config, monkeypatch, overrides)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["test"] == pytest.approx(result["test"])
    assert set(written["test"]) == {"accuracy", "macro_f1"}
    assert set(written["baselines"]["item_majority"]["test"]) == {"accuracy", "macro_f1"}
    assert "item_majority" in written["baselines"]["popularity"]["skipped"]
    targets = written["protocol"]["targets"]
    assert targets["source"] == "`behaviour` column"
    assert targets["classes"] == ["buy", "click", "view"]
    assert written["protocol"]["eval_mode"] == "pointwise"

    datamodule = fresh_datamodule(cfg, trained)
    reloaded = load_model(tmp_path / "model")
    assert reloaded.head.classes == ["buy", "click", "view"]
    expected, actual = predictions(trained.cpu(), datamodule), predictions(reloaded, datamodule)
    assert expected.shape[1] == 3
    assert torch.allclose(expected, actual, atol=1e-6)
    # The reported accuracy is the reloaded weights' own, over the whole test set.
    hits = [
        (reloaded.head(reloaded.backbone, batch).argmax(1) == batch.labels).float()
        for batch in datamodule.test_dataloader()
    ]
    assert written["test"]["accuracy"] == pytest.approx(float(torch.cat(hits).mean()), abs=1e-5)


def test_rating_buckets_with_balanced_weights_keep_the_best_macro_f1(config, tmp_path):
    result = train(
        config(
            [
                "head=behaviour",
                "head.net.class_weighting=balanced",
                "data.behaviour.column=rating",
                "data.behaviour.rating_bounds=[4]",
                "data.behaviour.rating_classes=[dislike,like]",
                "trainer.val_check_interval=2",
                "export_model=false",
                "baselines=[item_majority]",
                "logger=csv",
            ]
        )
    )
    targets = result["protocol"]["targets"]
    assert targets["source"] == "rating buckets (lower bounds [4.0])"
    assert targets["classes"] == ["dislike", "like"]
    best, logged, mode = best_and_logged(result, tmp_path, "macro_f1")
    assert mode == "max" and best == pytest.approx(max(logged))


@pytest.mark.real_data
def test_behaviour_head_on_movielens_100k_uses_rating_buckets(config, ml100k_root, tmp_path):
    result = train(
        config(
            [
                *TINY,
                "head=behaviour",
                "data=movielens_100k",
                f"data.root={ml100k_root}",
                f"data.cache_dir={tmp_path / 'cache'}",
                "baselines=[item_majority]",
                "logger=csv",
                "export_model=false",
            ],
            fast=False,
        )
    )
    targets = result["protocol"]["targets"]
    assert targets["source"].startswith("rating buckets")
    assert targets["classes"] == ["negative", "neutral", "positive"]
    # MovieLens-100K: 100,000 ratings, 1-2 / 3 / 4-5 stars.
    counts = targets["train_counts"]
    assert counts["positive"] > counts["neutral"] > counts["negative"] > 10_000
    assert 0.0 <= result["test"]["macro_f1"] <= 1.0
    assert result["baselines"]["item_majority"]["test"]["accuracy"] > 0.45
