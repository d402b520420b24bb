"""The LightningModule: a pretrained backbone, a swappable head, a PEFT and a freezing strategy."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from peft import PeftConfig
from torch import nn
from transformers import get_scheduler

from recsys_lm.data.batches import ItemBatch
from recsys_lm.data.prepared import PreparedData
from recsys_lm.data.tasks import get_task
from recsys_lm.errors import ConfigError
from recsys_lm.models.adapters import apply_peft, peft_hooks
from recsys_lm.models.backbone import Backbone
from recsys_lm.models.freezing import NoFreeze
from recsys_lm.models.heads.base import Head, Recommendation

SCHEDULES = ("linear", "cosine", "constant_with_warmup")
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "ln_")


def count_parameters(module: nn.Module) -> dict[str, int]:
    params = list(module.parameters())
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
    }


class RecsysLM(L.LightningModule):
    """Backbone + head, trained and evaluated as the head's task says (its `Task` record).

    The head is driven only through the `Head` hooks (models/heads/base.py); PEFT methods
    that need per-step work get it through `PeftHooks` (models/adapters.py).
    """

    def __init__(
        self,
        backbone: Backbone,
        head: Head,
        peft_name: str = "none",
        peft_config: PeftConfig | None = None,
        freeze: Any = None,
        lr: float = 2e-4,
        head_lr: float | None = None,
        frozen_head_lr: float | None = 1e-3,
        weight_decay: float = 0.01,
        schedule: str = "linear",
        warmup_ratio: float = 0.1,
        k: int = 10,
        eval_batch_size: int = 128,
    ) -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise ConfigError("optim.schedule", schedule, f"one of {list(SCHEDULES)}")
        self.save_hyperparameters(ignore=["backbone", "head", "peft_config", "freeze"])
        self.backbone = backbone
        apply_peft(backbone, peft_name, peft_config)
        (freeze or NoFreeze()).apply(backbone)
        self.peft_hooks = peft_hooks(backbone)
        head.bind(backbone)  # after wrapping and freezing: the head sees what will train
        self.head = head
        self.task = get_task(head.task)
        # Under DDP each process evaluates its own rows; compute() combines every process's.
        self.val_metrics = self.task.metrics(k).across_processes()
        self.test_metrics = self.task.metrics(k).across_processes()
        self._indexed = False  # whether on_eval_start ran since the weights last changed
        self._item_backbone: Backbone | None = None  # see use_item_backbone
        self.register_load_state_dict_post_hook(_weights_changed)
        # from_pretrained returns modules in eval mode; Lightning keeps each module's mode, so
        # dropout would silently stay off during fine-tuning.
        self.train()
        # Parameters, not their count: a data-sized head's tensors are empty until attach.
        if not any(p.requires_grad for p in self.parameters()):
            raise ConfigError(
                "freeze",
                getattr(freeze, "name", freeze),
                "a combination that leaves some parameter trainable",
            )

    # -- the item side -----------------------------------------------------------------------
    @property
    def item_backbone(self) -> Backbone:
        """The backbone that embeds the catalogue (`on_eval_start`): `backbone` unless
        `use_item_backbone` set another."""
        return self._item_backbone if self._item_backbone is not None else self.backbone

    def use_item_backbone(self, backbone: Backbone | None) -> None:
        """Embed the catalogue with `backbone` while users go through `self.backbone`.

        Quantised serving flavours use it: item vectors are computed once, offline, so they
        come from the exact weights, and only the per-request user side pays the int8
        error (MiniLM two-tower, ML-100K: top-10 overlap 0.84 -> 0.92 for onnx-int8).
        `None` goes back to one backbone for both sides."""
        # Set past nn.Module.__setattr__: not a submodule, so neither trained nor saved.
        object.__setattr__(self, "_item_backbone", backbone)
        self._indexed = False

    # -- data-dependent state -------------------------------------------------------------
    def attach(self, data: PreparedData) -> None:
        """Give the head what it needs from the prepared data (Head.attach)."""
        self.head.attach(data)
        self._indexed = False

    def on_fit_start(self) -> None:
        self._unsharded("_fit_start_head")

    def _fit_start_head(self) -> None:
        self.head.on_fit_start(self.backbone, self._item_batches())

    def _unsharded(self, method: str) -> None:
        """Run `self.<method>()`, which calls the backbone outside a training or evaluation
        step, inside the strategy's wrapper forward where that is the only place the weights
        are whole: FSDP gathers its root unit's sharded parameters (embeddings, final norm)
        in its forward only, as Lightning does for `validation_step`. Elsewhere, directly."""
        trainer = self._trainer
        strategy = trainer.strategy if trainer is not None else None
        wrapper = getattr(strategy, "model", None)
        if wrapper is not None and wrapper is not self and _is_fsdp(wrapper):
            strategy._forward_redirection(wrapper, self, method)
        else:
            getattr(self, method)()

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.head.loss(self.backbone, batch) + self.peft_hooks.extra_loss(self.backbone)
        self.log("train/loss", loss, prog_bar=True, batch_size=_batch_size(batch))
        self._indexed = False
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Lightning zeroes gradients at the start of the next step, so they are still here.
        self.peft_hooks.after_optimizer_step(self.backbone, self.global_step)

    def configure_optimizers(self):
        hp = self.hparams
        backbone = [(n, p) for n, p in self.backbone.named_parameters() if p.requires_grad]
        head = [p for p in self.head.parameters() if p.requires_grad]
        # A frozen backbone (linear probe) leaves only the head, which needs a head-sized
        # rate, not the PEFT strategy's (5e-5 for full fine-tuning).
        head_lr = hp.head_lr or (hp.frozen_head_lr if not backbone else None) or hp.lr
        groups = [
            {
                "params": [p for n, p in backbone if not n.endswith(NO_DECAY)],
                "weight_decay": hp.weight_decay,
            },
            {"params": [p for n, p in backbone if n.endswith(NO_DECAY)], "weight_decay": 0.0},
            {"params": head, "weight_decay": 0.0, "lr": head_lr},
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
    def _item_batches(self) -> Iterator[ItemBatch]:
        """The catalogue's texts on this module's device, lazily (heads that do not read
        them cost nothing)."""
        batches = self.head.require_catalogue().item_batches(self.hparams.eval_batch_size)
        return (move_data_to_device(b, self.device) for b in batches)

    def _begin_eval(self) -> None:
        self.head.on_eval_start(self.item_backbone, self._item_batches())
        self._indexed = True

    def on_validation_epoch_start(self) -> None:
        self._unsharded("_begin_eval")

    def on_test_epoch_start(self) -> None:
        self._unsharded("_begin_eval")

    def validation_step(self, batch, batch_idx: int) -> None:
        self.head.evaluate(self.backbone, batch, self.val_metrics)

    def test_step(self, batch, batch_idx: int) -> None:
        self.head.evaluate(self.backbone, batch, self.test_metrics)

    def _end_eval(self, stage: str, metrics) -> None:
        values = metrics.compute()  # over every process's rows (across_processes)
        metrics.reset()
        # Every process holds the same values already; a max-sync keeps them exact and tells
        # Lightning they are synced (it warns about unsynced epoch-level values under DDP).
        self.log_dict(
            {f"{stage}/{k}": v for k, v in values.items()},
            prog_bar=stage == "val",
            sync_dist=True,
            reduce_fx="max",
        )

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._end_eval("test", self.test_metrics)

    # -- inference (serving) -----------------------------------------------------------------
    @torch.no_grad()
    def score(self, history: Sequence[int], candidates: Sequence[int]) -> torch.Tensor:
        """The head's score of each candidate item for a user with this `history` (item
        indices, oldest first)."""
        return self.head.score(self.backbone, history, candidates)

    @torch.no_grad()
    def recommend(
        self, history: Sequence[int], k: int = 10, exclude: Iterable[int] = ()
    ) -> Recommendation:
        """The top-k catalogue items for a user with this `history` (never history items)."""
        if not self._indexed:
            self._begin_eval()
        return self.head.recommend(self.backbone, history, k, exclude)


def _is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def _weights_changed(module: RecsysLM, incompatible_keys) -> None:
    module._indexed = False  # loaded weights: item vectors must be computed again


def _batch_size(batch) -> int:
    first = next(iter(vars(batch).values()))
    return int(first.shape[0])
