"""Inference flavours of a trained model: what `python -m recsys_lm.export` writes beside the
eager model, and the transforms `recsys_lm.build.load_flavour` applies when loading one.

    merged       the PEFT adapter merged into the backbone's weights (peft's merge_and_unload),
                 saved as a plain Hugging Face folder + the head's state: no peft at load time
    onnx         the merged backbone with its pooling as an ONNX graph, run by onnxruntime
                 (`OnnxBackbone`), and the head's own user-side network where it has one
                 (`Head.query_network`: the sequential encoder) as a second graph
                 (`OnnxQuery`); the head's other layers stay in torch
    onnx-int8    the backbone's graph after onnxruntime's dynamic int8 quantisation (users
                 only: items are embedded offline by the merged weights); a head network's
                 graph stays fp32 (a few kB of weights: nothing to gain)
    int8         the merged backbone with torchao's int8 dynamic quantisation of its Linear
                 layers (`quantize_`, applied at load time: nothing extra is saved)
    pruned-<n>   the merged backbone with only its lowest n transformer layers (at load time)

Every flavour but eager starts from the merged backbone, so `merged` is written whenever any
of them is asked for. Folder layout: `flavours/<name>/` inside the export (see export.py).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from recsys_lm.errors import ConfigError
from recsys_lm.models.adapters import is_peft
from recsys_lm.models.backbone import Backbone
from recsys_lm.models.module import RecsysLM

EAGER = "eager"
MERGED = "merged"
ONNX = "onnx"
ONNX_INT8 = "onnx-int8"
INT8 = "int8"
PRUNED = "pruned"
KINDS = (MERGED, ONNX, ONNX_INT8, INT8, PRUNED)
EXACT = (MERGED, ONNX)  # same arithmetic as the trained model, up to float rounding
QUANTISED = (INT8, ONNX_INT8)  # int8 arithmetic: judged by ranking overlap and the metric
# Quantised flavours run users in int8; item vectors are computed once, offline (the stored
# table, items added through the API), so they keep the exact weights (build.load_flavour).
ITEM_SIDE = "merged weights (fp32): items are embedded offline; users in int8"
FOLDER = "flavours"
BACKBONE = "backbone"  # merged/: the plain Hugging Face model folder
HEAD = "head.pt"  # merged/: the head's state_dict
MODEL_CONFIG = "model.yaml"  # merged/: the model config, backbone.name_or_path relative
GRAPH = "model.onnx"  # onnx/, onnx-int8/
QUERY_GRAPH = "query.onnx"  # onnx/, onnx-int8/: the head's own user-side network, if any
QUERY_INPUTS, QUERY_OUTPUT = ("vectors", "mask"), "query"
RECIPE_FILE = "flavour.json"  # every flavour folder: {name, recipe, parity}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "pooled"
# Where a Hugging Face model keeps its stack of transformer blocks (BERT-likes, GPT-2, Llama
# and most decoders, the same under a causal-LM wrapper, encoder-decoders' encoder).
LAYER_PATHS = (
    "encoder.layer",
    "h",
    "layers",
    "transformer.h",
    "model.layers",
    "encoder.layers",
    "model.decoder.layers",
)


@dataclass(frozen=True)
class Flavour:
    """A flavour name parsed: its kind and, for pruned-<n>, the layers kept."""

    name: str
    kind: str
    layers: int | None = None

    @property
    def folder(self) -> str:
        return f"{FOLDER}/{self.name}"


def parse(name: str) -> Flavour:
    """`merged`, `onnx`, `onnx-int8`, `int8` or `pruned-<n>` -> Flavour; anything else is
    refused naming the choices."""
    if name in (MERGED, ONNX, ONNX_INT8, INT8):
        return Flavour(name, name)
    match = re.fullmatch(rf"{PRUNED}-(\d+)", name)
    if match:
        return Flavour(name, PRUNED, int(match.group(1)))
    raise ConfigError(
        "flavours", name, f"one of {[EAGER, MERGED, ONNX, ONNX_INT8, INT8]} or pruned-<layers>"
    )


def expand(requested: list[str], pruned: list[int] | None, total_layers: int) -> list[Flavour]:
    """The flavours to export, in a fixed order (merged first: every other one starts from
    it). `pruned` in `requested` becomes pruned-<n> for each n of `pruned`, or, when that is
    null, every layer count from total_layers - 1 down to 1."""
    unknown = [name for name in requested if name not in KINDS]
    if unknown:
        raise ConfigError("flavours", unknown, f"names among {list(KINDS)}")
    names = [kind for kind in KINDS if kind in requested and kind != PRUNED]
    if names or PRUNED in requested:
        names = [MERGED, *[n for n in names if n != MERGED]]
    if PRUNED in requested:
        counts = list(range(total_layers - 1, 0, -1)) if pruned is None else list(pruned)
        bad = [n for n in counts if not 1 <= int(n) < total_layers]
        if bad or not counts:
            raise ConfigError(
                "pruned",
                counts,
                f"layer counts between 1 and {total_layers - 1} (the backbone has "
                f"{total_layers} layers; keeping all of them is the merged flavour)",
            )
        names += [f"{PRUNED}-{int(n)}" for n in counts]
    return [parse(name) for name in names]


# -- merged ----------------------------------------------------------------------------------
def merged_backbone(backbone: Backbone) -> Backbone:
    """A copy of the backbone with the PEFT adapter merged into its weights (LoRA, AdaLoRA,
    IA3: peft's `merge_and_unload`); a backbone without an adapter is copied as it is. Prompt
    learning (prefix, prompt) adds virtual tokens rather than weight deltas: nothing to merge."""
    plain = copy.deepcopy(backbone).eval()
    if not is_peft(plain):
        return plain
    peft_config = plain.model.peft_config[plain.model.active_adapter]
    if peft_config.is_prompt_learning:
        raise ConfigError(
            "flavours",
            MERGED,
            f"a run whose adapter merges into the weights (LoRA, AdaLoRA, IA3); "
            f"{peft_config.peft_type.value} prompt learning cannot be merged: export the eager "
            "flavour only (flavours=[])",
        )
    plain.model = plain.model.merge_and_unload()
    return plain


def write_merged(module: RecsysLM, model_cfg: DictConfig, folder: Path) -> Backbone:
    """Save the merged backbone as a Hugging Face folder (weights + tokenizer), the head's
    state and a model config that builds them with `peft=none`; returns the merged backbone.

    The config's backbone is `load_pretrained` of that folder, whatever built the trained one
    (a hub id, the packaged MiniLM, an in-process tiny model), with its pooling and length;
    `name_or_path` is relative to the flavour folder (`load_config` makes it absolute), so the
    export can be moved."""
    backbone = merged_backbone(module.backbone)
    folder.mkdir(parents=True, exist_ok=True)
    backbone.model.save_pretrained(folder / BACKBONE)
    backbone.tokenizer.save_pretrained(folder / BACKBONE)
    torch.save(module.head.state_dict(), folder / HEAD)
    cfg = OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True))
    cfg.backbone = {
        "_target_": "recsys_lm.models.backbone.load_pretrained",
        "name_or_path": BACKBONE,
        "pooling": backbone.pooling,
        "max_length": backbone.max_length,
        "causal_lm": backbone.causal_lm,
    }
    cfg.peft = {"name": "none", "config": None}
    OmegaConf.save(cfg, folder / MODEL_CONFIG)
    return backbone


def merged_recipe(module: RecsysLM, peft_name: str) -> dict:
    method = "peft merge_and_unload" if is_peft(module.backbone) else "trained weights as they are"
    return {"from": "model", "peft": peft_name, "method": method, "backbone": BACKBONE}


def load_config(folder: Path) -> DictConfig:
    """The merged flavour's model config, its backbone folder made absolute."""
    folder = Path(folder)
    if not (folder / MODEL_CONFIG).is_file():
        raise ConfigError("flavour", str(folder), f"an exported flavour folder with {MODEL_CONFIG}")
    cfg = OmegaConf.load(folder / MODEL_CONFIG)
    cfg.backbone.name_or_path = str((folder / cfg.backbone.name_or_path).resolve())
    return cfg


def load_head(module: RecsysLM, folder: Path) -> None:
    """The merged flavour's head state into a freshly built module (data-sized tensors take
    the saved shapes: Head.data_sized)."""
    state = torch.load(Path(folder) / HEAD, map_location="cpu", weights_only=True)
    module.head.load_state_dict(state)


# -- load-time transforms: int8, pruned --------------------------------------------------------
# torchao configs the int8 flavour may use (`int8.config` in conf/export.yaml):
# - Int8DynamicActivationInt8WeightConfig: int8 x int8 matrix products (torch._int_mm), the
#   fast path on CUDA; on a CPU without int8 GEMM kernels torch's reference product is used
#   (measured here: about 14x slower than float32 for MiniLM);
# - Int8DynamicActivationIntxWeightConfig (int8 weights per channel): torchao's CPU / edge
#   path (packed kernels where torchao has them for the CPU, an unpacked fallback elsewhere).
INT8_CONFIGS = ("Int8DynamicActivationInt8WeightConfig", "Int8DynamicActivationIntxWeightConfig")


def int8_config(name: str):
    """The torchao config object named `name` (one of INT8_CONFIGS)."""
    if name not in INT8_CONFIGS:
        raise ConfigError("int8.config", name, f"one of {list(INT8_CONFIGS)}")
    import torchao.quantization as tq

    if name == INT8_CONFIGS[1]:
        from torchao.quantization.granularity import PerAxis

        return tq.Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int8, weight_granularity=PerAxis(0)
        )
    return tq.Int8DynamicActivationInt8WeightConfig()


