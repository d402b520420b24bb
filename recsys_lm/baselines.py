"""Reference models scored with the same split, candidates and metrics as the language model.

A baseline is built from the datamodule (`BASELINES[name](datamodule)`) and is then a
`Scorer`: given a batch of users and the histories they may be judged on, it returns a score
for every item, [B, n_items]. `evaluate_scores` reads those scores for both tasks (whole
rows for ranking, the candidate's column for click rows), so every baseline is evaluated
exactly like the language model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from recsys_lm.data.examples import ClickSet, RankingSet
from recsys_lm.errors import ConfigError
from recsys_lm.metrics import build_metrics

EVAL_BATCH = 256


class Scorer(Protocol):
    def __call__(self, users: Sequence[int], histories: Sequence[list[int]]) -> torch.Tensor:
        """Scores [len(users), n_items]; higher ranks first."""


def popularity_scores(item_counts: np.ndarray) -> torch.Tensor:
    """Training-set interaction counts; ties broken by item index so rankings are stable."""
    counts = torch.as_tensor(item_counts, dtype=torch.float64)
    return counts - torch.arange(len(counts), dtype=torch.float64) / (10 * len(counts))


class ItemScores:
    """The same per-item score vector for every user (popularity)."""

    def __init__(self, item_scores: torch.Tensor) -> None:
        self.item_scores = item_scores.float()

    def __call__(self, users: Sequence[int], histories: Sequence[list[int]]) -> torch.Tensor:
        return self.item_scores.expand(len(users), -1)


class ItemKNN:
    """Item-based k-nearest neighbours (Sarwar et al., 2001; Deshpande & Karypis, 2004).

    Cosine similarity between the items' columns of the binary training user-item matrix;
    each item keeps only its `k_neighbors` most similar items. A user's score for a candidate
    is the sum of the similarities of the user's history items to it. Ties (chiefly items
    similar to nothing in the history) are broken by popularity, far below any similarity.
    The similarity matrix is built in blocks of items from sparse matrices and kept sparse
    (n_items x k_neighbors entries), so large catalogues fit as well.
    """

    def __init__(
        self,
        train: Sequence[list[int]],
        num_items: int,
        k_neighbors: int = 50,
        block_entries: int = 2**24,
    ) -> None:
        if k_neighbors < 1:
            raise ConfigError("item_knn.k_neighbors", k_neighbors, "a positive integer")
        self.num_items = num_items
        pairs = sorted({(u, i) for u, seq in enumerate(train) for i in seq})
        index = torch.tensor(pairs, dtype=torch.long).T.reshape(2, -1)
        values = torch.ones(index.shape[1], dtype=torch.float64)
        users = len(train)
        x = torch.sparse_coo_tensor(
            index, values, (users, num_items), check_invariants=True
        ).coalesce()  # [U, I]
        xt = torch.sparse_coo_tensor(
            index.flip(0), values, (num_items, users), check_invariants=True
        ).coalesce()
        counts = torch.zeros(num_items, dtype=torch.float64).index_add_(0, index[1], values)
        norms = counts.sqrt().clamp_min(1.0)
        keep = min(k_neighbors, max(num_items - 1, 1))
        rows, cols, sims = [], [], []
        block = max(1, block_entries // max(num_items, 1))
        for start in range(0, num_items, block):
            items = torch.arange(start, min(start + block, num_items))
            with warnings.catch_warnings():  # torch notes that sparse @ sparse is in beta
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
                co = torch.sparse.mm(xt.index_select(0, items), x).to_dense()  # co-counts [b, I]
            cosine = co / norms[items, None] / norms[None, :]
            cosine[torch.arange(len(items)), items] = 0.0  # an item is not its own neighbour
            top, where = cosine.topk(keep, dim=1)
            positive = top > 0
            rows.append(items[:, None].expand_as(where)[positive])
            cols.append(where[positive])
            sims.append(top[positive])
        # Stored transposed ([candidate, history item]) so scoring is one sparse @ dense.
        self.similarity_t = torch.sparse_coo_tensor(
            torch.stack([torch.cat(cols), torch.cat(rows)]),
            torch.cat(sims),
            (num_items, num_items),
            check_invariants=True,
        ).coalesce()
        tie_break = popularity_scores(counts.numpy())
        self.tie_break = 1e-6 * (tie_break - tie_break.min()) / (np.ptp(tie_break.numpy()) + 1)

    def __call__(self, users: Sequence[int], histories: Sequence[list[int]]) -> torch.Tensor:
        seen = torch.zeros((self.num_items, len(histories)), dtype=torch.float64)
        for column, history in enumerate(histories):
            seen[history, column] = 1.0
        scores = torch.sparse.mm(self.similarity_t, seen).T  # [B, I]
        return (scores + self.tie_break).float()


def evaluate_scores(datamodule, stage: str, scorer: Scorer | torch.Tensor) -> dict[str, float]:
    """Metrics of `stage` for a scorer (or a fixed per-item score vector)."""
    if isinstance(scorer, torch.Tensor):
        scorer = ItemScores(scorer)
    dataset = datamodule.datasets[stage]
    metrics = build_metrics(datamodule.task, datamodule.k)
    for start in range(0, len(dataset), EVAL_BATCH):
        rows = [dataset[i] for i in range(start, min(start + EVAL_BATCH, len(dataset)))]
        users = [row[0] for row in rows]
        histories = [row[1] for row in rows]
        scores = scorer(users, histories)
        if isinstance(dataset, ClickSet):  # (user, history, candidate, label)
            candidates = torch.tensor([row[2] for row in rows])
            picked = scores[torch.arange(len(rows)), candidates]
            metrics.update(picked, torch.tensor([row[3] for row in rows], dtype=torch.float32))
        else:
            assert isinstance(dataset, RankingSet)
            relevant, exclude = dataset.masks(rows)
            metrics.update(scores, relevant, exclude)
    return metrics.compute()


BASELINES: dict[str, Callable[..., Scorer]] = {
    "popularity": lambda dm: ItemScores(popularity_scores(dm.item_counts)),
    "item_knn": lambda dm: ItemKNN(dm.split.train, dm.num_items),
}


def run_baselines(datamodule, names: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    out = {}
    for name in names:
        if name not in BASELINES:
            raise ConfigError("baselines", name, f"names among {list(BASELINES)}")
        scorer = BASELINES[name](datamodule)
        out[name] = {stage: evaluate_scores(datamodule, stage, scorer) for stage in ("val", "test")}
    return out
