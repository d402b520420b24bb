"""ID-only SASRec (Kang & McAuley, ICDM 2018) as a baseline, trained inside the framework.

It is the sequential head with learned item IDs instead of text (`SequentialHead(text=False,
id_embedding=True)`), trained on the split's training sequences with a full softmax
(cross-entropy over the catalogue, which beats SASRec's original one-negative BCE; Klenitskiy
& Vasilev, RecSys 2023) by a Lightning `Trainer`: validated every `eval_every` epochs on the
run's own task and metric (`StageEvaluation`, exactly as `evaluate_scores` measures it),
early-stopped after `patience` validations without improvement, and restored to its best
validation weights. It is then scored like every other baseline.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback, EarlyStopping
from torch.utils.data import DataLoader

from recsys_lm.baselines.evaluate import StageEvaluation
from recsys_lm.data.batches import SequenceBatch
from recsys_lm.data.datasets.sequences import SequenceSet, left_pad
from recsys_lm.data.prepared import PreparedData
from recsys_lm.errors import ConfigError
from recsys_lm.models.heads.sequential import SequentialHead

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SASRecOptions:
    """baseline_options.sasrec (conf/train.yaml)."""

    dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    dropout: float = 0.2
    max_len: int = 50
    window_stride: int | None = None  # data.window_stride's meaning (sequences.spans)
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    max_epochs: int = 200
    eval_every: int = 5
    patience: int = 3
    seed: int = 0
    accelerator: str = "auto"  # Lightning's: auto (a GPU when there is one) | cpu | gpu

    def __post_init__(self) -> None:
        if self.max_epochs < 1 or self.eval_every < 1 or self.patience < 0:
            raise ConfigError(
                "baseline_options.sasrec",
                {k: getattr(self, k) for k in ("max_epochs", "eval_every", "patience")},
                "positive max_epochs and eval_every, and a patience >= 0",
            )
        if self.window_stride is not None and not 1 <= self.window_stride <= self.max_len:
            raise ConfigError(
                "baseline_options.sasrec.window_stride",
                self.window_stride,
                f"null or 1..baseline_options.sasrec.max_len ({self.max_len})",
            )


class IDSASRec(L.LightningModule):
    """The ID-only sequential head, trained and validated by Lightning; once fitted it is a
    `Scorer` (see recsys_lm.baselines.evaluate): histories -> scores for every item."""

    def __init__(self, data: PreparedData, options: SASRecOptions) -> None:
        super().__init__()
        self.options = options
        self.head = SequentialHead(
            hidden_size=0,
            dim=options.dim,
            num_layers=options.num_layers,
            num_heads=options.num_heads,
            dropout=options.dropout,
            max_len=options.max_len,
            text=False,
            id_embedding=True,
        )
        self.head.attach(data)
        # Not a submodule: the metric set stays on the CPU, where the scores are compared.
        self.validation = StageEvaluation(data, "val")
        self.monitor = f"val/{data.task.monitor_metric(data.k)}"
        self.history: list[dict] = []  # {epoch, val, loss} per validation
        self._last_loss = float("nan")

    @torch.no_grad()
    def forward(self, users: Sequence[int], histories: Sequence[list[int]]) -> torch.Tensor:
        """Scores [len(users), n_items] on the CPU, in eval mode (also mid-training)."""
        was_training = self.training
        self.eval()
        items, mask = left_pad([list(h)[-self.options.max_len :] for h in histories])
        self.head.on_eval_start(None, ())  # ID vectors as they are now
        batch = move_data_to_device(SequenceBatch(items, mask), self.device)
        scores = self.head.score_catalogue(None, batch)
        self.train(was_training)
        return scores.float().cpu()

    def training_step(self, batch: SequenceBatch, batch_idx: int) -> torch.Tensor:
        loss = self.head.loss(None, batch)
        self._last_loss = loss.detach()
        return loss

    def validation_step(self, rows: list, batch_idx: int) -> None:
        self.validation.update(rows, self)

    def on_validation_epoch_end(self) -> None:
        metrics = self.validation.compute()
        self.validation.reset()
        self.log_dict({f"val/{name}": value for name, value in metrics.items()})
        value, loss = metrics[self.monitor.removeprefix("val/")], float(self._last_loss)
        self.history.append({"epoch": self.current_epoch + 1, "val": value, "loss": loss})
        log.info(
            "ID-SASRec epoch %d: loss %.4f, %s %.4f",
            self.current_epoch + 1,
            loss,
            self.monitor,
            value,
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        o = self.options
        return torch.optim.AdamW(self.parameters(), lr=o.lr, weight_decay=o.weight_decay)


class BestWeights(Callback):
    """Keeps a CPU copy of the weights at the best validation (the first of equals, as early
    stopping counts only strict improvements) and loads it back when fitting ends."""

    def __init__(self, monitor: str, mode: str) -> None:
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.best_epoch = 0
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        value = float(trainer.callback_metrics[self.monitor])
        if self.best is None or _better(value, self.best, self.mode):
            self.best, self.best_epoch = value, trainer.current_epoch + 1
            self.state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.state is not None:
            module.load_state_dict(self.state)


class ValidateLastEpoch(Callback):
    """Validates the final epoch too when max_epochs is not a multiple of eval_every, so the
    last epochs' training can still be kept (Lightning validates only every n-th epoch)."""

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 == trainer.max_epochs:
            trainer.check_val_every_n_epoch = 1


