from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from recsys_lm.data.cache import CachedSource
from recsys_lm.data.canonical import CanonicalData
from recsys_lm.data.sources.amazon import Amazon2018
from recsys_lm.data.sources.base import Source
from recsys_lm.data.sources.custom import CustomSource
from recsys_lm.data.sources.mind import MIND
from recsys_lm.data.sources.movielens import MovieLens100K, MovieLensCSV
from recsys_lm.data.sources.sample import SampleSource
from recsys_lm.errors import ConfigError

OLD = 1_000_000_000  # an mtime long past, so digests are memoized


def write_100k(root: Path) -> Path:
    """A tiny MovieLens-100K folder (same format as the real one)."""
    folder = root / "movielens-100k"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(u, i, (u + i) % 5 + 1, 880_000_000 + 10 * u + i) for u in (1, 2, 3) for i in (1, 2, 3)]
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    items = [(1, "Toy Story (1995)"), (2, "GoldenEye (1995)"), (3, "Misérables, Les (1995)")]
    (folder / "u.item").write_bytes(
        "".join(f"{i}|{t}|01-Jan-1995||url" + "|0|1" + "|0" * 17 + "\n" for i, t in items).encode(
            "latin-1"
        )
    )
    for file in folder.iterdir():
        os.utime(file, (OLD, OLD))
    return folder


def assert_same(first: CanonicalData, second: CanonicalData) -> None:
    for frame in ("items", "interactions", "users"):
        pd.testing.assert_frame_equal(getattr(first, frame), getattr(second, frame))
    assert second.impressions is None and first.impressions is None
    assert (first.name, first.dropped) == (second.name, second.dropped)


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "canonical").iterdir() if p.is_dir())


def test_second_load_reads_the_cache_and_equals_the_first(tmp_path, monkeypatch):
    write_100k(tmp_path)
    cached = CachedSource(MovieLens100K(root=str(tmp_path), min_rating=2), tmp_path / "cache")
    first = cached.load()
    (entry,) = entries(tmp_path / "cache")
    assert entry.name == f"movielens_100k-{cached.key()[:16]}"
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["dropped"] == first.dropped == {"rating < 2": 2}
    assert [name for name, _ in meta["inputs"]["files"]] == ["u.data", "u.item"]
    assert meta["inputs"]["config"] == {"folder": "movielens-100k", "min_rating": 2, "fold": None}
    assert meta["inputs"]["parser_version"] == MovieLens100K.parser_version

    def no_parsing(*args):
        raise AssertionError("parsed although the cache holds the data")

    monkeypatch.setattr(MovieLens100K, "_read", no_parsing)
    assert_same(first, cached.load())


def test_a_changed_byte_or_config_field_changes_the_key(tmp_path):
    folder = write_100k(tmp_path)
    cache = tmp_path / "cache"
    key = CachedSource(MovieLens100K(root=str(tmp_path)), cache).key()
    assert CachedSource(MovieLens100K(root=str(tmp_path), min_rating=4), cache).key() != key
    # Where the data lives and whether it may be downloaded do not change what it is.
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    folder.rename(moved / "movielens-100k")
    assert CachedSource(MovieLens100K(root=str(moved), download=True), cache).key() == key
    data = moved / "movielens-100k" / "u.data"
    raw = bytearray(data.read_bytes())
    raw[2] = ord("3") if raw[2] != ord("3") else ord("2")  # one byte, same size
    data.write_bytes(bytes(raw))
    changed = CachedSource(MovieLens100K(root=str(moved)), cache)
    assert changed.key() != key
    assert changed.load().interactions["item_id"].iloc[0] == int(chr(raw[2]))  # re-parsed


def test_without_the_memo_a_same_size_same_mtime_edit_is_still_seen(tmp_path):
    folder = write_100k(tmp_path)
    source = MovieLens100K(root=str(tmp_path))
    memo_key = CachedSource(source, tmp_path / "cache").key()
    data = folder / "u.data"
    stat = data.stat()
    text = data.read_text()
    with open(data, "r+") as handle:  # in place: same inode, same size
        handle.write("9" + text[1:])
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # The stat memo trusts size+mtime+inode (like git); memo=False hashes the bytes.
    assert CachedSource(source, tmp_path / "cache", memo=False).key() != memo_key


