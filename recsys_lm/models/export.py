"""Save a trained model: its config, the weights that trained (+ the peft adapter folder).

`recsys_lm.build.load_model` reads what this writes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from recsys_lm.durable import atomic_directory
from recsys_lm.models.adapters import is_peft
from recsys_lm.models.module import RecsysLM

WEIGHTS = "trainable.pt"
CONFIG = "model.yaml"
MODEL_KEYS = ("backbone", "head", "peft", "freeze", "optim")


def save_model(module: RecsysLM, cfg: DictConfig, directory: str | Path) -> Path:
    """Everything needed to rebuild the model: the model config, the weights that trained
    (adapters, biases, head, ...) plus the head's whole state (buffers such as cached item
    vectors, extra state such as class names), and for PEFT runs a standard
    `save_pretrained` adapter. Written into a temporary folder renamed into place when
    complete: a kill never leaves a half-saved model that `load_model` would read."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        _write(module, cfg, tmp)
    return directory


def _write(module: RecsysLM, cfg: DictConfig, directory: Path) -> None:
    # Each part is resolved against the whole config (AdaLoRA's total_step reads the trainer).
    keep = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in MODEL_KEYS}
    keep["data"] = {"k": cfg.data.k, "eval_batch_size": cfg.data.eval_batch_size}
    OmegaConf.save(OmegaConf.create(keep), directory / CONFIG)
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    state = {
        k: _cpu(v) for k, v in module.state_dict().items() if k in trained or k.startswith("head.")
    }
    torch.save(state, directory / WEIGHTS)
    if is_peft(module.backbone):
        module.backbone.model.save_pretrained(directory / "adapter")


def _cpu(value):
    """Tensors to the CPU; extra state (plain Python values) as it is."""
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value
