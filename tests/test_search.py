"""recsys_lm.search: Optuna workers sharing one journal; presets, refusals, failing, pruned
and lost trials, and two worker processes of which one is killed and restarted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import optuna
import pytest
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from recsys_lm.search import HEARTBEAT, LOST, WORKER, check_space, read_spec, run
from recsys_lm.sweeps import collect
from tests.conftest import FAST, ROOT, entry_config

PRESETS = sorted(p.stem for p in (ROOT / "conf" / "hparams_search").glob("*.yaml"))
TINY_SEARCH = ["hparams_search=tiny", *FAST, "baselines=[]", "export_model=false"]


def space(entries: str) -> list[str]:
    """Overrides that replace the preset's search space (Hydra merges a dict otherwise)."""
    return ["~search.space", f"+search.space={{{entries}}}"]


def overrides(study_dir: Path, n_trials: int, *extra: str) -> list[str]:
    return [*TINY_SEARCH, f"search.dir={study_dir}", f"search.n_trials={n_trials}", *extra]


def load(study_dir: Path, name: str = "tiny") -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(study_dir / "journal.log")))
    return optuna.load_study(study_name=name, storage=storage)


def new_study(study_dir: Path) -> optuna.Study:
    study_dir.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(study_dir / "journal.log")))
    return optuna.create_study(study_name="tiny", storage=storage, direction="maximize")


def worker(args: list[str]) -> dict | int:
    """One worker in this process, as `python -m recsys_lm.search <args>` runs it."""
    return run(entry_config("train", args), args)


def by_state(study: optuna.Study) -> dict[str, int]:
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    return {s: states.count(s) for s in set(states)}


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_composes_and_states_study_storage_direction_sampler_pruner(name):
    args = [f"hparams_search={name}"]
    cfg = entry_config("train", args)
    spec = read_spec(cfg)
    check_space(spec, args)  # every key and every group option composes
    assert spec.storage.parent == spec.dir and spec.storage.name == "journal.log"
    assert spec.study_name == name and spec.direction in ("auto", "maximize", "minimize")
    assert spec.n_trials > 1 and len(spec.space) >= 3
    assert spec.sampler._target_ == "optuna.samplers.TPESampler" and spec.sampler.seed is not None
    assert spec.pruner._target_.startswith("optuna.pruners.")
    assert 0 < spec.interval_s < spec.grace_s
    text = (ROOT / "conf" / "hparams_search" / f"{name}.yaml").read_text()
    # the workers' own folders stay out of the runs `python -m recsys_lm.sweeps` reads
    assert yaml.safe_load(text)["hydra"]["output_subdir"] is None
    keys = [line for line in text.splitlines() if re.match(r"\s*[\w.]+:", line)]
    assert keys and all("#" in line for line in keys), [k for k in keys if "#" not in k]


def test_a_tiny_and_a_realistic_preset_exist():
    assert {"tiny", "lora_video"} <= set(PRESETS)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["+search.n_trails=3"], "`search.n_trails`"),
        (space("optim.lrr:{type:float,low:0.001,high:0.01}"), "`search.space.optim.lrr`"),
        (space("peft:{type:categorical,choices:[lora,ia4]}"), "`search.space.peft` = 'ia4'"),
        (["+search.space.peft.choises=[lora]"], "`search.space.peft.choises`"),
        (["+search.heartbeat.grace=5"], "`search.heartbeat.grace`"),
        (space("optim.lr:{type:floaty,low:0.001,high:0.01}"), "`search.space.optim.lr.type`"),
    ],
)
def test_a_mistyped_key_is_refused_with_its_name_before_anything_runs(
    tmp_path, capsys, extra, named
):
    study_dir = tmp_path / "study"
    assert worker(overrides(study_dir, 2, *extra)) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: config key ") and named in error, error
    assert not study_dir.exists()  # refused before the study was created


