"""Adapters and trained weights save and reload to identical scores."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from recsys_lm.build import build_module, load_model
from tests.conftest import fresh_datamodule, train_and_keep


def scores(module, datamodule):
    module.eval()
    batch = next(iter(datamodule.test_dataloader()))
    with torch.no_grad():
        if module.task.name == "click":
            return module.head(module.backbone, batch)
        module.head.on_eval_start(module.backbone, datamodule.item_dataloader())
        return module.head.score_catalogue(module.backbone, batch)


@pytest.mark.parametrize(
    ("head", "peft", "freeze"),
    [
        ("retrieval", "lora", "none"),
        ("click", "lora", "bitfit"),
        ("retrieval", "adalora", "none"),
        ("click", "ia3", "none"),
        ("retrieval", "prefix", "none"),
        ("click", "prompt", "none"),
        ("retrieval", "none", "none"),
        ("click", "none", "head_only"),
    ],
)
def test_saved_model_reloads_to_identical_scores(config, tmp_path, head, peft, freeze, monkeypatch):
    overrides = [
        f"head={head}",
        f"peft={peft}",
        f"freeze={freeze}",
        "optim.lr=1e-2",
        "trainer.max_steps=2",
        "baselines=[]",
    ]
    result, cfg, trained = train_and_keep(config, monkeypatch, overrides)
    model_dir = tmp_path / "model"
    assert result["model_dir"] == str(model_dir)
    if peft != "none":
        assert (model_dir / "adapter" / "adapter_config.json").exists()
    trained = trained.cpu()
    datamodule = fresh_datamodule(cfg, trained)
    reloaded = load_model(model_dir)
    expected, actual = scores(trained, datamodule), scores(reloaded, datamodule)
    assert torch.allclose(expected, actual, atol=1e-6)
    # And the weights that came back are the trained ones, not a fresh initialisation.
    untrained = build_module(OmegaConf.load(model_dir / "model.yaml"))
    assert not torch.allclose(scores(untrained, datamodule), actual, atol=1e-6)
