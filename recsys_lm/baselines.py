"""Reference models scored with the same split, candidates and metrics as the language model.

A baseline is built from the datamodule (`BASELINES[name](datamodule)`) and is then a
`Scorer`: given a batch of users and the histories they may be judged on, it returns a score
for every item, [B, n_items]. `evaluate_scores` reads those scores for both tasks (whole
rows for ranking, the candidate's column for click rows), so every baseline is evaluated
exactly like the language model.

The pointwise tasks (rating, behaviour) have no items to rank: their baselines are
`PointPredictor`s, predicting each held-out interaction's rating [B] or class scores
[B, n_classes] from (user, item), fed to the same metrics as the head. `APPLIES_TO` says which
baseline suits which task; one that does not is skipped with the reason in the output.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from recsys_lm.data.examples import ClickSet, RankingSet
from recsys_lm.data.points import BehaviourTargets, PointSet, RatingTargets
from recsys_lm.errors import ConfigError
from recsys_lm.metrics import build_metrics
from recsys_lm.models.id_sasrec import IDSASRec

EVAL_BATCH = 256
log = logging.getLogger(__name__)


class Scorer(Protocol):
    def __call__(self, users: Sequence[int], histories: Sequence[list[int]]) -> torch.Tensor:
        """Scores [len(users), n_items]; higher ranks first."""


def popularity_scores(item_counts: np.ndarray, seed: int = 0) -> torch.Tensor:
    """Training-set interaction counts; ties broken in a fixed random order (seeded), not by
    item index: catalogues often number items by release or popularity, and an index order
    would leak that to items never seen in training (a cold-start split)."""
    counts = torch.as_tensor(item_counts, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    return counts + 0.5 * torch.rand(len(counts), generator=generator, dtype=torch.float64)


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
        # Popularity rank scaled into [0, 1e-4): far below any similarity sum, yet distinct
        # in float32 for items similar to nothing in the history (all cold items).
        rank = popularity_scores(counts.numpy()).argsort().argsort().double()
        self.tie_break = 1e-4 * rank / num_items

    def __call__(self, users: Sequence[int], histories: Sequence[list[int]]) -> torch.Tensor:
        seen = torch.zeros((self.num_items, len(histories)), dtype=torch.float64)
        for column, history in enumerate(histories):
            seen[history, column] = 1.0
        scores = torch.sparse.mm(self.similarity_t, seen).T  # [B, I]
        return (scores + self.tie_break).float()


class PointPredictor(Protocol):
    def __call__(self, users: Sequence[int], items: Sequence[int]) -> torch.Tensor:
        """Ratings [B] (rating) or class scores [B, n_classes] (behaviour)."""


class BiasBaseline:
    """Baseline predictor of Koren (2008), "Factorization meets the neighborhood", sec. 2.1:
    r_ui = mu + b_u + b_i, with regularised biases estimated in one pass:
        b_i = sum_{u in R(i)} (r_ui - mu) / (reg_item + |R(i)|)
        b_u = sum_{i in R(u)} (r_ui - mu - b_i) / (reg_user + |R(u)|)
    (his lambda_2 = 25, lambda_3 = 10). Users and items without training ratings get bias 0.
    Predictions are clamped to the rating range, as the head's are.
    """

    def __init__(
        self,
        users: np.ndarray,
        items: np.ndarray,
        ratings: np.ndarray,
        num_users: int,
        num_items: int,
        targets: RatingTargets,
        reg_item: float = 25.0,
        reg_user: float = 10.0,
    ) -> None:
        ratings = ratings.astype(np.float64)
        self.mu = float(ratings.mean())
        residual = ratings - self.mu
        self.item_bias = _shrunk_mean(items, residual, num_items, reg_item)
        residual = residual - self.item_bias[items]
        self.user_bias = _shrunk_mean(users, residual, num_users, reg_user)
        self.low, self.high = targets.low, targets.high

    @classmethod
    def from_datamodule(cls, dm, **options) -> BiasBaseline:
        users, items, ratings = dm.datasets["train"].arrays()  # the head's training rows
        return cls(users, items, ratings, len(dm.split.train), dm.num_items, dm.targets, **options)

    def __call__(self, users: Sequence[int], items: Sequence[int]) -> torch.Tensor:
        predicted = self.mu + self.user_bias[list(users)] + self.item_bias[list(items)]
        return torch.as_tensor(predicted, dtype=torch.float32).clamp(self.low, self.high)


class ItemMajority:
    """Each item's most frequent training class; items never seen in training (and ties) fall
    back to the global class frequencies."""

    def __init__(self, items: np.ndarray, labels: np.ndarray, num_items: int, classes: int):
        counts = np.zeros((num_items, classes))
        np.add.at(counts, (items, labels), 1.0)
        overall = counts.sum(axis=0) / max(counts.sum(), 1.0)
        # The global frequencies (< 1) decide only where the item's own counts tie.
        self.choice = torch.as_tensor((counts + overall).argmax(axis=1))
        self.classes = classes

    @classmethod
    def from_datamodule(cls, dm) -> ItemMajority:
        _, items, labels = dm.datasets["train"].arrays()  # the head's training rows
        targets: BehaviourTargets = dm.targets
        return cls(items, labels, dm.num_items, len(targets.classes))

    def __call__(self, users: Sequence[int], items: Sequence[int]) -> torch.Tensor:
        votes = self.choice[torch.as_tensor(list(items), dtype=torch.long)]
        return torch.nn.functional.one_hot(votes, self.classes).float()


def _shrunk_mean(index: np.ndarray, values: np.ndarray, size: int, reg: float) -> np.ndarray:
    """Per-index sum of values / (reg + count): a mean shrunk towards 0 for rare indices (and
    0 for indices without values)."""
    sums = np.bincount(index, weights=values, minlength=size)
    counts = np.bincount(index, minlength=size)
    return np.divide(sums, reg + counts, out=np.zeros(size), where=counts > 0)


def evaluate_points(datamodule, stage: str, predictor: PointPredictor) -> dict[str, float]:
    """Metrics of `stage` for a pointwise predictor, over the head's own evaluation rows."""
    dataset: PointSet = datamodule.datasets[stage]
    metrics = build_metrics(datamodule.task, datamodule.k)
    for start in range(0, len(dataset), EVAL_BATCH):
        rows = [dataset[i] for i in range(start, min(start + EVAL_BATCH, len(dataset)))]
        users, items = [row[0] for row in rows], [row[2] for row in rows]
        targets = torch.tensor([row[3] for row in rows], dtype=dataset.targets.dtype)
        metrics.update(predictor(users, items), targets)
    return metrics.compute()


