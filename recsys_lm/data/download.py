"""Where a dataset's files live, and fetching a publisher's archive into a cache folder
(checksum verified, unpacked)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.request
import zipfile
from pathlib import Path

from recsys_lm.errors import ConfigError, DataError

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


def resolve_root(root: str | None, key: str = "data.root") -> Path:
    """The folder that holds the datasets: `data.root`, else $RECSYS_LM_DATA_ROOT."""
    root = root or os.environ.get("RECSYS_LM_DATA_ROOT")
    if not root:
        raise ConfigError(
            key, root, "a folder of datasets; set data.root=... or RECSYS_LM_DATA_ROOT"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ConfigError(key, root, f"an existing folder; {path.resolve()} does not exist")
    return path


def dataset_folder(
    root: str | None, folder: str, download: bool, cache_dir: str, cached: str | None = None
) -> Path:
    """Where a source reads its files: `<data.root>/<folder>`, or, when it may download and
    no root is set at all, its unpacked folder (`cached`, default `folder`) in the cache."""
    if download and not root and not os.environ.get("RECSYS_LM_DATA_ROOT"):
        return Path(cache_dir).expanduser() / (cached or folder)
    return resolve_root(root) / folder
