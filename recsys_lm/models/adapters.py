"""PEFT strategies through the `peft` library: a strategy is a `PeftConfig`, wrapping is one call.

conf/peft/<name>.yaml holds `name` and `config` (a `_target_` to a peft config class, or null
for full fine-tuning).
"""

from __future__ import annotations

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from peft import AdaLoraConfig, PeftConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.adalora import AdaLoraModel

from recsys_lm.errors import ConfigError
from recsys_lm.models.backbone import Backbone


def make_peft_config(name: str, node: DictConfig | None) -> PeftConfig | None:
    """Instantiate conf/peft/<name>.yaml's `config`; peft's own validation errors name the key."""
    if node is None:
        return None
    try:
        return instantiate(node)
    except InstantiationException as err:
        reason = err.__cause__ or err
        raise ConfigError(
            "peft.config", name, f"valid arguments for {node._target_}: {reason}"
        ) from err


def apply_peft(backbone: Backbone, name: str, config: PeftConfig | None) -> None:
    """Wrap the backbone's transformer in place; `config=None` means full fine-tuning."""
    if config is None:
        return
    # A causal LM gets PeftModelForCausalLM: prefix/prompt tuning then feed the LM head too,
    # and the saved adapter loads with AutoPeftModelForCausalLM. Both task types pass
    # `output_hidden_states`/`logits_to_keep` through, so pooling heads work either way.
    config.task_type = TaskType.CAUSAL_LM if backbone.causal_lm else TaskType.FEATURE_EXTRACTION
    try:
        backbone.model = get_peft_model(backbone.model, config)
    except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError) as err:
        raise ConfigError(
            "peft", name, f"a PEFT strategy that fits backbone type `{backbone.model_type}`: {err}"
        ) from err


def is_peft(backbone: Backbone) -> bool:
    return isinstance(backbone.model, PeftModel)


def adalora_model(backbone: Backbone) -> AdaLoraModel | None:
    if is_peft(backbone) and isinstance(backbone.model.base_model, AdaLoraModel):
        return backbone.model.base_model
    return None


class PeftHooks:
    """Per-step work a PEFT method needs beyond its forward pass. The module calls these two
    hooks for every strategy; the base class does nothing (LoRA, IA3, prefix, prompt, none)."""

    def extra_loss(self, backbone: Backbone) -> torch.Tensor | float:
        """A term added to the training loss."""
        return 0.0

    def after_optimizer_step(self, backbone: Backbone, global_step: int) -> None:
        """Called after each optimizer step, while the gradients are still there."""


class AdaLoraHooks(PeftHooks):
    """AdaLoRA (Zhang et al., 2023): an orthogonality penalty on P and Q, and rank
    re-allocation from the gradients after every optimizer step."""

    def extra_loss(self, backbone: Backbone) -> torch.Tensor | float:
        return adalora_regularisation(backbone)

    def after_optimizer_step(self, backbone: Backbone, global_step: int) -> None:
        adalora_step(backbone, global_step)


def peft_hooks(backbone: Backbone) -> PeftHooks:
    """The hooks for the backbone's PEFT strategy."""
    return AdaLoraHooks() if adalora_model(backbone) is not None else PeftHooks()


def adalora_step(backbone: Backbone, global_step: int) -> None:
    """AdaLoRA re-allocates rank from the gradients: call after the optimizer step, before the
    gradients are zeroed. Skipped when a freeze strategy left the adapter without gradients."""
    model = adalora_model(backbone)
    if model is None:
        return
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    if grads and all(g is not None for g in grads):
        model.update_and_allocate(global_step)


def adalora_regularisation(backbone: Backbone) -> torch.Tensor | float:
    """AdaLoRA's orthogonality penalty on P and Q. peft adds it only when the wrapped model
    returns a loss itself, which a feature-extraction backbone never does."""
    model = adalora_model(backbone)
    if model is None:
        return 0.0
    config: AdaLoraConfig = model.peft_config[model.trainable_adapter_name]
    if config.orth_reg_weight <= 0:
        return 0.0
    penalty, count = 0.0, 0
    for name, param in model.named_parameters():
        if param.requires_grad and ("lora_A" in name or "lora_B" in name):
            gram = param @ param.T if "lora_A" in name else param.T @ param
            eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
            penalty = penalty + torch.norm(gram - eye, p="fro")
            count += 1
    return config.orth_reg_weight * penalty / max(count, 1)
