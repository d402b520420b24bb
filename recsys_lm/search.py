"""`python -m recsys_lm.search hparams_search=<name> [train overrides]`: one Optuna worker.

A worker asks the study (`search.*`, conf/hparams_search/) for a trial, composes that trial's
config with Hydra's compose API (the worker's own overrides + the sampled ones, so a
categorical over a config group such as `peft` works), trains it into
`<search.dir>/trial_<number>/`, tells the study the best value of the monitored validation
metric, and goes on until the study holds `search.n_trials` trials. Several workers (one per
GPU with `-m +search.worker=0,1 hydra/launcher=local_gpus`, a SLURM array, or the same command
run N times) share one study through a journal file (optuna's JournalStorage): each ask and
tell is one line appended under a file lock, so a killed worker loses no finished trial.

Lost trials. Optuna's JournalStorage (4.x, 5.0) has no heartbeat (RDBStorage alone has), so
optuna's RetryFailedTrialCallback cannot apply. The same mechanism is kept in the journal: while
a trial trains, its worker writes the time into the trial's system attribute every
`search.heartbeat.interval_s`. A RUNNING trial whose last sign of life is older than
`search.heartbeat.grace_s` (or, when a labelled worker starts again, one that this worker
label left behind) is lost: it is set FAIL with system attribute `search:lost` (the journal
orders concurrent writes, so exactly one worker wins), and its parameters are enqueued again
(user attribute `retry_of`). Lost trials do not count towards `search.n_trials`; failed ones
(an error while composing or training) do, so a config that always fails cannot loop forever.
Heartbeats are wall-clock times: the workers' clocks must agree to well within grace_s (NTP).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import optuna
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from recsys_lm.build import check_config
from recsys_lm.durable import TrainingInterrupted, atomic_write_text
from recsys_lm.errors import ConfigError
from recsys_lm.launch.record import FAILED_FILE
from recsys_lm.train import CONFIG_DIR, USER_ERRORS, train

log = logging.getLogger("recsys_lm")

# `search.*` keys a preset may set (`worker` comes from the command line: +search.worker=<i>).
SEARCH_KEYS = (
    "study_name",
    "dir",
    "storage",
    "direction",
    "n_trials",
    "sampler",
    "pruner",
    "heartbeat",
    "wait_for_running",
    "space",
    "worker",
)
HEARTBEAT_KEYS = ("interval_s", "grace_s")
# The fields of one `search.space.<key>` entry, by distribution type.
DISTRIBUTIONS = {
    "float": ("low", "high", "log", "step"),
    "int": ("low", "high", "log", "step"),
    "categorical": ("choices",),
}
COMMON_FIELDS = ("type", "when")
DIRECTIONS = ("auto", "maximize", "minimize")
# Trial attributes (system attributes are the worker's bookkeeping, user ones are for people).
HEARTBEAT = "search:heartbeat"
WORKER = "search:worker"
LOST = "search:lost"
STUDY_METRIC = "metric"
TRIAL_FILE = "trial.json"
BEST_FILE = "best.json"
JOURNAL_LOCK_GRACE_S = 30  # a lock file older than this was left by a killed worker
# Overrides a trial does not take from its worker's command line: Hydra's own settings (run
# folder, launcher) and the worker's label.
NOT_INHERITED = re.compile(r"^[+~]*(hydra[./]|search\.worker=)")


@dataclass(frozen=True)
class Param:
    """One entry of `search.space`: the Hydra override `key` and its distribution."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    when: dict[str, Any] = field(default_factory=dict)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)
        if self.type == "int":
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_categorical(self.key, list(self.choices))

    def first(self) -> Any:
        """A value the distribution can draw: what the worker composes to check the key."""
        return self.choices[0] if self.type == "categorical" else self.low


@dataclass(frozen=True)
class Spec:
    """`search.*` read and checked."""

    study_name: str
    dir: Path
    storage: Path
    direction: str
    n_trials: int
    sampler: DictConfig
    pruner: DictConfig | None
    space: tuple[Param, ...]
    interval_s: float
    grace_s: float
    wait_for_running: bool
    worker: str
    labelled: bool  # the worker's name is stable across restarts (+search.worker, SLURM array)


