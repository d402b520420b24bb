"""`hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml): the resources each job asks SLURM
for, checked in the submitting process so that a bad value stops the sweep with the key named,
before sbatch sees it. SLURM gives every job its own GPUs: there is no device pool here."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback

from recsys_lm.errors import ConfigError

# key: (smallest value, null allowed)
LIMITS = {
    "gpus_per_node": (0, True),
    "cpus_per_task": (1, True),
    "mem_gb": (1, True),
    "timeout_min": (1, False),
    "array_parallelism": (1, False),
    "nodes": (1, False),
    "tasks_per_node": (1, False),
}


class SlurmSettings(Callback):
    """Validates `hydra.launcher.<key>` for every key of LIMITS (passed by slurm.yaml)."""

    def __init__(self, **settings: Any) -> None:
        unknown = sorted(set(settings) - set(LIMITS))
        if unknown:
            raise ConfigError(
                f"hydra.callbacks.slurm_settings.{unknown[0]}",
                settings[unknown[0]],
                f"not a checked setting; known: {sorted(LIMITS)}",
            )
        for key, value in settings.items():
            least, nullable = LIMITS[key]
            if value is None and nullable:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                expected = f"a whole number >= {least}" + (" or null" if nullable else "")
                raise ConfigError(f"hydra.launcher.{key}", value, expected)
