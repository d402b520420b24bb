"""Fetch a publisher's archive into a cache folder, verify its checksum, unpack it."""

from __future__ import annotations

import hashlib
import logging
import shutil
import urllib.request
import zipfile
from pathlib import Path

from recsys_lm.errors import DataError

log = logging.getLogger(__name__)


def file_digest(path: Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, target: Path, checksum: str | None, algorithm: str = "sha256") -> Path:
    """Download `url` to `target` unless a file with the right checksum is already there.

    `checksum=None` is for publishers that publish none (MIND): nothing can be verified, so an
    existing `target` is reused as is and a warning says so rather than failing.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if checksum is None and target.exists():
        log.warning("%s: no published checksum; reusing %s unverified", url, target)
        return target
    if target.exists() and file_digest(target, algorithm) == checksum:
        return target
    partial = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as err:
        raise DataError(
            f"could not download {url} ({err}); without network, place the unpacked files "
            f"in the data folder instead"
        ) from err
    actual = file_digest(partial, algorithm)
    if checksum is None:
        log.warning("%s: no published checksum; not verified (%s %s)", url, algorithm, actual)
    elif actual != checksum:
        partial.unlink(missing_ok=True)
        raise DataError(f"{url}: {algorithm} {actual} does not match the expected {checksum}")
    partial.replace(target)
    return target


def unzip(archive: Path, destination: Path) -> Path:
    destination.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as bundle:
        bundle.extractall(destination)
    return destination