def read_spec(cfg: DictConfig) -> Spec:
    """`cfg.search` as a Spec; a mistyped or missing key stops here, named."""
    node = cfg.get("search")
    if node is None:
        raise ConfigError(
            "hparams_search", None, "a search preset: hparams_search=<name> (conf/hparams_search/)"
        )
    _known_keys(node, "search", SEARCH_KEYS)
    for key in ("study_name", "dir", "storage", "n_trials", "sampler", "space"):
        if node.get(key) is None:
            raise ConfigError(f"search.{key}", None, "a value (every preset sets it)")
    direction = str(node.get("direction", "auto"))
    if direction not in DIRECTIONS:
        raise ConfigError("search.direction", direction, f"one of {list(DIRECTIONS)}")
    n_trials = node.n_trials
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise ConfigError("search.n_trials", n_trials, "a positive integer")
    heartbeat = node.get("heartbeat") or OmegaConf.create({})
    _known_keys(heartbeat, "search.heartbeat", HEARTBEAT_KEYS)
    interval_s = float(heartbeat.get("interval_s", 30))
    grace_s = float(heartbeat.get("grace_s", 120))
    if not 0 < interval_s < grace_s:
        raise ConfigError(
            "search.heartbeat", f"{interval_s}/{grace_s}", "0 < interval_s < grace_s (seconds)"
        )
    for key in ("sampler", "pruner"):
        target = node.get(key)
        if target is not None and (not isinstance(target, DictConfig) or "_target_" not in target):
            raise ConfigError(f"search.{key}", target, "a node with `_target_` (an optuna class)")
    worker = node.get("worker")
    array = os.environ.get("SLURM_ARRAY_TASK_ID")
    if worker is not None:
        name, labelled = str(worker), True
    elif array is not None:
        name, labelled = f"slurm-{os.environ.get('SLURM_ARRAY_JOB_ID', '')}_{array}", True
    else:
        name, labelled = f"{socket.gethostname()}-{os.getpid()}", False
    directory = Path(str(node.dir)).resolve()
    return Spec(
        study_name=str(node.study_name),
        dir=directory,
        storage=Path(str(node.storage)).resolve(),
        direction=direction,
        n_trials=n_trials,
        sampler=node.sampler,
        pruner=node.get("pruner"),
        space=read_space(node.space),
        interval_s=interval_s,
        grace_s=grace_s,
        wait_for_running=bool(node.get("wait_for_running", True)),
        worker=name,
        labelled=labelled,
    )


def _known_keys(node: DictConfig, where: str, known: Sequence[str]) -> None:
    for key in node:
        if key not in known:
            raise ConfigError(f"{where}.{key}", node[key], f"one of the keys {list(known)}")


def read_space(node: DictConfig) -> tuple[Param, ...]:
    """`search.space`: {override key: {type: float|int|categorical, ...}}, in order."""
    if not isinstance(node, DictConfig) or len(node) == 0:
        raise ConfigError("search.space", node, "a mapping of override keys to distributions")
    params: list[Param] = []
    for key, entry in node.items():
        where = f"search.space.{key}"
        if not isinstance(entry, DictConfig):
            raise ConfigError(
                where, entry, "a mapping such as {type: float, low: 1e-4, high: 1e-2}"
            )
        kind = entry.get("type")
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"{where}.type", kind, f"one of {list(DISTRIBUTIONS)}")
        _known_keys(entry, where, (*COMMON_FIELDS, *DISTRIBUTIONS[kind]))
        values = OmegaConf.to_container(entry, resolve=True)
        when = values.get("when") or {}
        if not isinstance(when, dict):
            raise ConfigError(f"{where}.when", when, "a mapping {earlier key: its value}")
        for other, value in when.items():
            earlier = next((p for p in params if p.key == other), None)
            if earlier is None or earlier.type != "categorical" or value not in earlier.choices:
                raise ConfigError(
                    f"{where}.when.{other}", value, "a choice of a categorical listed above it"
                )
        if kind == "categorical":
            choices = values.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}.choices", choices, "a non-empty list")
            if not all(c is None or isinstance(c, bool | int | float | str) for c in choices):
                raise ConfigError(f"{where}.choices", choices, "null, booleans, numbers or text")
            params.append(Param(str(key), kind, choices=tuple(choices), when=when))
            continue
        low, high = values.get("low"), values.get("high")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
            raise ConfigError(where, values, "numbers `low` and `high`")
        if not low <= high:
            raise ConfigError(where, values, "low <= high")
        step, use_log = values.get("step"), bool(values.get("log", False))
        if use_log and (step is not None or low <= 0):
            raise ConfigError(where, values, "log: true with low > 0 and no step")
        params.append(Param(str(key), kind, low=low, high=high, log=use_log, step=step, when=when))
    return tuple(params)


