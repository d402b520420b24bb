"""`hydra/launcher=local_gpus`: parallel multirun jobs on one machine (hydra-joblib-launcher),
each job holding one GPU of a pool for its whole life.

The pool is a folder of lock files, one per device (`cuda-<id>.lock`); a job holds the
`fcntl.flock` of its device from `on_job_start` to `on_job_end`. The kernel drops the lock
when the process dies, so a killed job never leaves a device taken, and every sweep (or plain
run) on the machine that uses the same folder shares the GPUs without collisions.

Each job's folder gets `device.json`: the device, the process, when the device was taken and
given back, the thread budget, and the job's status.

Bottom layer: imports nothing of recsys_lm but `recsys_lm.errors`; torch only when a job runs.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from recsys_lm.errors import ConfigError

log = logging.getLogger(__name__)

KEY = "hydra.callbacks.device_pool"  # where conf/hydra/launcher/local_gpus.yaml puts the callback
N_JOBS_KEY = "hydra.launcher.n_jobs"  # joblib's own key: jobs at a time
RECORD_FILE = "device.json"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
SETTINGS = ("devices", "fake", "n_jobs", "threads_per_job", "pool_dir", "poll_s")

# Per process (a joblib worker runs many jobs one after the other; the callback object itself
# is unpickled afresh for each job, so what must outlive a job lives here):
_STICKY: dict[str, str] = {}  # pool -> the device this process has already used
_PINS: dict[str, int] = {}  # pool -> the pin lock this process holds for its whole life
_ACTIVE: dict[str, Any] = {}  # the running job's lease, record and its file
_JOBS_RUN = 0  # jobs this process has started (> 1: a reused worker)


class Lease:
    """One device held by this process until `release()` (or until the process dies)."""

    def __init__(self, device: str, fd: int, waited_s: float, sticky: bool) -> None:
        self.device, self.waited_s, self.sticky = device, waited_s, sticky
        self.acquired_at = time.time()  # after the lock is held: intervals never overlap
        self._fd: int | None = fd

    def release(self) -> None:
        """Give the device back (again: nothing)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # explicit: forked children share the fd
            os.close(self._fd)
            self._fd = None


class DevicePool:
    """Devices shared through lock files in `folder`: `acquire()` blocks until one is free.

    `kind` names the lock files (`cuda-0.lock`, `fake-0.lock`, `cpu-0.lock`), so fake devices
    of a test and CPU slots never block the real GPUs of the same folder.

    `acquire(sticky=True)` is for processes that run several jobs: once such a process has
    used a device it only ever takes that device again (see `DevicePoolCallback`). A fresh
    sticky process prefers devices no other live process is stuck to (each holds a `.pin`
    lock for its life), so two reused workers do not end up waiting on the same GPU while
    another one idles."""

    def __init__(
        self, folder: str | Path, devices: Sequence[str], kind: str = "cuda", poll_s: float = 0.1
    ) -> None:
        if not devices:
            raise ValueError("a device pool needs at least one device")
        self.folder, self.kind = Path(folder).expanduser(), kind
        self.devices = [str(d) for d in devices]
        self.poll_s = poll_s
        self._key = f"{self.folder.resolve()}:{kind}"

    def acquire(self, sticky: bool = False) -> Lease:
        self.folder.mkdir(parents=True, exist_ok=True)
        started = time.time()
        if sticky and self._key in _STICKY:
            device = _STICKY[self._key]
            fd = _open(self._path(device, "lock"))
            fcntl.flock(fd, fcntl.LOCK_EX)  # wait for this one, even while others are free
            return self._lease(device, fd, started, sticky)
        while True:
            if sticky:  # first choice: a free device no other live process is stuck to
                for device in self.devices:
                    pin = _try_lock(self._path(device, "pin"))
                    if pin is None:
                        continue
                    fd = _try_lock(self._path(device, "lock"))
                    if fd is None:
                        _unlock(pin)
                        continue
                    _PINS[self._key] = pin
                    return self._lease(device, fd, started, sticky)
            for device in self.devices:
                fd = _try_lock(self._path(device, "lock"))
                if fd is not None:
                    return self._lease(device, fd, started, sticky)
            time.sleep(self.poll_s)

    def __repr__(self) -> str:
        return f"DevicePool({str(self.folder)!r}, {self.devices}, kind={self.kind!r})"

    def unpin(self) -> None:
        """Forget this process's device (tests; a worker keeps it for its life)."""
        _STICKY.pop(self._key, None)
        pin = _PINS.pop(self._key, None)
        if pin is not None:
            _unlock(pin)

    def _lease(self, device: str, fd: int, started: float, sticky: bool) -> Lease:
        if sticky:
            _STICKY[self._key] = device
        os.ftruncate(fd, 0)  # who holds it, for a curious `cat <pool_dir>/cuda-0.lock`
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return Lease(device, fd, round(time.time() - started, 3), sticky)

    def _path(self, device: str, suffix: str) -> Path:
        return self.folder / f"{self.kind}-{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}.{suffix}"


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


