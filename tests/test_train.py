"""The entry point `recsys_lm.train.train` and what a configured module trains.

PEFT x freezing is a property of the module, not of the head or the Trainer: every
combination is checked on a module built from the composed config (which parameters train,
the optimizer's groups, one optimizer step). End-to-end `train()` runs check the wiring once
per head in the fast tier; the whole head x PEFT x freezing matrix runs as `slow`.
"""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from recsys_lm.build import build_module
from recsys_lm.data.sources.sample import SampleSource
from recsys_lm.models.module import RecsysLM, count_parameters
from recsys_lm.train import train
from tests.conftest import (
    assert_ranking_metrics,
    entry_config,
    fresh_datamodule,
    make_config,
    make_datamodule,
    recomputed_auroc,
    train_and_keep,
)

HEADS = ["click", "retrieval"]
PEFTS = ["none", "lora", "adalora", "ia3", "prefix", "prompt"]
FREEZES = ["none", "head_only", "bottom_k", "embeddings", "bitfit"]
REQUIRED = {"test", "val", "baselines", "protocol", "params", "timing", "run", "checkpoint"}
# Names of each PEFT strategy's own parameters (everything else of a wrapped model is frozen).
ADAPTER = {"lora": "lora_", "adalora": "lora_", "ia3": "ia3_", "prefix": "prompt_encoder."}
ADAPTER["prompt"] = ADAPTER["prefix"]
CHEAP = ["trainer.max_steps=2", "export_model=false", "baselines=[]"]


def freeze_overrides(peft: str, freeze: str) -> list[str]:
    extra = ["freeze.k=1"] if freeze == "bottom_k" else []
    return [f"peft={peft}", f"freeze={freeze}", *extra]


def expected_trainable(backbone_names: list[str], peft: str, freeze: str) -> set[str]:
    """What must train, by rule, among the (wrapped) backbone's parameter names.

    PEFT leaves only its adapter trainable; freezing then only turns training off (bottom_k:
    the embeddings and layer 0 of tiny_bert's two; embeddings: the embedding tables), except
    BitFit, which is defined as training the biases alone, whatever the PEFT."""
    base = [n for n in backbone_names if peft == "none" or ADAPTER[peft] in n]
    if freeze == "none":
        return set(base)
    if freeze == "head_only":
        return set()
    if freeze == "bottom_k":
        return {n for n in base if ".layer.0." not in n and ".embeddings." not in n}
    if freeze == "embeddings":
        return {n for n in base if ".embeddings." not in n}
    assert freeze == "bitfit"
    return {n for n in backbone_names if n.endswith(".bias")}


@pytest.fixture(scope="session")
def click_batch(tokenizer):
    """One training batch of the click task on a tiny sample (read-only)."""
    dm = make_datamodule(tokenizer, "click", SampleSource(num_users=20, num_items=30), batch_size=8)
    return next(iter(dm.train_dataloader()))


def with_fake_trainer(module: RecsysLM, steps: int) -> RecsysLM:
    """configure_optimizers reads only the trainer's step estimate."""
    module._trainer = SimpleNamespace(estimated_stepping_batches=steps)
    return module


