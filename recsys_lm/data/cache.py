"""A cache of a source's canonical form: parse once, then read Parquet.

`CachedSource(source, cache_dir).load()` keys an entry by sha256 over
  * the cache format version and the canonical form's version (`canonical.VERSION`),
  * the source's class (module + qualname) and its `parser_version` (a class attribute the
    source bumps when its parser's output changes; code files are not hashed, so editing a
    pipeline module or a comment never invalidates a cache),
  * the source's settings: its dataclass fields except root/cache_dir/download,
  * the sha256 of every raw file the source reads (`source.raw_files()`), in order; a
    generated source returns [] and is keyed by its settings alone,
and stores every DataFrame of the CanonicalData as Parquet plus meta.json (name, dropped, the
key inputs, created time) in `<cache_dir>/canonical/<name>-<key[:16]>/`. Entries are written
into a temporary folder and renamed into place, so a crash never leaves a half entry under the
real name; an entry whose files are missing or of the wrong size is ignored and rebuilt.

Hashing stays cheap on every load: a file's digest is remembered in `digests.json` together with
its size, mtime (ns) and inode, and reused while all three are unchanged (what git and make
trust too). `memo=False` hashes every file on every load instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_lm.data.canonical import VERSION as CANONICAL_VERSION
from recsys_lm.data.canonical import CanonicalData
from recsys_lm.data.download import file_digest
from recsys_lm.errors import ConfigError, RecsysLMError

log = logging.getLogger(__name__)
FORMAT = 1  # bump when the entry layout changes: old entries then miss instead of misreading
# Where the data lives and how it is fetched, not what it is: left out of the key.
NOT_CONFIG = ("root", "cache_dir", "download")
THREADS_FROM = 16 << 20  # bytes: Parquet files above this are read with threads
SETTLE_NS = 2_000_000_000  # files modified this recently are re-hashed (coarse mtime clocks)


@dataclasses.dataclass
class CachedSource:
    """Wraps a source (`name`, `prepare()`, `load()`, `raw_files()`) with the canonical cache."""

    source: Any
    cache_dir: str | Path = "~/.cache/recsys_lm"
    enabled: bool = True  # False: every load parses (the wrapper is then transparent)
    memo: bool = True  # reuse a raw file's digest while its size/mtime/inode are unchanged

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def folder(self) -> Path:
        return Path(self.cache_dir).expanduser() / "canonical"

    def prepare(self) -> None:
        self.source.prepare()

    def load(self) -> CanonicalData:
        if not self.enabled:
            return self.source.load()
        files = self._raw_files()
        if not all(f.is_file() for f in files):
            return self.source.load()  # it raises the error that names the missing file
        inputs = self.key_inputs(files)
        key = key_of(inputs)
        entry = self.folder / f"{_safe(self.name)}-{key[:16]}"
        data = read_entry(entry, key)
        if data is None:
            data = self.source.load()
            write_entry(entry, data, key, inputs)
        return data

    def key(self) -> str:
        """The entry key for the source as it is now (tests, tooling)."""
        return key_of(self.key_inputs(self._raw_files()))

    def key_inputs(self, files: list[Path]) -> dict[str, Any]:
        digests = Digests(self.folder / "digests.json", self.memo)
        source_type = type(self.source)
        inputs = {
            "format": FORMAT,
            "canonical": CANONICAL_VERSION,
            "source": f"{source_type.__module__}.{source_type.__qualname__}",
            "parser_version": self._parser_version(),
            "config": config_of(self.source),
            # Names, not full paths: moving data.root does not invalidate the cache.
            "files": [[file.name, digests.of(file)] for file in files],
        }
        digests.save()
        return inputs

    def _raw_files(self) -> list[Path]:
        """The files to hash; a source that cannot list them cannot be cached honestly."""
        if not callable(getattr(self.source, "raw_files", None)):
            raise ConfigError(
                "data.use_cache",
                True,
                f"a source with raw_files() (see recsys_lm/data/sources/base.py); "
                f"{_class_name(self.source)} has none: add it, or set data.use_cache=false",
            )
        return [Path(f) for f in self.source.raw_files()]

    def _parser_version(self) -> int:
        version = getattr(self.source, "parser_version", None)
        if not isinstance(version, int) or isinstance(version, bool):
            raise ConfigError(
                "data.use_cache",
                True,
                f"a source with an integer class attribute parser_version; "
                f"{_class_name(self.source)} has {version!r}",
            )
        return version


def key_of(inputs: dict[str, Any]) -> str:
    return _sha256(json.dumps(inputs, sort_keys=True).encode())


def _class_name(source: Any) -> str:
    kind = type(source)
    return f"{kind.__module__}.{kind.__qualname__}"


def config_of(source: Any) -> dict[str, Any]:
    """The fields that shape the canonical output, JSON-able (unknown objects as str)."""
    if dataclasses.is_dataclass(source):
        values = {f.name: getattr(source, f.name) for f in dataclasses.fields(source)}
    else:
        values = {k: v for k, v in vars(source).items() if not k.startswith("_")}
    kept = {k: v for k, v in values.items() if k not in NOT_CONFIG}
    return json.loads(json.dumps(kept, sort_keys=True, default=str))


class Digests:
    """sha256 of files, remembered per (size, mtime_ns, inode) in a small JSON file."""

    def __init__(self, file: Path, enabled: bool = True) -> None:
        self.file, self.enabled, self.changed = file, enabled, False
        self.known: dict[str, list] = {}
        if enabled:
            try:
                self.known = json.loads(file.read_text())
            except (OSError, ValueError):
                self.known = {}  # absent or damaged: start over, it is only a memo

    def of(self, path: Path) -> str:
        if not self.enabled:
            return file_digest(path)
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        name = os.path.abspath(path)  # not resolve(): realpath's lstat walk costs more
        entry = self.known.get(name)
        if entry and entry[:3] == stamp:
            return entry[3]
        digest = file_digest(path)
        # A file written within the clock's granularity could change again unseen: not memoized.
        if time.time_ns() - stat.st_mtime_ns > SETTLE_NS:
            self.known[name] = [*stamp, digest]
            self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            partial = self.file.with_name(f".{self.file.name}.{uuid.uuid4().hex}")
            partial.write_text(json.dumps(self.known))
            partial.replace(self.file)  # atomic: readers see the old or the new memo
        except OSError as err:
            log.warning("could not save %s (%s); files will be hashed again", self.file, err)


def read_entry(entry: Path, key: str) -> CanonicalData | None:
    """The cached data, or None when the entry is absent, incomplete or not for `key`."""
    meta_file = entry / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("key") != key or meta.get("format") != FORMAT:
            raise ValueError("meta.json belongs to another key or format")
        frames = {name: _read_frame(entry, info) for name, info in meta["frames"].items()}
        return _validated(meta["fields"] | frames)
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException, RecsysLMError) as err:
        log.warning("cache entry %s is unusable (%s); parsing the source again", entry, err)
        return None


def _validated(values: dict[str, Any]) -> CanonicalData:
    """CanonicalData without re-running validate(): the entry held validated data when it was
    written, and canonical.VERSION (bumped when the rules change) is in the key."""
    data = object.__new__(CanonicalData)
    for field in dataclasses.fields(CanonicalData):
        object.__setattr__(data, field.name, values[field.name])  # KeyError: entry is stale
    return data


def _read_frame(entry: Path, info: dict[str, Any]) -> pd.DataFrame:
    file = entry / info["file"]
    size = file.stat().st_size
    if size != info["bytes"]:  # truncated or replaced: Parquet might not even notice
        raise ValueError(f"{file.name} has {size} bytes, meta.json says {info['bytes']}")
    # ParquetFile skips the dataset layer of pq.read_table (~1 ms a file); threads pay off
    # only for big tables (ml-25m), not for thread start-up on a 100K one.
    threads = size > THREADS_FROM
    table = pq.ParquetFile(file).read(use_threads=threads)
    # split_blocks: no copy into one 2-D block per dtype (the frame's values are unchanged).
    return table.to_pandas(use_threads=threads, split_blocks=True)


def write_entry(entry: Path, data: CanonicalData, key: str, inputs: dict[str, Any]) -> None:
    """Write into a temporary sibling, then rename: the entry appears whole or not at all."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    except OSError as err:
        log.warning("cannot write the cache under %s (%s); continuing without it", entry, err)
        return
    try:
        frames, fields = {}, {}
        for field in dataclasses.fields(data):
            value = getattr(data, field.name)
            if isinstance(value, pd.DataFrame):
                file = partial / f"{field.name}.parquet"
                # Uncompressed (dictionary-encoded): reads faster, and the size is rarely the issue.
                value.to_parquet(file, compression=None)
                frames[field.name] = {"file": file.name, "bytes": file.stat().st_size}
            else:
                fields[field.name] = value
        meta = {
            "format": FORMAT,
            "key": key,
            "name": data.name,
            "dropped": data.dropped,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "inputs": inputs,
            "fields": fields,
            "frames": frames,
        }
        # meta.json last: an entry without it is never read.
        (partial / "meta.json").write_text(json.dumps(meta, indent=1))
        _move_into_place(partial, entry)
    except (OSError, ValueError, TypeError, pa.ArrowException) as err:
        log.warning("could not write cache entry %s (%s); continuing without it", entry, err)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _move_into_place(partial: Path, entry: Path) -> None:
    if entry.exists():  # a broken entry (a valid one would have been read): set it aside first
        trash = entry.with_name(f".trash-{entry.name}-{uuid.uuid4().hex}")
        entry.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(partial, entry)
    except OSError:
        if not (entry / "meta.json").is_file():
            raise
        # Another process finished the same entry first; its copy is as good as ours.


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safe(name: str) -> str:
    """A dataset name usable as a folder name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "dataset"
