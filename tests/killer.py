"""A test-only callback, registered with `+callbacks.killer._target_=tests.killer.KillAt`:
sends a signal to its own process after each of the given optimizer steps, once each."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from pathlib import Path

import lightning as L


class KillAt(L.Callback):
    """`steps`: one step or several. The run's config carries this callback into every
    resumed process, so `marker` (a file) lists the steps already fired: a resumed run
    passes them by and is killed at the next one."""

    def __init__(
        self, step: int | Iterable[int], signal_name: str = "SIGKILL", marker: str = ""
    ) -> None:
        self.steps = {int(step)} if isinstance(step, int) else {int(s) for s in step}
        self.signum = getattr(signal, signal_name)
        self.marker = Path(marker) if marker else None

    def fired(self) -> set[int]:
        if self.marker is None or not self.marker.exists():
            return set()
        return {int(s) for s in self.marker.read_text().split()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step not in self.steps or step in self.fired():
            return
        if self.marker:
            self.marker.write_text(" ".join(str(s) for s in sorted(self.fired() | {step})))
        os.kill(os.getpid(), self.signum)
