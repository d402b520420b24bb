"""The command line as a user runs it: multirun sweeps and clear errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SMALL = [
    "trainer.accelerator=cpu",
    "data.source.num_users=40",
    "data.source.num_items=60",
    "export_model=false",
]


def run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recsys_lm.train", *args, f"paths.log_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in: {proc.stderr[-2000:]}"


@pytest.mark.slow
def test_multirun_sweeps_peft_and_freeze(tmp_path):
    proc = run_cli(
        [
            "-m",
            "backbone=tiny_bert",
            "peft=none,lora,ia3",
            "freeze=none,head_only",
            "trainer.max_steps=5",
            *SMALL,
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted(tmp_path.glob("train/multiruns/*/*/metrics.json"))
    assert len(written) == 6
    names = {p.parent.name.split("_", 1)[1] for p in written}
    assert any("peft=ia3" in n and "freeze=head_only" in n for n in names)


def test_unknown_config_choice_names_the_group_and_options(tmp_path):
    proc = run_cli(["peft=loraa"], tmp_path)
    assert_clean_error(proc, "peft/loraa", "lora")


def test_missing_data_folder_names_key_and_path(tmp_path):
    proc = run_cli(
        ["data=movielens_100k", "data.root=/no/such/folder", "backbone=tiny_bert"], tmp_path
    )
    assert_clean_error(proc, "data.root", "/no/such/folder", "does not exist")


def test_missing_backbone_folder_names_key_and_path(tmp_path):
    proc = run_cli(["backbone=hf", "backbone.name_or_path=./no/such/model"], tmp_path)
    assert_clean_error(proc, "backbone.name_or_path", "no/such/model", "does not exist")


def test_strategy_that_does_not_fit_the_backbone(tmp_path):
    proc = run_cli(["backbone=tiny_bert", "freeze=bottom_k", "freeze.k=7", *SMALL], tmp_path)
    assert_clean_error(proc, "freeze.k", "7", "2 layers")


def test_peft_target_that_does_not_exist(tmp_path):
    proc = run_cli(
        ["backbone=tiny_bert", "peft=lora", "peft.config.target_modules=[nonexistent]", *SMALL],
        tmp_path,
    )
    assert_clean_error(proc, "`peft`", "lora", "bert")


def test_fp16_on_cpu_is_refused_clearly(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present: 16-mixed is valid here")
    proc = run_cli(["backbone=tiny_bert", "trainer.precision=16-mixed", *SMALL], tmp_path)
    assert_clean_error(proc, "trainer.precision", "16-mixed", "GPU")


def test_adalora_without_a_step_budget(tmp_path):
    proc = run_cli(["backbone=tiny_bert", "peft=adalora", *SMALL], tmp_path)
    assert_clean_error(proc, "peft.config", "adalora", "total_step")
