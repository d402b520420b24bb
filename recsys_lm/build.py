"""The composition root: every object a run needs is built here, from a composed config.

`train.py`, the benchmarks, the tests and (later) serving call these builders; nothing else
instantiates the module, the data, the callbacks or a saved model.

    check_config(cfg)            every typed check, before any data or weights are loaded
    build_module(cfg)            backbone + PEFT + freezing + head -> RecsysLM
    build_datamodule(cfg, m)     source + data settings -> RecDataModule (prepares on setup)
    build_trainer(cfg, task)     Lightning Trainer with the loggers and callbacks
    build_callbacks(cfg, task)   Lightning callbacks; `monitor: auto` -> the task's metric
    build_eval_trainer(cfg)      a Trainer for evaluation only
    evaluate_saved(dir, cfg)     a saved model's metrics on the data of a config
    evaluate_sets(trainer, ...)  trainer.test over named evaluation sets (new-item events)
    load_model(dir)              a saved model (models/export.py wrote it) -> RecsysLM
    warm_start(m, dir)           a built module starts from a saved model's weights
    load_run(dir)                a finished run's model with its prepared data attached
    load_flavour(dir, name)      one inference flavour of an export (serving/flavours.py)
    load_export(dir, flavour)    an export served in one flavour: ServedModel (serving/model.py)
    preadapted_config(cfg, c)    `preadapt=...`: pre-adapt the item encoder, point the backbone at it
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from recsys_lm.baselines import check_names as check_baseline_names
from recsys_lm.data.cooccurrence import PairSet, cooccurring_pairs
from recsys_lm.data.datamodule import RecDataModule
from recsys_lm.data.prepared import PreparedData, prepare
from recsys_lm.data.settings import DataSettings, data_settings
from recsys_lm.data.task import Task
from recsys_lm.data.tasks import get_task
from recsys_lm.durable import atomic_directory
from recsys_lm.errors import ConfigError, DataError
from recsys_lm.models.adapters import make_peft_config
from recsys_lm.models.backbone import load_pretrained
from recsys_lm.models.export import CONFIG, WEIGHTS
from recsys_lm.models.heads.base import Head
from recsys_lm.models.module import RecsysLM
from recsys_lm.models.preadapt import ItemContrastive, Preadapt, save_backbone
from recsys_lm.models.quantization import check_quantization
from recsys_lm.serving import flavours
from recsys_lm.serving.model import ServedModel, ServingData

LR_MONITOR = "LearningRateMonitor"
PREADAPTED = "preadapted_backbone"  # the run folder's pre-adapted backbone (preadapt=...)
HYDRA_KEYS = ("_target_", "_convert_", "_recursive_", "_partial_", "_args_")


@dataclass
class Checked:
    """What `check_config` established: the typed data settings, the source object (built,
    not loaded), the head class and its task."""

    settings: DataSettings
    source: Any
    head_class: type[Head]
    task: Task


def check_config(cfg: DictConfig) -> Checked:
    """Refuse a config that cannot work before anything is loaded: unknown or mistyped
    `data.*` keys, keys a head or a source does not take, an eval mode the task cannot do."""
    head_class = _class_of(cfg.head.net, "head.net")
    if not (isinstance(head_class, type) and issubclass(head_class, Head)):
        raise ConfigError(
            "head.net._target_", cfg.head.net._target_, "a subclass of recsys_lm Head"
        )
    check_arguments(head_class, cfg.head.net, "head.net", skip=("hidden_size",))
    task = get_task(head_class.task)
    settings = data_settings(cfg.data)
    task.eval_mode(settings.eval_mode)
    check_arguments(_class_of(cfg.data.source, "data.source"), cfg.data.source, "data.source")
    source = _instantiate(cfg.data.source, "data.source")
    check_baseline_names(baseline_names(cfg, task))  # now, not after the model has trained
    _check_quantization(cfg)
    return Checked(settings, source, head_class, task)


def _check_quantization(cfg: DictConfig) -> None:
    """4/8-bit weights train only through adapters (QLoRA): not with peft=none."""
    value = cfg.backbone.get("quantization")
    check_quantization(value)
    if value is not None and cfg.peft.get("config") is None:
        raise ConfigError(
            "backbone.quantization",
            value,
            f"null with peft={cfg.peft.name}: quantised weights cannot train; use peft=lora (QLoRA)",
        )


def check_arguments(cls: type, node: DictConfig, key: str, skip: tuple[str, ...] = ()) -> None:
    """Every key of `node` must be a parameter of `cls` (its `__init__`); names the first
    that is not, with the ones that are."""
    parameters = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    allowed = [name for name in parameters if name not in skip]
    for name in node:
        if name not in HYDRA_KEYS and name not in allowed:
            raise ConfigError(
                f"{key}.{name}", node[name], f"a parameter of {cls.__name__}: one of {allowed}"
            )


def _class_of(node: DictConfig, key: str) -> type:
    try:
        return get_class(node._target_)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(
            f"{key}._target_", node.get("_target_"), f"an importable class: {err}"
        ) from err


def _instantiate(node: DictConfig, key: str, **kwargs) -> Any:
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from err
        raise ConfigError(
            key, node.get("_target_"), f"valid arguments: {err.__cause__ or err}"
        ) from err


def build_module(cfg: DictConfig) -> RecsysLM:
    """Backbone + head + strategies from a composed config (train.yaml or a saved model.yaml)."""
    backbone = instantiate(cfg.backbone)
    head = _instantiate(cfg.head.net, "head.net", hidden_size=backbone.hidden_size)
    return RecsysLM(
        backbone,
        head,
        peft_name=cfg.peft.name,
        peft_config=make_peft_config(cfg.peft.name, cfg.peft.config),
        freeze=instantiate(cfg.freeze),
        k=cfg.data.k,
        eval_batch_size=cfg.data.eval_batch_size,
        **scaled_rates(cfg.optim),
    )


def scaled_rates(optim: DictConfig) -> dict[str, Any]:
    """`optim` with `lr_scale` applied to every learning rate: one sweep axis (0.3x, 1x, 3x)
    that means the same for strategies whose own rates differ 600-fold (prompt vs none)."""
    out = OmegaConf.to_container(optim, resolve=True)
    scale = float(out.pop("lr_scale", 1.0))
    if scale <= 0:
        raise ConfigError("optim.lr_scale", scale, "a positive multiplier of the learning rates")
    for key in ("lr", "head_lr", "frozen_head_lr"):
        if out.get(key) is not None:
            out[key] = float(out[key]) * scale
    return out


def build_datamodule(cfg: DictConfig, module: RecsysLM, checked: Checked | None = None):
    """The RecDataModule for `cfg`, tokenizing with the module's backbone for its task."""
    checked = checked or check_config(cfg)
    backbone = module.backbone
    return RecDataModule(
        checked.source, checked.settings, module.task, backbone.tokenizer, backbone.max_length
    )


