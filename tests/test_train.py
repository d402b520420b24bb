"""End to end through the composed Hydra config: every head x PEFT x freezing strategy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recsys_lm.train import CONFIG_DIR, train

HEADS = ["click", "retrieval"]
PEFTS = ["none", "lora", "adalora", "ia3", "prefix", "prompt"]
FREEZES = ["none", "head_only", "bottom_k", "embeddings", "bitfit"]
REQUIRED = {"test", "val", "baselines", "protocol", "params", "timing"}


@pytest.mark.parametrize("freeze", FREEZES)
@pytest.mark.parametrize("peft", PEFTS)
@pytest.mark.parametrize("head", HEADS)
def test_every_head_peft_freeze_combination_trains_and_reports(
    config, tmp_path, head, peft, freeze
):
    cfg = config(
        [f"head={head}", f"peft={peft}", f"freeze={freeze}", "freeze.k=1"]
        if freeze == "bottom_k"
        else [f"head={head}", f"peft={peft}", f"freeze={freeze}"]
    )
    result = train(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written.keys() >= REQUIRED
    assert written["test"] == pytest.approx(result["test"])
    metric = "auroc" if head == "click" else "ndcg@10"
    assert 0.0 <= written["test"][metric] <= 1.0
    assert metric in written["baselines"]["popularity"]["test"]
    assert written["protocol"]["eval_mode"] == ("sampled-9" if head == "click" else "full")
    params = written["params"]
    assert 0 < params["trainable"] <= params["total"]
    if peft != "none" and freeze == "none":
        assert params["trainable"] < 0.05 * params["total"]  # only adapters and head train
    if peft == "none" and freeze == "none":
        assert params["trainable"] == params["total"]  # full fine-tuning


def test_metrics_json_carries_protocol_timing_and_checkpoint(config, tmp_path):
    result = train(config())
    assert result["protocol"]["split"].startswith("leave-one-out")
    assert result["protocol"]["k"] == 10
    assert result["protocol"]["exclude_seen"] is True
    assert result["timing"]["train_steps"] == 4
    assert result["checkpoint"].endswith(".ckpt")
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "csv").is_dir()  # CSV logger by default


def test_training_is_seeded(config, tmp_path):
    first = train(config(["export_model=false"]))["test"]
    second = train(config(["export_model=false"]))["test"]
    assert first == second


def test_resume_from_checkpoint_continues_the_step_count(config, tmp_path):
    # An interrupted run: stopped after 3 steps in the middle of its first epoch.
    train(config(["trainer.max_steps=3", "trainer.max_epochs=5"]))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.exists()
    resumed = train(config(["trainer.max_steps=6", "trainer.max_epochs=5", f"ckpt_path={last}"]))
    # 3 steps restored + 3 more: the optimizer, scheduler and loop state came back.
    assert resumed["timing"]["train_steps"] == 6


def test_gradient_accumulation_and_cosine_schedule(config):
    result = train(
        config(
            ["trainer.accumulate_grad_batches=2", "optim.schedule=cosine", "trainer.max_steps=2"]
        )
    )
    assert result["timing"]["train_steps"] == 2


def test_bf16_mixed_precision_runs_on_cpu(config):
    result = train(config(["trainer.precision=bf16-mixed", "head=click"]))
    assert result["run"]["precision"] == "bf16-mixed"
    assert 0.0 <= result["test"]["auroc"] <= 1.0


@pytest.mark.parametrize("flavour", ["sample_news", "sample_video"])
def test_other_sample_flavours(config, flavour):
    result = train(config([f"data={flavour}"]))
    assert result["protocol"]["dataset"] == flavour


@pytest.mark.wandb
def test_wandb_logger_works_offline(config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(config(["logger=wandb"]))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run written"
    # Offline runs keep the config in the run's record file until `wandb sync`.
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"protocol" in record and b"leave-one-out" in record
    assert b"RetrievalHead" in record  # the resolved config (head target) is recorded


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_trains_on_a_custom_dataset_with_only_a_yaml_mapping(tmp_path, suffix):
    """A user's own export + one YAML file in their own config folder: nothing else."""
    import pandas as pd

    from tests.conftest import TINY, make_config

    rng = np.random.default_rng(0)
    products = pd.DataFrame(
        {
            "sku": [f"P{i}" for i in range(40)],
            "name": [f"{c} {k}" for c in ("red", "blue", "green", "black") for k in range(10)],
            "brand": ["acme", "zenith"] * 20,
        }
    )
    events = pd.DataFrame(
        {
            "customer": [f"c{u}" for u in range(25) for _ in range(8)],
            "sku": [f"P{i}" for i in rng.integers(0, 40, 200)],
            "ts": pd.date_range("2024-01-01", periods=200, freq="h").astype(str),
        }
    )
    data_dir = tmp_path / "shop"
    data_dir.mkdir()
    for name, frame in (("events", events), ("products", products)):
        path = data_dir / f"{name}{suffix}"
        frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    conf = tmp_path / "my_conf" / "data"
    conf.mkdir(parents=True)
    (conf / "my_shop.yaml").write_text(f"""
defaults:
  - custom
  - _self_
root: {data_dir}
source:
  name: my_shop
  interactions: {{path: events{suffix}, user: customer, item: sku, time: ts}}
  items: {{path: products{suffix}, id: sku, text: [name, brand]}}
item_template: "{{name}}. Brand: {{brand}}."
history_template: "{{name}}"
""")
    cfg = make_config(
        tmp_path / "run",
        [
            *TINY,
            "data=my_shop",
            f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
        fast=False,
    )
    result = train(cfg)
    assert result["protocol"]["dataset"] == "my_shop"
    assert result["protocol"]["items"] == 40
    assert 0.0 <= result["test"]["ndcg@10"] <= 1.0


def test_every_head_says_which_way_its_monitor_metric_improves(config):
    """Checkpointing and early stopping follow the head: rmse is minimised, the rest maximised."""
    heads = sorted(p.stem for p in Path(CONFIG_DIR, "head").glob("*.yaml"))
    assert {"click", "retrieval", "rating", "behaviour"} <= set(heads)
    for head in heads:
        cfg = config([f"head={head}"])
        assert cfg.head.monitor_mode in ("min", "max"), head
        callbacks = cfg.callbacks
        assert callbacks.model_checkpoint.mode == cfg.head.monitor_mode, head
        assert callbacks.early_stopping.mode == cfg.head.monitor_mode, head
    assert config(["head=rating"]).callbacks.model_checkpoint.mode == "min"
    assert config(["head=click"]).callbacks.model_checkpoint.mode == "max"
