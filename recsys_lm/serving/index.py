"""`ItemIndex`: the served items' vectors and inner-product top-k over them.

Three backends behind one interface:

    exact       a float32 numpy matrix; scores = queries @ matrix.T, masked, then top-k. Exact,
                and the fastest choice up to a few hundred thousand items.
    faiss       faiss `IndexFlatIP` in an `IndexIDMap2`: also exact (same scores up to float
                rounding), faiss's kernels; removals and replacements are real `remove_ids`.
    faiss-hnsw  faiss `IndexHNSWFlat` (inner product): approximate, sub-linear, for large
                catalogues. Options: `M` (graph degree, 32), `efConstruction` (64), `efSearch`
                (64; raised to k when k is larger).

Rows and ids: every vector lives in one row of a numpy matrix (faiss backends keep that copy
too: `vectors(ids)`, rebuilds and `save` read it), and a row number is also the item's faiss
label. An HNSW graph cannot delete or update a node, so for `faiss-hnsw` a removed row is a
tombstone that a faiss `IDSelector` filters out of every query, and a replaced vector is a
tombstone plus a new row. When tombstones outnumber live rows (and exceed `COMPACT_AT`) the
index compacts: live rows are renumbered and the faiss index rebuilt from them, which for HNSW
costs one graph build, amortised over at least as many removals.

Filters are applied inside the query, never by over-fetching: the exact backend masks scores
before top-k; faiss backends pass `SearchParameters(sel=...)`: `IDSelectorBatch` of the
allowed rows, or `IDSelectorNot` of the excluded (and tombstoned) rows. HNSW under a selective
filter can miss eligible items (its walk stops at efSearch candidates); a query that comes
back with fewer than min(k, eligible) items is then answered exactly over its eligible rows,
so no backend returns fewer. Ids in `exclude` / `allow` that the index does not hold are
ignored (a history may name removed items; an allow list may name items out of stock).

Ties: results are ordered by (score descending, id ascending), ties at the k-th place
included, so an answer does not depend on insertion order: faiss backends fetch k + 1 and,
when the k-th and the next item tie, answer that query exactly.

Not safe to mutate while another thread reads: callers serialise writes with reads
(`ServedModel` holds one lock for both).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recsys_lm.durable import atomic_directory
from recsys_lm.errors import ConfigError, DataError, RecsysLMError, UnknownItem

BACKENDS = ("exact", "faiss", "faiss-hnsw")


def _faiss():
    """faiss, imported on first use: the exact backend (the default) needs numpy only, so
    training (which imports this module through the composition root) neither pays for
    faiss at start-up nor needs the `serve` extra's faiss-cpu."""
    import faiss

    return faiss


HNSW_DEFAULTS = {"M": 32, "efConstruction": 64, "efSearch": 64}
COMPACT_AT = 1024  # tombstones below this never trigger a compaction
FORMAT = 1
_FILES = ("index.json", "ids.json", "vectors.npy")


class InvalidVectors(RecsysLMError, ValueError):
    """Vectors or queries of the wrong shape, dtype or with non-finite values; ids that are
    not strings or repeat within one call."""