@pytest.mark.parametrize("freeze", FREEZES)
@pytest.mark.parametrize("peft", PEFTS)
def test_peft_and_freezing_train_exactly_their_parameters(config, click_batch, peft, freeze):
    torch.manual_seed(0)
    # No warmup: the first step runs at the full rate.
    cfg = config(["head=click", "optim.warmup_ratio=0", *freeze_overrides(peft, freeze)])
    module = build_module(cfg)
    names = [n for n, _ in module.backbone.named_parameters()]
    trainable = {n for n, p in module.backbone.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(names, peft, freeze)
    assert all(p.requires_grad for p in module.head.parameters())  # the head always trains

    params = count_parameters(module)
    head = sum(p.numel() for p in module.head.parameters())
    assert 0 < params["trainable"] <= params["total"]
    if peft == "none" and freeze == "none":
        assert params["trainable"] == params["total"]  # full fine-tuning
    elif freeze == "head_only":
        assert params["trainable"] == head  # a linear probe
    elif peft != "none" and freeze == "none":
        assert head < params["trainable"] < 0.05 * params["total"]  # adapters and head

    # The optimizer holds every trainable parameter once and nothing else; the head's rate
    # is frozen_head_lr when no backbone weight trains.
    optimizer = with_fake_trainer(module, 10).configure_optimizers()["optimizer"]
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(held) == len({id(p) for p in held})
    assert {id(p) for p in held} == {id(p) for p in module.parameters() if p.requires_grad}
    head = next(module.head.parameters())
    group = next(g for g in optimizer.param_groups if any(p is head for p in g["params"]))
    hp = module.hparams
    assert group["initial_lr"] == (hp.frozen_head_lr if not trainable else hp.lr)  # pre-warmup

    # One step changes trainable weights only: frozen ones stay bit-identical.
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    module.train()
    loss = module.head.loss(module.backbone, click_batch) + module.peft_hooks.extra_loss(
        module.backbone
    )
    loss.backward()
    graded = {
        n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    optimizer.step()
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    should = {f"backbone.{n}" for n in trainable} | {
        f"head.{n}" for n, _ in module.head.named_parameters()
    }
    assert changed <= should
    assert graded <= should and graded <= changed  # every weight with a gradient moved
    assert any(n.startswith("head.") for n in changed)
    if trainable and peft not in ("lora", "adalora"):  # LoRA's B starts at 0: A has no grad yet
        assert any(n.startswith("backbone.") for n in graded)


def test_cosine_schedule_follows_warmup_then_half_cosine(config):
    module = build_module(config(["optim.schedule=cosine", "optim.warmup_ratio=0.2"]))
    configured = with_fake_trainer(module, 20).configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert configured["lr_scheduler"]["interval"] == "step"
    base, warmup, total = module.hparams.lr, 4, 20
    for step in range(total):
        if step < warmup:
            expected = base * step / warmup
        else:
            expected = base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12), step
        optimizer.step()
        scheduler.step()


def test_two_accumulated_batches_make_one_optimizer_step(config, monkeypatch):
    batches = []
    original = RecsysLM.training_step

    def counting(self, batch, batch_idx):
        batches.append(batch_idx)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(RecsysLM, "training_step", counting)
    result = train(config(["trainer.accumulate_grad_batches=2", *CHEAP]))
    assert result["timing"]["train_steps"] == 2
    assert batches == [0, 1, 2, 3]  # 4 batches for 2 optimizer steps


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_mixed_precision_runs_the_backbone_in_bf16_on_cpu(config, monkeypatch, precision):
    from recsys_lm.models.heads.click import ClickHead

    seen = []
    original = ClickHead.logits

    def recording(self, backbone, batch):
        pooled = backbone(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        # A Linear layer's output dtype: bf16 only under bf16 autocast.
        seen.append((self.training, self.classifier(pooled).dtype))
        return original(self, backbone, batch)

    monkeypatch.setattr(ClickHead, "logits", recording)
    result = train(config([f"trainer.precision={precision}", "head=click", *CHEAP]))
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    assert {d for _, d in seen} == {dtype}
    assert {training for training, _ in seen} == {True, False}  # fit and evaluation both
    assert result["run"]["precision"] == precision
    assert "auroc" in result["test"]


def test_click_end_to_end_reports_the_auroc_of_its_own_predictions(config, tmp_path, monkeypatch):
    result, cfg, module = train_and_keep(config, monkeypatch, ["head=click", "peft=lora"])
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written.keys() >= REQUIRED
    assert written["test"] == pytest.approx(result["test"])
    # The reported AUROC is the tested weights' own (recomputed by Mann-Whitney here).
    datamodule = fresh_datamodule(cfg, module.cpu())
    assert written["test"]["auroc"] == pytest.approx(recomputed_auroc(module, datamodule), abs=1e-4)
    assert "auroc" in written["baselines"]["popularity"]["test"]
    protocol = written["protocol"]
    assert protocol["eval_mode"] == "sampled-9" and protocol["monitor"] == "val/auroc"
    assert result["model_dir"] == str(tmp_path / "model")


def test_retrieval_end_to_end_writes_metrics_protocol_timing_and_checkpoint(config, tmp_path):
    result = train(config(["head=retrieval", "peft=prefix", "freeze=embeddings", "logger=csv"]))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written.keys() >= REQUIRED
    assert written["test"] == pytest.approx(result["test"])
    assert_ranking_metrics(written["test"], k=10)
    assert_ranking_metrics(written["baselines"]["popularity"]["test"], k=10)
    protocol = result["protocol"]
    assert protocol["split"].startswith("leave-one-out")
    assert protocol["k"] == 10 and protocol["exclude_seen"] is True
    assert protocol["eval_mode"] == "full" and protocol["monitor"] == "val/ndcg@10"
    assert result["timing"]["train_steps"] == 4
    assert result["run"]["peft"] == "prefix" and result["run"]["tags"] == []
    assert result["checkpoint"].endswith(".ckpt")
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "csv").is_dir()  # the CSV log


def test_the_default_job_trains_only_the_top_layer_over_cached_lower_layers(tmp_path, monkeypatch):
    """train.yaml's own freeze (the default job's fast path) on tiny BERT: LoRA trains in the
    top layer only, and the frozen layer below is computed once per text."""
    from recsys_lm.models.frozen_cache import FrozenLayerCache
    from tests.conftest import FAST

    assert entry_config("train", []).freeze.k == -1
    calls = []
    original = FrozenLayerCache.run

    def counted(self, *args, **kwargs):
        calls.append(self.k)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FrozenLayerCache, "run", counted)
    overrides = [o for o in FAST if o != "freeze=none"] + CHEAP
    result = train(make_config(tmp_path, overrides, fast=False))
    assert result["run"]["freeze"] == "bottom_k" and result["run"]["peft"] == "lora"
    assert calls and set(calls) == {1}  # tiny BERT's 2 layers: layer 0 cached
    assert 0 < result["params"]["trainable"] < result["params"]["total"]
    assert_ranking_metrics(result["test"], k=10)