def check_space(spec: Spec, base: Sequence[str]) -> None:
    """Compose the config with every entry at its first value (`low`, or the first choice),
    then once per other text choice of a categorical (a config group's option), `when`
    applied: a mistyped key, an unknown group option or a value the config refuses stops
    the worker here, named, before any trial runs."""
    first = {p.key: p.first() for p in spec.space}
    scenarios = [first]
    for param in spec.space:
        if param.type == "categorical":
            # text choices may be options of a config group, each its own file
            scenarios += [{**first, param.key: c} for c in param.choices[1:] if isinstance(c, str)]
    for values in scenarios:
        chosen = [p for p in spec.space if all(values.get(k) == v for k, v in p.when.items())]
        try:
            compose_config([*base, *(override(p.key, values[p.key]) for p in chosen)])
        except Exception as err:  # Hydra's message says what is wrong: find the entry
            for p in chosen:
                condition = [override(k, v) for k, v in p.when.items()]
                try:
                    compose_config([*base, *condition, override(p.key, values[p.key])])
                except Exception as single:
                    raise _space_error(p.key, values[p.key], single) from single
            raise _space_error("", values, err) from err


def _space_error(key: str, value: Any, err: Exception) -> ConfigError:
    text = str(err).strip()
    line = text.splitlines()[0] if text else repr(err)
    where = f"search.space.{key}" if key else "search.space"
    return ConfigError(
        where, value, f"a key (or config group and option) of the composed config: {line}"
    )


def sample(trial: optuna.Trial, space: Sequence[Param]) -> list[str]:
    """The trial's sampled values as Hydra overrides, in the order of the space; an entry
    whose `when` does not hold is not sampled (and keeps its configured value)."""
    drawn: dict[str, Any] = {}
    for param in space:
        if all(k in drawn and drawn[k] == v for k, v in param.when.items()):
            drawn[param.key] = param.suggest(trial)
    return [override(k, v) for k, v in drawn.items()]


SIMPLE = re.compile(r"[A-Za-z_][\w\-./]*")


def override(key: str, value: Any) -> str:
    """`key=value` in Hydra's override grammar (text is quoted unless it is a plain word)."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        text = repr(value)
    elif SIMPLE.fullmatch(value) and value not in ("null", "true", "false"):
        text = value
    else:
        text = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"{key}={text}"


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """conf/train.yaml composed with `overrides`, as the command line would compose it. Inside
    the Hydra app the app's search path is used; elsewhere (tests, notebooks) conf/."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=list(overrides))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def monitored(cfg: DictConfig) -> tuple[str, str]:
    """The validation metric that picks the best checkpoint, and its mode (max | min):
    `callbacks.model_checkpoint.monitor`/`mode`, where `auto` is the task's (build_callbacks)."""
    task = check_config(cfg).task
    node = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    metric, mode = node.get("monitor", "auto"), node.get("mode", "auto")
    if metric == "auto":
        metric = f"val/{task.monitor_metric(cfg.data.k)}"
    if mode == "auto":
        mode = task.monitor_mode
    return str(metric), str(mode)