def evaluate_scores(datamodule, stage: str, scorer: Scorer | torch.Tensor) -> dict[str, float]:
    """Metrics of `stage` for a scorer (or a fixed per-item score vector)."""
    if isinstance(datamodule.datasets[stage], PointSet):
        return evaluate_points(datamodule, stage, scorer)
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


BASELINES: dict[str, Callable[..., Scorer | PointPredictor]] = {
    "popularity": lambda dm: ItemScores(popularity_scores(dm.item_counts)),
    "item_knn": lambda dm, **options: ItemKNN(dm.split.train, dm.num_items, **options),
    "sasrec": lambda dm, **options: IDSASRec(dm, **{"seed": dm.seed, **options}),
    "bias": BiasBaseline.from_datamodule,
    "item_majority": ItemMajority.from_datamodule,
}
RANKING_TASKS = (
    "click",
    "retrieval",
    "sequential",
    "generative_ranking",
)  # per-item scores rank these
# Which tasks each baseline can be evaluated on.
APPLIES_TO: dict[str, tuple[str, ...]] = {
    "popularity": RANKING_TASKS,
    "item_knn": RANKING_TASKS,
    "sasrec": RANKING_TASKS,
    "bias": ("rating",),
    "item_majority": ("behaviour",),
}


def run_baselines(
    datamodule, names: list[str], options: dict[str, dict] | None = None
) -> dict[str, dict]:
    """{name: {"val": metrics, "test": metrics}}, or {name: {"skipped": why}} for a baseline
    that does not apply to the task. `options[name]` are the baseline's keyword arguments
    (conf/train.yaml `baseline_options`)."""
    options = options or {}
    out: dict[str, dict] = {}
    for name in names:
        if name not in BASELINES:
            raise ConfigError("baselines", name, f"names among {list(BASELINES)}")
        task = datamodule.task
        if task not in APPLIES_TO[name]:
            suited = [n for n, tasks in APPLIES_TO.items() if task in tasks]
            why = f"`{name}` does not apply to task `{task}` (it serves {list(APPLIES_TO[name])})"
            out[name] = {"skipped": f"{why}; for `{task}` use baselines={suited}"}
            log.warning("baseline %s", out[name]["skipped"])
            continue
        scorer = BASELINES[name](datamodule, **options.get(name, {}))
        out[name] = {stage: evaluate_scores(datamodule, stage, scorer) for stage in ("val", "test")}
    return out
