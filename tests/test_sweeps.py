"""recsys_lm.sweeps: metrics.json of a fake multirun collected into one table, and its CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from recsys_lm.errors import DataError
from recsys_lm.sweeps import collect

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
    with pytest.raises(DataError, match=re.escape(f"no metrics.json found under {tmp_path}")):
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
    assert done.stderr.strip() == f"error: no metrics.json found under {tmp_path}"
