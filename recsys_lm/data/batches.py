"""Batch dataclasses: what each head receives. Lightning moves dataclass fields to the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PairBatch:
    """Cross-encoder input: history text and candidate text in one sequence (click head)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    token_type_ids: torch.Tensor  # [B, L]; 0 for the history segment, 1 for the candidate
    labels: torch.Tensor  # [B] float, 1 = clicked
    user_index: torch.Tensor  # [B]
    item_index: torch.Tensor  # [B]


@dataclass
class TwoTowerBatch:
    """User-history texts and their next items' texts, encoded separately (retrieval training)."""

    user_ids: torch.Tensor  # [B, Lu]
    user_mask: torch.Tensor
    item_ids: torch.Tensor  # [B, Li]
    item_mask: torch.Tensor
    item_index: torch.Tensor  # [B]: to mask in-batch duplicates and apply logQ correction


@dataclass
class RankingBatch:
    """Users to rank items for (retrieval evaluation): the whole catalogue in full ranking,
    held-out items plus sampled negatives in sampled mode (everything else is excluded)."""

    user_ids: torch.Tensor  # [B, Lu]
    user_mask: torch.Tensor
    relevant: torch.Tensor  # [B, n_items] bool: the held-out items
    exclude: torch.Tensor  # [B, n_items] bool: never ranked (history; non-candidates)
    user_index: torch.Tensor  # [B]


@dataclass
class ItemBatch:
    """Catalogue items to embed once per evaluation."""

    item_ids: torch.Tensor
    item_mask: torch.Tensor
    item_index: torch.Tensor


def pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence in the batch (dynamic padding)."""
    width = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask
