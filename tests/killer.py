"""A test-only callback, registered with `+callbacks.killer._target_=tests.killer.KillAt`:
sends a signal to its own process once, after a given optimizer step."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L


class KillAt(L.Callback):
    def __init__(self, step: int, signal_name: str = "SIGKILL", marker: str = "") -> None:
        self.step, self.signum = int(step), getattr(signal, signal_name)
        self.marker = Path(marker) if marker else None  # fires once: a resumed run passes by

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or (self.marker and self.marker.exists()):
            return
        if self.marker:
            self.marker.write_text(str(self.step))
        os.kill(os.getpid(), self.signum)
