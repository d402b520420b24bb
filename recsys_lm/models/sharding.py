"""FSDP pieces that conf/trainer/fsdp.yaml names: the auto-wrap policy and mixed precision.

Lightning's FSDPStrategy shards each wrapped unit's parameters over the processes and gathers
one unit at a time in forward and backward; wrapping every transformer block separately keeps
the whole model from being gathered at once, which is what lets a decoder that does not fit
one GPU train.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from recsys_lm.errors import ConfigError


class TransformerBlocks:
    """FSDP auto-wrap policy (also usable as the activation-checkpointing policy): every
    transformer block becomes its own FSDP unit; what is left (embeddings, final norm, the
    head) stays in the root unit.

    The block classes are the ones each Hugging Face model in the wrapped module lists in
    `_no_split_modules` (GPT2Block, LlamaDecoderLayer, Qwen2DecoderLayer, BertLayer, ...),
    read from the module when FSDP first calls the policy on it, plus `extra` class names.
    The callable follows FSDP's policy signature `(module, recurse, nonwrapped_numel)`."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        self.extra = tuple(extra)
        self.names: set[str] | None = None

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if self.names is None:  # the first call is on the root: the whole model
            self.names = set(self.extra) | block_names(module)
        if recurse:
            return True  # look inside every module
        return type(module).__name__ in self.names


def block_names(module: nn.Module) -> set[str]:
    """Class names of the transformer blocks of every Hugging Face model inside `module`."""
    names: set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or ())
    return names


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mixed_precision(
    param_dtype: str = "bfloat16", reduce_dtype: str = "float32", buffer_dtype: str = "bfloat16"
):
    """A torch FSDP `MixedPrecision` from dtype names (float32 | bfloat16 | float16): the
    dtype of the gathered parameters in forward and backward, of the gradient reduction, and
    of the buffers. The sharded master weights and the optimizer stay in float32."""
    from torch.distributed.fsdp import MixedPrecision

    chosen = {}
    for key, name in (
        ("param_dtype", param_dtype),
        ("reduce_dtype", reduce_dtype),
        ("buffer_dtype", buffer_dtype),
    ):
        if name not in DTYPES:
            raise ConfigError(
                f"trainer.strategy.mixed_precision.{key}", name, f"one of {list(DTYPES)}"
            )
        chosen[key] = DTYPES[name]
    return MixedPrecision(**chosen)
