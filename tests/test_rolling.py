"""`python -m recsys_lm.rolling`: stale, refreshed and retrained models on every window."""

from __future__ import annotations

import json

import pytest
from hydra import initialize_config_dir

from recsys_lm.rolling import STAGES, protocol
from tests.conftest import CONFIG_DIR, make_config


@pytest.mark.slow
def test_each_window_has_stale_refreshed_and_retrained_scores(tmp_path):
    cfg = make_config(
        tmp_path,
        [
            "experiment=refresh_video",
            "data=sample_video",
            "backbone=tiny_bert",
            "data.split.windows=3",
            "baselines=[popularity]",
            "export_model=true",
            "rolling.refresh.budget.max_epochs=1",
        ],
    )
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        rows = protocol(cfg)["windows"]
    assert [row["window"] for row in rows] == [0, 1, 2]
    assert rows[0]["stale"] == rows[0]["refreshed"] == rows[0]["retrained"]
    for row in rows[1:]:
        for model in ("stale", "refreshed", "retrained"):
            assert set(row[model]) == set(STAGES) and "ndcg@10" in row[model]["test"]
        assert row["refresh_fit_s"] > 0 and row["retrain_fit_s"] > 0
        assert row["baselines"]["popularity"]["test"]["ndcg@10"] > 0
    # the chain: window 2's refresh starts from window 1's refreshed model
    second = json.loads((tmp_path / "refresh-w2" / "refresh.json").read_text())
    assert second["parent"] == "refresh-w1" and second["plan"]["window"] == 2
    first = json.loads((tmp_path / "refresh-w1" / "refresh.json").read_text())
    assert second["data_window"][0] == first["cutoff"]  # fresh = after its parent's data
    bounds = rows[2]["protocol"]["bounds"]
    assert rows[2]["protocol"]["window"] == 2 and bounds[2] < bounds[3]
    table = (tmp_path / "rolling.md").read_text().splitlines()
    assert table[0] == "All test events, ndcg@10:" and table[5].startswith("| 1 |")
    assert sum(line.startswith("| 2 |") for line in table) == 2  # both tables
    again = protocol(cfg)["windows"]  # finished steps are read, not run again
    assert again[2]["refreshed"] == rows[2]["refreshed"]


@pytest.mark.parametrize(
    ("experiment", "budget"),
    [
        ("refresh_video", {"max_steps": -1, "max_epochs": 14, "check_val_every_n_epoch": 7}),
        (
            "refresh_video_two_tower",  # val_check_interval: a trainer key refresh.yaml lacks
            {"max_steps": 200, "max_epochs": 1, "check_val_every_n_epoch": 1,
             "val_check_interval": 50},
        ),
    ],
)  # fmt: skip
def test_each_experiments_refresh_settings_reach_the_refresh(tmp_path, experiment, budget):
    from omegaconf import OmegaConf, open_dict

    from recsys_lm.rolling import refresh_config

    cfg = make_config(tmp_path, [f"experiment={experiment}"], fast=False)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        refresh_cfg = refresh_config(cfg, tmp_path / "parent", 2, tmp_path / "r")
        assert OmegaConf.to_container(refresh_cfg.budget) == budget
        assert refresh_cfg.window == 2 and refresh_cfg.replay == 1.0 and refresh_cfg.lr is None
        with open_dict(cfg):
            cfg.rolling.refresh.replya = 2.0  # a misspelt key is refused, not ignored
        with pytest.raises(Exception, match="replya"):
            refresh_config(cfg, tmp_path / "parent", 2, tmp_path / "r")
