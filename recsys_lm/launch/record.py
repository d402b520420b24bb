"""A failed multirun job leaves `failed.json` in its folder (the error, its traceback and the
job's overrides), so a sweep report lists it with its reason instead of silently missing it.
Hydra catches a job's exception, lets the other jobs run, and raises the first one at the end
of the sweep; this callback keeps each job's own."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from recsys_lm.durable import atomic_write_text

FAILED_FILE = "failed.json"


class JobRecord(Callback):
    """Writes `<job dir>/failed.json` when a job fails; removes a stale one when it starts
    again in the same folder (`resume=<job dir>`)."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        (_job_dir(config) / FAILED_FILE).unlink(missing_ok=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED:
            return
        error = job_return._return_value  # `.return_value` re-raises a failed job's error
        record = {
            "error": f"{type(error).__name__}: {error}",
            "traceback": "".join(traceback.format_exception(error)),
            "overrides": list(job_return.overrides or []),
            "pid": os.getpid(),
        }
        atomic_write_text(_job_dir(config) / FAILED_FILE, json.dumps(record, indent=2))


def _job_dir(config: DictConfig) -> Path:
    return Path(str(OmegaConf.select(config, "hydra.runtime.output_dir")))
