"""Save a trained model as its trainable weights (+ the peft adapter folder) and reload it."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from recsys_lm.models.adapters import is_peft, make_peft_config
from recsys_lm.models.module import RecsysLM

WEIGHTS = "trainable.pt"
CONFIG = "model.yaml"


def build_module(cfg: DictConfig) -> RecsysLM:
    """Backbone + head + strategies from a composed config (train.yaml or an export's model.yaml)."""
    backbone = instantiate(cfg.backbone)
    head = instantiate(cfg.head.net, hidden_size=backbone.hidden_size)
    peft_config = make_peft_config(cfg.peft.name, cfg.peft.config)
    return RecsysLM(
        backbone,
        head,
        peft_name=cfg.peft.name,
        peft_config=peft_config,
        freeze=instantiate(cfg.freeze),
        k=cfg.data.k,
        **cfg.optim,
    )


def save_model(module: RecsysLM, cfg: DictConfig, directory: str | Path) -> Path:
    """Everything needed to rebuild the model: the model config, the weights that trained
    (adapters, biases, head, ...), and for PEFT runs a standard `save_pretrained` adapter."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Each part is resolved against the whole config (AdaLoRA's total_step reads the trainer).
    keep = {
        k: OmegaConf.to_container(cfg[k], resolve=True)
        for k in ("backbone", "head", "peft", "freeze", "optim")
    }
    keep["data"] = {"k": cfg.data.k}
    OmegaConf.save(OmegaConf.create(keep), directory / CONFIG)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    state = {k: v.detach().cpu() for k, v in module.state_dict().items() if k in trainable}
    torch.save(state, directory / WEIGHTS)
    if is_peft(module.backbone):
        module.backbone.model.save_pretrained(directory / "adapter")
    return directory


def load_model(directory: str | Path) -> RecsysLM:
    directory = Path(directory)
    module = build_module(OmegaConf.load(directory / CONFIG))
    state = torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"{directory / WEIGHTS}: weights the model does not have: {unexpected}")
    return module.eval()