def quantize_int8(backbone: Backbone, config: str = INT8_CONFIGS[0]) -> Backbone:
    """torchao's int8 dynamic quantisation (int8 per-channel weights, activations quantised
    per token at run time) of every nn.Linear of the backbone, in place. torchao's current
    API (`quantize_` + a config); `torch.ao.quantization.quantize_dynamic` is deprecated."""
    from torchao.quantization import quantize_

    quantize_(backbone.model, int8_config(config))
    return backbone


def int8_recipe(config: str) -> dict:
    import torchao

    int8_config(config)  # refuse an unknown name before anything is written
    return {
        "from": MERGED,
        "transform": "torchao.quantization.quantize_",
        "config": config,
        "modules": "every nn.Linear of the backbone",
        "torchao": torchao.__version__,
        "applied": "at load time",
        "item_side": ITEM_SIDE,
    }


def read_recipe(folder: Path) -> dict:
    """The recipe in a flavour folder's flavour.json."""
    file = Path(folder) / RECIPE_FILE
    if not file.is_file():
        raise ConfigError("flavour", str(folder), f"an exported flavour folder with {RECIPE_FILE}")
    return json.loads(file.read_text())["recipe"]


def transformer_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(owner, attribute, ModuleList) of the model's transformer blocks."""
    for path in LAYER_PATHS:
        owner_path, _, name = path.rpartition(".")
        try:
            owner = model.get_submodule(owner_path) if owner_path else model
        except AttributeError:
            continue
        layers = getattr(owner, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return owner, name, layers
    raise ConfigError(
        "flavours",
        PRUNED,
        f"a backbone whose transformer blocks sit at one of {list(LAYER_PATHS)}; "
        f"{type(model).__name__} has none",
    )


def num_layers(backbone: Backbone) -> int:
    return len(transformer_layers(backbone.model)[2])


def prune_layers(backbone: Backbone, keep: int) -> Backbone:
    """Keep the lowest `keep` transformer blocks (the ones nearest the embeddings), in place;
    the model config says so too (`num_hidden_layers`, per-layer lists)."""
    owner, name, layers = transformer_layers(backbone.model)
    if not 1 <= keep < len(layers):
        raise ConfigError("pruned", keep, f"a layer count between 1 and {len(layers) - 1}")
    setattr(owner, name, nn.ModuleList(list(layers)[:keep]))
    config = backbone.model.config
    config.num_hidden_layers = keep  # GPT-2's n_layer through its attribute map
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:keep]
    return backbone


