"""The composition root: config checks before any loading, callbacks that follow the task,
a new head + task from outside the package, and loading a finished run for inference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

import recsys_lm.build as build
import recsys_lm.train as entry
from recsys_lm.build import build_callbacks, check_config, load_run
from recsys_lm.data.tasks import TASKS
from recsys_lm.errors import ConfigError
from tests.conftest import TINY, make_config

TOY_CONF = Path(__file__).resolve().parent / "toy" / "conf"


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if weights or data are touched."""

    def refuse(*args, **kwargs):
        raise AssertionError("loaded weights or data before the config was checked")

    monkeypatch.setattr(entry, "build_module", refuse)
    monkeypatch.setattr(build, "build_module", refuse)
    monkeypatch.setattr("recsys_lm.data.prepared.load_canonical", refuse)


def test_mistyped_head_key_on_the_command_line_is_hydras_error(config):
    with pytest.raises(ConfigCompositionException) as err:
        config(["head=sequential", "head.net.dimm=64"])
    assert "dimm" in str(err.value.__cause__ or err.value)


def test_added_unknown_head_key_stops_before_loading(config, nothing_loads):
    cfg = config(["head=sequential", "+head.net.dimm=64"])
    with pytest.raises(ConfigError) as err:
        entry.train(cfg)
    assert err.value.key == "head.net.dimm"
    assert "'dim'" in str(err.value)  # the parameters it does take are listed


def test_unknown_data_key_in_an_experiment_file_stops_before_loading(tmp_path, nothing_loads):
    folder = tmp_path / "conf" / "experiment"
    folder.mkdir(parents=True)
    (folder / "typo.yaml").write_text("# @package _global_\ndata:\n  batchsize: 7\n")
    cfg = make_config(
        tmp_path, ["experiment=typo", f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]
    )
    with pytest.raises(ConfigError) as err:
        entry.train(cfg)
    assert err.value.key == "data.batchsize"


def test_custom_source_typo_in_an_experiment_file_names_the_key(tmp_path, nothing_loads):
    folder = tmp_path / "conf" / "experiment"
    folder.mkdir(parents=True)
    (folder / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /data: custom\n"
        "data:\n  root: /nowhere\n  item_template: '{name}'\n  history_template: '{name}'\n"
        "  source:\n    interactions: {path: e.csv, user: u, item: i, time: t, usr: x}\n"
        "    items: {path: p.csv, id: i, text: [name]}\n"
    )
    cfg = make_config(
        tmp_path,
        [*TINY, "experiment=mine", f"hydra.searchpath=[file://{tmp_path / 'conf'}]"],
        fast=False,
    )
    with pytest.raises(ConfigError) as err:
        entry.train(cfg)
    assert "usr" in str(err.value) and "data.source.interactions" in str(err.value)


def test_mistyped_source_key_on_the_command_line_is_hydras_error(config):
    with pytest.raises(ConfigCompositionException) as err:
        config(["data=custom", "data.source.interactions.usr=x"], fast=False)
    assert "usr" in str(err.value.__cause__ or err.value)


def test_wrong_type_is_refused_with_the_key(config):
    with pytest.raises(ConfigError) as err:
        check_config(config(["data.batch_size=many"]))
    assert err.value.key == "data.batch_size"


def test_eval_mode_the_task_cannot_do_is_refused_before_loading(config):
    with pytest.raises(ConfigError) as err:
        check_config(config(["head=click", "data.eval_mode=full"]))
    assert err.value.key == "data.eval_mode" and "sampled" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "monitor", "mode"),
    [
        ([], "val/ndcg@10", "max"),
        (["data.k=20"], "val/ndcg@20", "max"),
        (["head=click"], "val/auroc", "max"),
        (["head=rating"], "val/rmse", "min"),
        (["head=behaviour"], "val/macro_f1", "max"),
    ],
)
def test_checkpointing_and_early_stopping_watch_the_tasks_metric(config, overrides, monitor, mode):
    cfg = config(overrides)
    callbacks = build_callbacks(cfg, check_config(cfg).task)
    watched = {type(c).__name__: (c.monitor, c.mode) for c in callbacks if hasattr(c, "mode")}
    assert watched["EarlyStopping"] == (monitor, mode)
    best = [c for c in callbacks if getattr(c, "monitor", None) == monitor]
    assert {type(c).__name__ for c in best} == {"ModelCheckpoint", "EarlyStopping"}


def test_data_k_20_trains_checkpoints_and_early_stops_on_ndcg_at_20(config, tmp_path):
    result = entry.train(
        config(
            [
                "data.k=20",
                "trainer.max_steps=6",
                "trainer.val_check_interval=2",
                "export_model=false",
            ]
        )
    )
    assert "ndcg@20" in result["test"] and "ndcg@10" not in result["test"]
    assert result["protocol"]["monitor"] == "val/ndcg@20"
    checkpoint = torch.load(result["checkpoint"], map_location="cpu", weights_only=False)
    states = checkpoint["callbacks"]
    early = next(v for k, v in states.items() if k.startswith("EarlyStopping"))
    best = next(v for k, v in states.items() if k.startswith("ModelCheckpoint") and "ndcg@20" in k)
    assert early["best_score"] == pytest.approx(best["best_model_score"])
    assert "'monitor': 'val/ndcg@20'" in next(k for k in states if k.startswith("EarlyStopping"))


def test_a_new_head_and_task_from_the_test_folder_train_end_to_end(config, tmp_path):
    cfg = config(
        [
            f"hydra.searchpath=[file://{TOY_CONF}]",
            "head=bag",
            "peft=none",
            "freeze=head_only",
            "data.max_sequence_length=10",
        ]
    )
    result = entry.train(cfg)
    assert "bag_of_items" in TASKS
    assert result["run"]["head"] == "bag_of_items"
    assert result["protocol"]["monitor"] == "val/hr@10"  # the toy task's record decides
    assert result["test"]["hr@10"] > 0 or result["test"]["mrr"] > 0
    assert "popularity" in result["baselines"]
    model = build.load_model(tmp_path / "model")  # saved and reloaded with no special case
    assert model.head.items.weight.shape == (60, 16)


def test_load_run_recommends_and_scores_like_evaluation(config, tmp_path):
    cfg = config(["trainer.max_steps=2"])
    entry.train(cfg)
    (tmp_path / ".hydra").mkdir(exist_ok=True)
    from omegaconf import OmegaConf

    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    run = load_run(tmp_path)
    user = run.data.user_index(run.data.user_ids[3])
    history = run.data.history(user)
    top = run.model.recommend(history, k=10)
    assert len(top.items) == 10 and not set(top.items) & set(history)
    assert top.scores == sorted(top.scores, reverse=True)
    again = run.model.score(history, top.items)
    assert torch.allclose(again, torch.tensor(top.scores), atol=1e-5)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["run"]["head"] == "retrieval"


def test_without_a_logger_the_lr_monitor_is_left_out(config):
    cfg = config(["logger=none"])
    task = check_config(cfg).task
    names = {type(c).__name__ for c in build_callbacks(cfg, task, logging=False)}
    assert "LearningRateMonitor" not in names and "ModelCheckpoint" in names
    assert "LearningRateMonitor" in {type(c).__name__ for c in build_callbacks(cfg, task)}
