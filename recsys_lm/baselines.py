"""Reference models scored with the same split, candidates and metrics as the language model."""

from __future__ import annotations

import numpy as np
import torch

from recsys_lm.data.examples import ClickSet, RankingSet
from recsys_lm.metrics import build_metrics


def popularity_scores(item_counts: np.ndarray) -> torch.Tensor:
    """Training-set interaction counts; ties broken by item index so rankings are stable."""
    counts = torch.as_tensor(item_counts, dtype=torch.float64)
    return counts - torch.arange(len(counts), dtype=torch.float64) / (10 * len(counts))


def evaluate_scores(datamodule, stage: str, item_scores: torch.Tensor) -> dict[str, float]:
    """Score every evaluation sample of `stage` with a fixed per-item score vector."""
    dataset = datamodule.datasets[stage]
    metrics = build_metrics(datamodule.task, datamodule.k)
    if isinstance(dataset, ClickSet):
        metrics.update(item_scores[dataset.item_index], torch.as_tensor(dataset.labels))
        return metrics.compute()
    assert isinstance(dataset, RankingSet)
    for start in range(0, len(dataset), 256):
        rows = [dataset[i] for i in range(start, min(start + 256, len(dataset)))]
        relevant, exclude = dataset.masks(rows)
        metrics.update(item_scores.expand(len(rows), -1), relevant, exclude)
    return metrics.compute()


BASELINES = {"popularity": lambda dm: popularity_scores(dm.item_counts)}


def run_baselines(datamodule, names: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    out = {}
    for name in names:
        if name not in BASELINES:
            from recsys_lm.errors import ConfigError

            raise ConfigError("baselines", name, f"names among {list(BASELINES)}")
        scores = BASELINES[name](datamodule).float()
        out[name] = {stage: evaluate_scores(datamodule, stage, scores) for stage in ("val", "test")}
    return out
