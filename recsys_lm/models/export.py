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


def build_datamodule(cfg: DictConfig, module: RecsysLM):
    """The configured RecDataModule, tokenizing with the module's backbone for its head's task."""
    return instantiate(
        cfg.data,
        tokenizer=module.backbone.tokenizer,
        task=module.task,
        max_length=module.backbone.max_length,
        _recursive_=True,
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
    # Sizes a head learned from the data (catalogue size, classes) to rebuild it before loading.
    keep["head_state"] = module.head.data_state() if hasattr(module.head, "data_state") else {}
    OmegaConf.save(OmegaConf.create(keep), directory / CONFIG)
    # Trained weights, plus the head's buffers (e.g. cached item embeddings for serving).
    wanted = {n for n, p in module.named_parameters() if p.requires_grad}
    wanted |= {f"head.{n}" for n, _ in module.head.named_buffers()}
    # ...and the head's extra state (the behaviour head's class names), loaded before its weights.
    wanted |= {f"head.{k}" for k in module.head.state_dict() if k.endswith("_extra_state")}
    state = {k: _cpu(v) for k, v in module.state_dict().items() if k in wanted}
    torch.save(state, directory / WEIGHTS)
    if is_peft(module.backbone):
        module.backbone.model.save_pretrained(directory / "adapter")
    return directory


def _cpu(value):
    """Tensors to the CPU; extra state (plain Python values) as it is."""
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def load_model(directory: str | Path) -> RecsysLM:
    directory = Path(directory)
    cfg = OmegaConf.load(directory / CONFIG)
    module = build_module(cfg)
    if cfg.get("head_state"):
        module.head.attach(**cfg.head_state)
    state = torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"{directory / WEIGHTS}: weights the model does not have: {unexpected}")
    return module.eval()