def pruned_recipe(flavour: Flavour, total: int) -> dict:
    return {"from": MERGED, "layers": flavour.layers, "of": total, "applied": "at load time"}


# -- ONNX --------------------------------------------------------------------------------------
def input_names(backbone: Backbone) -> list[str]:
    """The graph's inputs: segment ids only for models that embed them (BERT-likes)."""
    return list(INPUTS if backbone.uses_segments else INPUTS[:2])


def _example(backbone: Backbone, names: list[str]) -> tuple[torch.Tensor, ...]:
    # Two rows of different lengths, longer than 1: torch.export specialises sizes 0 and 1.
    encoded = backbone.tokenizer(
        ["an example text for tracing the graph", "a shorter one"],
        padding=True,
        return_tensors="pt",
    )
    ids = encoded["input_ids"]
    out = {"input_ids": ids, "attention_mask": encoded["attention_mask"].long()}
    out["token_type_ids"] = torch.zeros_like(ids)
    return tuple(out[name] for name in names)


def export_onnx(backbone: Backbone, path: Path, opset: int | None = None) -> dict:
    """The backbone with its pooling -> an ONNX graph (ids, mask[, segments] -> pooled [B, H]),
    batch and sequence length dynamic. torch.export-based exporter (`dynamo=True`, the
    default since torch 2.9; the TorchScript one is deprecated and bakes tensor-dependent
    branches into constants). Returns the recipe."""
    backbone = backbone.eval()
    names = input_names(backbone)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    shapes = tuple({0: batch, 1: length} for _ in names)
    _export(backbone, _example(backbone, names), names, OUTPUT, shapes, opset, path)
    return {
        "from": MERGED,
        "graph": GRAPH,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "opset": _opset(path),
        "inputs": names,
        "output": f"{OUTPUT} [batch, {backbone.hidden_size}] ({backbone.pooling} pooling)",
        "dynamic_axes": ["batch", "length"],
        "head": "stays in torch",
    }


