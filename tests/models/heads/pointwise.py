"""Helpers shared by the pointwise heads' tests (rating, behaviour)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from tests.conftest import fresh_datamodule, train_and_keep

__all__ = ["fresh_datamodule", "predictions", "train_and_keep"]


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
