"""The served model: a trained (exported) model with its catalogue, answering in item ids.

`ServedModel` wraps a `RecsysLM` in any flavour (eager, merged, int8, ONNX...) and speaks the
source's item ids, not model indices. It keeps the catalogue's token ids, so the two-tower head
reads histories as text, and, for heads that rank by vectors (`Head.ranks_by_vectors`), a
table of item vectors searched through an `ItemIndex`. Items added after training join from
their text alone (the head's item side embeds them); removed items leave the index but stay
readable in histories. `Pipeline` retrieves with one model and re-ranks with another.

Every call takes a batch of users, so the service can micro-batch concurrent requests. Calls
are serialised by a lock: a model (and its index) is not safe to mutate while it is read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from recsys_lm.data.datasets.examples import ItemSet, pair_batch
from recsys_lm.data.prepared import PreparedData
from recsys_lm.data.text import PromptText, TokenCache, render
from recsys_lm.errors import UnknownItem
from recsys_lm.models.heads.base import PAIRS_PER_PASS, Catalogue, PairHead
from recsys_lm.models.module import RecsysLM
from recsys_lm.serving.index import ItemIndex

ITEM_BATCH = 256  # items per backbone pass when embedding the catalogue


@dataclass
class Ranked:
    """One user's answer: item ids best first, their scores, and per-stage seconds."""

    items: list[str]
    scores: list[float]
    stages: dict[str, float] = field(default_factory=dict)


@dataclass
class ServingData:
    """What inference needs from the run's data settings (the export's serving.json)."""

    max_item_tokens: int
    max_history_tokens: int
    max_sequence_length: int
    history_separator: str = " ; "
    prompt: dict[str, str] = field(default_factory=dict)
    item_template: str = "{title}"
    history_template: str = "{title}"
    k: int = 10


def catalogue_frame(data: PreparedData) -> pd.DataFrame:
    """The catalogue as served: model index, the source's item id (as text) and both
    rendered texts (what the model reads for an item, and for it inside a history)."""
    items = data.data.items.reset_index(drop=True)
    settings = data.settings
    return pd.DataFrame(
        {
            "index": np.arange(len(items), dtype=np.int64),
            "item_id": [str(i) for i in data.item_ids],
            "item_text": render(items, settings.item_template, "data.item_template"),
            "history_text": render(items, settings.history_template, "data.history_template"),
        }
    )


def user_histories(data: PreparedData) -> dict[str, list[str]]:
    """Every user's interactions the run's data holds (train, val, test), oldest first: the
    service's initial user state."""
    ids = [str(i) for i in data.item_ids]
    return {str(u): [ids[i] for i in data.history(n)] for n, u in enumerate(data.user_ids)}


def serving_data(data: PreparedData) -> ServingData:
    settings = data.settings
    return ServingData(
        max_item_tokens=settings.max_item_tokens,
        max_history_tokens=settings.max_history_tokens,
        max_sequence_length=settings.max_sequence_length,
        prompt=dict(vars(settings.prompt)),
        item_template=settings.item_template,
        history_template=settings.history_template,
        k=settings.k,
    )


