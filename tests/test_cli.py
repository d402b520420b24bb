"""The command line as a user runs it: the README's smoke run, a user error as one line and
exit status 2, and multirun sweeps.

One subprocess run proves the real `python -m recsys_lm.train` as the README shows it; the
user error's exit status and the multirun go through Hydra's real entry (`main`) in-process,
and every other user error through the same `recsys_lm.train.run`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException

from recsys_lm.train import main, run
from tests.conftest import ROOT, TINY, make_config

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


def test_readme_smoke_run_trains_and_writes_metrics(tmp_path):
    proc = run_cli(["debug=fast", *SMALL, "baselines=[]"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (written,) = tmp_path.glob("train/runs/*/metrics.json")
    metrics = json.loads(written.read_text())
    assert metrics["timing"]["train_steps"] == 5 and metrics["run"]["backbone"]
    assert "ndcg@10" in metrics["test"]


def run_main(args: list[str], tmp_path: Path, monkeypatch) -> int:
    """`python -m recsys_lm.train <args>` in this process: Hydra's real entry (`main`), its
    command-line parsing and our exit status, without a new interpreter's ~5 s of imports."""
    monkeypatch.setattr(sys, "argv", ["recsys_lm.train", *args, f"paths.log_dir={tmp_path}"])
    GlobalHydra.instance().clear()
    try:
        main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        GlobalHydra.instance().clear()
    return 0


def test_user_error_exits_2_with_one_line_and_no_traceback(tmp_path, monkeypatch, capsys):
    code = run_main(["backbone=tiny_bert", "data.batch_size=many", *SMALL], tmp_path, monkeypatch)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert "data.batch_size" in lines[0] and "many" in lines[0]


@pytest.mark.slow
def test_multirun_sweeps_peft_and_freeze(tmp_path, monkeypatch):
    code = run_main(
        [
            "-m",
            "backbone=tiny_bert",
            "peft=none,lora,ia3",
            "freeze=none,head_only",
            "trainer.max_steps=2",
            "baselines=[]",
            "logger=none",
            *SMALL,
        ],
        tmp_path,
        monkeypatch,
    )
    assert code == 0
    written = sorted(tmp_path.glob("train/multiruns/*/*/metrics.json"))
    assert len(written) == 6
    names = {p.parent.name.split("_", 1)[1] for p in written}
    assert any("peft=ia3" in n and "freeze=head_only" in n for n in names)
    runs = {
        (m["run"]["peft"], m["run"]["freeze"])
        for m in map(json.loads, map(Path.read_text, written))
    }
    assert len(runs) == 6  # each job trained its own combination


# -- the same error path, in-process ----------------------------------------------------------
def assert_clean_error(code, capsys, *needles: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"


def cli_config(tmp_path: Path, overrides: list[str]):
    return make_config(tmp_path, ["backbone=tiny_bert", *SMALL, *overrides], fast=False)


def test_unknown_config_choice_names_the_group_and_options(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        make_config(tmp_path, ["peft=loraa"])
    assert "peft/loraa" in str(err.value) and "lora" in str(err.value)


def test_missing_data_folder_names_key_and_path(tmp_path, capsys):
    overrides = ["backbone=tiny_bert", "data=movielens_100k", "data.root=/no/such/folder"]
    code = run(make_config(tmp_path, overrides, fast=False))
    assert_clean_error(code, capsys, "data.root", "/no/such/folder", "does not exist")


def test_missing_backbone_folder_names_key_and_path(tmp_path, capsys):
    code = run(cli_config(tmp_path, ["backbone=hf", "backbone.name_or_path=./no/such/model"]))
    assert_clean_error(code, capsys, "backbone.name_or_path", "no/such/model", "does not exist")


def test_strategy_that_does_not_fit_the_backbone(tmp_path, capsys):
    code = run(cli_config(tmp_path, ["freeze=bottom_k", "freeze.k=7"]))
    assert_clean_error(code, capsys, "freeze.k", "7", "2 layers")


def test_peft_target_that_does_not_exist(tmp_path, capsys):
    code = run(cli_config(tmp_path, ["peft=lora", "peft.config.target_modules=[nonexistent]"]))
    assert_clean_error(code, capsys, "`peft`", "lora", "bert")


def test_fp16_on_cpu_is_refused_clearly(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: 16-mixed is valid here")
    code = run(cli_config(tmp_path, ["trainer.precision=16-mixed"]))
    assert_clean_error(code, capsys, "trainer.precision", "16-mixed", "GPU")


def test_adalora_without_a_step_budget(tmp_path, capsys):
    code = run(cli_config(tmp_path, ["peft=adalora"]))
    assert_clean_error(code, capsys, "peft.config", "adalora", "total_step")


def test_a_mistyped_data_key_is_refused_before_loading(tmp_path, capsys):
    code = run(make_config(tmp_path, [*TINY, "+data.batchsize=7"], fast=False))
    assert_clean_error(code, capsys, "data.batchsize")
