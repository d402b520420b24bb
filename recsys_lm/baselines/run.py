"""`run_baselines`: the baselines a run lists, each fitted and scored on val and test."""

from __future__ import annotations

import logging

from recsys_lm.baselines.evaluate import evaluate_scores
from recsys_lm.baselines.registry import BASELINES
from recsys_lm.data.prepared import EXTRA_TESTS, PreparedData
from recsys_lm.data.tasks import TASKS
from recsys_lm.errors import ConfigError

log = logging.getLogger(__name__)


def run_baselines(
    data: PreparedData, names: list[str], options: dict[str, dict] | None = None
) -> dict[str, dict]:
    """{name: {"val": metrics, "test": metrics}}, or {name: {"skipped": why}} for a baseline
    that does not apply to the task. `options[name]` are the baseline's keyword arguments
    (conf/train.yaml `baseline_options`)."""
    options = options or {}
    check_names(names)  # a misspelt name stops the run before anything is fitted
    out: dict[str, dict] = {}
    for name in names:
        if name not in data.task.baselines:
            out[name] = {"skipped": _why_skipped(name, data)}
            log.warning("baseline %s", out[name]["skipped"])
            continue
        baseline = BASELINES[name].build(data, **options.get(name, {}))
        stages = [s for s in ("val", "test", *EXTRA_TESTS) if s in data.datasets]
        out[name] = {stage: _evaluate(data, stage, baseline) for stage in stages}
    return out


def _evaluate(data: PreparedData, stage: str, baseline) -> dict[str, float]:
    return evaluate_scores(data, stage, baseline) if len(data.datasets[stage]) else {}


def check_names(names: list[str]) -> None:
    """Every name must be a registered baseline; names the unknown ones."""
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise ConfigError("baselines", unknown, f"names among {list(BASELINES)}")


def _why_skipped(name: str, data: PreparedData) -> str:
    task = data.task.name
    serves = [t.name for t in TASKS.values() if name in t.baselines]
    why = f"`{name}` does not apply to task `{task}` (it serves {serves})"
    return f"{why}; for `{task}` use baselines={list(data.task.baselines)}"
