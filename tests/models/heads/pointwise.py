"""Helpers shared by the pointwise heads' tests (rating, behaviour)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from hydra.utils import instantiate

import recsys_lm.train as entry


def train_and_keep(config, monkeypatch, overrides: list[str], **kw):
    """Train through `recsys_lm.train.train`; returns (result, cfg, the trained module)."""
    captured = {}
    original = entry.save_model

    def spy(module, cfg, directory):
        captured["module"] = module
        return original(module, cfg, directory)

    monkeypatch.setattr(entry, "save_model", spy)
    cfg = config(overrides, **kw)
    return entry.train(cfg), cfg, captured["module"]


def fresh_datamodule(cfg, module):
    datamodule = instantiate(
        cfg.data,
        tokenizer=module.backbone.tokenizer,
        task=module.task,
        max_length=module.backbone.max_length,
    )
    datamodule.setup()
    return datamodule


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
