"""Freezing strategies: which backbone parameters may train, applied after any PEFT wrapping.

A strategy only ever turns training off (except `bitfit`, which is defined as training the
biases alone), so `peft=lora freeze=bottom_k` trains LoRA only in the upper layers, and
`freeze=head_only` makes any run a linear probe.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from torch import nn

from recsys_lm.errors import ConfigError
from recsys_lm.models.adapters import is_peft
from recsys_lm.models.backbone import Backbone
from recsys_lm.models.frozen_cache import FrozenLayerCache

log = logging.getLogger(__name__)
EMBEDDING_NAMES = re.compile(r"(^|\.)(embeddings|embed_tokens|wte|wpe|embed_positions)(\.|$)")


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks (BERT `encoder.layer`, GPT-2 `h`, Llama `layers`)."""
    config = model.config
    depth = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return module
    raise ConfigError(
        "freeze",
        "bottom_k",
        f"a backbone with a list of {depth} transformer "
        f"layers; none found in {type(model).__name__}",
    )


@dataclass
class NoFreeze:
    """Leave trainability as the PEFT strategy set it (full fine-tuning with peft=none)."""

    name = "none"

    def apply(self, backbone: Backbone) -> None:
        return None


@dataclass
class HeadOnly:
    """Linear probe: the whole backbone (adapters included) is frozen; only the head trains."""

    name = "head_only"

    def apply(self, backbone: Backbone) -> None:
        if is_peft(backbone) and any(p.requires_grad for p in backbone.parameters()):
            log.warning(
                "freeze=head_only also freezes the PEFT adapter: this run is a "
                "linear probe of the head over a frozen backbone"
            )
        for param in backbone.parameters():
            param.requires_grad_(False)


@dataclass
class BottomK:
    """Freeze the embeddings and the `k` lowest transformer layers.

    With `cache_frozen`, the hidden states after layer k are computed once per text and
    reused (models/frozen_cache.py): training and evaluation then run only the layers above.
    """

    k: int = 2
    cache_frozen: bool = False
    cache_dtype: str = "float32"
    cache_max_mb: float | None = None
    name = "bottom_k"

    def apply(self, backbone: Backbone) -> None:
        layers = layer_stack(backbone.model)
        k = self.frozen_layers(len(layers))
        for index in range(k):
            layers[index].requires_grad_(False)
        Embeddings().apply(backbone)
        if self.cache_frozen:
            if backbone.causal_lm and k == len(layers):
                # transformers records a decoder's hidden states (which pooling reads) from
                # its blocks; with every block swapped for the cache, none would be recorded.
                raise ConfigError(
                    "freeze.k",
                    self.k,
                    f"fewer than all {len(layers)} layers with freeze.cache_frozen=true on a decoder with its "
                    "LM head (backbone.causal_lm): at least one block must run",
                )
            backbone.frozen_cache = FrozenLayerCache(
                layers,
                k,
                lower_parameters(backbone, k),
                self.cache_dtype,
                self.cache_max_mb,
            )

    def frozen_layers(self, depth: int) -> int:
        """How many layers `k` freezes in a `depth`-layer stack: k itself, or with k < 0 all
        but the top |k| (k = -1 trains only the last layer of any backbone)."""
        k = self.k if self.k >= 0 else depth + self.k
        if not 0 <= k <= depth:
            raise ConfigError(
                "freeze.k",
                self.k,
                f"between {-depth} and {depth} for the backbone's {depth} layers "
                "(negative: all but the top |k|)",
            )
        return k


def lower_parameters(backbone: Backbone, k: int) -> list[nn.Parameter]:
    """Every parameter that shapes the states after layer k: the embeddings and the k lowest
    layers (adapters inside them included). Prompt and prefix tuning add trainable vectors
    outside both that reach every layer, so a cache under them is refused outright."""
    if is_peft(backbone) and backbone.model.active_peft_config.is_prompt_learning:
        raise ConfigError(
            "peft",
            backbone.model.active_peft_config.peft_type.value.lower(),
            "an adapter inside the layers (lora, ia3, adalora) with freeze.cache_frozen=true: "
            "trainable virtual tokens or prefixes feed the lower layers, whose states then "
            "change as they train (or freeze=none / freeze.cache_frozen=false, e.g. beside "
            "the default freeze=upper_cached)",
        )
    layers = layer_stack(backbone.model)
    params = [p for layer in layers[:k] for p in layer.parameters()]
    params += [p for n, p in backbone.model.named_parameters() if EMBEDDING_NAMES.search(n)]
    return params


@dataclass
class Embeddings:
    """Freeze token/position embeddings (the largest block of a small encoder)."""

    name = "embeddings"

    def apply(self, backbone: Backbone) -> None:
        found = False
        for name, param in backbone.model.named_parameters():
            if EMBEDDING_NAMES.search(name):
                param.requires_grad_(False)
                found = True
        if not found:
            raise ConfigError("freeze", self.name, "a backbone with named embedding parameters")


@dataclass
class BitFit:
    """BitFit (Ben Zaken et al., 2022): train only the backbone's bias terms."""

    name = "bitfit"

    def apply(self, backbone: Backbone) -> None:
        biases = 0
        for name, param in backbone.named_parameters():
            is_bias = name.endswith(".bias") and "lora_" not in name
            param.requires_grad_(is_bias)
            biases += int(is_bias)
        if biases == 0:
            raise ConfigError(
                "freeze", self.name, f"a backbone with bias terms; `{backbone.model_type}` has none"
            )
