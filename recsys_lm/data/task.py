"""The `Task` record: everything the framework knows about one task, in one place.

A head names its task (`Head.task`); the record says how the task's datasets are built, which
metrics it reports, which evaluation modes and baselines apply to it, the metric that
checkpointing and early stopping watch, and what its protocol adds to metrics.json. Nothing
else switches on task names. The registry of records is `recsys_lm.data.tasks.TASKS`; a new
task is one record there (or `register_task(record)` from your own module).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from recsys_lm.errors import ConfigError
from recsys_lm.metrics import Metrics

MONITOR_MODES = ("max", "min")


@dataclass(frozen=True)
class Task:
    name: str
    # (PreparedData, "train" | "val" | "test") -> that stage's dataset. Callables here take
    # the PreparedData (recsys_lm.data.prepared), which holds this record: typed Any, so
    # the two modules do not import each other.
    build: Callable[[Any, str], Dataset]
    # k (data.k) -> the metric set, fed identically by the head and by every baseline
    metrics: Callable[[int], Metrics]
    # data.eval_mode values this task supports; the first is the default (data.eval_mode=null)
    eval_modes: tuple[str, ...]
    # validation metric that checkpointing and early stopping watch; `{k}` is data.k
    monitor: str
    monitor_mode: str = "max"  # max: higher is better | min (rmse)
    # baselines (names in recsys_lm.baselines.BASELINES) that can be scored on this task...
    baselines: tuple[str, ...] = ()
    # ...and those a run reports when `baselines` is not set
    default_baselines: tuple[str, ...] = ()
    why: str = ""  # said in the error when an unsupported eval_mode is asked for
    # Pointwise tasks: the target space (rating statistics, class names), computed once from
    # the split before any dataset is built (PreparedData.targets).
    targets: Callable[[Any], Any] | None = None
    # Checks on the prepared data before datasets are built (e.g. a column the task needs).
    check: Callable[[Any], None] | None = None
    # Extra metrics.json protocol fields (e.g. where click labels came from).
    protocol: Callable[[Any], dict] | None = None

    def __post_init__(self) -> None:
        if self.monitor_mode not in MONITOR_MODES:
            raise ValueError(f"task {self.name}: monitor_mode must be one of {MONITOR_MODES}")
        if not self.eval_modes:
            raise ValueError(f"task {self.name}: at least one eval mode")

    @property
    def ranked(self) -> bool:
        """Whether anything is ranked (k and negatives mean something): not for pointwise."""
        return self.eval_modes != ("pointwise",)

    def monitor_metric(self, k: int) -> str:
        return self.monitor.format(k=k)

    def eval_mode(self, asked: str | None) -> str:
        """data.eval_mode, or this task's default; refuses a mode the task cannot evaluate."""
        if asked is None:
            return self.eval_modes[0]
        if asked not in self.eval_modes:
            why = f" ({self.why})" if self.why else ""
            raise ConfigError(
                "data.eval_mode",
                asked,
                f"one of {list(self.eval_modes)} for task `{self.name}`{why}",
            )
        return asked
