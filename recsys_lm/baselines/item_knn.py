"""Item-based k-nearest neighbours over the binary training user-item matrix."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from recsys_lm.baselines.popularity import popularity_scores
from recsys_lm.data.prepared import PreparedData
from recsys_lm.errors import ConfigError


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


def build(data: PreparedData, **options) -> ItemKNN:
    """`options`: ItemKNN's keyword arguments (baseline_options.item_knn)."""
    return ItemKNN(data.split.train, data.num_items, **options)