def _export(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    inputs: list[str],
    output: str,
    shapes: tuple[dict, ...],
    opset: int | None,
    path: Path,
) -> None:
    """torch.onnx.export (dynamo) of `module` at `example`, the axes in `shapes` dynamic, to
    one self-contained file at `path`."""
    with warnings.catch_warnings(), torch.no_grad():
        # The exporter warns that both axes keep one name each (all inputs share them).
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            module,
            example,
            dynamo=True,
            input_names=inputs,
            output_names=[output],
            dynamic_shapes=shapes,
            opset_version=opset,
            verbose=False,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=False)


def export_query(network: nn.Module, dim: int, path: Path, opset: int | None = None) -> dict:
    """A head's user-side network (`Head.query_network`) -> an ONNX graph (vectors [B, T, d],
    mask [B, T] bool -> query [B, d]), batch and length dynamic. Returns the recipe."""
    # Two left-padded rows longer than 1: torch.export specialises sizes 0 and 1.
    vectors = torch.randn(2, 5, dim)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, :2] = False
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    shapes = ({0: batch, 1: length}, {0: batch, 1: length})
    _export(network.eval(), (vectors, mask), list(QUERY_INPUTS), QUERY_OUTPUT, shapes, opset, path)
    return {
        "graph": QUERY_GRAPH,
        "network": type(network).__name__,
        "inputs": [f"vectors [batch, length, {dim}]", "mask [batch, length] (bool)"],
        "output": f"{QUERY_OUTPUT} [batch, {dim}]",
        "precision": "fp32",
    }