class ServedModel:
    """A model and its catalogue behind item ids (see the module docstring)."""

    @classmethod
    def from_prepared(cls, module: RecsysLM, data: PreparedData, **kwargs) -> ServedModel:
        """Serve a model beside its prepared data (a run loaded in-process)."""
        kwargs.setdefault("version", "run")
        return cls(
            module, catalogue_frame(data), serving_data(data), users=user_histories(data), **kwargs
        )

    def __init__(
        self,
        module: RecsysLM,
        catalogue: pd.DataFrame,
        settings: ServingData,
        version: str,
        flavour: str = "eager",
        users: dict[str, list[str]] | None = None,
        vectors: np.ndarray | None = None,
        index_backend: str = "exact",
        index_options: dict[str, Any] | None = None,
    ) -> None:
        self.module = module.eval()
        self.head = module.head
        self.backbone = module.backbone
        self.task = module.task.name
        self.version, self.flavour = version, flavour
        self.settings = settings
        self.users = dict(users or {})
        self.lock = threading.RLock()
        self.item_ids: list[str] = [str(i) for i in catalogue["item_id"]]
        self.index_of = {item: i for i, item in enumerate(self.item_ids)}
        if len(self.index_of) != len(self.item_ids):
            raise ValueError("catalogue: item ids are not unique")
        self.removed: set[str] = set()
        self.tokens = TokenCache(
            self.backbone.tokenizer,
            list(catalogue["item_text"]),
            list(catalogue["history_text"]),
            settings.max_item_tokens,
            settings.history_separator,
            prompt=_prompt(settings.prompt),
        )
        self.head.catalogue = Catalogue(
            self.tokens,
            len(self.item_ids),
            settings.max_history_tokens,
            settings.max_sequence_length,
        )
        self.can_recommend = bool(self.head.ranks_by_vectors)
        self.table: torch.Tensor | None = None
        self.index: ItemIndex | None = None
        if self.can_recommend:
            table = vectors if vectors is not None else self.embed(range(len(self.item_ids)))
            self.table = torch.as_tensor(np.asarray(table, dtype=np.float32))
            self.index = ItemIndex.from_vectors(
                self.item_ids, self.table.numpy(), index_backend, **(index_options or {})
            )

    # -- catalogue ------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return len(self.item_ids) - len(self.removed)

    def has_item(self, item_id: str) -> bool:
        return item_id in self.index_of and item_id not in self.removed

    def indices(self, ids: Iterable[str], readable: bool = True) -> list[int]:
        """Model indices of item ids. `readable`: removed items still count (a history may
        hold them); otherwise only servable items do. Raises UnknownItem naming the rest."""
        ids = [str(i) for i in ids]
        missing = [i for i in ids if i not in self.index_of or (not readable and i in self.removed)]
        if missing:
            raise UnknownItem(missing)
        return [self.index_of[i] for i in ids]

    @torch.no_grad()
    def embed(self, indices: Iterable[int]) -> np.ndarray:
        """Item vectors [n, d] of these indices through the head's item side."""
        items = ItemSet(len(self.tokens.item_ids), self.tokens)
        indices = list(indices)
        parts = []
        for start in range(0, len(indices), ITEM_BATCH):
            batch = items.collate(indices[start : start + ITEM_BATCH])
            batch = move_data_to_device(batch, self._device)
            parts.append(self.head.item_vectors(self.module.item_backbone, batch).float().cpu())
        dim = parts[0].shape[1] if parts else 0
        return torch.cat(parts).numpy() if parts else np.zeros((0, dim), np.float32)

    def add_items(self, items: dict[str, str | dict]) -> list[str]:
        """Add items by text (a string, used for both templates) or by fields (rendered with
        the run's item and history templates). An id already served is refused; a removed
        one comes back with its new text."""
        with self.lock:
            clash = [i for i in items if self.has_item(str(i))]
            if clash:
                raise ValueError(f"items already in the catalogue: {clash[:5]}")
            ids = [str(i) for i in items]
            item_texts, history_texts = self._texts(list(items.values()))
            new = self.tokens.append(
                self.backbone.tokenizer, item_texts, history_texts, self.settings.max_item_tokens
            )
            for item, index in zip(ids, new, strict=True):
                self.index_of[item] = index  # a re-added item gets a fresh row
                self.removed.discard(item)
            self.item_ids.extend(ids)
            self.head.catalogue.num_items = len(self.tokens.item_ids)
            if self.can_recommend:
                vectors = self.embed(new)
                self.table = torch.cat([self.table, torch.as_tensor(vectors)])
                self.index.add(ids, vectors)
            return ids

    def remove_items(self, ids: Sequence[str]) -> None:
        with self.lock:
            ids = [str(i) for i in ids]
            self.indices(ids, readable=False)  # unknown or already removed: UnknownItem
            if self.can_recommend:
                self.index.remove(ids)
            self.removed.update(ids)

    def _texts(self, values: list[str | dict]) -> tuple[list[str], list[str]]:
        item_texts, history_texts = [], []
        for value in values:
            if isinstance(value, str):
                text = " ".join(value.split())
                item_texts.append(text)
                history_texts.append(text)
                continue
            row = pd.DataFrame([value])
            item_texts.append(render(row, self.settings.item_template, "item fields")[0])
            history_texts.append(render(row, self.settings.history_template, "item fields")[0])
        return item_texts, history_texts

    # -- inference ------------------------------------------------------------------------
    @property
    def _device(self) -> torch.device:
        try:
            return next(self.module.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    @torch.no_grad()
    def recommend_batch(
        self,
        histories: Sequence[Sequence[str]],
        k: int = 10,
        exclude: Sequence[set[str]] | None = None,
        allow: Sequence[set[str] | None] | None = None,
        exclude_seen: bool = True,
    ) -> list[Ranked]:
        """Top-k servable items per user from the whole catalogue (never an `exclude` item,
        nor a history item with `exclude_seen`; only `allow` items where given)."""
        if not self.can_recommend:
            raise TypeError(f"a {self.task} model scores candidates; it does not recommend")
        with self.lock:
            started = time.perf_counter()
            index_histories = [self.indices(h) for h in histories]
            queries = self.head.query_vectors(self.backbone, index_histories, self.table)
            queries = queries.float().cpu().numpy()
            banned = [set(e or ()) for e in (exclude or [None] * len(histories))]
            if exclude_seen:
                banned = [b | {str(i) for i in h} for b, h in zip(banned, histories, strict=True)]
            found = self.index.search(queries, k, banned, allow)
            seconds = time.perf_counter() - started
        return [
            Ranked(list(ids), [float(s) for s in scores], {"retrieve": seconds})
            for ids, scores in found
        ]

    @torch.no_grad()
    def score_batch(
        self, histories: Sequence[Sequence[str]], candidates: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """Each user's score of each of their candidates (servable items only)."""
        with self.lock:
            index_histories = [self.indices(h) for h in histories]
            index_candidates = [self.indices(c, readable=False) for c in candidates]
            if self.can_recommend:
                queries = self.head.query_vectors(self.backbone, index_histories, self.table)
                return [
                    (self.table[c].to(q.device) @ q).float().tolist()
                    for q, c in zip(queries, index_candidates, strict=True)
                ]
            if isinstance(self.head, PairHead):
                return self._pair_scores(index_histories, index_candidates)
            return [
                self.head.score(self.backbone, h, c).float().tolist()
                for h, c in zip(index_histories, index_candidates, strict=True)
            ]

    def _pair_scores(self, histories: list[list[int]], candidates: list[list[int]]):
        """A cross-encoder scores (history, candidate) pairs: every user's pairs go through the
        backbone together, PAIRS_PER_PASS at a time (one user's 100 candidates: one pass)."""
        rows = [(0, h, c, 0.0) for h, cs in zip(histories, candidates, strict=True) for c in cs]
        catalogue = self.head.require_catalogue()
        out = []
        for start in range(0, len(rows), PAIRS_PER_PASS):
            batch = pair_batch(
                rows[start : start + PAIRS_PER_PASS],
                catalogue.tokens,
                catalogue.history_budget,
                torch.float32,
            )
            out.append(self.head(self.backbone, move_data_to_device(batch, self._device)))
        flat = torch.cat(out).float().tolist() if out else []
        answer, at = [], 0
        for cs in candidates:
            answer.append(flat[at : at + len(cs)])
            at += len(cs)
        return answer


class Pipeline:
    """Two stages: `retriever` recommends `n` items, `ranker` (a cross-encoder) re-scores them
    and the best `k` are returned; each answer's `stages` holds both stages' seconds."""

    def __init__(self, retriever: ServedModel, ranker: ServedModel, n: int = 100) -> None:
        if not retriever.can_recommend:
            raise TypeError(f"pipeline: the retriever ({retriever.task}) must rank by vectors")
        if retriever.item_ids[: len(ranker.item_ids)] != ranker.item_ids[: len(retriever.item_ids)]:
            raise ValueError("pipeline: the two exports have different catalogues")
        self.retriever, self.ranker, self.n = retriever, ranker, int(n)
        self.task = f"{retriever.task}+{ranker.task}"
        self.version = f"{retriever.version}+{ranker.version}"
        self.flavour = f"{retriever.flavour}+{ranker.flavour}"
        self.can_recommend = True
        self.users = retriever.users
        self.settings = retriever.settings

    @property
    def index(self) -> ItemIndex:
        return self.retriever.index

    @property
    def num_items(self) -> int:
        return self.retriever.num_items

    def has_item(self, item_id: str) -> bool:
        return self.retriever.has_item(item_id) and self.ranker.has_item(item_id)

    def recommend_batch(self, histories, k=10, exclude=None, allow=None, exclude_seen=True):
        first = self.retriever.recommend_batch(
            histories, max(k, self.n), exclude, allow, exclude_seen
        )
        started = time.perf_counter()
        scores = self.ranker.score_batch(histories, [r.items for r in first])
        seconds = time.perf_counter() - started
        out = []
        for ranked, rescored in zip(first, scores, strict=True):
            order = sorted(range(len(rescored)), key=lambda i: -rescored[i])[:k]
            stages = {"retrieve": ranked.stages["retrieve"], "rerank": seconds}
            out.append(
                Ranked([ranked.items[i] for i in order], [rescored[i] for i in order], stages)
            )
        return out

    def score_batch(self, histories, candidates):
        return self.ranker.score_batch(histories, candidates)

    def add_items(self, items):
        added = self.retriever.add_items(items)
        self.ranker.add_items(items)
        return added

    def remove_items(self, ids):
        self.retriever.remove_items(ids)
        self.ranker.remove_items(ids)


def _prompt(words: dict[str, str]) -> PromptText | None:
    return PromptText(**words) if words else None