def build_callbacks(cfg: DictConfig, task: Task, logging: bool = True) -> list:
    """Every entry of `callbacks` (`~callbacks.<name>` drops one); `monitor: auto` and
    `mode: auto` become the task's validation metric at data.k and its direction. Without a
    logger (`logging=False`, logger=none) the LR monitor, which only writes to loggers, is
    left out: Lightning refuses it there."""
    monitor = f"val/{task.monitor_metric(cfg.data.k)}"
    out = []
    for node in (cfg.get("callbacks") or {}).values():
        if node is None or (not logging and node.get("_target_", "").endswith(LR_MONITOR)):
            continue
        overrides = {}
        if node.get("monitor") == "auto":
            overrides["monitor"] = monitor
        if node.get("mode") == "auto":
            overrides["mode"] = task.monitor_mode
        out.append(instantiate(node, **overrides))
    return out


def build_loggers(cfg: DictConfig) -> list:
    return [instantiate(node) for node in (cfg.get("logger") or {}).values() if node is not None]


def build_trainer(cfg: DictConfig, task: Task, extra_callbacks: Sequence = ()) -> L.Trainer:
    """`trainer.*` with the run's loggers and callbacks (its `loggers` are the run's);
    `extra_callbacks` are objects made by the caller (an Optuna trial's pruning callback)."""
    check_strategy(cfg.trainer)
    loggers = build_loggers(cfg)
    callbacks = [*build_callbacks(cfg, task, logging=bool(loggers)), *extra_callbacks]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    check_launch(trainer)
    return trainer


def check_strategy(trainer_cfg: DictConfig) -> None:
    """FSDP (trainer=fsdp) runs on CUDA GPUs only: Lightning refuses any other accelerator."""
    strategy = trainer_cfg.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    if not (target.endswith("FSDPStrategy") or target.startswith("fsdp")):
        return
    accelerator = str(trainer_cfg.get("accelerator"))
    if accelerator not in ("gpu", "cuda"):
        raise ConfigError(
            "trainer.accelerator",
            accelerator,
            "gpu with trainer=fsdp: Lightning's FSDPStrategy shards over CUDA GPUs only "
            "(on CPU use trainer=ddp trainer.accelerator=cpu)",
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            "trainer.strategy", target, "a machine with CUDA GPUs (none found) for trainer=fsdp"
        )


