"""The LightningModule: a pretrained backbone, a swappable head, a PEFT and a freezing strategy."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from peft import PeftConfig
from torch import nn
from transformers import get_scheduler

from recsys_lm.errors import ConfigError
from recsys_lm.metrics import build_metrics
from recsys_lm.models.adapters import adalora_regularisation, adalora_step, apply_peft
from recsys_lm.models.backbone import Backbone
from recsys_lm.models.freezing import NoFreeze

SCHEDULES = ("linear", "cosine", "constant_with_warmup")
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "ln_")


def count_parameters(module: nn.Module) -> dict[str, int]:
    params = list(module.parameters())
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
    }


class RecsysLM(L.LightningModule):
    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        peft_name: str = "none",
        peft_config: PeftConfig | None = None,
        freeze: Any = None,
        lr: float = 2e-4,
        head_lr: float | None = None,
        weight_decay: float = 0.01,
        schedule: str = "linear",
        warmup_ratio: float = 0.1,
        k: int = 10,
    ) -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise ConfigError("optim.schedule", schedule, f"one of {list(SCHEDULES)}")
        self.save_hyperparameters(ignore=["backbone", "head", "peft_config", "freeze"])
        self.backbone = backbone
        if hasattr(head, "bind"):  # a head that needs the backbone's kind or tokenizer checks here
            head.bind(backbone)
        apply_peft(backbone, peft_name, peft_config)
        (freeze or NoFreeze()).apply(backbone)
        self.head = head
        self.task = head.task
        self.val_metrics = build_metrics(self.task, k)
        self.test_metrics = build_metrics(self.task, k)
        # from_pretrained returns modules in eval mode; Lightning keeps each module's mode, so
        # dropout would silently stay off during fine-tuning.
        self.train()
        if count_parameters(self)["trainable"] == 0:
            raise ConfigError(
                "freeze",
                getattr(freeze, "name", freeze),
                "a combination that leaves some parameter trainable",
            )

    # -- data-dependent state -------------------------------------------------------------
    def attach_data(self, datamodule) -> None:
        """Give the head what it needs from the training data (item prior for logQ,
        catalogue size for per-item parameters)."""
        if hasattr(self.head, "set_item_prior"):
            self.head.set_item_prior(torch.as_tensor(datamodule.item_counts))
        # Pointwise heads: rating statistics, behaviour classes (data/points.py).
        if hasattr(self.head, "set_targets") and getattr(datamodule, "targets", None):
            self.head.set_targets(datamodule.targets)
        if hasattr(self.head, "attach"):
            self.head.attach(datamodule.num_items)
        if hasattr(self.head, "check_backbone"):
            self.head.check_backbone(self.backbone)

    def on_fit_start(self) -> None:
        if hasattr(self.head, "on_fit_start"):  # e.g. item embeddings cached before training
            self.head.on_fit_start(self.backbone, self._item_batches())

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.head.loss(self.backbone, batch)
        loss = loss + adalora_regularisation(self.backbone)
        self.log("train/loss", loss, prog_bar=True, batch_size=_batch_size(batch))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Lightning zeroes gradients at the start of the next step, so they are still here.
        adalora_step(self.backbone, self.global_step)

    def configure_optimizers(self):
        hp = self.hparams
        backbone = [(n, p) for n, p in self.backbone.named_parameters() if p.requires_grad]
        head = [p for p in self.head.parameters() if p.requires_grad]
        groups = [
            {
                "params": [p for n, p in backbone if not n.endswith(NO_DECAY)],
                "weight_decay": hp.weight_decay,
            },
            {"params": [p for n, p in backbone if n.endswith(NO_DECAY)], "weight_decay": 0.0},
            {"params": head, "weight_decay": 0.0, "lr": hp.head_lr or hp.lr},
        ]
        groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_scheduler(
            hp.schedule,
            optimizer,
            num_warmup_steps=int(hp.warmup_ratio * total),
            num_training_steps=total,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- evaluation -------------------------------------------------------------------------
    def _item_batches(self):
        loader = self.trainer.datamodule.item_dataloader()
        return (move_data_to_device(b, self.device) for b in loader)

    def _begin_eval(self) -> None:
        if hasattr(self.head, "index_catalogue"):
            self.head.index_catalogue(self.backbone, self._item_batches())

    def on_validation_epoch_start(self) -> None:
        self._begin_eval()

    def on_test_epoch_start(self) -> None:
        self._begin_eval()

    def validation_step(self, batch, batch_idx: int) -> None:
        self.head.evaluate(self.backbone, batch, self.val_metrics)

    def test_step(self, batch, batch_idx: int) -> None:
        self.head.evaluate(self.backbone, batch, self.test_metrics)

    def _end_eval(self, stage: str, metrics) -> None:
        values = metrics.compute()
        metrics.reset()
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val")

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._end_eval("test", self.test_metrics)


def _batch_size(batch) -> int:
    first = next(iter(vars(batch).values()))
    return int(first.shape[0])
