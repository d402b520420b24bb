"""hydra/launcher=local_gpus (a file-lock device pool over hydra-joblib-launcher) and
hydra/launcher=slurm (hydra-submitit-launcher): the pool itself across processes, real
multiruns through `python -m recsys_lm.train -m` on CPU (fake devices; CPU slots), the
validation of every setting, and the sbatch script the slurm config produces."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

import recsys_lm.launch.devices as devices
from recsys_lm.errors import ConfigError
from recsys_lm.launch.devices import DevicePool, DevicePoolCallback, usable_cores, visible_gpus
from recsys_lm.train import CONFIG_DIR
from tests.conftest import FAST, ROOT

POOL = "hydra.callbacks.device_pool"
FORK = multiprocessing.get_context("fork")  # children start in milliseconds


def hydra_config(overrides: list[str]) -> DictConfig:
    """conf/train.yaml with the Hydra node, as `python -m recsys_lm.train` composes it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def overlaps(records: list[dict]) -> list[tuple]:
    """Pairs of records holding the same device at overlapping times."""
    found = []
    for i, a in enumerate(records):
        for b in records[i + 1 :]:
            same = a["device"] == b["device"]
            if same and a["acquired_at"] < b["released_at"] and b["acquired_at"] < a["released_at"]:
                found.append((a, b))
    return found


def most_at_once(records: list[dict]) -> int:
    """The largest number of records whose [acquired_at, released_at) intervals overlap."""
    events = sorted(
        [(r["acquired_at"], 1) for r in records] + [(r["released_at"], -1) for r in records],
        key=lambda e: (e[0], e[1]),  # a release before an acquisition at the same instant
    )
    held = peak = 0
    for _, step in events:
        held += step
        peak = max(peak, held)
    return peak


# -- the pool, across processes -------------------------------------------------------------
def _hold(folder: str, ids: list[str], seconds: float, out) -> None:
    lease = DevicePool(folder, ids, kind="fake", poll_s=0.01).acquire()
    acquired = lease.acquired_at
    time.sleep(seconds)
    released = time.time()
    lease.release()
    out.put({"device": lease.device, "acquired_at": acquired, "released_at": released})


HOLDS = [0.6, 0.02, 0.3, 0.05, 0.45, 0.1, 0.25, 0.02, 0.15]