def check_launch(trainer: L.Trainer) -> None:
    """Lightning starts DDP's other processes by running the command line again, which in a
    Hydra multirun would run the whole sweep in each: refused there unless the cluster
    starts the processes itself (SLURM tasks, torchrun)."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.world_size <= 1 or environment is None or environment.creates_processes_externally:
        return
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError(
            "trainer.devices",
            trainer.world_size,
            "1 in a multirun (-m): Lightning would rerun the whole sweep in each extra "
            "process; run a DDP job alone, or sweep on SLURM with one task per GPU",
        )


def build_eval_trainer(cfg: DictConfig) -> L.Trainer:
    """`trainer.*` for evaluation only: no loggers, callbacks, checkpoints or bars."""
    return instantiate(
        cfg.trainer,
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def evaluate_saved(
    model_dir: str | Path, cfg: DictConfig, stages: tuple[str, ...] = ("test",)
) -> dict[str, dict[str, float]]:
    """A saved model's metrics on the data `cfg` describes (prepared as a run of `cfg`
    would be): {stage: metrics} for each named evaluation set it has, e.g. the current
    model on a refresh's held-out slice, or a stale model on a later window."""
    module = load_model(model_dir)
    datamodule = build_datamodule(cfg, module)
    datamodule.prepare_data()
    datamodule.setup("test")
    module.attach(datamodule.data)
    return evaluate_sets(build_eval_trainer(cfg), module, datamodule, stages)


def evaluate_sets(
    trainer: L.Trainer, module: RecsysLM, datamodule, names: tuple[str, ...], ckpt_path=None
) -> dict[str, dict[str, float]]:
    """`trainer.test` over each named evaluation set the data has: {name: metrics}; a set
    with no rows gets {}; a name the data lacks is left out."""
    out = {}
    for name in names:
        loader = datamodule.eval_dataloader(name)
        if loader is None:
            continue
        if not len(loader.dataset):
            out[name] = {}
            continue
        logged = trainer.test(module, dataloaders=loader, ckpt_path=ckpt_path, verbose=False)[0]
        out[name] = {k.removeprefix("test/"): float(v) for k, v in logged.items()}
    return out


def baseline_names(cfg: DictConfig, task: Task) -> list[str]:
    """`baselines`, or the task's defaults when it is null."""
    names = cfg.get("baselines")
    return list(task.default_baselines if names is None else names)


# -- item-text pre-adaptation ------------------------------------------------------------------
def preadapted_config(cfg: DictConfig, checked: Checked) -> DictConfig:
    """`cfg` itself without `preadapt`; with it, a copy whose backbone is the pre-adapted one
    in `<run>/preadapted_backbone` (a Hugging Face folder), fine-tuning it there first unless
    an earlier attempt of this run finished it (a resumed run reuses it). Saved models then
    name that folder, so new items are embedded by the same weights as trained ones."""
    node = cfg.get("preadapt")
    if not node:
        return cfg
    _check_preadapt_devices(cfg.trainer)
    folder = Path(cfg.paths.output_dir) / PREADAPTED
    if not (folder / "config.json").is_file():
        with atomic_directory(folder) as tmp:
            save_backbone(_preadapt(cfg, checked, _preadapt_settings(node)), tmp)
    out = copy.deepcopy(cfg)
    backbone = {"_target_": f"{load_pretrained.__module__}.{load_pretrained.__name__}"}
    backbone.update(name_or_path=str(folder.resolve()), pooling=cfg.backbone.pooling)
    backbone.update(max_length=cfg.backbone.max_length)
    if cfg.backbone.get("causal_lm") is not None:
        backbone["causal_lm"] = cfg.backbone.causal_lm
    with open_dict(out):
        out.backbone = backbone
    return out


def _check_preadapt_devices(trainer_cfg: DictConfig) -> None:
    """Every DDP process runs `train`: each would pre-adapt into the same folder."""
    devices, nodes = trainer_cfg.get("devices", 1), trainer_cfg.get("num_nodes", 1)
    if devices in (1, "1") and nodes in (1, None):
        return
    raise ConfigError(
        "trainer.devices",
        devices,
        "1 with preadapt (one process pre-adapts the encoder); for several devices pre-adapt "
        "in a one-device run (trainer.max_steps=0), then train with backbone=hf "
        "backbone.name_or_path=<that run>/preadapted_backbone",
    )


