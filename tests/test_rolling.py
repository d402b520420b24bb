"""`python -m recsys_lm.rolling`: stale, refreshed and retrained models on every window."""

from __future__ import annotations

import json

import pytest
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from recsys_lm.data.prepared import NEW_AMONG_NEW
from recsys_lm.rolling import STAGES, protocol, protocol_seeds, seeds_table, summarize_seeds
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
    from omegaconf import open_dict

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


def _row(window: int, stale: float, refreshed: float, retrained: float) -> dict:
    def scores(value: float) -> dict:
        return {"test": {"ndcg@10": value}, NEW_AMONG_NEW: {"ndcg@10": value / 2}}

    row = {
        "window": window,
        "stale": scores(stale),
        "refreshed": scores(refreshed),
        "retrained": scores(retrained),
        "baselines": {"popularity": scores(0.04)},
        "retrain_steps": 300,
        "retrain_fit_s": 100.0,
    }
    if window:
        row.update(refresh_steps=60, refresh_fit_s=20.0)
    return row


def test_seeds_summary_is_mean_and_sample_std_per_window():
    runs = {
        42: [_row(0, 0.08, 0.08, 0.08), _row(1, 0.07, 0.09, 0.10)],
        43: [_row(0, 0.10, 0.10, 0.10), _row(1, 0.05, 0.07, 0.07)],
    }
    summary = summarize_seeds(runs, 10)
    assert summary["seeds"] == [42, 43] and summary["metric"] == "ndcg@10"
    first, second = summary["windows"]
    assert first["all/stale"]["mean"] == pytest.approx(0.09)
    assert first["all/stale"]["std"] == pytest.approx(0.02**0.5 / 10)  # ddof=1
    assert "all/refreshed_over_retrained" not in first and "refresh_steps" not in first
    assert second["all/refreshed_over_retrained"]["mean"] == pytest.approx((0.9 + 1.0) / 2)
    assert second["new_among_new/retrained"]["mean"] == pytest.approx(0.0425)
    assert "all/sasrec" not in second  # a baseline no seed ran is left out, not zero
    lines = seeds_table(summary).splitlines()
    assert lines[0] == "All test events, ndcg@10, mean ± std over seeds 42, 43:"
    assert lines[4].startswith("| 0 | 0.0900 ± 0.0141 |") and "(same model)" in lines[4]
    assert lines[5] == (
        "| 1 | 0.0600 ± 0.0141 | 0.0800 ± 0.0141 | 0.0850 ± 0.0212 | - | 0.0400 ± 0.0000 | "
        "0.9500 ± 0.0707 | 60, 20 | 300, 100 |"
    )


@pytest.mark.slow
def test_seeds_run_the_protocol_once_per_seed_in_its_own_folder(tmp_path):
    cfg = make_config(
        tmp_path,
        [
            "experiment=refresh_video",
            "data=sample_video",
            "backbone=tiny_bert",
            "data.split.windows=2",
            "baselines=[popularity]",
            "rolling.refresh.budget.max_epochs=1",
            "seed=7",
            "seeds=2",
        ],
    )
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        summary = protocol_seeds(cfg)
    assert summary["seeds"] == [7, 8] and len(summary["windows"]) == 2
    for seed in (7, 8):
        saved = OmegaConf.load(tmp_path / f"seed_{seed}" / "retrain-w1" / ".hydra" / "config.yaml")
        assert saved.seed == seed and saved.data.seed == seed
        rows = json.loads((tmp_path / f"seed_{seed}" / "rolling.json").read_text())
        assert [row["window"] for row in rows] == [0, 1]
    assert summary["windows"][1]["all/refreshed"]["n"] == 2
    assert json.loads((tmp_path / "rolling_seeds.json").read_text()) == summary
    assert (tmp_path / "rolling_seeds.md").read_text() == seeds_table(summary)