def _try_lock(path: Path) -> int | None:
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


# -- settings ----------------------------------------------------------------------------------
def visible_gpus() -> list[str]:
    """The GPUs this process may use: the entries of CUDA_VISIBLE_DEVICES where it is set
    (empty: none), else 0..torch.cuda.device_count()-1. torch counts through NVML where it
    can, which does not initialise CUDA in this (the launching) process."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def pool_devices(devices: Any, fake: Any) -> tuple[str, list[str]]:
    """(kind, device ids) of `devices` (auto | a count | a list of GPU ids): kind `cuda`,
    `fake` (counted devices that jobs do not see: they run on CPU), or `cpu` (no GPU: the
    pool is empty and jobs hold CPU slots instead)."""
    key = f"{KEY}.devices"
    expected = "auto, a count >= 0 (0: CPU jobs) or a non-empty list of distinct GPU ids"
    if not isinstance(fake, bool):
        raise ConfigError(f"{KEY}.fake", fake, "true or false")
    if isinstance(devices, ListConfig):
        devices = OmegaConf.to_container(devices)
    if devices == "auto":
        if fake:
            raise ConfigError(key, devices, "a count or a list with fake: true")
        found = visible_gpus()
        return ("cuda", found) if found else ("cpu", [])
    if isinstance(devices, int) and not isinstance(devices, bool):
        if devices < 0:
            raise ConfigError(key, devices, expected)
        if devices == 0:
            return "cpu", []
        if fake:
            return "fake", [str(i) for i in range(devices)]
        found = visible_gpus()
        if devices > len(found):
            raise ConfigError(
                key, devices, f"at most the {len(found)} visible GPUs {found} (or fake: true)"
            )
        return "cuda", found[:devices]
    if isinstance(devices, list) and devices:
        ids = [str(d).strip() for d in devices]
        bad = [d for d in devices if isinstance(d, bool) or not isinstance(d, int | str)]
        if (
            bad
            or len(set(ids)) != len(ids)
            or any(not d or "," in d or d.startswith("-") for d in ids)
        ):
            raise ConfigError(key, devices, expected)
        return ("fake" if fake else "cuda"), ids
    raise ConfigError(key, devices, expected)


def pool_n_jobs(n_jobs: Any, kind: str, devices: Sequence[str]) -> int:
    """Jobs at a time: -1 = one per device (one per core without GPUs)."""
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0 or n_jobs < -1:
        raise ConfigError(
            N_JOBS_KEY, n_jobs, "a count >= 1, or -1 for one job per device (per core on CPU)"
        )
    if kind == "cpu":
        return usable_cores() if n_jobs == -1 else n_jobs
    if n_jobs == -1:
        return len(devices)
    if n_jobs > len(devices):
        raise ConfigError(
            N_JOBS_KEY,
            n_jobs,
            f"at most the {len(devices)} devices of the pool {list(devices)}: each job holds "
            f"one GPU, more jobs would only wait",
        )
    return n_jobs


def thread_budget(threads_per_job: Any, n_jobs: int) -> int:
    """CPU threads per job: `auto` shares the usable cores out between the n_jobs jobs."""
    if threads_per_job == "auto":
        return max(1, usable_cores() // n_jobs)
    if (
        isinstance(threads_per_job, bool)
        or not isinstance(threads_per_job, int)
        or threads_per_job < 1
    ):
        raise ConfigError(f"{KEY}.threads_per_job", threads_per_job, "auto or a count >= 1")
    return threads_per_job


# -- the Hydra callback --------------------------------------------------------------------------
class DevicePoolCallback(Callback):
    """Each Hydra job holds one device of the pool for its whole life (see the module doc).

    Joblib's loky backend reuses worker processes: one process runs several jobs in turn. CUDA
    reads CUDA_VISIBLE_DEVICES once per process, when the driver initialises, and a job can
    initialise it without torch knowing (`cudaGetDeviceCount` where NVML is missing), so a
    reused worker cannot safely move to another GPU: its later jobs would still run on the
    first one, beside whichever job now holds it. A worker therefore always takes back the
    device it held first (waiting for it if needed; `DevicePool.acquire(sticky=True)`), and a
    fresh worker prefers a device no live worker is stuck to. With n_jobs <= devices (checked)
    each worker normally ends up with a device of its own.

    All settings are validated here, in the launching process, before any job starts; a bad
    one stops the sweep with a ConfigError naming its key."""

    def __init__(
        self,
        devices: Any = "auto",
        fake: Any = False,
        n_jobs: Any = -1,
        threads_per_job: Any = "auto",
        pool_dir: Any = None,
        poll_s: Any = 0.2,
        **unknown: Any,
    ) -> None:
        if unknown:
            name = sorted(unknown)[0]
            raise ConfigError(f"{KEY}.{name}", unknown[name], f"not a setting; known: {SETTINGS}")
        if not isinstance(pool_dir, str) or not pool_dir:
            raise ConfigError(f"{KEY}.pool_dir", pool_dir, "a folder for the pool's lock files")
        if isinstance(poll_s, bool) or not isinstance(poll_s, int | float) or poll_s <= 0:
            raise ConfigError(f"{KEY}.poll_s", poll_s, "seconds > 0")
        self.kind, self.devices = pool_devices(devices, fake)
        self.n_jobs = pool_n_jobs(n_jobs, self.kind, self.devices)
        self.threads = thread_budget(threads_per_job, self.n_jobs)
        slots = self.devices or [str(i) for i in range(self.n_jobs)]  # CPU: n_jobs slots
        self.pool = DevicePool(pool_dir, slots, self.kind, float(poll_s))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Runs before Hydra builds the launcher: joblib gets the resolved count (-1 would
        # mean "one job per core" to joblib, not "one per device").
        launcher = OmegaConf.select(config, "hydra.launcher")
        if launcher is not None and "n_jobs" in launcher:
            with read_write(launcher), open_dict(launcher):
                launcher.n_jobs = self.n_jobs
        what = f"{len(self.devices)} {self.kind} devices {self.devices}" if self.devices else "CPU"
        log.info(
            "device pool: %s, %d jobs at a time, %d threads each, locks in %s",
            what,
            self.n_jobs,
            self.threads,
            self.pool.folder,
        )

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _JOBS_RUN
        if _ACTIVE:  # the previous job left without on_job_end (sys.exit in the task)
            _finish("ENDED_WITHOUT_ON_JOB_END")
        _JOBS_RUN += 1
        try:
            lease = self.pool.acquire(sticky=True)
        except Exception:
            # Hydra turns a callback's exception into a warning and runs the job anyway:
            # hide every GPU so that it cannot land on one another job holds.
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
            log.exception("device pool %s: no device taken; this job sees no GPU", self.pool)
            raise
        visible = lease.device if self.kind == "cuda" else ""  # fake, cpu: no GPU at all
        os.environ["CUDA_VISIBLE_DEVICES"] = visible  # before the job's first CUDA call
        for name in THREAD_VARIABLES:
            os.environ[name] = str(self.threads)
        import torch

        torch.set_num_threads(self.threads)
        job = OmegaConf.select(config, "hydra.job")
        record = {
            "job": OmegaConf.select(job, "num"),
            "job_id": OmegaConf.select(job, "id"),
            "kind": self.kind,
            "device": lease.device if self.kind != "cpu" else f"cpu:{lease.device}",
            "cuda_visible_devices": visible,
            "threads": self.threads,
            "n_jobs": self.n_jobs,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "reused_worker": _JOBS_RUN > 1,
            "waited_s": lease.waited_s,
            "acquired_at": lease.acquired_at,
            "released_at": None,
            "status": "RUNNING",
            "pool_dir": str(self.pool.folder),
        }
        path = Path(str(OmegaConf.select(config, "hydra.runtime.output_dir"))) / RECORD_FILE
        _ACTIVE.update(lease=lease, record=record, path=path)
        _write_json(path, record)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if _ACTIVE:
            _finish(job_return.status.name)


def _finish(status: str) -> None:
    """Record the end of the running job and give its device back."""
    lease, record, path = _ACTIVE.pop("lease"), _ACTIVE.pop("record"), _ACTIVE.pop("path")
    import torch

    record.update(status=status, threads_at_end=torch.get_num_threads())
    try:
        record["released_at"] = time.time()  # before the lock drops: see Lease.release
        _write_json(path, record)
    finally:
        lease.release()


def _write_json(path: Path, data: dict) -> None:
    """Whole or not at all: a reader never sees half a record."""
    # Imported here: durable loads torch and Lightning, which a Hydra launcher that only
    # reads this module's callbacks should not pay for at start-up.
    from recsys_lm.durable import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2))
