"""`${job_dirname:...}`: a multirun job's folder name that fits a file system. Hydra's own
`<num>_<override_dirname>` grows with every override and a sweep with a dozen of them passes
the 255-byte limit on a file name (OSError: File name too long) before its first job runs.
Registered on import of the package (recsys_lm/__init__.py), before any config resolves."""

from __future__ import annotations

import hashlib

from omegaconf import OmegaConf

MAX_NAME = 150  # bytes kept of the readable part; the limit is 255 on ext4, xfs, apfs


def job_dirname(num: int | str, overrides: str) -> str:
    """`<num>_<overrides>`, or, when that is too long, its first MAX_NAME bytes plus an
    8-character digest of the whole: still unique, still readable, sorted by job number.
    The full overrides are in the job's .hydra/overrides.yaml either way."""
    name = f"{num}_{overrides}" if overrides else str(num)
    encoded = name.encode()
    if len(encoded) <= MAX_NAME:
        return name
    digest = hashlib.sha1(encoded).hexdigest()[:8]
    return f"{encoded[:MAX_NAME].decode(errors='ignore')}..{digest}"


if not OmegaConf.has_resolver("job_dirname"):
    OmegaConf.register_new_resolver("job_dirname", job_dirname)