@pytest.mark.parametrize("damage", ["truncate", "delete_meta", "delete_frame", "garble_meta"])
def test_a_partial_cache_folder_is_not_used(tmp_path, damage, caplog):
    write_100k(tmp_path)
    cached = CachedSource(MovieLens100K(root=str(tmp_path)), tmp_path / "cache")
    first = cached.load()
    (entry,) = entries(tmp_path / "cache")
    frame = entry / "interactions.parquet"
    if damage == "truncate":
        frame.write_bytes(frame.read_bytes()[: frame.stat().st_size // 2])
    elif damage == "delete_meta":
        (entry / "meta.json").unlink()
    elif damage == "delete_frame":
        frame.unlink()
    else:
        (entry / "meta.json").write_text('{"format": 1, "key": ')
    with caplog.at_level(logging.WARNING):
        again = cached.load()
    assert_same(first, again)  # parsed again, not read from the damaged entry
    assert (entry / "meta.json").is_file() and frame.stat().st_size > 0  # rebuilt
    assert_same(first, cached.load())
    assert [p.name for p in entries(tmp_path / "cache")] == [entry.name]  # no leftovers


def test_a_leftover_temporary_folder_is_ignored(tmp_path):
    write_100k(tmp_path)
    cached = CachedSource(MovieLens100K(root=str(tmp_path)), tmp_path / "cache")
    # What an interrupted write leaves: files under a temporary name, never the real one.
    leftover = tmp_path / "cache" / "canonical" / f".tmp-movielens_100k-{cached.key()[:16]}-x"
    leftover.mkdir(parents=True)
    (leftover / "items.parquet").write_bytes(b"PAR1")
    first = cached.load()
    assert len(first.interactions) == 9
    assert_same(first, cached.load())


def test_a_generated_source_is_keyed_by_its_settings(tmp_path):
    sample = SampleSource(num_users=20, num_items=30)
    assert sample.raw_files() == [] and isinstance(sample, Source)
    cached = CachedSource(sample, tmp_path / "c")
    first = cached.load()
    assert len(entries(tmp_path / "c")) == 1
    assert_same(first, cached.load())
    assert CachedSource(SampleSource(num_users=20, num_items=30, seed=8), tmp_path / "c").key() != (
        cached.key()
    )


def test_a_source_without_raw_files_is_an_error(tmp_path):
    class Listless:
        name, parser_version = "listless", 1

        def load(self):
            raise AssertionError("never reached")

    with pytest.raises(ConfigError, match=r"test_cache.*Listless has none.*use_cache=false"):
        CachedSource(Listless(), tmp_path / "c").load()
    assert not isinstance(Listless(), Source)


def test_disabled_cache_and_unwritable_cache_still_load(tmp_path, caplog):
    write_100k(tmp_path)
    source = MovieLens100K(root=str(tmp_path))
    assert len(CachedSource(source, tmp_path / "off", enabled=False).load().interactions) == 9
    assert not (tmp_path / "off").exists()
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING):
        assert len(CachedSource(source, blocker).load().interactions) == 9
    assert "continuing without it" in caplog.text


def test_custom_source_round_trips_through_the_cache(tmp_path):
    pd.DataFrame({"u": ["a", "b"], "i": ["x", "y"], "t": ["2020-01-01", "2020-01-02"]}).to_csv(
        tmp_path / "events.csv", index=False
    )
    pd.DataFrame({"id": ["x", "y"], "title": ["Ex", "Why"]}).to_parquet(tmp_path / "items.parquet")
    source = CustomSource(
        {"path": "events.csv", "user": "u", "item": "i", "time": "t"},
        {"path": "items.parquet", "id": "id", "text": ["title"]},
        root=str(tmp_path),
    )
    cached = CachedSource(source, tmp_path / "cache")
    assert_same(cached.load(), cached.load())
    renamed = CustomSource(
        {"path": "events.csv", "user": "u", "item": "i", "time": "t", "time_format": "%Y-%m-%d"},
        source.items,
        root=str(tmp_path),
    )
    assert CachedSource(renamed, tmp_path / "cache").key() != cached.key()


@pytest.mark.real_data
def test_real_100k_round_trips(ml100k_root, tmp_path):
    cached = CachedSource(MovieLens100K(root=str(ml100k_root)), tmp_path)
    first = cached.load()
    assert len(first.interactions) == 100_000
    assert_same(first, cached.load())


SOURCE_MODULE = """
from recsys_lm.data.sources.movielens import MovieLens100K


class Edited(MovieLens100K):
    parser_version = {version}
    # {comment}
"""


def _edited_key(tmp_path: Path, monkeypatch, version: int, comment: str) -> str:
    """The key of a source class whose module file is (re)written with this text."""
    module = tmp_path / "edited_source.py"
    module.write_text(SOURCE_MODULE.format(version=version, comment=comment))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "edited_source", raising=False)
    cls = importlib.import_module("edited_source").Edited
    return CachedSource(cls(root=str(tmp_path)), tmp_path / "cache").key()


def test_code_edits_keep_the_key_and_parser_version_changes_it(tmp_path, monkeypatch):
    write_100k(tmp_path)
    key = _edited_key(tmp_path, monkeypatch, 1, "first edit")
    # No code file is hashed: editing the source module (or any pipeline module) keeps entries.
    assert _edited_key(tmp_path, monkeypatch, 1, "second edit, same output") == key
    assert _edited_key(tmp_path, monkeypatch, 2, "the parser changed") != key
    inputs = CachedSource(MovieLens100K(root=str(tmp_path)), tmp_path / "c").key_inputs([])
    assert set(inputs) == {"format", "canonical", "source", "parser_version", "config", "files"}


def test_every_source_follows_the_protocol(tmp_path):
    write_100k(tmp_path)
    sources = [
        MovieLens100K(root=str(tmp_path)),
        SampleSource(),
        MIND(),
        Amazon2018(),
        MovieLensCSV(),
        CustomSource(
            {"path": "a.csv", "user": "u", "item": "i", "time": "t"},
            {"path": "b.csv", "id": "id", "text": ["title"]},
        ),
    ]
    for source in sources:
        assert isinstance(source, Source) and isinstance(type(source).parser_version, int)
