"""A test-only Hydra callback, added with `+hydra.callbacks.barrier._target_=
tests.launch.barrier.Barrier`: each job, once it holds its device, waits until `parties` jobs
of the sweep have got that far (files in `folder`), so jobs that a launcher runs in parallel
provably overlap, however slowly each worker starts. `barrier.json` in the job folder says
whether the barrier was met (a launcher that runs jobs one at a time times out: met=false)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


class Barrier(Callback):
    def __init__(self, folder: str, parties: int = 2, timeout_s: float = 60.0) -> None:
        self.folder, self.parties, self.timeout_s = Path(folder), parties, timeout_s

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        num = OmegaConf.select(config, "hydra.job.num")
        (self.folder / f"job{num}-pid{os.getpid()}").touch()
        started = time.time()
        met = False
        while time.time() - started < self.timeout_s:
            if len(list(self.folder.iterdir())) >= self.parties:
                met = True
                break
            time.sleep(0.05)
        out = Path(str(OmegaConf.select(config, "hydra.runtime.output_dir")))
        out.mkdir(parents=True, exist_ok=True)
        record = {"met": met, "waited_s": round(time.time() - started, 2)}
        (out / "barrier.json").write_text(json.dumps(record))
