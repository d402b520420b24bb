"""Item-text pre-adaptation: a short contrastive fine-tune of the text encoder on items that
co-occur in users' training sequences, before the recommendation model trains (the idea of
UniSRec, Hou et al. KDD 2022, and RecFormer, Li et al. KDD 2023).

A pretrained sentence encoder places items by what their texts say; co-occurrence places them
by who takes them together. Pulling co-occurring items' text vectors together (in-batch
InfoNCE) moves the frozen item table the sequential head reads towards the second geometry
while keeping the text path, so items never seen in training are placed by the same encoder.

`conf/preadapt/cooccur.yaml` holds the settings (`Preadapt`); the composition root
(build.py, `preadapted_config`) runs the stage and points the run's backbone at its output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from peft import PeftConfig
from torch.nn import functional as F
from transformers import get_scheduler

from recsys_lm.data.cooccurrence import CooccurrenceBatch
from recsys_lm.errors import ConfigError
from recsys_lm.models.adapters import apply_peft, is_peft
from recsys_lm.models.backbone import Backbone
from recsys_lm.models.freezing import BottomK, layer_stack


@dataclass
class Preadapt:
    """conf/preadapt/cooccur.yaml: every key is documented there."""

    window: int = 1
    top_layers: int | None = 2
    cache_max_mb: float | None = 1024
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    temperature: float = 0.05
    peft: PeftConfig | None = None

    def __post_init__(self) -> None:
        if self.top_layers is not None and self.top_layers < 1:
            raise ConfigError(
                "preadapt.top_layers", self.top_layers, "an integer >= 1, or null for every layer"
            )
        if self.steps < 1:
            raise ConfigError("preadapt.steps", self.steps, "an integer >= 1")
        if self.batch_size < 2:
            raise ConfigError("preadapt.batch_size", self.batch_size, "an integer >= 2")
        if not self.temperature > 0:
            raise ConfigError("preadapt.temperature", self.temperature, "a positive number")


def contrastive_loss(
    first: torch.Tensor,
    second: torch.Tensor,
    first_items: torch.Tensor,
    second_items: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Symmetric in-batch InfoNCE over L2-normalised vectors: row i's positive is column i.
    A column showing the same item as the row's positive or its anchor is no negative (a
    popular item recurs within a batch), so it is left out of the softmax."""
    first, second = F.normalize(first, dim=-1), F.normalize(second, dim=-1)
    logits = first @ second.T / temperature
    forward = logits.masked_fill(_no_negative(second_items, first_items), float("-inf"))
    backward = logits.T.masked_fill(_no_negative(first_items, second_items), float("-inf"))
    target = torch.arange(len(first), device=first.device)
    return (F.cross_entropy(forward, target) + F.cross_entropy(backward, target)) / 2


def _no_negative(candidates: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """[row, column] True where column's candidate item is row's own positive or its anchor,
    off the diagonal (the diagonal is the positive itself)."""
    repeats = (candidates[None, :] == candidates[:, None]) | (
        candidates[None, :] == anchors[:, None]
    )
    return repeats & ~torch.eye(len(candidates), dtype=torch.bool, device=candidates.device)


class ItemContrastive(L.LightningModule):
    """The backbone alone, trained on (item, co-occurring item) text pairs; `PeftConfig`
    adapters (merged into the weights by `adapted`) or, with `peft=None`, every weight."""

    def __init__(self, backbone: Backbone, settings: Preadapt) -> None:
        super().__init__()
        if is_peft(backbone):
            raise ConfigError(
                "preadapt", "cooccur", "a plain backbone: it is pre-adapted before PEFT wraps it"
            )
        self.backbone = backbone
        self.settings = settings
        apply_peft(backbone, "preadapt.peft", settings.peft)
        top = settings.top_layers
        if top is not None and top < len(layer_stack(backbone.model)):
            # Only the top layers adapt; the states below them are computed once per item
            # text and cached, so a step costs the top layers alone (models/frozen_cache.py).
            BottomK(k=-top, cache_frozen=True, cache_max_mb=settings.cache_max_mb).apply(backbone)
        self.train()  # from_pretrained returns eval mode: dropout would stay off

    def training_step(self, batch: CooccurrenceBatch, batch_idx: int) -> torch.Tensor:
        vectors = self.backbone(batch.items.item_ids, batch.items.item_mask).float()
        index = batch.items.item_index
        loss = contrastive_loss(
            vectors[batch.first],
            vectors[batch.second],
            index[batch.first],
            index[batch.second],
            self.settings.temperature,
        )
        self.log("preadapt/loss", loss, prog_bar=True, batch_size=len(batch.first))
        return loss

    def configure_optimizers(self):
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=self.settings.lr, weight_decay=self.settings.weight_decay
        )
        steps = self.settings.steps
        scheduler = get_scheduler(
            "linear", optimizer, int(self.settings.warmup_ratio * steps), steps
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def adapted(self) -> Backbone:
        """The backbone with any adapter merged into its weights (a plain model again)."""
        self.backbone.frozen_cache = None
        if is_peft(self.backbone):
            self.backbone.model = self.backbone.model.merge_and_unload()
        return self.backbone.eval()


def save_backbone(backbone: Backbone, folder: Path) -> None:
    """A Hugging Face model folder (`load_pretrained` reads it): weights and tokenizer."""
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