def _preadapt_settings(node: DictConfig) -> Preadapt:
    check_arguments(Preadapt, node, "preadapt")
    values = OmegaConf.to_container(node, resolve=True)
    values["peft"] = make_peft_config("preadapt", node.get("peft"))
    return Preadapt(**values)


def _preadapt(cfg: DictConfig, checked: Checked, settings: Preadapt):
    """Fit `ItemContrastive` on the training sequences' co-occurring pairs; the backbone
    with its adapter merged."""
    backbone = instantiate(cfg.backbone)
    data = prepare(
        checked.source, checked.settings, checked.task, backbone.tokenizer, backbone.max_length
    )
    pairs = cooccurring_pairs(data.split.train, settings.window)
    if not len(pairs):
        raise ConfigError(
            "preadapt.window",
            settings.window,
            f"training sequences with two items or more; {data.name} has no co-occurring pair",
        )
    dataset = PairSet(pairs, data.items)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    loader = torch.utils.data.DataLoader(
        dataset,
        settings.batch_size,
        shuffle=True,
        collate_fn=dataset.collate,
        generator=generator,
        drop_last=len(dataset) > settings.batch_size,
    )
    module = ItemContrastive(backbone, settings)
    # One device, no validation or checkpoints: a short stage whose output is the folder.
    trainer = instantiate(
        cfg.trainer,
        max_steps=settings.steps,
        max_epochs=-1,
        min_epochs=None,
        devices=1,
        strategy="auto",
        num_nodes=1,
        limit_val_batches=0,
        val_check_interval=1.0,
        check_val_every_n_epoch=1,
        limit_train_batches=1.0,
        accumulate_grad_batches=1,
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        default_root_dir=str(Path(cfg.paths.output_dir) / "preadapt"),
    )
    trainer.fit(module, train_dataloaders=loader)
    return module.adapted()


# -- saved models ---------------------------------------------------------------------------
def load_model(directory: str | Path) -> RecsysLM:
    """Rebuild a model saved by `recsys_lm.models.export.save_model`, in eval mode. Heads
    resize their data-sized tensors from the saved weights (Head.data_sized), so no data is
    needed; `load_run` also attaches the data for `score` / `recommend`."""
    directory = Path(directory)
    cfg = OmegaConf.load(directory / CONFIG)
    module = without_frozen_cache(build_module(cfg))
    state = torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True)
    _, unexpected = module.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"{directory / WEIGHTS}: weights the model does not have: {unexpected}")
    return module.eval()


def without_frozen_cache(module: RecsysLM) -> RecsysLM:
    """A saved model runs without `freeze.cache_frozen`'s cache: it pays off for texts that
    recur across steps and epochs, whereas serving sees new histories all the time (the
    cache would only grow), and ONNX export traces the plain model (the cached forward
    reads token ids on the host). Outputs are the same in eval mode, cache or not."""
    module.backbone.frozen_cache = None
    return module


def warm_start(module: RecsysLM, directory: str | Path) -> None:
    """Start `module` (built and attached to its data) from a saved model's weights: the
    refresh's warm start. The optimizer and LR schedule start fresh. The model must have
    the same architecture and catalogue size; a mismatch names the tensor."""
    directory = Path(directory)
    file = directory / WEIGHTS
    if not file.is_file():
        raise ConfigError("init_from", str(directory), f"a saved model folder ({file} is missing)")
    state = torch.load(file, map_location="cpu", weights_only=True)
    own = module.state_dict()
    for name, value in state.items():
        if name in own and isinstance(value, torch.Tensor) and _reshaped(value, own[name]):
            raise ConfigError(
                "init_from",
                str(directory),
                f"weights of this model's shapes ({name}: saved {tuple(value.shape)}, "
                f"model {tuple(own[name].shape)}; a changed catalogue or architecture?)",
            )
    _, unexpected = module.load_state_dict(state, strict=False)
    if unexpected:
        raise ConfigError("init_from", str(directory), f"this model's weights, not {unexpected}")


def _reshaped(saved: torch.Tensor, own: torch.Tensor) -> bool:
    # A one-element tensor saved 0-d (the retrieval temperature before trainer=fsdp) loads:
    # the head's own load hook reshapes it.
    return saved.shape != own.shape and not (saved.dim() == 0 and own.numel() == 1)


@dataclass
class Run:
    """A trained run, ready for inference: `model.recommend(data.history(user), k=10)`."""

    model: RecsysLM
    data: PreparedData
    config: DictConfig