# -- faiss engines: the index structure beside the numpy rows -----------------------------------
class _FlatEngine:
    """Exact inner product in faiss; labels are row numbers, removal is real."""

    tombstones = False  # removed rows leave the faiss index: no filter needed

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.reset(np.empty((0, dim), np.float32))

    def reset(self, matrix: np.ndarray) -> None:
        self.index = _faiss().IndexIDMap2(_faiss().IndexFlatIP(self.dim))
        self.add(np.arange(len(matrix), dtype=np.int64), matrix)

    def add(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        if len(rows):
            self.index.add_with_ids(vectors, rows.astype(np.int64))

    def remove(self, rows: np.ndarray) -> None:
        if len(rows):
            self.index.remove_ids(rows.astype(np.int64))

    def params(self, selector, k: int):
        return _faiss().SearchParameters(sel=selector) if selector is not None else None


class _HnswEngine:
    """Approximate inner product on an HNSW graph; node i is row i (rows are only appended
    between compactions), removed rows stay in the graph as tombstones."""

    tombstones = True

    def __init__(self, dim: int, M: int, efConstruction: int, efSearch: int) -> None:
        self.dim, self.M, self.ef_construction, self.ef_search = dim, M, efConstruction, efSearch
        self.reset(np.empty((0, dim), np.float32))

    def reset(self, matrix: np.ndarray) -> None:
        self.index = _faiss().IndexHNSWFlat(self.dim, self.M, _faiss().METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = self.ef_construction
        self.add(np.arange(len(matrix), dtype=np.int64), matrix)

    def adopt(self, index) -> None:
        """Use a graph read from disk (`ItemIndex.load`) instead of building one."""
        self.index = index

    def add(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        if len(rows) and rows[0] != self.index.ntotal:
            raise AssertionError("HNSW rows must be appended in order")  # an internal slip
        if len(rows):
            self.index.add(vectors)

    def remove(self, rows: np.ndarray) -> None:
        """Nothing to do: tombstoned rows are filtered by the query's selector."""

    def params(self, selector, k: int):
        return _faiss().SearchParametersHNSW(sel=selector, efSearch=max(self.ef_search, k))


def _engine(backend: str, dim: int, options: dict[str, Any]):
    if backend not in BACKENDS:
        raise ConfigError("index.backend", backend, f"one of {', '.join(BACKENDS)}")
    allowed = HNSW_DEFAULTS if backend == "faiss-hnsw" else {}
    for name, value in options.items():
        if name not in allowed:
            known = ", ".join(allowed) or "none"
            raise ConfigError(f"index.{name}", value, f"an option of {backend} ({known})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"index.{name}", value, "a positive integer")
    if backend == "exact":
        return None
    if backend == "faiss":
        return _FlatEngine(dim)
    return _HnswEngine(dim, **{**HNSW_DEFAULTS, **options})


# -- the index -------------------------------------------------------------------------------
class ItemIndex:
    """Item vectors by item id, searched by inner product (see the module docstring)."""

    def __init__(self, dim: int, backend: str = "exact", **options: Any) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigError("index.dim", dim, "a positive integer (the vector size)")
        self.dim, self.backend, self.options = dim, backend, dict(options)
        self._engine = _engine(backend, dim, self.options)
        self._matrix = np.empty((0, dim), np.float32)  # capacity grows by doubling
        self._size = 0  # rows in use, tombstones included
        self._alive = np.zeros(0, bool)
        self._row_ids: list[str | None] = []  # id of each row; None for a tombstone
        self._rows: dict[str, int] = {}
        self._dead_selector = None  # cached IDSelectorBatch of HNSW tombstones

    @classmethod
    def from_vectors(
        cls, ids: Sequence[str], vectors: np.ndarray, backend: str = "exact", **options: Any
    ) -> ItemIndex:
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise InvalidVectors(f"item vectors must be a [n, d] matrix, got shape {vectors.shape}")
        index = cls(int(vectors.shape[1]), backend, **options)
        index.add(ids, vectors)
        return index

    # -- reading -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._rows

    @property
    def ids(self) -> list[str]:
        """Live item ids in row order."""
        return [i for i in self._row_ids if i is not None]

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """The vectors [len(ids), d] of these items (a copy)."""
        return self._matrix[self._rows_of(ids)].copy()

    def _rows_of(self, ids: Iterable[str]) -> np.ndarray:
        ids = list(ids)
        missing = [i for i in ids if i not in self._rows]
        if missing:
            raise UnknownItem(missing)
        return np.fromiter((self._rows[i] for i in ids), np.int64, len(ids))

    # -- writing -----------------------------------------------------------------------------
    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add items; an id the index holds already gets the new vector."""
        ids = _checked_ids(ids)
        vectors = self._checked(vectors, "item vectors", len(ids))
        if not ids:
            return
        held = [n for n, i in enumerate(ids) if i in self._rows]
        if held and not (self._engine is not None and self._engine.tombstones):
            # exact and flat replace in place: same row, the faiss label moves with it
            rows = self._rows_of([ids[n] for n in held])
            self._matrix[rows] = vectors[held]
            if self._engine is not None:
                self._engine.remove(rows)
                self._engine.add(rows, vectors[held])
            fresh = np.setdiff1d(np.arange(len(ids)), held)
        else:
            self._tombstone([ids[n] for n in held])  # HNSW: the old node stays as a tombstone
            fresh = np.arange(len(ids))
        self._append([ids[n] for n in fresh], vectors[fresh])
        self._maybe_compact()

    def remove(self, ids: Sequence[str]) -> None:
        """Remove items (all or none: an unknown id raises UnknownItem before any change)."""
        ids = list(dict.fromkeys(ids))
        self._rows_of(ids)
        self._tombstone(ids)
        self._maybe_compact()

    def compact(self) -> None:
        """Renumber the live rows and rebuild the faiss index from them (drops tombstones)."""
        live = np.flatnonzero(self._alive[: self._size])
        self._matrix = np.ascontiguousarray(self._matrix[live])
        self._row_ids = [self._row_ids[r] for r in live]
        self._rows = {item: row for row, item in enumerate(self._row_ids)}
        self._size = len(live)
        self._alive = np.ones(self._size, bool)
        self._dead_selector = None
        if self._engine is not None:
            self._engine.reset(self._matrix)

    def _append(self, ids: list[str], vectors: np.ndarray, to_engine: bool = True) -> None:
        if not ids:
            return
        start, end = self._size, self._size + len(ids)
        if end > len(self._matrix):
            capacity = max(end, 2 * len(self._matrix), 16)
            grown = np.empty((capacity, self.dim), np.float32)
            grown[:start] = self._matrix[:start]
            self._matrix = grown
            self._alive = np.concatenate([self._alive[:start], np.zeros(capacity - start, bool)])
        self._matrix[start:end] = vectors
        self._alive[start:end] = True
        self._row_ids.extend(ids)
        self._rows.update(zip(ids, range(start, end), strict=True))
        self._size = end
        if self._engine is not None and to_engine:
            self._engine.add(np.arange(start, end, dtype=np.int64), self._matrix[start:end])

    def _tombstone(self, ids: list[str]) -> None:
        if not ids:
            return
        rows = self._rows_of(ids)
        for item, row in zip(ids, rows, strict=True):
            del self._rows[item]
            self._row_ids[row] = None
        self._alive[rows] = False
        self._dead_selector = None
        if self._engine is not None:
            self._engine.remove(rows)

    def _maybe_compact(self) -> None:
        dead = self._size - len(self._rows)
        if dead >= COMPACT_AT and dead > len(self._rows):
            self.compact()

    # -- search ------------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: Sequence[Iterable[str] | None] | None = None,
        allow: Sequence[Iterable[str] | None] | None = None,
    ) -> list[tuple[list[str], list[float]]]:
        """Per query [B, d]: the k live items with the highest inner product, best first, as
        (ids, scores), never an `exclude[b]` item and, where `allow[b]` is a set, only its
        items. Each answer holds min(k, eligible items) entries."""
        queries = self._checked(queries, "queries", None)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidVectors(f"k must be a positive integer, got {k!r}")
        batch = len(queries)
        if len(self) == 0:
            return [([], []) for _ in range(batch)]
        exclude = _per_query(exclude, batch, "exclude")
        allow = _per_query(allow, batch, "allow")
        excluded = [self._known_rows(e) for e in exclude]
        allowed = [
            None if a is None else np.setdiff1d(self._known_rows(a), x)
            for a, x in zip(allow, excluded, strict=True)
        ]
        if self._engine is None:
            return self._search_exact(queries, int(k), excluded, allowed)
        return self._search_faiss(queries, int(k), excluded, allowed)

    def _known_rows(self, ids: Iterable[str] | None) -> np.ndarray:
        if isinstance(ids, str):
            raise InvalidVectors(f"exclude / allow entries are sets of ids, got the string {ids!r}")
        rows = {self._rows[i] for i in ids or () if i in self._rows}
        return np.array(sorted(rows), np.int64)

    def _eligible(self, excluded: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
        if allowed is not None:
            return allowed
        mask = self._alive[: self._size].copy()
        mask[excluded] = False
        return np.flatnonzero(mask)

    def _search_exact(self, queries, k, excluded, allowed):
        matrix = self._matrix[: self._size]
        # one matrix product for the batch, unless every query scores its allow list only
        full = None if all(a is not None for a in allowed) else queries @ matrix.T
        out = []
        for b, query in enumerate(queries):
            rows = self._eligible(excluded[b], allowed[b])
            scores = matrix[rows] @ query if full is None else full[b, rows]
            out.append(self._answer(rows, scores, k))
        return out

    def _answer(self, rows: np.ndarray, scores: np.ndarray, k: int):
        """The top k of (rows, scores): score descending, ties (also at the k-th place) by id."""
        if len(rows) > k:
            top = np.argpartition(scores, len(scores) - k)[len(scores) - k :]
            keep = np.flatnonzero(scores >= scores[top].min())  # every tie of the k-th score
            rows, scores = rows[keep], scores[keep]
        names = np.array([self._row_ids[r] for r in rows], dtype=object)
        order = np.lexsort((names.astype(str), -scores))[:k] if len(rows) else []
        return [str(names[i]) for i in order], [float(scores[i]) for i in order]

    def _search_faiss(self, queries, k, excluded, allowed):
        # one more than k: a tie between the k-th and the next item is then visible
        fetch = k + 1
        if all(len(x) == 0 and a is None for x, a in zip(excluded, allowed, strict=True)):
            # no per-query filter: one batched faiss call (tombstones filtered if any)
            found = list(zip(*self._faiss_search(queries, fetch, self._not(None)), strict=True))
        else:
            found = [
                self._search_one(query[None], fetch, x, a)
                for query, x, a in zip(queries, excluded, allowed, strict=True)
            ]
        out = []
        for b, (scores, labels) in enumerate(found):
            hit = labels >= 0
            labels, scores = labels[hit], scores[hit]
            eligible = len(allowed[b]) if allowed[b] is not None else len(self) - len(excluded[b])
            short = len(labels) < min(k, eligible)  # HNSW missed items under a selective filter
            tie = len(labels) > k and scores[k] == scores[k - 1]  # which tied item is k-th?
            if short or tie:  # answer this query exactly over its eligible rows
                rows = self._eligible(excluded[b], allowed[b])
                out.append(self._answer(rows, self._matrix[rows] @ queries[b], k))
            else:
                out.append(self._answer(labels[:k], scores[:k], k))
        return out

    def _search_one(self, query, k, excluded, allowed):
        if allowed is None:
            banned = _faiss().IDSelectorBatch(excluded) if len(excluded) else None
            scores, labels = self._faiss_search(query, k, self._not(banned))
        elif len(allowed):
            scores, labels = self._faiss_search(query, k, [_faiss().IDSelectorBatch(allowed)])
        else:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        return scores[0], labels[0]

    def _not(self, banned) -> list:
        """Selectors for "none of `banned` nor a tombstone": the last one is the selector to
        search with (an empty list: no filter); the others must stay referenced until the
        search is over, since faiss holds raw pointers to them."""
        dead = self._dead() if self._engine.tombstones else None
        parts = [s for s in (banned, dead) if s is not None]
        if len(parts) == 2:
            parts.append(_faiss().IDSelectorOr(banned, dead))
        if parts:
            parts.append(_faiss().IDSelectorNot(parts[-1]))
        return parts

    def _faiss_search(self, queries: np.ndarray, k: int, selectors: list):
        params = self._engine.params(selectors[-1] if selectors else None, k)
        return self._engine.index.search(queries, k, params=params)

    def _dead(self):
        """IDSelectorBatch of the tombstoned rows (None when there are none), cached."""
        if self._size == len(self._rows):
            return None
        if self._dead_selector is None:
            dead = np.flatnonzero(~self._alive[: self._size]).astype(np.int64)
            self._dead_selector = _faiss().IDSelectorBatch(dead)
        return self._dead_selector

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the folder `path` atomically: vectors.npy (live rows), ids.json (their ids),
        index.json (dim, backend, options) and, for faiss-hnsw, the graph (hnsw.faiss) so
        that loading does not rebuild it. Tombstones are compacted away first."""
        if self._size != len(self._rows):
            self.compact()
        settings = {"format": FORMAT, "dim": self.dim, "backend": self.backend}
        with atomic_directory(path) as tmp:
            _write(tmp / "vectors.npy", lambda f: np.save(f, self._matrix[: self._size]))
            _write(tmp / "ids.json", lambda f: f.write(json.dumps(self.ids).encode()))
            text = json.dumps({**settings, "options": self.options}, indent=2)
            _write(tmp / "index.json", lambda f: f.write(text.encode()))
            if isinstance(self._engine, _HnswEngine):
                _faiss().write_index(self._engine.index, str(tmp / "hnsw.faiss"))
                _fsync(tmp / "hnsw.faiss")

    @classmethod
    def load(cls, path: str | Path, backend: str | None = None, **options: Any) -> ItemIndex:
        """Read a folder `save` wrote. `backend` (and options) default to the saved ones; a
        saved HNSW graph is reused when the graph options match, else the index is rebuilt."""
        path = Path(path)
        for name in _FILES:
            if not (path / name).is_file():
                raise DataError(f"{path / name}: missing (an item index folder holds {_FILES})")
        settings = json.loads((path / "index.json").read_text())
        if settings.get("format") != FORMAT:
            raise DataError(
                f"{path / 'index.json'}: format {settings.get('format')!r}, "
                f"this version reads format {FORMAT}"
            )
        ids = json.loads((path / "ids.json").read_text())
        vectors = np.load(path / "vectors.npy", allow_pickle=False)
        if vectors.ndim != 2 or len(vectors) != len(ids) or vectors.shape[1] != settings["dim"]:
            raise DataError(
                f"{path / 'vectors.npy'}: shape {vectors.shape}, expected "
                f"({len(ids)}, {settings['dim']}) from ids.json and index.json"
            )
        if backend is None:
            backend, options = settings["backend"], {**settings["options"], **options}
        graph = path / "hnsw.faiss"
        if backend == "faiss-hnsw" and graph.is_file() and settings["backend"] == backend:
            saved = {**HNSW_DEFAULTS, **settings["options"]}
            wanted = {**HNSW_DEFAULTS, **options}
            if all(saved[o] == wanted[o] for o in ("M", "efConstruction")):
                return cls._with_graph(ids, vectors, _faiss().read_index(str(graph)), options)
        return cls.from_vectors(ids, vectors, backend, **options)

    @classmethod
    def _with_graph(cls, ids, vectors, graph, options) -> ItemIndex:
        if graph.metric_type != _faiss().METRIC_INNER_PRODUCT:
            raise DataError(f"hnsw.faiss: metric {graph.metric_type}, expected inner product")
        if graph.ntotal != len(ids) or graph.d != vectors.shape[1]:
            raise DataError(
                f"hnsw.faiss holds {graph.ntotal} vectors of size {graph.d}, "
                f"expected {len(ids)} of size {vectors.shape[1]}"
            )
        index = cls(int(vectors.shape[1]), "faiss-hnsw", **options)
        ids = _checked_ids(ids)
        index._engine.adopt(graph)  # node i of the saved graph is row i of vectors.npy
        index._append(ids, index._checked(vectors, "item vectors", len(ids)), to_engine=False)
        return index

    # -- checks ------------------------------------------------------------------------------
    def _checked(self, array: Any, what: str, rows: int | None) -> np.ndarray:
        array = np.asarray(array)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise InvalidVectors(f"{what} must be [n, {self.dim}], got shape {array.shape}")
        if rows is not None and len(array) != rows:
            raise InvalidVectors(f"{what}: {len(array)} rows for {rows} ids")
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise InvalidVectors(f"{what} must be real numbers, got dtype {array.dtype}")
        array = np.ascontiguousarray(array, dtype=np.float32)
        bad = ~np.isfinite(array).all(axis=1)
        if bad.any():
            raise InvalidVectors(f"{what}: rows {np.flatnonzero(bad)[:5].tolist()} are not finite")
        return array


def _checked_ids(ids: Sequence[str]) -> list[str]:
    ids = list(ids)
    wrong = [i for i in ids if not isinstance(i, str)]
    if wrong:
        raise InvalidVectors(f"item ids must be strings, got {wrong[:5]!r}")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        twice = [i for i in ids if i in seen or seen.add(i)]
        raise InvalidVectors(f"item ids repeat within one call: {twice[:5]!r}")
    return ids


def _per_query(values, batch: int, what: str) -> list:
    if values is None:
        return [None] * batch
    values = list(values)
    if len(values) != batch:
        raise InvalidVectors(f"{what}: {len(values)} entries for {batch} queries")
    return values


def _write(path: Path, fill) -> None:
    with open(path, "wb") as handle:
        fill(handle)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