def _better(value: float, best: float, mode: str) -> bool:
    return value > best if mode == "max" else value < best


def fit(data: PreparedData, options: SASRecOptions) -> IDSASRec:
    """Build and train ID-SASRec; returns it in eval mode with its best validation weights."""
    # Init, loader order and dropout all from `seed`, without touching the caller's RNG.
    with _isolated(options.seed):
        model = IDSASRec(data, options)
        best = BestWeights(model.monitor, data.task.monitor_mode)
        trainer = _trainer(options, model.monitor, data.task.monitor_mode, best)
        with warnings.catch_warnings():
            # num_workers=0 is deliberate: the windows are tiny lists in memory.
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            trainer.fit(model, _train_loader(data, options), model.validation.batches())
    log.info(
        "ID-SASRec: best %s %.4f at epoch %d of %d",
        model.monitor,
        best.best if best.best is not None else float("nan"),
        best.best_epoch,
        trainer.current_epoch,
    )
    return model.eval()


def _train_loader(data: PreparedData, options: SASRecOptions) -> DataLoader:
    # Item IDs only, no texts.
    windows = SequenceSet(data.split, options.max_len, stride=options.window_stride)
    return DataLoader(
        windows,
        batch_size=options.batch_size,
        shuffle=True,
        collate_fn=windows.collate,
        generator=torch.Generator().manual_seed(options.seed),
    )


def _trainer(options: SASRecOptions, monitor: str, mode: str, best: BestWeights) -> L.Trainer:
    stop = EarlyStopping(
        monitor=monitor, mode=mode, patience=options.patience, check_on_train_epoch_end=False
    )
    return L.Trainer(
        accelerator=options.accelerator,
        devices=1,
        max_epochs=options.max_epochs,
        check_val_every_n_epoch=options.eval_every,
        num_sanity_val_steps=0,
        callbacks=[best, stop, ValidateLastEpoch()],
        logger=False,
        enable_checkpointing=False,  # BestWeights keeps the best state in memory
        enable_progress_bar=False,
        enable_model_summary=False,
        # Not deterministic=True: besides flipping a global torch flag for the caller, it
        # sends torchmetrics' retrieval metrics to a bincount fallback that allocates
        # queries x candidates (11 GB for MovieLens-100K's validation). On the CPU these
        # ops are deterministic anyway; seeding (`_isolated`) covers the rest.
        inference_mode=False,  # no_grad is enough, and keeps the saved state plain tensors
        use_distributed_sampler=False,  # keep the seeded loader as it is
    )


@contextmanager
def _isolated(seed: int) -> Iterator[None]:
    """Seeds torch inside (init, dropout) and gives the caller its RNG states back."""
    devices = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def build(data: PreparedData, **options) -> IDSASRec:
    """`options`: SASRecOptions' fields (baseline_options.sasrec); the seed is data.seed."""
    return fit(data, SASRecOptions(**{"seed": data.seed, **options}))
