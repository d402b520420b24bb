"""4-bit and 8-bit loading of a pretrained backbone for QLoRA (`backbone.quantization`).

The frozen base weights are stored by bitsandbytes (4-bit: NF4 with double quantisation and
bf16 compute, as in the QLoRA paper; 8-bit: LLM.int8()), and peft's
`prepare_model_for_kbit_training` readies the model for adapters: base weights frozen, norms
in fp32, gradients reaching the inputs, gradient checkpointing on. The adapters (peft=lora)
train in full precision on top. bitsandbytes places the weights on a CUDA GPU at load time,
so both a GPU and the `bitsandbytes` package are required.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from recsys_lm.errors import ConfigError

KEY = "backbone.quantization"
QUANTIZATIONS = ("4bit", "8bit")


def check_quantization(value: str | None) -> str | None:
    """`value` if it is null, `4bit` or `8bit` and this machine can load it; a ConfigError
    naming the key and what is missing otherwise."""
    if value is None:
        return None
    if value not in QUANTIZATIONS:
        raise ConfigError(KEY, value, f"null or one of {list(QUANTIZATIONS)}")
    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    if missing:
        raise ConfigError(
            KEY, value, f"null here: {value} loading needs {' and '.join(missing)}, not found"
        )
    return value


def load_kwargs(value: str | None) -> dict:
    """`from_pretrained` keyword arguments for `value` (checked): the BitsAndBytesConfig and
    the GPU of this process (LOCAL_RANK under DDP), or {} for null."""
    if check_quantization(value) is None:
        return {}
    from transformers import BitsAndBytesConfig

    if value == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    device = int(os.environ.get("LOCAL_RANK", 0))
    return {"quantization_config": config, "device_map": {"": device}}


def prepare_for_training(model: torch.nn.Module) -> torch.nn.Module:
    """peft's preparation of a k-bit model for adapter training (see the module docstring)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},  # works with DDP and adapters
    )
