"""recsys_lm.sweeps: metrics.json of a fake multirun collected into one table, and its CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from recsys_lm.errors import DataError
from recsys_lm.sweeps import collect, summarize

ROOT = Path(__file__).resolve().parent.parent


def _metrics(ndcg: float, peft: str, trainable: int) -> dict:
    scores = {"ndcg@10": ndcg, "hr@10": 2 * ndcg}
    return {
        "test": scores,
        "val": {k: v + 0.01 for k, v in scores.items()},
        "baselines": {"popularity": {"val": {"ndcg@10": 0.05}, "test": {"ndcg@10": 0.04}}},
        "protocol": {
            "dataset": "sample_ecom",
            "split": "leave-one-out by time",
            "eval_mode": "full",
            "k": 10,
            "task": "retrieval",
        },
        "params": {"trainable": trainable, "total": 1000},
        "timing": {"setup_s": 1.0, "fit_s": 20.5, "eval_s": 2.0, "total_s": 23.5},
        "run": {
            "head": "RetrievalHead",
            "peft": peft,
            "freeze": "NoFreeze",
            "backbone": "tiny",
            "precision": "32-true",
            "seed": 42,
        },
    }


def _job(sweep: Path, name: str, overrides: list[str] | None, metrics: dict | str) -> Path:
    job = sweep / name
    job.mkdir(parents=True)
    text = metrics if isinstance(metrics, str) else json.dumps(metrics)
    (job / "metrics.json").write_text(text)
    if overrides is not None:
        (job / ".hydra").mkdir()
        (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return job


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A multirun folder with two jobs, written out of order to check the sorting."""
    _job(
        tmp_path,
        "1_peft=none,trainer.max_epochs=3",
        ["peft=none", "trainer.max_epochs=3"],
        _metrics(0.2, "none", 1000),
    )
    _job(
        tmp_path,
        "0_peft=lora,trainer.max_epochs=2",
        ["peft=lora", "trainer.max_epochs=2"],
        _metrics(0.1, "lora", 10),
    )
    return tmp_path


def test_collect_one_row_per_job(sweep: Path) -> None:
    table = collect(sweep)
    assert list(table["run"]) == [
        "0_peft=lora,trainer.max_epochs=2",
        "1_peft=none,trainer.max_epochs=3",
    ]
    # Overrides come right after the run folder; numbers become numbers.
    assert list(table.columns[:3]) == ["run", "peft", "trainer.max_epochs"]
    assert list(table["peft"]) == ["lora", "none"]
    assert table["trainer.max_epochs"].tolist() == [2, 3]
    assert pd.api.types.is_integer_dtype(table["trainer.max_epochs"])
    expected = {
        "run.head",
        "run.peft",
        "run.freeze",
        "run.backbone",
        "run.precision",
        "run.seed",
        "test/ndcg@10",
        "test/hr@10",
        "val/ndcg@10",
        "val/hr@10",
        "popularity/test/ndcg@10",
        "protocol.dataset",
        "protocol.eval_mode",
        "protocol.k",
        "protocol.split",
        "params.trainable",
        "params.total",
        "params.trainable_pct",
        "timing.fit_s",
        "timing.total_s",
    }
    assert expected <= set(table.columns)
    first = table.iloc[0]
    assert first["test/ndcg@10"] == pytest.approx(0.1)
    assert first["val/hr@10"] == pytest.approx(0.21)
    assert first["popularity/test/ndcg@10"] == pytest.approx(0.04)
    assert first["params.trainable_pct"] == pytest.approx(1.0)
    assert table.iloc[1]["params.trainable_pct"] == pytest.approx(100.0)
    assert (first["protocol.dataset"], first["protocol.eval_mode"], first["protocol.k"]) == (
        "sample_ecom",
        "full",
        10,
    )
    assert first["timing.fit_s"] == pytest.approx(20.5)


def test_collect_single_run_without_overrides(tmp_path: Path) -> None:
    run = _job(tmp_path, "2026-01-01_00-00-00", None, _metrics(0.3, "lora", 10))
    table = collect(run)
    assert list(table["run"]) == ["2026-01-01_00-00-00"]
    assert "peft" not in table.columns  # no .hydra/overrides.yaml: no override columns
    assert table.iloc[0]["run.peft"] == "lora"


def test_bad_json_names_the_file(sweep: Path) -> None:
    bad = _job(sweep, "2_peft=ia3", ["peft=ia3"], '{"test": {')
    with pytest.raises(DataError, match="not valid JSON") as err:
        collect(sweep)
    assert str(bad / "metrics.json") in str(err.value)


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"no runs found under {tmp_path}")):
        collect(tmp_path)