@pytest.mark.slow
@pytest.mark.parametrize("freeze", FREEZES)
@pytest.mark.parametrize("peft", PEFTS)
@pytest.mark.parametrize("head", HEADS)
def test_every_head_peft_freeze_combination_trains_and_reports(
    config, tmp_path, head, peft, freeze
):
    result = train(config([f"head={head}", *freeze_overrides(peft, freeze), *CHEAP]))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["test"] == pytest.approx(result["test"])
    assert result["timing"]["train_steps"] == 2
    assert written["protocol"]["eval_mode"] == ("sampled-9" if head == "click" else "full")
    if head == "retrieval":
        assert_ranking_metrics(written["test"], k=10)
    else:
        assert set(written["test"]) == {"auroc"} and not math.isnan(written["test"]["auroc"])
    params = written["params"]  # exact counts: test_peft_and_freezing_train_exactly_...
    assert 0 < params["trainable"] <= params["total"]
    if peft != "none" and freeze == "none":
        assert params["trainable"] < 0.05 * params["total"]  # adapters and head only
    if peft == "none" and freeze == "none":
        assert params["trainable"] == params["total"]  # full fine-tuning


def test_training_is_seeded(config):
    first = train(config(CHEAP))["test"]
    second = train(config(CHEAP))["test"]
    assert first == second


def test_resume_from_checkpoint_continues_the_step_count(config, tmp_path):
    # An interrupted run: stopped after 3 steps in the middle of its first epoch.
    train(config(["trainer.max_steps=3", "trainer.max_epochs=5", "baselines=[]"]))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.exists()
    resumed = train(
        config(["trainer.max_steps=6", "trainer.max_epochs=5", f"ckpt_path={last}", "baselines=[]"])
    )
    # 3 steps restored + 3 more: the optimizer, scheduler and loop state came back.
    assert resumed["timing"]["train_steps"] == 6


@pytest.mark.parametrize("flavour", ["sample_news", "sample_video"])
def test_other_sample_flavours(config, flavour):
    result = train(config([f"data={flavour}", *CHEAP]))
    assert result["protocol"]["dataset"] == flavour


@pytest.mark.wandb
def test_wandb_logger_works_offline(config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(config(["logger=wandb", *CHEAP]))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run written"
    # Offline runs keep the config in the run's record file until `wandb sync`. W&B's
    # service process may still be writing it after `wandb.finish()` returns (seen once on
    # a loaded CI machine: only the file header was there), so read it until it has landed.
    record_file = next(runs[0].glob("run-*.wandb"))
    deadline = time.monotonic() + 30
    while b"leave-one-out" not in record_file.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    record = record_file.read_bytes()
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
            *CHEAP,
            "data=my_shop",
            f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
        fast=False,
    )
    result = train(cfg)
    assert result["protocol"]["dataset"] == "my_shop"
    assert result["protocol"]["items"] == 40
    assert result["protocol"]["users"] == 25
    assert_ranking_metrics(result["test"], k=10)


def test_seeds_run_each_seed_in_its_folder_and_write_mean_std(config, tmp_path, monkeypatch):
    from recsys_lm.train import run_seeds

    results = run_seeds(config(["seeds=2", *CHEAP]), ["seeds=2", "trainer.max_steps=2"])
    assert [r["run"]["seed"] for r in results] == [42, 43]
    for seed in (42, 43):
        folder = tmp_path / f"seed_{seed}"
        assert json.loads((folder / "metrics.json").read_text())["run"]["seed"] == seed
        saved = (folder / ".hydra" / "overrides.yaml").read_text()
        assert f"seed={seed}" in saved and "seeds=" not in saved  # a run of its own
    cost = results[0]["cost"]
    assert cost["train_samples"] == 2 * 8 and cost["train_samples_per_s"] > 0
    assert cost["test_queries"] == 40 and cost["test_ms_per_query"] > 0
    assert cost["peak_memory_mb"] > 0
    # Linux resets the peak at fit start: this run's own peak, not the test process's
    assert cost["peak_memory_kind"] == "process_peak_rss_since_fit"
    summary = json.loads((tmp_path / "seeds.json").read_text())
    values = [r["test"]["ndcg@10"] for r in results]
    assert summary["seeds"] == [42, 43]
    assert summary["test"]["ndcg@10"]["mean"] == pytest.approx(np.mean(values))
    assert summary["test"]["ndcg@10"]["std"] == pytest.approx(np.std(values, ddof=1))
    # Run again in the same folder: finished seeds are read back, not trained again.
    monkeypatch.setattr("recsys_lm.train.train", lambda cfg: pytest.fail("trained again"))
    again = run_seeds(config(["seeds=2", *CHEAP]), ["seeds=2"])
    assert [r["test"] for r in again] == [r["test"] for r in results]


