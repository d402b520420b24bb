"""Mixed precision on a CUDA GPU (skipped on machines without one)."""

from __future__ import annotations

import pytest
import torch

from recsys_lm.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "32-true"])
@pytest.mark.parametrize("head", ["click", "retrieval"])
def test_precisions_on_gpu(config, precision, head):
    result = train(
        config([f"trainer.precision={precision}", "trainer.accelerator=gpu", f"head={head}"])
    )
    metric = "auroc" if head == "click" else "ndcg@10"
    assert 0.0 <= result["test"][metric] <= 1.0
    assert result["run"]["precision"] == precision
