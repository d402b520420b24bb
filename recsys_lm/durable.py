"""Crash-safe training: files a kill cannot leave half-written, checkpoints on SIGTERM /
SIGINT / SIGUSR1 at the next step boundary, and per-step seeding so that a resumed run draws
the same random numbers as an uninterrupted one.

Core layer: depends on Lightning and torch only.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

LAST = "last.ckpt"


# -- atomic files ----------------------------------------------------------------------------
def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, then rename: a
    reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    with _temporary_beside(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` whole (the old
    folder, if any, is removed only after the new one is complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint format, written to `<path>.tmp` and renamed into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)


def checkpoint_step(path: str | Path) -> int:
    """The global step a Lightning checkpoint was saved at."""
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return int(state.get("global_step", -1))


def newest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint in `folder` with the highest global step; on a tie last.ckpt (written
    after validation, so it holds the most state), then the newest file."""
    files = [p for p in Path(folder).glob("*.ckpt") if p.is_file()]
    if not files:
        return None
    return max(files, key=lambda p: (checkpoint_step(p), p.name == LAST, p.stat().st_mtime))


# -- per-step seeding ------------------------------------------------------------------------
class StepSeed(L.Callback):
    """Reseed python, numpy and torch before every training batch from (seed, epoch, batch):
    dropout, sampled negatives and any other draw then depend on the position in training
    only, not on what ran before (validation, a restart), so a resumed run is bit-identical.
    Under DDP each process adds its rank (its own dropout; rank 0 draws as a single process)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        position = self.seed * 1_000_003 + trainer.current_epoch * 100_003 + batch_idx
        value = (position + trainer.global_rank * 7_919_993) % 2**32
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)  # every device's generator too


# -- graceful stop ---------------------------------------------------------------------------
class TrainingInterrupted(Exception):
    """Raised after the interrupt checkpoint is written; `train` turns it into an exit."""

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class GracefulStop(L.Callback):
    """On SIGTERM, SIGINT or SIGUSR1 (SLURM's pre-emption warning, by Lightning's convention)
    finish the current step, save `<checkpoints>/last.ckpt` and stop with
    `TrainingInterrupted`. Where Lightning's SLURM auto-requeue already handles SIGUSR1, that
    signal is left to it. Handlers are installed at fit start and restored at fit end."""

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGUSR1")) -> None:
        self.signals = [getattr(signal, name) for name in signals if hasattr(signal, name)]
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            return  # Python accepts signal handlers in the main thread only
        for signum in self.signals:
            current = signal.getsignal(signum)
            if signum == getattr(signal, "SIGUSR1", None) and current not in (
                None,
                signal.SIG_DFL,
                signal.SIG_IGN,
            ):
                continue  # Lightning's SLURM auto-requeue owns it
            self._previous[signum] = current
            signal.signal(signum, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:  # DDP: all processes stop at the same step, or none does
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        signum = self.received if self.received is not None else signal.SIGTERM
        raise TrainingInterrupted(signum, trainer.global_step, str(path))

    @staticmethod
    def checkpoint_path(trainer) -> Path:
        callback = trainer.checkpoint_callback
        folder = (
            getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        )
        return Path(folder) / LAST

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()