def test_a_failing_seed_is_recorded_and_the_other_seeds_run(config, tmp_path, monkeypatch):
    import recsys_lm.train as entry
    from recsys_lm.errors import ConfigError

    real = entry.train

    def flaky(cfg):
        if cfg.seed == 42:
            raise ConfigError("optim.lr", -1, "a positive rate")
        return real(cfg)

    monkeypatch.setattr(entry, "train", flaky)
    assert entry.run_seeds(config(["seeds=2", *CHEAP]), []) == 2
    failed = json.loads((tmp_path / "seed_42" / "failed.json").read_text())
    assert "config key `optim.lr` = -1: a positive rate" in failed["error"]
    assert (tmp_path / "seed_43" / "metrics.json").is_file()
    assert not (tmp_path / "seeds.json").exists()  # no mean over a seed that never ran


def test_lr_scale_multiplies_every_learning_rate(config):
    from omegaconf import OmegaConf

    from recsys_lm.build import scaled_rates
    from recsys_lm.errors import ConfigError

    optim = OmegaConf.create({"lr": 1e-3, "head_lr": None, "frozen_head_lr": 1e-2, "lr_scale": 3})
    assert scaled_rates(optim) == {
        "lr": pytest.approx(3e-3),
        "head_lr": None,
        "frozen_head_lr": pytest.approx(3e-2),
    }
    module = build_module(config(["optim.lr_scale=0.5", "optim.lr=2e-3"]))
    assert module.hparams.lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="optim.lr_scale"):
        scaled_rates(OmegaConf.create({"lr": 1e-3, "lr_scale": 0}))


def test_a_multirun_job_gets_its_own_grouped_tagged_wandb_run(config):
    from omegaconf import OmegaConf

    from recsys_lm.train import multirun_wandb

    hydra_cfg = OmegaConf.create(
        {"sweep": {"dir": "logs/train/multiruns/2026-12-02_01-00-00", "subdir": "3_peft=ia3"}}
    )
    cfg = multirun_wandb(config(["logger=wandb"]), hydra_cfg, ["peft=ia3", "x=" + "y" * 100])
    assert cfg.logger.wandb.group == "2026-12-02_01-00-00"
    assert cfg.logger.wandb.name == "2026-12-02_01-00-00/3_peft=ia3"
    assert list(cfg.logger.wandb.tags) == ["peft=ia3", "x=" + "y" * 62]  # W&B's 64-character cap
    kept = multirun_wandb(config(["logger=wandb", "logger.wandb.group=mine"]), hydra_cfg, [])
    assert kept.logger.wandb.group == "mine"
    assert multirun_wandb(config(["logger=csv"]), hydra_cfg, []).logger.get("wandb") is None


@pytest.mark.slow
@pytest.mark.wandb
def test_multirun_jobs_are_separate_finished_wandb_runs_of_one_group(tmp_path):
    """W&B merges the jobs of a multirun into one run unless each finishes its own: two jobs
    in one process must leave two offline runs, each grouped by the sweep and tagged."""
    import os
    import subprocess
    import sys

    pytest.importorskip("wandb")
    from tests.conftest import FAST, ROOT

    sweep = tmp_path / "2026-12-02_01-02-03"
    overrides = [o for o in FAST if not o.startswith("logger=")]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "recsys_lm.train",
            "-m",
            *overrides,
            *CHEAP,
            "logger=wandb",
            "seed=1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    runs = sorted(sweep.glob("*/wandb/offline-run-*"))
    assert len(runs) == 2 and runs[0].parent.parent != runs[1].parent.parent
    assert len({r.name.rsplit("-", 1)[-1] for r in runs}) == 2  # two run ids
    for seed, run in zip((1, 2), runs, strict=True):
        record = next(run.glob("run-*.wandb")).read_bytes()
        assert sweep.name.encode() in record  # the group
        assert f"seed={seed}".encode() in record  # the job's overrides as tags


def test_train_refuses_a_search_preset_it_would_ignore(config, capsys):
    from recsys_lm.train import run

    assert run(config(["hparams_search=tiny"])) == 2
    assert "`hparams_search`" in capsys.readouterr().err
