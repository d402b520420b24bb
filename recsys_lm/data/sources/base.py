"""What every data source is: the `Source` protocol.

A source turns one dataset's raw files (or a generator) into `CanonicalData`; everything after
that (caching, filtering, splitting, task datasets) is the pipeline's and works for any source.

Adding a source takes two files:

1. `recsys_lm/data/sources/<name>.py`: a dataclass with the members below. Its fields are its
   settings (they enter the cache key, except `root`, `cache_dir` and `download`, which say
   where the data lives, not what it is). Read line-oriented files with
   `recsys_lm.data.readers` so that a bad value is reported as
   `<file>, line N, column '<name>': <value> ...; expected ...`. Import only
   `recsys_lm.data.{canonical,readers,markup,download}` and `recsys_lm.errors`.
2. `conf/data/<name>.yaml`: `defaults: [loader, _self_]`, then `source:` with
   `_target_: recsys_lm.data.sources.<name>.<Class>` and every field with an inline comment,
   plus the item/history templates over its item text columns.

A source that knows its own train/val/test split (shipped folds, a split column) adds the
optional interaction column `part` ("train" | "val" | "test"); `data.split.method=predefined`
then uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from recsys_lm.data.canonical import CanonicalData


@runtime_checkable
class Source(Protocol):
    """One dataset, as the pipeline (and `CachedSource`) sees it."""

    # Names the dataset in logs, metrics.json and the cache folder.
    name: str
    # Bump (a class attribute) whenever the parser's output changes for the same raw files and
    # settings: it is what invalidates cached canonical data, instead of hashing code files.
    parser_version: int

    def raw_files(self) -> list[Path]:
        """Every raw file `load()` reads, in order: the cache key holds their checksums.

        A generated source (the built-in sample) returns `[]`: its settings are its key.
        """
        ...

    def prepare(self) -> None:
        """Download the raw files when the settings allow it; otherwise do nothing."""
        ...

    def load(self) -> CanonicalData:
        """Parse the raw files into canonical form; bad input raises DataError / ConfigError."""
        ...
