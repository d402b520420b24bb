"""What a run costs: training throughput, evaluation latency and peak memory (metrics.json
`cost`), measured by a Lightning callback so every strategy is timed the same way."""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch


def batch_size_of(batch: Any) -> int:
    """Rows in a batch: the first dimension of its first tensor (batches are dataclasses)."""
    values = (
        [getattr(batch, f.name) for f in dataclasses.fields(batch)]
        if dataclasses.is_dataclass(batch)
        else list(batch.values())
        if isinstance(batch, dict)
        else list(batch)
        if isinstance(batch, list | tuple)
        else [batch]
    )
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0


class CostMeter(L.Callback):
    """Times training and test batches only (not validation, checkpointing or data set-up):
    `train_samples_per_s` over the optimisation batches, `test_ms_per_query` over the last
    `trainer.test` (the main test set: read it before testing another set), and the peak
    memory: CUDA's max allocated on a GPU, else the process's peak resident set since fit
    started (where Linux lets it be reset). Under DDP the figures are rank 0's: its latency
    and memory, its throughput times the world size."""

    def __init__(self) -> None:
        self.train_s = 0.0
        self.train_samples = 0
        self.test_s = 0.0
        self.test_queries = 0
        self._started = 0.0
        self._cuda = False
        self._world = 1
        self._rss_reset = False

    def _now(self) -> float:
        # GPU kernels run asynchronously: without a sync the time is the launch, not the work.
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._cuda = pl_module.device.type == "cuda"
        self._world = trainer.world_size  # DDP: this process trains on 1/world of each step
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        else:
            self._rss_reset = reset_peak_rss()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_s += self._now() - self._started
        self.train_samples += batch_size_of(batch)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._cuda = pl_module.device.type == "cuda"
        self.test_s, self.test_queries = 0.0, 0

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._started = self._now()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.test_s += self._now() - self._started
        self.test_queries += batch_size_of(batch)

    def summary(self) -> dict[str, float | int | str | None]:
        samples = self.train_samples * self._world
        return {
            "train_samples": samples,
            "train_samples_per_s": _ratio(samples, self.train_s),
            "test_queries": self.test_queries,
            "test_ms_per_query": _ratio(1000 * self.test_s, self.test_queries),
            **peak_memory(self._cuda, self._rss_reset),
        }


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set to its current size (Linux: `5` into
    /proc/self/clear_refs), so a job that is not the process's first (a multirun's later
    jobs, a search's trials) reports its own peak. False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(cuda: bool, rss_reset: bool = False) -> dict[str, float | str]:
    """{"peak_memory_mb", "peak_memory_kind"}: what the numbers mean differs by device."""
    if cuda:
        return {
            "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "peak_memory_kind": "cuda_max_allocated",
        }
    if rss_reset:  # VmHWM: the peak since the reset, in kB
        status = Path("/proc/self/status").read_text()
        high = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
        return {
            "peak_memory_mb": round(int(high.split()[1]) / 2**10, 1),
            "peak_memory_kind": "process_peak_rss_since_fit",
        }
    # Without a reset the peak is the process's whole life so far. ru_maxrss is in kilobytes
    # on Linux and bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 2**20 if sys.platform == "darwin" else 2**10
    return {"peak_memory_mb": round(rss / scale, 1), "peak_memory_kind": "process_peak_rss"}