class PruningCallback(L.Callback):
    """Reports the monitored metric to the trial after each validation of `fit` (at the
    optimizer step, so step-based validation works within one epoch) and stops the trial,
    raising optuna.TrialPruned, when the study's pruner says so. `best` is the best value
    reported: what the study is told for a finished trial."""

    def __init__(self, trial: optuna.Trial, metric: str, maximize: bool) -> None:
        self.trial, self.metric, self.maximize = trial, metric, maximize
        self.values: list[float] = []

    @property
    def best(self) -> float | None:
        finite = [v for v in self.values if math.isfinite(v)]
        if not finite:
            return self.values[-1] if self.values else None
        return max(finite) if self.maximize else min(finite)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            return
        value, step = float(value), int(trainer.global_step)
        self.values.append(value)
        self.trial.report(value, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: {self.metric} = {value:.6g}")


class Heartbeat:
    """Writes the time into the trial's `search:heartbeat` every `interval_s` seconds, from
    a daemon thread, until stopped: the sign that the trial's worker is alive."""

    def __init__(self, storage: JournalStorage, trial_id: int, interval_s: float) -> None:
        self.storage, self.trial_id, self.interval_s = storage, trial_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="search-heartbeat", daemon=True)

    def beat(self) -> bool:
        try:
            self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT, time.time())
            return True
        except UpdateFinishedTrialError:  # declared lost by another worker: nothing to keep up
            log.warning("trial %s was finished by another worker", self.trial_id)
            return False

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.beat():
                    return
            except Exception as err:  # a full disk or NFS hiccup: try again next time
                log.warning("heartbeat of trial %s not written: %s", self.trial_id, err)

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Worker:
    """One worker of the study `spec` describes; `base` are its command-line overrides."""

    def __init__(self, cfg: DictConfig, base: Sequence[str]) -> None:
        self.spec = read_spec(cfg)
        if cfg.get("resume"):
            raise ConfigError(
                "resume", cfg.resume, "null: a search resumes by running its workers again"
            )
        if int(cfg.get("seeds") or 1) != 1:
            raise ConfigError(
                "seeds", cfg.seeds, "1: a trial trains once (to vary the seed, search over `seed`)"
            )
        self.base = [o for o in base if not NOT_INHERITED.match(o)]
        check_space(self.spec, self.base)
        self.metric, mode = monitored(cfg)
        direction = self.spec.direction
        self.direction = (
            ("maximize" if mode == "max" else "minimize") if direction == "auto" else direction
        )
        self.spec.dir.mkdir(parents=True, exist_ok=True)
        self.spec.storage.parent.mkdir(parents=True, exist_ok=True)
        self.storage = JournalStorage(JournalFileBackend(str(self.spec.storage)))
        # Serialises "recover lost trials, count, ask" across workers (the journal's own lock
        # covers single writes only); a lock left by a killed worker is taken over after 30 s.
        self.lock = JournalFileOpenLock(str(self.spec.dir / "ask"), JOURNAL_LOCK_GRACE_S)
        with self.locked():
            self.study = self._open_study()
            started_with = len(self.study.get_trials(deepcopy=False))
        # Workers seeded alike would draw the same first trials, and so would a restarted
        # worker: the sampler's seed is mixed with the worker's label and the study's size.
        mix = started_with + (zlib.crc32(self.spec.worker.encode()) if self.spec.labelled else 0)
        sampler_node = self.spec.sampler
        if sampler_node.get("seed") is not None:
            sampler_node = OmegaConf.merge(
                sampler_node, {"seed": (sampler_node.seed + mix) % 2**32}
            )
        self.study.sampler = instantiate(sampler_node)
        self.study.pruner = (
            instantiate(self.spec.pruner) if self.spec.pruner else optuna.pruners.NopPruner()
        )
        self.first_pass = True
        self.exhausted = False  # the sampler has covered its whole space

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.lock.acquire()
        try:
            yield
        finally:
            self.lock.release()

    def _open_study(self) -> optuna.Study:
        study = optuna.create_study(
            study_name=self.spec.study_name,
            storage=self.storage,
            direction=self.direction,
            load_if_exists=True,
        )
        if study.direction.name.lower() != self.direction:
            raise ConfigError(
                "search.direction",
                self.direction,
                f"{study.direction.name.lower()}: study `{self.spec.study_name}` in "
                f"{self.spec.storage} was created so (a new study_name starts another)",
            )
        saved = study.user_attrs.get(STUDY_METRIC)
        if saved is None:
            study.set_user_attr(STUDY_METRIC, self.metric)
        elif saved != self.metric:
            raise ConfigError(
                "callbacks.model_checkpoint.monitor",
                self.metric,
                f"{saved}, the metric study `{self.spec.study_name}` was created with",
            )
        return study

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> dict:
        """Trials until the study holds n_trials; returns what best.json holds."""
        log.info(
            "worker %s: study %s (%s %s) in %s",
            self.spec.worker,
            self.spec.study_name,
            self.direction,
            self.metric,
            self.spec.storage,
        )
        while not self.exhausted:
            with self.locked():
                self.release_lost()
                trial = self.next_trial()
                if trial is not None:
                    self.storage.set_trial_system_attr(trial._trial_id, WORKER, self.spec.worker)
            if trial is not None:
                self.run_trial(trial)
                continue
            running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not (self.spec.wait_for_running and running):
                break
            # Wait for the other workers' trials: one whose worker dies is re-run here.
            time.sleep(self.spec.interval_s)
        best = write_best(self.study, self.spec, self.metric)
        return best

    def next_trial(self) -> optuna.Trial | None:
        trials = self.study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if waiting or counted(trials) < self.spec.n_trials:
            return self.study.ask()
        return None

    def release_lost(self) -> None:
        """Set FAIL every RUNNING trial whose worker is gone and enqueue its parameters again.
        Gone: no heartbeat for grace_s, or (on this worker's first pass) left by a worker of
        this worker's label, which can only be an earlier, killed run of this worker."""
        now = time.time()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            start = t.datetime_start.timestamp() if t.datetime_start else now
            last = max(float(t.system_attrs.get(HEARTBEAT, 0.0)), start)
            own = (
                self.first_pass
                and self.spec.labelled
                and t.system_attrs.get(WORKER) == self.spec.worker
            )
            if own:
                reason = f"worker {self.spec.worker} restarted: the trial was left running"
            elif now - last > self.spec.grace_s:
                reason = (
                    f"no heartbeat for {now - last:.0f} s (worker {t.system_attrs.get(WORKER)})"
                )
            else:
                continue
            self.release(t, reason)
        self.first_pass = False

    def release(self, trial: FrozenTrial, reason: str) -> bool:
        try:
            self.storage.set_trial_system_attr(trial._trial_id, LOST, reason)
            self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:  # its worker told it meanwhile, or another released it
            return False
        self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        log.warning("trial %d lost (%s): enqueued again", trial.number, reason)
        return True

    def run_trial(self, trial: optuna.Trial) -> None:
        """Train one trial and tell the study how it ended: COMPLETE with its value, PRUNED,
        or FAIL (any error: a bad sampled config, NaN, out of memory) with the error in the
        trial's user attribute `error` and in `<trial>/failed.json`; the worker goes on."""
        folder = self.spec.dir / f"trial_{trial.number}"
        folder.mkdir(parents=True, exist_ok=True)
        trial.set_user_attr("folder", str(folder))
        trial.set_user_attr("worker", self.spec.worker)
        state, value, error, trace, overrides = TrialState.FAIL, None, None, None, []
        with Heartbeat(self.storage, trial._trial_id, self.spec.interval_s):
            try:
                overrides = sample(trial, self.spec.space)
                value = self.train_trial(trial, overrides, folder)
                state = TrialState.COMPLETE
            except optuna.TrialPruned as pruned:
                state, error = TrialState.PRUNED, f"TrialPruned: {pruned}"
            except (TrainingInterrupted, KeyboardInterrupt) as stop:
                # The worker is told to stop (SIGTERM, Ctrl-C): the trial is not at fault.
                self.release(self.storage.get_trial(trial._trial_id), "worker interrupted")
                self._record(folder, trial, "LOST", None, f"{type(stop).__name__}: {stop}", None)
                raise
            except Exception as err:
                error, trace = f"{type(err).__name__}: {err}", traceback.format_exc()
                trial.set_user_attr("error", error[:2000])
                log.error("trial %d failed: %s", trial.number, error)
            finally:
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        self._record(folder, trial, state.name, value, error, trace, overrides)
        try:
            self.study.tell(trial, value, state=state)
        except UpdateFinishedTrialError:
            log.warning("trial %d had been declared lost; its result is not counted", trial.number)
        except RuntimeError as err:
            # GridSampler and BruteForceSampler call study.stop() once the space is covered,
            # which optuna allows inside study.optimize only; the trial is stored by then.
            if "Study.stop" not in str(err):
                raise
            self.exhausted = True

    def _record(
        self,
        folder: Path,
        trial: optuna.Trial,
        state: str,
        value: float | None,
        error: str | None,
        trace: str | None,
        overrides: Sequence[str] = (),
    ) -> None:
        """`<trial>/trial.json` (state, value, params); for a trial that did not finish also
        `failed.json` (error, traceback, overrides), which `recsys_lm.sweeps` lists."""
        record = {
            "number": trial.number,
            "state": state,
            "value": value,
            "metric": self.metric,
            "params": trial.params,
            "overrides": list(overrides),
            "worker": self.spec.worker,
            "error": error,
        }
        atomic_write_text(folder / TRIAL_FILE, json.dumps(record, indent=2))
        if error is not None:
            failed = {
                "error": error,
                "traceback": trace,
                "overrides": [*self.base, *overrides],
                "pid": os.getpid(),
                "trial": trial.number,
                "state": state,
            }
            atomic_write_text(folder / FAILED_FILE, json.dumps(failed, indent=2))

    def train_trial(self, trial: optuna.Trial, overrides: list[str], folder: Path) -> float:
        """Compose, save like a Hydra run (.hydra/config.yaml, overrides.yaml), train; the
        best reported value of the monitored metric (the final validation's if none)."""
        cfg = compose_config([*self.base, *overrides])
        with open_dict(cfg):
            cfg.paths.output_dir = str(folder)
        (folder / ".hydra").mkdir(exist_ok=True)
        atomic_write_text(folder / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))
        recorded = OmegaConf.to_yaml(ListConfig([*self.base, *overrides]))
        atomic_write_text(folder / ".hydra" / "overrides.yaml", recorded)
        metric, _ = monitored(cfg)
        if metric != self.metric:
            raise ConfigError("callbacks.model_checkpoint.monitor", metric, f"{self.metric}")
        pruning = PruningCallback(trial, self.metric, self.direction == "maximize")
        result = train(cfg, callbacks=[pruning])
        value = pruning.best
        if value is None:
            value = result["val"].get(self.metric.removeprefix("val/"))
        if value is None or not math.isfinite(value):
            raise FloatingPointError(f"{self.metric} is {value}")
        return float(value)