def quantize_onnx(source: Path, target: Path, per_channel: bool, reduce_range: bool) -> dict:
    """onnxruntime's dynamic quantisation of the graph's weight MatMuls: int8 weights (per
    output channel with `per_channel`), activations quantised at run time. Returns the recipe."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process: shape inference fails on
    try:  # dynamic-shape graphs, and quantisation works without it
        quantize_dynamic(
            source,
            target,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            reduce_range=reduce_range,
        )
    finally:
        root.setLevel(level)
    return {
        "from": ONNX,
        "graph": GRAPH,
        "quantisation": "onnxruntime.quantization.quantize_dynamic",
        "weight_type": "QInt8",
        "per_channel": per_channel,
        "reduce_range": reduce_range,
        "onnxruntime": _ort_version(),
        "item_side": ITEM_SIDE,
    }


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def cpu_threads() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_session(path: str, threads: int | None):
    """An onnxruntime session on the CPU provider with `threads` intra-op threads (default:
    every core this process may use)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cpu_threads()
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


class OnnxBackbone(nn.Module):
    """An onnxruntime session with the Backbone's call signature and the attributes heads read
    (tokenizer, max_length, hidden_size, pooling, device, is_decoder, causal_lm,
    uses_segments), so every pooling head runs on it unchanged.

    It runs on the CPU (onnxruntime's CPU provider) with `threads` intra-op threads (default:
    every core this process may use). It has no parameters: the module around it trains
    nothing, and `state_dict` holds the head alone. The two-tower head's projection and
    normalisation are not folded into the graph: heads call `backbone(ids, mask)` and then
    apply their own layers, so a graph ending in the head's output would need a second head
    contract for one [H, H] matrix product, which costs nothing beside the encoder.
    """

    causal_lm = False

    def __init__(self, path: str | Path, like: Backbone, threads: int | None = None) -> None:
        super().__init__()
        self.path = str(path)
        self.session = cpu_session(self.path, threads)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.tokenizer = like.tokenizer
        self.max_length = like.max_length
        self.hidden_size = like.hidden_size
        self.pooling = like.pooling
        self.is_decoder = like.is_decoder
        self.model_type = like.model_type

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def uses_segments(self) -> bool:
        return INPUTS[2] in self.inputs

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        feeds = {INPUTS[0]: _int64(input_ids), INPUTS[1]: _int64(attention_mask)}
        if self.uses_segments:
            segments = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            feeds[INPUTS[2]] = _int64(segments)
        pooled = self.session.run([OUTPUT], feeds)[0]
        return torch.from_numpy(pooled).to(input_ids.device)

    def lm_logits(self, *args, **kwargs) -> torch.Tensor:
        raise ConfigError(
            "flavour", ONNX, "a pooling head: the ONNX graph gives pooled vectors, not logits"
        )


class OnnxQuery:
    """A head's user-side network as an onnxruntime session, called like the module it was
    exported from (`Head.use_query_network`): on the CPU, `threads` intra-op threads (default:
    every core this process may use). One user's query costs about 0.4 ms against 1.0 ms in
    eager torch (the SASRec encoder, 2 blocks, 64-d, 50 items, one thread)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = str(path)
        self.session = cpu_session(self.path, threads)

    def __call__(self, vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        feeds = {
            QUERY_INPUTS[0]: vectors.detach().to("cpu", torch.float32).numpy(),
            QUERY_INPUTS[1]: mask.detach().to("cpu", torch.bool).numpy(),
        }
        query = self.session.run([QUERY_OUTPUT], feeds)[0]
        return torch.from_numpy(query).to(vectors.device)


def _int64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.long).numpy()


def check_onnx(backbone: Backbone) -> None:
    """Refuse backbones whose heads need more than pooled vectors."""
    if backbone.causal_lm:
        raise ConfigError(
            "flavours",
            ONNX,
            "a head that reads pooled vectors; the generative heads read next-token logits, "
            "which the ONNX graph does not give (export merged, int8 or pruned)",
        )
