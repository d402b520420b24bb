"""recsys_lm.launch.record: a failed job leaves failed.json; a rerun clears it."""

from __future__ import annotations

import json
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from recsys_lm.launch.record import FAILED_FILE, JobRecord


def _config(folder: Path):
    return OmegaConf.create({"hydra": {"runtime": {"output_dir": str(folder)}}})


def _failed_job(error: Exception) -> JobReturn:
    try:
        raise error
    except Exception as raised:  # a real traceback, as Hydra's run_job keeps it
        job = JobReturn(overrides=["peft=ia3", "seed=2"], status=JobStatus.FAILED)
        job.return_value = raised
        return job


def test_a_failed_job_writes_its_error_traceback_and_overrides(tmp_path: Path) -> None:
    JobRecord().on_job_end(_config(tmp_path), _failed_job(ValueError("lr must be > 0")))
    record = json.loads((tmp_path / FAILED_FILE).read_text())
    assert record["error"] == "ValueError: lr must be > 0"
    assert "raise error" in record["traceback"]
    assert record["overrides"] == ["peft=ia3", "seed=2"]


def test_a_finished_job_writes_nothing_and_a_rerun_clears_the_old_record(tmp_path: Path) -> None:
    done = JobReturn(overrides=[], status=JobStatus.COMPLETED)
    done.return_value = 0.5
    JobRecord().on_job_end(_config(tmp_path), done)
    assert not (tmp_path / FAILED_FILE).exists()
    (tmp_path / FAILED_FILE).write_text("{}")
    JobRecord().on_job_start(_config(tmp_path))
    assert not (tmp_path / FAILED_FILE).exists()