def counted(trials: Sequence[FrozenTrial]) -> int:
    """Trials that count towards n_trials: all but the lost ones (their retry counts)."""
    return sum(1 for t in trials if not (t.state == TrialState.FAIL and LOST in t.system_attrs))


def write_best(study: optuna.Study, spec: Spec, metric: str) -> dict:
    """`<search.dir>/best.json`: the best finished trial (value, params, overrides, folder)
    and the study's trial counts. Written by each worker at its end: the last one's is final."""
    trials = study.get_trials(deepcopy=False)
    states = {s.name: sum(1 for t in trials if t.state == s) for s in TrialState}
    states["LOST"] = sum(1 for t in trials if LOST in t.system_attrs and t.state == TrialState.FAIL)
    best: dict[str, Any] = {
        "study": spec.study_name,
        "storage": str(spec.storage),
        "metric": metric,
        "direction": study.direction.name.lower(),
        "trials": states,
    }
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        top = study.best_trial
        best.update(
            number=top.number,
            value=top.value,
            params=top.params,
            overrides=[override(k, v) for k, v in top.params.items()],
            folder=top.user_attrs.get("folder"),
        )
    atomic_write_text(spec.dir / BEST_FILE, json.dumps(best, indent=2))
    if complete:
        print(
            f"best trial {best['number']}: {metric} = {best['value']:.6g} "
            f"({' '.join(best['overrides'])}) in {best['folder']}"
        )
    else:
        print(f"no finished trial yet in study {spec.study_name}: {states}")
    return best


def run(cfg: DictConfig, overrides: Sequence[str]) -> dict | int:
    """One worker; a user's mistake is one `error: ...` line and status 2, an interrupted
    worker (SIGTERM, SIGINT) exits 128 + the signal number, its trial enqueued again."""
    try:
        return Worker(cfg, overrides).run()
    except TrainingInterrupted as stop:
        print(f"interrupted: {stop}; run the worker again to go on", file=sys.stderr)
        return 128 + int(stop.signum)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    result = run(cfg, list(HydraConfig.get().overrides.task))
    if isinstance(result, int):
        sys.exit(result)
    return result.get("value")


if __name__ == "__main__":
    main()
