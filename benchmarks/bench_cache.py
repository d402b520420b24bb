"""First load (parse + hash + write the cache) vs cached load of MovieLens-100K.

    python benchmarks/bench_cache.py --root /work/shared/data [--runs 9]

Each round times, back to back: a plain parse without the cache, a first load into a fresh
empty cache folder, a cached load from one warm entry, and a cached load that re-hashes every
raw file (`memo=False`). Interleaving the rounds lets every case see the same load on a shared
machine; the medians over rounds are printed. Exits 1 when the cached load is not at least 10x
faster than the first load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from recsys_lm.data.cache import CachedSource
from recsys_lm.data.sources.movielens import MovieLens100K

TARGET = 10.0
CASES = ("parse only (no cache)", "first load (parse+hash+write)", "cached load", "cached, re-hash")


def seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def rounds(source: MovieLens100K, runs: int, scratch: Path) -> dict[str, list[float]]:
    warm = CachedSource(source, scratch / "warm")
    reference, again = warm.load(), warm.load()
    for frame in ("items", "interactions", "users"):  # the figures mean nothing otherwise
        pd.testing.assert_frame_equal(getattr(reference, frame), getattr(again, frame))
    rehash = CachedSource(source, scratch / "warm", memo=False)
    times: dict[str, list[float]] = {case: [] for case in CASES}
    for run in range(runs):
        cold = CachedSource(source, scratch / f"cold-{run}")  # empty folder, made untimed
        for case, load in zip(CASES, (source.load, cold.load, warm.load, rehash.load), strict=True):
            times[case].append(seconds(load))
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder that holds movielens-100k/")
    parser.add_argument("--runs", type=int, default=9, help="timed rounds")
    args = parser.parse_args()
    source = MovieLens100K(root=args.root)
    source.load()  # warm imports and the OS page cache, so no case pays them alone
    with tempfile.TemporaryDirectory() as scratch:
        times = rounds(source, args.runs, Path(scratch))
    median = {case: statistics.median(values) for case, values in times.items()}
    first, cached = median[CASES[1]], median[CASES[2]]
    print(f"MovieLens-100K at {source.path}, median of {args.runs} interleaved rounds")
    for case in CASES:
        spread = f"[{min(times[case]) * 1e3:.1f} .. {max(times[case]) * 1e3:.1f}]"
        print(f"  {case:32s} {median[case] * 1e3:8.1f} ms  {spread}")
    print(f"  {'first / cached':32s} {first / cached:8.1f} x   (target >= {TARGET:g} x)")
    print(f"  {'parse only / cached':32s} {median[CASES[0]] / cached:8.1f} x")
    return 0 if first / cached >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
