"""Mixed precision on a CUDA GPU (skipped on machines without one)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import recsys_lm.train as entry
from tests.conftest import (
    assert_ranking_metrics,
    fresh_datamodule,
    recomputed_auroc,
    train_and_keep,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "32-true"])
@pytest.mark.parametrize("head", ["click", "retrieval"])
def test_precisions_on_gpu(config, monkeypatch, precision, head):
    plugins = []
    original = entry.instantiate

    def keep_trainer(node, *args, **kwargs):
        made = original(node, *args, **kwargs)
        if isinstance(made, L.Trainer):
            plugins.append(made.precision_plugin)
        return made

    monkeypatch.setattr(entry, "instantiate", keep_trainer)
    result, cfg, module = train_and_keep(
        config,
        monkeypatch,
        [f"trainer.precision={precision}", "trainer.accelerator=gpu", f"head={head}"],
    )
    assert plugins and plugins[0].precision == precision  # Lightning ran in that precision
    assert result["run"]["precision"] == precision
    if head == "click":  # the reported AUROC is the tested weights' own (fp32 recomputation)
        auroc = recomputed_auroc(module.cpu().float(), fresh_datamodule(cfg, module))
        assert result["test"]["auroc"] == pytest.approx(auroc, abs=0.02)
    else:
        assert_ranking_metrics(result["test"], k=10)
