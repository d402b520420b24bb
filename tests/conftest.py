"""Shared fixtures: compose the real Hydra config (conf/train.yaml) on CPU with tiny backbones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from recsys_lm.models.backbone import build_tiny_bert
from recsys_lm.models.export import build_datamodule
from recsys_lm.train import CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent
# Tiny everything: seconds per run on 2 CPU cores.
TINY = [
    "backbone=tiny_bert",
    "trainer.accelerator=cpu",
    "trainer.max_steps=4",
    "trainer.max_epochs=1",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "data.batch_size=8",
    "logger=csv",
]
FAST = [
    *TINY,
    "data.source.num_users=40",
    "data.source.num_items=60",
    "data.eval_negatives=9",
]


def make_config(
    tmp_path: Path, overrides: list[str] | None = None, fast: bool = True
) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=(FAST if fast else []) + (overrides or []))
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return cfg


def train_and_keep(config, monkeypatch, overrides: list[str], **kw):
    """Train through `recsys_lm.train.train`; returns (result, cfg, the trained module), the
    module caught on its way into `save_model`."""
    import recsys_lm.train as entry

    captured = {}
    original = entry.save_model

    def spy(module, cfg, directory):
        captured["module"] = module
        return original(module, cfg, directory)

    monkeypatch.setattr(entry, "save_model", spy)
    cfg = config(overrides, **kw)
    return entry.train(cfg), cfg, captured["module"]


def fresh_datamodule(cfg, module):
    """A set-up datamodule for `cfg`, tokenizing like `module`'s backbone."""
    datamodule = build_datamodule(cfg, module)
    datamodule.setup()
    return datamodule


@pytest.fixture(scope="session")
def tokenizer():
    """The packaged MiniLM tokenizer, as tiny_bert uses it (read-only in tests)."""
    return build_tiny_bert().tokenizer


@pytest.fixture
def config(tmp_path):
    """Factory: config(["head=click", "peft=ia3"]) -> a composed DictConfig writing into tmp_path."""
    return lambda overrides=None, **kw: make_config(tmp_path, overrides, **kw)


def require_dataset(marker: str, what: str) -> Path:
    """The datasets root holding `marker` (a path below it), or skip the test saying why."""
    root = Path(os.environ.get("RECSYS_LM_DATA_ROOT") or ROOT.parent / "shared" / "data")
    if not (root / marker).exists():
        folder = marker.split("/")[0]
        pytest.skip(
            f"{what} not found: set RECSYS_LM_DATA_ROOT to the folder that holds {folder}/ "
            f"(e.g. ../shared/data)"
        )
    return root


@pytest.fixture
def ml100k_root() -> Path:
    return require_dataset("movielens-100k/u.data", "MovieLens-100K")


@pytest.fixture
def amazon2018_root() -> Path:
    return require_dataset(
        "amazon2018-magazine-subscriptions/SOURCE.md", "Amazon 2018 Magazine_Subscriptions"
    )


@pytest.fixture
def mind_root() -> Path:
    return require_dataset("mind-small-sample/MINDsmall_train/behaviors.tsv", "MIND sample")
