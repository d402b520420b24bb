"""Helpers shared by the pointwise heads' tests (rating, behaviour)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

from tests.conftest import fresh_datamodule, train_and_keep

__all__ = ["fake_data", "fresh_datamodule", "predictions", "train_and_keep"]


def fake_data(targets) -> SimpleNamespace:
    """The parts of a PreparedData that `Head.attach` reads, with these targets."""
    settings = SimpleNamespace(max_history_tokens=8, max_sequence_length=5)
    return SimpleNamespace(targets=targets, tokens=None, num_items=0, settings=settings)


def predictions(module, datamodule) -> torch.Tensor:
    """The head's output (ratings [B] or class logits [B, C]) on the first test batch."""
    module.eval()
    batch = next(iter(datamodule.test_dataloader()))
    with torch.no_grad():
        return module.head(module.backbone, batch)


def best_and_logged(result: dict, output_dir: Path, metric: str):
    """(the checkpoint callback's best score, every logged val value of `metric`, its mode)."""
    checkpoint = torch.load(result["checkpoint"], map_location="cpu", weights_only=False)
    key, state = next(
        (k, v)
        for k, v in checkpoint["callbacks"].items()
        if k.startswith("ModelCheckpoint") and f"'monitor': 'val/{metric}'" in k
    )
    mode = "min" if "'mode': 'min'" in key else "max"
    logged = pd.read_csv(next(output_dir.glob("csv/version_*/metrics.csv")))
    return float(state["best_model_score"]), logged[f"val/{metric}"].dropna().tolist(), mode