def load_run(run_dir: str | Path) -> Run:
    """The model of a finished run (`<run>/model`) with its data prepared again (from the
    Parquet and token caches: seconds) and attached, using the run's own config."""
    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    model = load_model(run_dir / "model")
    checked = check_config(cfg)
    backbone = model.backbone
    data = prepare(
        checked.source, checked.settings, model.task, backbone.tokenizer, backbone.max_length
    )
    model.attach(data)
    return Run(model.eval(), data, cfg)


def load_flavour(
    export_dir: str | Path, flavour: str = "eager", threads: int | None = None
) -> RecsysLM:
    """The trained module of an export (`python -m recsys_lm.export`) in one inference
    flavour, in eval mode, without data (`attach` it for score / recommend): `eager` is the
    trained model itself; every other flavour is the merged model (plain weights, peft=none)
    transformed as its name says (serving/flavours.py); the quantised ones (int8, onnx-int8)
    embed items with the merged weights and only users in int8. `threads`: onnxruntime's intra-op
    threads for the ONNX flavours (default: every core)."""
    export_dir = Path(export_dir)
    if flavour == flavours.EAGER:
        return load_model(export_dir / "model")
    wanted = flavours.parse(flavour)
    if not (export_dir / wanted.folder).is_dir():
        raise ConfigError("flavour", flavour, f"a flavour exported in {export_dir}")
    merged = export_dir / flavours.FOLDER / flavours.MERGED
    module = without_frozen_cache(build_module(flavours.load_config(merged)))
    flavours.load_head(module, merged)
    # Quantised flavours embed items (offline, once) with the exact merged weights: only the
    # per-request user side runs in int8 (RecsysLM.use_item_backbone).
    if wanted.kind == flavours.INT8:
        module.use_item_backbone(copy.deepcopy(module.backbone).eval())  # quantised in place
        recipe = flavours.read_recipe(export_dir / wanted.folder)
        flavours.quantize_int8(module.backbone, recipe["config"])
    elif wanted.kind == flavours.PRUNED:
        flavours.prune_layers(module.backbone, wanted.layers)
    elif wanted.kind in (flavours.ONNX, flavours.ONNX_INT8):
        graph = export_dir / wanted.folder / flavours.GRAPH
        if wanted.kind == flavours.ONNX_INT8:
            module.use_item_backbone(module.backbone.eval())
        module.backbone = flavours.OnnxBackbone(graph, module.backbone, threads)
        query = export_dir / wanted.folder / flavours.QUERY_GRAPH
        if query.is_file():  # the head's own user-side network, compiled
            module.head.use_query_network(flavours.OnnxQuery(query, threads))
    return module.eval()


def load_export(
    export_dir: str | Path,
    flavour: str = "eager",
    threads: int | None = None,
    index_backend: str = "exact",
    index_options: dict | None = None,
    verify: bool = True,
) -> ServedModel:
    """An export folder (`python -m recsys_lm.export`) served in one flavour: the module, the
    catalogue, the serving settings, the users' histories and the flavour's item vectors
    (computed at export; embedded again only where the export has none). `verify` checks
    every file against the manifest's checksums first: a half-copied or edited export is
    refused, naming the files."""
    export_dir = Path(export_dir)
    manifest_file = export_dir / "manifest.json"
    if not manifest_file.is_file():
        raise DataError(f"{export_dir}: not an export (no manifest.json)")
    manifest = json.loads(manifest_file.read_text())
    if verify:
        verify_export(export_dir, manifest)
    module = load_flavour(export_dir, flavour, threads)
    users = pd.read_parquet(export_dir / "users.parquet")
    histories = {
        str(user): [str(item) for item in history]
        for user, history in zip(users["user_id"], users["history"], strict=True)
    }
    vectors = export_dir / "vectors" / f"{flavour}.npy"
    return ServedModel(
        module,
        pd.read_parquet(export_dir / "catalogue.parquet"),
        ServingData(**json.loads((export_dir / "serving.json").read_text())),
        version=manifest["version"],
        flavour=flavour,
        users=histories,
        vectors=np.load(vectors) if vectors.is_file() else None,
        index_backend=index_backend,
        index_options=index_options,
    )


def verify_export(export_dir: Path, manifest: dict) -> None:
    """Every file the manifest lists is there with its checksum."""
    bad = []
    for name, digest in manifest.get("files", {}).items():
        path = export_dir / name
        if not path.is_file() or file_sha256(path) != digest:
            bad.append(name)
    if bad:
        raise DataError(f"{export_dir}: files missing or changed since export: {bad[:5]}")


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks (exports hold 100 MB weight files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
