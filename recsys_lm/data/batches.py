"""Batch dataclasses: what each head receives. Lightning moves dataclass fields to the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PairBatch:
    """Cross-encoder input: history text and candidate text in one sequence (click, rating and
    behaviour heads)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    token_type_ids: torch.Tensor  # [B, L]; 0 for the history segment, 1 for the candidate
    labels: torch.Tensor  # [B] click: float, 1 = clicked; rating: float; behaviour: long class
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


@dataclass
class SequenceBatch:
    """Users' item sequences, left-padded so the most recent item is always last (sequential
    head). Training rows carry next-item targets; evaluation rows carry ranking masks."""

    items: torch.Tensor  # [B, T] item indices (0 at padding)
    mask: torch.Tensor  # [B, T] bool, True at real items
    targets: torch.Tensor | None = None  # [B, T] next item at each position, -100 at padding
    # The batch's distinct items (inputs and targets) and their token ids: a trainable
    # backbone embeds only these, and they are the softmax's candidates.
    unique: torch.Tensor | None = None  # [U] item indices
    unique_ids: torch.Tensor | None = None  # [U, L] token ids of their text
    unique_mask: torch.Tensor | None = None  # [U, L]
    relevant: torch.Tensor | None = None  # [B, n_items] bool (evaluation): held-out items
    exclude: torch.Tensor | None = None  # [B, n_items] bool (evaluation): never ranked
    user_index: torch.Tensor | None = None  # [B]


@dataclass
class LMBatch:
    """Prompt (history) + continuation (the next item's text) in one right-padded sequence;
    the continuation's tokens are the language-model targets (generative ranking training)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    target_mask: torch.Tensor  # [B, L] bool: True at the item-text tokens to predict
    item_index: torch.Tensor  # [B]


@dataclass
class CandidateBatch:
    """Users' prompts, each followed by every candidate's text: N = sum of candidates (held-out
    + sampled negatives) sequences for B users (generative ranking evaluation)."""

    input_ids: torch.Tensor  # [N, L]
    attention_mask: torch.Tensor  # [N, L]
    target_mask: torch.Tensor  # [N, L] bool: True at the candidate's text tokens
    query: torch.Tensor  # [N]: which of the B users (row of `relevant`) the sequence is for
    item_index: torch.Tensor  # [N]: the candidate
    relevant: torch.Tensor  # [B, n_items] bool: the held-out items
    exclude: torch.Tensor  # [B, n_items] bool: never ranked (every non-candidate)
    user_index: torch.Tensor  # [B]


def pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence in the batch (dynamic padding)."""
    width = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask
