"""Rating head: trains through the composed config, reports RMSE/MAE beside the bias baseline,
checkpoints the lowest RMSE, and reloads to identical predictions."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from recsys_lm.build import build_module, load_model
from recsys_lm.data.batches import PairBatch
from recsys_lm.data.datasets.points import RatingTargets
from recsys_lm.models.heads.rating import RatingHead
from recsys_lm.train import train
from tests.conftest import TINY
from tests.models.heads.pointwise import (
    best_and_logged,
    fake_data,
    fresh_datamodule,
    predictions,
    train_and_keep,
)

TARGETS = RatingTargets(mean=3.5, std=1.2, low=1.0, high=5.0, missing=0)


class Pooled(nn.Module):
    """A stand-in backbone whose pooled output is the input ids themselves."""

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return input_ids.float()


def pair(pooled: list[list[float]], labels: list[float]) -> PairBatch:
    ids = torch.tensor(pooled)
    return PairBatch(ids, ids, ids, torch.tensor(labels), torch.zeros(2), torch.zeros(2))


def test_head_starts_at_the_training_mean_and_clamps_to_the_rating_range():
    head = RatingHead(hidden_size=2, dropout=0.0)
    head.attach(fake_data(TARGETS))
    batch = pair([[0.0, 0.0], [0.0, 0.0]], [4.7, 2.3])
    assert head(Pooled(), batch).tolist() == pytest.approx([3.5, 3.5])
    # Standardised targets are +1 and -1: the loss is MSE / std^2 = 1.
    assert head.loss(Pooled(), batch).item() == pytest.approx(1.0)
    with torch.no_grad():
        head.regressor.weight.copy_(torch.tensor([[10.0, 0.0]]))
    assert head(Pooled(), pair([[1.0, 0.0], [-1.0, 0.0]], [5.0, 1.0])).tolist() == [5.0, 1.0]


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_gpt2"])
def test_rating_head_trains_reports_and_reloads(config, tmp_path, monkeypatch, backbone):
    overrides = [
        "head=rating",
        f"backbone={backbone}",
        "baselines=[popularity,bias]",
        "optim.lr=1e-2",
    ]
    result, cfg, trained = train_and_keep(config, monkeypatch, overrides)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["test"] == pytest.approx(result["test"])
    assert set(written["test"]) == {"rmse", "mae"}
    assert 0 < written["test"]["mae"] <= written["test"]["rmse"] < 4  # RMSE >= MAE
    assert set(written["baselines"]["bias"]["test"]) == {"rmse", "mae"}
    assert "baselines=['bias']" in written["baselines"]["popularity"]["skipped"]
    protocol = written["protocol"]
    assert protocol["eval_mode"] == "pointwise" and protocol["task"] == "rating"
    assert protocol["targets"]["range"] == [1.0, 5.0]

    datamodule = fresh_datamodule(cfg, trained)
    reloaded = load_model(tmp_path / "model")
    expected, actual = predictions(trained.cpu(), datamodule), predictions(reloaded, datamodule)
    assert torch.allclose(expected, actual, atol=1e-6)
    assert reloaded.head.mean.item() == pytest.approx(protocol["targets"]["train_mean"], abs=1e-4)
    assert ((actual >= 1.0) & (actual <= 5.0)).all()
    untrained = build_module(OmegaConf.load(tmp_path / "model" / "model.yaml"))
    assert not torch.allclose(predictions(untrained, datamodule), actual, atol=1e-6)


def test_the_best_checkpoint_is_the_lowest_validation_rmse(config, tmp_path):
    result = train(
        config(
            [
                "head=rating",
                "trainer.val_check_interval=2",
                "export_model=false",
                "baselines=[]",
                "logger=csv",
            ]
        )
    )
    best, logged, mode = best_and_logged(result, tmp_path, "rmse")
    assert mode == "min" and len(logged) >= 2
    assert best == pytest.approx(min(logged))


@pytest.mark.real_data
def test_rating_head_on_movielens_100k(config, ml100k_root, tmp_path):
    result = train(
        config(
            [
                *TINY,
                "head=rating",
                "data=movielens_100k",
                f"data.root={ml100k_root}",
                f"data.cache_dir={tmp_path / 'cache'}",
                "baselines=[bias]",
                "export_model=false",
            ],
            fast=False,
        )
    )
    assert result["protocol"]["targets"]["range"] == [1.0, 5.0]
    assert result["protocol"]["eval_users"]["test"] == 943
    assert 0.5 < result["test"]["rmse"] < 2.0
    # Koren's bias predictor on leave-one-out MovieLens-100K: about 1.0 RMSE.
    assert 0.8 < result["baselines"]["bias"]["test"]["rmse"] < 1.2