def _cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recsys_lm.sweeps", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "300"},
    )


def test_cli_prints_table_and_writes_csv(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep.csv"
    done = _cli(sweep, "--csv", out)
    assert done.returncode == 0, done.stderr
    for text in (
        "dataset=sample_ecom",
        "eval_mode=full",
        "k=10",
        "test/ndcg@10",
        "0_peft=lora,trainer.max_epochs=2",
        "0.1000",
    ):
        assert text in done.stdout
    written = pd.read_csv(out)
    assert written.shape == collect(sweep).shape
    assert written["test/ndcg@10"].tolist() == pytest.approx([0.1, 0.2])


def test_cli_error_is_one_line(tmp_path: Path) -> None:
    done = _cli(tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().startswith(f"error: no runs found under {tmp_path} (no metrics.json")


def _seeded(sweep: Path, num: int, peft: str, seed: int, ndcg: float, trainable: int, ms: float):
    metrics = _metrics(ndcg, peft, trainable)
    metrics["protocol"]["monitor"] = "val/ndcg@10"
    metrics["cost"] = {"test_ms_per_query": ms, "train_samples_per_s": 100.0}
    name = f"{num}_peft={peft},seed={seed}"
    return _job(sweep, name, [f"peft={peft}", f"seed={seed}", "trainer.max_steps=5"], metrics)


def _failed(sweep: Path, name: str, overrides: list[str], error: str | None) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if error is not None:
        (job / "failed.json").write_text(json.dumps({"error": error, "traceback": "..."}))
    return job


@pytest.fixture
def seeded(tmp_path: Path) -> Path:
    """Three configurations x 2 seeds: lora dominates none (better, smaller, as fast); ia3
    is worse than lora but faster, so both are on the front. Plus a failed and a killed job."""
    for num, (peft, seed, ndcg, trainable, ms) in enumerate(
        [
            ("lora", 1, 0.30, 10, 2.0),
            ("lora", 2, 0.40, 10, 2.0),
            ("none", 1, 0.20, 1000, 2.0),
            ("none", 2, 0.22, 1000, 2.0),
            ("ia3", 1, 0.10, 10, 1.0),
            ("ia3", 2, 0.12, 10, 1.0),
        ]
    ):
        _seeded(tmp_path, num, peft, seed, ndcg, trainable, ms)
    _failed(
        tmp_path,
        "6_peft=prefix,seed=1",
        ["peft=prefix", "seed=1", "trainer.max_steps=5"],
        "JobFailed: error: config key `optim.lr_scale` = -1.0: a positive multiplier",
    )
    _failed(
        tmp_path, "7_peft=prefix,seed=2", ["peft=prefix", "seed=2", "trainer.max_steps=5"], None
    )
    return tmp_path


def test_failed_and_incomplete_runs_are_rows_with_their_reason(seeded: Path) -> None:
    table = collect(seeded)
    assert len(table) == 8
    by_run = table.set_index("run")
    assert by_run.loc["6_peft=prefix,seed=1", "status"] == "failed"
    assert "optim.lr_scale" in by_run.loc["6_peft=prefix,seed=1", "error"]
    assert by_run.loc["7_peft=prefix,seed=2", "status"] == "incomplete"
    assert "killed, or still running" in by_run.loc["7_peft=prefix,seed=2", "error"]
    assert by_run.loc["0_peft=lora,seed=1", "status"] == "ok"
    assert pd.isna(by_run.loc["0_peft=lora,seed=1", "error"])


def test_summary_is_mean_and_sample_std_over_seeds_with_the_pareto_front(seeded: Path) -> None:
    summary = summarize(collect(seeded)).set_index("config")
    # the seed is not part of a configuration; the shared trainer.max_steps names none
    assert list(summary.index) == ["peft=lora", "peft=none", "peft=ia3", "peft=prefix"]
    lora = summary.loc["peft=lora"]
    assert lora["test/ndcg@10"] == pytest.approx(0.35)
    assert lora["test/ndcg@10.std"] == pytest.approx(0.0707107, abs=1e-6)  # ddof=1
    assert (lora["seeds"], lora["failed"]) == (2, 0)
    assert (summary.loc["peft=prefix", "seeds"], summary.loc["peft=prefix", "failed"]) == (0, 2)
    assert summary["pareto"].to_dict() == {
        "peft=lora": True,  # best quality
        "peft=none": False,  # worse than lora, more parameters, no faster
        "peft=ia3": True,  # worst quality but the fastest
        "peft=prefix": False,  # nothing finished
    }


def test_overrides_are_parsed_by_hydras_parser(tmp_path: Path) -> None:
    items = [
        "+extra.key=1",
        "~callbacks.early_stopping",
        "baselines=[popularity,sasrec]",
        "x='a,b'",
    ]
    _job(tmp_path, "0_job", items, _metrics(0.1, "lora", 10))
    row = collect(tmp_path).iloc[0]
    assert row["extra.key"] == 1
    assert pd.isna(row["callbacks.early_stopping"])  # a deletion has no value
    assert row["baselines"] == "[popularity,sasrec]"
    assert row["x"] == "a,b"


def test_report_files_and_markdown(seeded: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    done = _cli(seeded, "--out", out)
    assert done.returncode == 0, done.stderr
    assert "failed: 6_peft=prefix,seed=1: JobFailed" in done.stdout
    runs = pd.read_parquet(out / "runs.parquet")
    assert len(runs) == 8 and set(runs["status"]) == {"ok", "failed", "incomplete"}
    summary = pd.read_csv(out / "summary.csv")
    assert summary["test/ndcg@10"].iloc[0] == pytest.approx(0.35)
    text = (out / "report.md").read_text()
    assert "| `peft=lora` | 2 | 0.3500 ± 0.0707 |" in text
    assert "Shared by every run: `trainer.max_steps=5`" in text
    assert (
        "- `peft=prefix seed=1` (failed; folder `6_peft=prefix,seed=1`): JobFailed: error: "
        "config key `optim.lr_scale`" in text
    )
    assert "- `peft=prefix seed=2` (incomplete; folder `7_peft=prefix,seed=2`)" in text
    assert text.count("★") == 3  # two on the front, one in the legend


NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TINY_FRONTIER = [
    "experiment=peft_frontier",
    "data=sample_ecom",
    "data.source.num_users=40",
    "data.source.num_items=60",
    "data.batch_size=8",
    "data.eval_batch_size=64",
    "backbone=tiny_bert",
    "trainer.accelerator=cpu",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "logger=none",
    "baselines=[popularity]",
    "export_model=false",
    # the preset's axes, shrunk: 16-mixed fails on a CPU on purpose (4 jobs: 2 lr x 2 seeds)
    "peft=lora",
    "freeze=none",
    "trainer.precision=32-true,bf16-mixed,16-mixed",
    "optim.lr_scale=1.0,3.0",
    "seed=1,2",
]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(notebook: Path) -> None:
    cells = nbformat.read(notebook, as_version=4).cells
    dirty = [i for i, c in enumerate(cells) if c.get("outputs") or c.get("execution_count")]
    assert not dirty, f"{notebook.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.slow
def test_peft_frontier_sweep_report_and_notebook(tmp_path: Path, monkeypatch) -> None:
    """experiment=peft_frontier with tiny limits: every job runs, the deliberately failing
    ones (16-mixed on a CPU) are reported with their error, the report has mean ± std over
    2 seeds, and notebooks/sweep_analysis.ipynb executes on it and writes its figures."""
    sweep = tmp_path / "sweep"
    done = subprocess.run(
        [sys.executable, "-m", "recsys_lm.train", "-m", *TINY_FRONTIER, f"hydra.sweep.dir={sweep}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # Hydra runs every job, then raises the first failure: the sweep's status says so.
    assert done.returncode == 1, done.stderr[-2000:]
    assert "16-mixed needs a CUDA GPU" in done.stderr
    assert len(list(sweep.glob("*/metrics.json"))) == 8
    assert len(list(sweep.glob("*/failed.json"))) == 4

    report = _cli(sweep, "--out", tmp_path / "report")
    assert report.returncode == 0, report.stderr
    summary = pd.read_parquet(tmp_path / "report" / "summary.parquet").set_index("config")
    ok = summary[summary["seeds"] == 2]
    assert len(ok) == 4 and ok["test/ndcg@10.std"].notna().all()
    assert set(summary[summary["failed"] == 2].index) == {
        "trainer.precision=16-mixed optim.lr_scale=1.0",
        "trainer.precision=16-mixed optim.lr_scale=3.0",
    }
    text = (tmp_path / "report" / "report.md").read_text()
    assert text.count("needs a CUDA GPU") == 4

    figures = tmp_path / "figures"
    monkeypatch.setenv("RECSYS_LM_REPORT", str(tmp_path / "report"))
    monkeypatch.setenv("RECSYS_LM_FIGURES", str(figures))
    notebook = nbformat.read(ROOT / "notebooks" / "sweep_analysis.ipynb", as_version=4)
    NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": ROOT / "notebooks"}},
    ).execute()
    for name in ("pareto.png", "precision.png", "lr_curves.png"):
        assert (figures / name).stat().st_size > 10_000, name