def test_the_command_line_refuses_a_mistyped_key_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTEST_XDIST_WORKER", None)
    done = subprocess.run(
        [sys.executable, "-m", "recsys_lm.search", *overrides(tmp_path, 2, "+search.n_trails=3")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: config key `search.n_trails`")


def test_categorical_over_a_config_group_composes_each_trial_from_its_option(tmp_path):
    study_dir = tmp_path / "study"
    study = new_study(study_dir)
    for peft in ("ia3", "lora"):  # both options, in a known order
        study.enqueue_trial({"peft": peft})
    args = [
        *space("peft:{type:categorical,choices:[lora,ia3]}"),
        "trainer.val_check_interval=2",
        "+search.worker=3",  # the worker's label: not a trial's override
    ]
    best = worker(overrides(study_dir, 2, *args))

    trials = load(study_dir).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for trial, peft, config in zip(
        trials, ("ia3", "lora"), ("IA3Config", "LoraConfig"), strict=True
    ):
        folder = study_dir / f"trial_{trial.number}"
        saved = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())
        assert saved["peft"]["name"] == peft and saved["peft"]["config"]["_target_"].endswith(
            config
        )
        assert saved["paths"]["output_dir"] == str(folder)
        recorded = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
        assert recorded[-1] == f"peft={peft}" and "+search.worker" not in " ".join(recorded)
        assert json.loads((folder / "metrics.json").read_text())["run"]["peft"] == peft
        # validations at steps 2 and 4 were reported; the study holds the best, not the last
        assert sorted(trial.intermediate_values) == [2, 4]
        assert trial.value == max(trial.intermediate_values.values())
    top = max(trials, key=lambda t: t.value)
    assert best["number"] == top.number and best["value"] == top.value
    assert best["folder"] == str(study_dir / f"trial_{top.number}")
    assert json.loads((study_dir / "best.json").read_text()) == best
    table = collect(study_dir)  # the study reads like a multirun
    assert list(table["run"]) == ["trial_0", "trial_1"] and list(table["peft"]) == ["ia3", "lora"]
    assert list(table["status"]) == ["ok", "ok"]


def test_a_failing_trial_is_recorded_fail_with_its_error_and_the_worker_goes_on(tmp_path):
    study_dir = tmp_path / "study"
    study = new_study(study_dir)
    for precision in ("16-mixed", "32-true"):  # 16-mixed on CPU: train() refuses it
        study.enqueue_trial({"trainer.precision": precision})
    args = space("trainer.precision:{type:categorical,choices:['32-true','16-mixed']}")
    best = worker(overrides(study_dir, 2, *args))

    failed, done = load(study_dir).get_trials()
    assert failed.state == TrialState.FAIL and done.state == TrialState.COMPLETE
    assert "trainer.precision" in failed.user_attrs["error"]
    assert "16-mixed" in failed.user_attrs["error"]
    record = json.loads((study_dir / "trial_0" / "failed.json").read_text())
    assert record["error"] == failed.user_attrs["error"] and "Traceback" in record["traceback"]
    assert json.loads((study_dir / "trial_0" / "trial.json").read_text())["state"] == "FAIL"
    assert best["number"] == 1 and best["trials"]["FAIL"] == 1 and best["trials"]["COMPLETE"] == 1
    assert list(collect(study_dir)["status"]) == ["failed", "ok"]


def test_pruning_stops_each_trial_at_its_first_report(tmp_path):
    study_dir = tmp_path / "study"
    pruner = "+search.pruner={_target_:optuna.pruners.ThresholdPruner,lower:2.0}"
    args = ["~search.pruner", pruner, "trainer.val_check_interval=2"]
    best = worker(overrides(study_dir, 2, *args))

    trials = load(study_dir).get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    for trial in trials:
        assert list(trial.intermediate_values) == [2]  # the report at step 4 never came
        folder = study_dir / f"trial_{trial.number}"
        assert not (folder / "metrics.json").exists()
        assert json.loads((folder / "failed.json").read_text())["error"].startswith("TrialPruned")
    assert "value" not in best and best["trials"]["PRUNED"] == 2


@pytest.mark.parametrize(
    ("owner", "age_s", "label", "released"),
    [
        # silent: the worker waits for it (wait_for_running) until grace_s has passed
        ("gone", 1000.0, ["search.heartbeat.interval_s=1", "search.heartbeat.grace_s=3"], True),
        ("7", 0.0, ["+search.worker=7"], True),  # left by this worker's earlier, killed run
        ("busy", 0.0, ["search.wait_for_running=false"], False),  # alive: left alone
    ],
)
def test_a_lost_trial_is_set_fail_and_its_parameters_run_again(
    tmp_path, owner, age_s, label, released
):
    study_dir = tmp_path / "study"
    study = new_study(study_dir)
    study.enqueue_trial({"peft": "ia3"})
    lost = study.ask()  # RUNNING, as a worker leaves it
    assert lost.suggest_categorical("peft", ["lora", "ia3"]) == "ia3"
    study._storage.set_trial_system_attr(lost._trial_id, HEARTBEAT, time.time() - age_s)
    study._storage.set_trial_system_attr(lost._trial_id, WORKER, owner)
    args = [*space("peft:{type:categorical,choices:[lora,ia3]}"), *label]
    best = worker(overrides(study_dir, 1, *args))

    trials = load(study_dir).get_trials()
    if not released:  # a running trial counts: nothing left to ask
        assert [t.state for t in trials] == [TrialState.RUNNING]
        assert LOST not in trials[0].system_attrs and best["trials"]["RUNNING"] == 1
        return
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert LOST in trials[0].system_attrs
    retry = trials[1]
    assert retry.params == {"peft": "ia3"} and retry.user_attrs["retry_of"] == lost.number
    assert best["trials"]["LOST"] == 1 and best["number"] == 1  # the lost one did not count


def test_an_interrupted_worker_gives_its_trial_back_and_exits_128_plus_the_signal(tmp_path, capsys):
    study_dir = tmp_path / "study"
    killer = [
        "+callbacks.killer._target_=tests.killer.KillAt",
        "+callbacks.killer.step=2",
        "+callbacks.killer.signal_name=SIGTERM",  # graceful_stop turns it into an exception
        f"+callbacks.killer.marker={tmp_path / 'fired'}",
    ]
    args = [*space("peft:{type:categorical,choices:[lora,ia3]}"), *killer]
    assert worker(overrides(study_dir, 2, *args)) == 128 + signal.SIGTERM
    assert "interrupted: SIGTERM at step" in capsys.readouterr().err

    interrupted, retry = load(study_dir).get_trials()
    assert interrupted.state == TrialState.FAIL and LOST in interrupted.system_attrs
    assert retry.state == TrialState.WAITING and retry.user_attrs["retry_of"] == 0
    assert retry.system_attrs["fixed_params"] == interrupted.params  # the next worker's first
    record = json.loads((study_dir / "trial_0" / "failed.json").read_text())
    assert record["state"] == "LOST" and record["error"].startswith("TrainingInterrupted")


class KillWhenFinished(L.Callback):
    """Test-only, for a worker's trials: SIGKILLs its own process mid-training once the study
    has `finished` finished trials; `marker` (a file) makes it fire once over restarts."""

    def __init__(self, journal: str, finished: int, marker: str) -> None:
        self.journal, self.finished, self.marker = journal, finished, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.marker.exists():
            return
        storage = JournalStorage(JournalFileBackend(self.journal))
        trials = storage.get_all_trials(storage.get_all_studies()[0]._study_id)
        if sum(t.state.is_finished() for t in trials) >= self.finished:
            self.marker.write_text(str(trainer.global_step))
            os.kill(os.getpid(), signal.SIGKILL)


def start(study_dir: Path, label: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    args = [
        *overrides(study_dir, 6, "search.heartbeat.interval_s=1", "search.heartbeat.grace_s=60"),
        f"+search.worker={label}",
        f"hydra.run.dir={study_dir.parent / f'worker_{label}'}",
        *extra,
    ]
    log = (study_dir.parent / f"worker_{label}.out").open("a")
    return subprocess.Popen(
        [sys.executable, "-m", "recsys_lm.search", *args],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
def test_two_workers_share_a_study_and_a_killed_worker_restarted_loses_no_finished_trial(
    tmp_path,
):
    study_dir = tmp_path / "study"
    journal = study_dir / "journal.log"
    marker = tmp_path / "killed"
    killer = [
        f"+callbacks.killer._target_={__name__}.KillWhenFinished",
        f"+callbacks.killer.journal={journal}",
        "+callbacks.killer.finished=2",
        f"+callbacks.killer.marker={marker}",
    ]
    first, second = start(study_dir, 0, *killer), start(study_dir, 1)
    try:
        assert first.wait(timeout=240) == -signal.SIGKILL, (tmp_path / "worker_0.out").read_text()
        study = load(study_dir)
        finished = {t.number: (t.state, t.value) for t in study.trials if t.state.is_finished()}
        left = [t for t in study.trials if t.state == TrialState.RUNNING]
        killed = [t for t in left if t.system_attrs[WORKER] == "0"]
        assert len(finished) >= 2 and len(killed) == 1 and marker.exists()

        restarted = start(study_dir, 0, *killer)
        assert restarted.wait(timeout=240) == 0, (tmp_path / "worker_0.out").read_text()
        assert second.wait(timeout=240) == 0, (tmp_path / "worker_1.out").read_text()
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.kill()

    trials = load(study_dir).trials
    for number, (state, value) in finished.items():  # nothing finished was lost or changed
        assert (trials[number].state, trials[number].value) == (state, value)
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 6
    assert states.count(TrialState.FAIL) == 1  # the killed trial, set FAIL as lost...
    lost = trials[killed[0].number]
    assert lost.state == TrialState.FAIL and LOST in lost.system_attrs
    retry = [t for t in trials if t.user_attrs.get("retry_of") == lost.number]
    assert len(retry) == 1 and retry[0].params == lost.params  # ...and run again
    assert {t.user_attrs["worker"] for t in trials} == {"0", "1"}
    best = json.loads((study_dir / "best.json").read_text())
    study = load(study_dir)
    assert (best["number"], best["value"]) == (study.best_trial.number, study.best_value)
    assert (Path(best["folder"]) / "metrics.json").is_file()
    table = collect(study_dir)
    assert (table["status"] == "ok").sum() == states.count(TrialState.COMPLETE)