def _contend(folder: Path, ids: list[str]) -> list[dict]:
    out = FORK.Queue()
    workers = [FORK.Process(target=_hold, args=(str(folder), ids, s, out)) for s in HOLDS]
    for w in workers:
        w.start()
    records = [out.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(timeout=10)
    return records


def test_pool_never_gives_one_device_to_two_processes(tmp_path: Path) -> None:
    ids = ["0", "1", "2"]
    records = _contend(tmp_path, ids)
    assert len(records) == len(HOLDS)
    assert overlaps(records) == []
    assert {r["device"] for r in records} == set(ids)  # every device was used
    assert most_at_once(records) == len(ids)  # the pool was full: processes had to wait


def test_the_overlap_check_catches_a_pool_without_locks(tmp_path: Path, monkeypatch) -> None:
    """The check above can fail: with flock a no-op, processes share devices."""
    monkeypatch.setattr(devices.fcntl, "flock", lambda fd, op: None)
    records = _contend(tmp_path, ["0", "1", "2"])
    assert overlaps(records)


def _stick_then_wait(folder: str, ids: list[str], ready, leave) -> None:
    """A worker that has used a device (stuck to it) and now sits idle between jobs."""
    DevicePool(folder, ids, kind="fake").acquire(sticky=True).release()
    ready.set()
    leave.wait(30)


def _hold_first_free(folder: str, ids: list[str], seconds: float, ready) -> None:
    lease = DevicePool(folder, ids, kind="fake").acquire()
    ready.set()
    time.sleep(seconds)
    lease.release()


def test_fresh_worker_prefers_a_device_no_live_worker_is_stuck_to(tmp_path: Path) -> None:
    ids = ["0", "1", "2"]
    ready, leave = FORK.Event(), FORK.Event()
    idle = FORK.Process(target=_stick_then_wait, args=(str(tmp_path), ids, ready, leave))
    idle.start()
    pool = DevicePool(tmp_path, ids, kind="fake", poll_s=0.01)
    try:
        assert ready.wait(30)
        lease = pool.acquire(sticky=True)  # "0" is free, but the idle worker will want it
        assert lease.device == "1"
        lease.release()
    finally:
        pool.unpin()
        leave.set()
        idle.join(10)


def test_reused_worker_waits_for_its_own_device(tmp_path: Path) -> None:
    """A worker whose CUDA is set up on one GPU takes that GPU back, even while others are
    free: it blocks until the job holding it is done."""
    ids = ["0", "1", "2"]
    pool = DevicePool(tmp_path, ids, kind="fake", poll_s=0.01)
    try:
        first = pool.acquire(sticky=True)
        assert first.device == "0"
        first.release()
        ready = FORK.Event()
        other = FORK.Process(target=_hold_first_free, args=(str(tmp_path), ids, 1.0, ready))
        other.start()
        assert ready.wait(30)  # another process now holds "0"; "1" and "2" are free
        again = pool.acquire(sticky=True)
        waited = again.waited_s
        again.release()
        other.join(10)
        assert again.device == "0"
        assert waited >= 0.5
    finally:
        pool.unpin()


# -- settings ---------------------------------------------------------------------------------
def test_local_gpus_adds_its_callback_and_keeps_the_others(tmp_path: Path) -> None:
    cfg = hydra_config(["hydra/launcher=local_gpus", f"{POOL}.pool_dir={tmp_path}"])
    assert "JoblibLauncher" in cfg.hydra.launcher._target_
    assert cfg.hydra.callbacks.device_pool._target_.endswith("DevicePoolCallback")
    plain = hydra_config([])
    assert set(plain.hydra.callbacks or {}) < set(cfg.hydra.callbacks)  # none dropped


def test_n_jobs_defaults_to_one_job_per_device(tmp_path: Path) -> None:
    cfg = hydra_config(
        ["hydra/launcher=local_gpus", f"{POOL}.devices=3", f"{POOL}.fake=true"]
        + [f"{POOL}.pool_dir={tmp_path}"]
    )
    callback = instantiate(cfg.hydra.callbacks.device_pool)
    assert (callback.kind, callback.devices, callback.n_jobs) == ("fake", ["0", "1", "2"], 3)
    assert cfg.hydra.launcher.n_jobs == -1
    callback.on_multirun_start(cfg)  # what joblib is then built with
    assert cfg.hydra.launcher.n_jobs == 3
    assert callback.threads == max(1, usable_cores() // 3)


def test_devices_auto_reads_cuda_visible_devices(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    auto = DevicePoolCallback(devices="auto", pool_dir=str(tmp_path))
    assert (auto.kind, auto.devices, auto.n_jobs) == ("cuda", ["3", "5"], 2)
    first = DevicePoolCallback(devices=1, pool_dir=str(tmp_path))
    assert first.devices == ["3"]
    with pytest.raises(ConfigError, match="devices"):
        DevicePoolCallback(devices=4, pool_dir=str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    none = DevicePoolCallback(devices="auto", n_jobs=2, pool_dir=str(tmp_path))
    assert (none.kind, none.devices, none.n_jobs) == ("cpu", [], 2)
    assert none.threads == max(1, usable_cores() // 2)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (f"{POOL}.devices=-1", f"{POOL}.devices"),
        (f"{POOL}.devices=[0,0]", f"{POOL}.devices"),
        (f"{POOL}.devices=some", f"{POOL}.devices"),
        ("hydra.launcher.n_jobs=0", "hydra.launcher.n_jobs"),
        ("hydra.launcher.n_jobs=-3", "hydra.launcher.n_jobs"),
        ("hydra.launcher.n_jobs=5", "hydra.launcher.n_jobs"),  # more jobs than devices
        (f"{POOL}.threads_per_job=0", f"{POOL}.threads_per_job"),
        (f"{POOL}.fake=maybe", f"{POOL}.fake"),
        (f"{POOL}.poll_s=0", f"{POOL}.poll_s"),
        (f"+{POOL}.devcies=2", f"{POOL}.devcies"),  # a mistyped key, appended
    ],
)
def test_a_bad_setting_names_its_key(override: str, key: str, tmp_path: Path) -> None:
    fake4 = [f"{POOL}.fake=true", f"{POOL}.devices=4"]
    if override.startswith((f"{POOL}.devices", f"{POOL}.fake")):
        fake4 = [f"{POOL}.fake=true"]
    cfg = hydra_config(
        ["hydra/launcher=local_gpus", *fake4, f"{POOL}.pool_dir={tmp_path}", override]
    )
    with pytest.raises(InstantiationException) as caught:
        instantiate(cfg.hydra.callbacks.device_pool)
    error = caught.value.__cause__
    assert isinstance(error, ConfigError)
    assert error.key == key


def test_a_mistyped_key_is_refused() -> None:
    with pytest.raises(ConfigCompositionException, match="devcies"):
        hydra_config(["hydra/launcher=local_gpus", f"{POOL}.devcies=2"])
    with pytest.raises(ConfigCompositionException, match="n_job"):
        hydra_config(["hydra/launcher=local_gpus", "hydra.launcher.n_job=2"])


# -- real multiruns ----------------------------------------------------------------------------
def multirun(tmp_path: Path, overrides: list[str], parties: int = 2) -> list[Path]:
    """`python -m recsys_lm.train -m hydra/launcher=local_gpus ...` with tiny jobs; the
    first `parties` jobs meet at a barrier once they hold their device
    (tests/launch/barrier.py)."""
    sweep = tmp_path / "sweep"
    given = {o.split("=")[0] for o in overrides}
    args = [
        "hydra/launcher=local_gpus",
        f"{POOL}.pool_dir={tmp_path / 'pool'}",
        "+hydra.callbacks.barrier._target_=tests.launch.barrier.Barrier",
        f"+hydra.callbacks.barrier.folder={tmp_path / 'barrier'}",
        f"+hydra.callbacks.barrier.parties={parties}",
        f"hydra.sweep.dir={sweep}",
        f"paths.log_dir={tmp_path}",
        *[o for o in FAST if o.split("=")[0] not in given],
        "baselines=[]",
        "export_model=false",
        *overrides,
    ]
    done = subprocess.run(
        [sys.executable, "-m", "recsys_lm.train", "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return sorted(
        (p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[0])
    )


def records_of(jobs: list[Path]) -> list[dict]:
    records = [json.loads((job / "device.json").read_text()) for job in jobs]
    for job, record in zip(jobs, records, strict=True):
        assert (job / "metrics.json").is_file(), job  # the job finished
        assert record["status"] == "COMPLETED"
        assert record["acquired_at"] < record["released_at"]
        assert json.loads((job / "barrier.json").read_text())["met"], job  # ran in parallel
    return records


@pytest.mark.slow
def test_multirun_jobs_hold_distinct_devices(tmp_path: Path) -> None:
    """4 jobs of very different lengths, 2 at a time, over 4 fake devices."""
    jobs = multirun(
        tmp_path,
        [f"{POOL}.devices=4", f"{POOL}.fake=true", "hydra.launcher.n_jobs=2"]
        + ["trainer.max_steps=8,1,4,2"],
    )
    assert len(jobs) == 4
    records = records_of(jobs)
    assert sorted(r["job"] for r in records) == [0, 1, 2, 3]
    assert all(r["kind"] == "fake" and r["cuda_visible_devices"] == "" for r in records)
    assert overlaps(records) == []  # no device held by two jobs at once
    assert most_at_once(records) == 2  # n_jobs at a time: never more, and really 2
    assert len({r["pid"] for r in records}) == 2  # two worker processes ...
    for a in records:  # ... each of which takes back the device it held first
        assert all(b["device"] == a["device"] for b in records if b["pid"] == a["pid"])
    assert any(r["reused_worker"] for r in records)


@pytest.mark.slow
def test_multirun_on_cpu_runs_parallel_jobs_with_a_thread_budget(tmp_path: Path) -> None:
    jobs = multirun(
        tmp_path, [f"{POOL}.devices=0", "hydra.launcher.n_jobs=2", "trainer.max_steps=1,2"]
    )
    records = records_of(jobs)
    budget = max(1, usable_cores() // 2)
    assert [r["kind"] for r in records] == ["cpu", "cpu"]
    assert sorted(r["device"] for r in records) == ["cpu:0", "cpu:1"]
    assert [(r["threads"], r["threads_at_end"]) for r in records] == [(budget, budget)] * 2
    assert most_at_once(records) == 2
    assert records[0]["pid"] != records[1]["pid"]


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_multirun_on_gpus_gives_each_job_its_own_gpu(tmp_path: Path) -> None:
    """Every visible GPU in the pool, one job per GPU at a time, two jobs per GPU."""
    gpus = visible_gpus()
    steps = ",".join(str(1 + i) for i in range(2 * len(gpus)))
    jobs = multirun(
        tmp_path,
        ["hydra.launcher.n_jobs=-1", "trainer.accelerator=gpu", f"trainer.max_steps={steps}"],
        parties=len(gpus),
    )
    records = records_of(jobs)
    assert all(r["kind"] == "cuda" for r in records)
    assert all(r["cuda_visible_devices"] == r["device"] for r in records)
    assert {r["device"] for r in records} == set(gpus)
    assert overlaps(records) == []
    assert most_at_once(records) == len(gpus)


# -- slurm -------------------------------------------------------------------------------------
SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=gpu-a100",
    "hydra.launcher.gpus_per_node=2",
    "hydra.launcher.cpus_per_task=6",
    "hydra.launcher.mem_gb=48",
    "hydra.launcher.timeout_min=90",
    "hydra.launcher.array_parallelism=3",
]


def test_slurm_config_carries_the_resources() -> None:
    launcher = hydra_config(SLURM).hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.cpus_per_task) == (
        "gpu-a100",
        2,
        6,
    )
    assert (launcher.mem_gb, launcher.timeout_min, launcher.array_parallelism) == (48, 90, 3)
    assert launcher.name == "recsys_lm-train"


class _Submitted(Exception):
    """Raised where sbatch would run: the script is written, nothing is submitted."""


def _task(cfg):  # what the launcher pickles as the job's function (never called here)
    return None


def test_slurm_launcher_writes_them_into_the_sbatch_script(tmp_path: Path, monkeypatch) -> None:
    """The plugin and submitit as they run, stopped where sbatch would be called."""
    import submitit.slurm.slurm as submitit_slurm
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")  # submitit looks for it
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    scripts = []
    original = submitit_slurm.SlurmExecutor._make_submission_file_text

    def capture(self, command, uid):
        scripts.append(original(self, command, uid))
        raise _Submitted

    monkeypatch.setattr(submitit_slurm.SlurmExecutor, "_make_submission_file_text", capture)
    cfg = hydra_config([*SLURM, f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    launcher = Plugins.instance().instantiate_launcher(
        hydra_context=HydraContext(config_loader=None, callbacks=None),
        task_function=_task,
        config=cfg,
    )
    with pytest.raises(_Submitted):
        launcher.launch([["seed=1"], ["seed=2"], ["seed=3"], ["seed=4"]], initial_job_idx=0)
    (script,) = scripts
    for line in [
        "#SBATCH --partition=gpu-a100",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --mem=48GB",
        "#SBATCH --time=90",
        "#SBATCH --array=0-3%3",
        "#SBATCH --job-name=recsys_lm-train",
    ]:
        assert line in script.splitlines(), (line, script)


@pytest.mark.parametrize(
    "override",
    [
        "hydra.launcher.gpus_per_node=-1",
        "hydra.launcher.cpus_per_task=0",
        "hydra.launcher.timeout_min=0",
        "hydra.launcher.array_parallelism=0",
    ],
)
def test_a_bad_slurm_value_names_its_key(override: str) -> None:
    cfg = hydra_config([*SLURM, override])
    with pytest.raises(InstantiationException) as caught:
        instantiate(cfg.hydra.callbacks.slurm_settings)
    assert isinstance(caught.value.__cause__, ConfigError)
    assert caught.value.__cause__.key == override.split("=")[0]


def test_a_mistyped_slurm_key_is_refused() -> None:
    with pytest.raises(ConfigCompositionException, match="gpu_per_node"):
        hydra_config([*SLURM, "hydra.launcher.gpu_per_node=1"])
