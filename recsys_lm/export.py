"""`python -m recsys_lm.export run=<run dir> [flavours=[merged,onnx,...]] [overrides]`: write a
trained run's export folder (conf/export.yaml documents every key).

    <out>/manifest.json      format, version, source run, head, task, the run's metrics, each
                             flavour's recipe and parity figures, every file's sha256
    <out>/model/             the run's saved model (the `eager` flavour)
    <out>/catalogue.parquet  index, item_id, item_text, history_text
    <out>/users.parquet      user_id, history (item ids, oldest first: train + val + test)
    <out>/serving.json       the data settings inference needs (token budgets, prompt, k, ...)
    <out>/vectors/<name>.npy each flavour's item vectors (heads that rank by vectors)
    <out>/flavours/<name>/   flavour.json {name, recipe, parity} + the flavour's files

Each flavour is loaded back from the folder being written (`recsys_lm.build.load_flavour`,
what serving loads) and checked against the trained model on the run's test users
(serving/parity.py): max score difference, top-k overlap, the task's test metric recomputed
by Lightning's `trainer.test`, and backbone latency. A flavour that misses its thresholds
(`parity.*`) refuses the whole export: one `error:` line with the figures, exit status 2, and
nothing written (the folder is built beside the target and renamed into place at the end).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import warnings
from datetime import UTC, datetime
from pathlib import Path

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from hydra.errors import InstantiationException
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from recsys_lm.build import (
    Run,
    build_datamodule,
    build_trainer,
    file_sha256,
    load_flavour,
    load_run,
)
from recsys_lm.durable import atomic_directory, atomic_write_text
from recsys_lm.errors import RecsysLMError
from recsys_lm.models.adapters import is_peft
from recsys_lm.models.export import CONFIG
from recsys_lm.models.module import RecsysLM
from recsys_lm.serving import flavours as fl
from recsys_lm.serving import parity
from recsys_lm.serving.model import catalogue_frame, serving_data, user_histories

log = logging.getLogger("recsys_lm.export")
FORMAT = 1
MANIFEST = "manifest.json"
VECTORS = "vectors"  # vectors/<flavour>.npy: item vectors of heads that rank by vectors
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
# peft's merge and the dynamo exporter warn about their own internals on every export.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
warnings.filterwarnings("ignore", message=".*`isinstance\\(treespec, LeafSpec\\)`.*")
# The ONNX exporter's graph passes log every rewrite at INFO: hundreds of lines per graph.
QUIET_LOGGERS = ("onnxscript", "onnx_ir")


class ParityRefused(RecsysLMError):
    """A flavour missed its parity thresholds; the message carries the figures."""


class Exporter:
    """One export: the trained run, its reference figures, and each flavour's check."""

    def __init__(self, cfg: DictConfig, run: Run, folder: Path) -> None:
        self.cfg, self.run, self.folder = cfg, run, folder
        self.data = run.data
        self.k = int(cfg.parity.k or self.data.k)
        self.metric = self.data.task.monitor_metric(self.data.k)
        settings = cfg.parity
        self.users = parity.sample_users(self.data, int(settings.users), int(settings.seed))
        if not self.users:
            raise RecsysLMError(f"run {cfg.run}: no test users to check parity on")
        self.timing_users = self.users[: int(settings.timing_users)]
        self.scorer = parity.Scorer(
            self.data, self.users, int(settings.candidates), int(settings.seed)
        )
        self.datamodule = build_datamodule(run.config, run.model)
        self.datamodule.data = self.data  # already prepared by load_run: no second pass
        self.reference: dict = {}
        self.reference_scores: list[torch.Tensor] = []

    # -- the trained model -------------------------------------------------------------------
    def measure_reference(self) -> dict:
        model = self.run.model
        log.info("eager (the trained model): test %s and latency", self.metric)
        self.reference = {
            "metric": self.metric,
            "metric_value": self.test_metric(model),
            "latency_ms": self.latency(model),
        }
        self.reference_scores = self.scorer.scores(model)
        return self.reference

    def latency(self, module: RecsysLM) -> float:
        repeats = int(self.cfg.parity.timing_repeats)
        return parity.latency_ms(module, self.data, self.timing_users, repeats)

    def test_metric(self, module: RecsysLM) -> float:
        """The task's monitored metric from `trainer.test` on the run's test loader, with the
        run's own Trainer config (minus its loggers and callbacks: nothing is written into
        the run) and the export's `trainer` overrides."""
        cfg = copy.deepcopy(self.run.config)
        with open_dict(cfg), tempfile.TemporaryDirectory() as root:
            cfg.logger = None
            cfg.callbacks = None
            cfg.trainer.update(OmegaConf.to_container(self.cfg.trainer, resolve=True))
            cfg.trainer.default_root_dir = root
            trainer = build_trainer(cfg, self.data.task)
            result = trainer.test(module, datamodule=self.datamodule, verbose=False)[0]
        return float(result[f"test/{self.metric}"])

    # -- one flavour --------------------------------------------------------------------------
    def check(self, flavour: fl.Flavour, module: RecsysLM) -> dict:
        """The flavour's parity figures; raises ParityRefused when they miss its limits."""
        module.attach(self.data)
        value = self.test_metric(module)  # first: its epoch embeds the catalogue for scoring
        figures = parity.compare(self.reference_scores, self.scorer.scores(module), self.k)
        figures.update(
            users=len(self.users),
            metric=self.metric,
            metric_reference=self.reference["metric_value"],
            metric_value=value,
            metric_change=parity.relative_change(value, self.reference["metric_value"]),
            latency_ms=self.latency(module),
            latency_ms_reference=self.reference["latency_ms"],
        )
        limits, keys = self.limits(flavour)
        figures["limits"] = dataclasses.asdict(limits)
        missed = parity.failures(figures, limits, keys)
        log.info("%s: %s", flavour.name, _summary(figures))
        if missed:
            raise ParityRefused(
                f"flavour `{flavour.name}` refused on {len(self.users)} test users: "
                f"{'; '.join(missed)}"
            )
        return figures

    def limits(self, flavour: fl.Flavour) -> tuple[parity.Limits, str]:
        """Exact flavours: parity.*; int8 ones: parity.int8.*; pruned ones: reported only."""
        p = self.cfg.parity
        if flavour.kind in fl.EXACT:
            return parity.Limits(p.max_score_diff, p.min_overlap, p.max_metric_change), "parity"
        if flavour.kind in fl.QUANTISED:
            q = p.int8
            return (
                parity.Limits(q.max_score_diff, q.min_overlap, q.max_metric_change),
                "parity.int8",
            )
        return parity.Limits(), "none"

    def write(self, flavour: fl.Flavour, merged: RecsysLM | None) -> dict:
        """The flavour's files under flavours/<name>/; returns its recipe."""
        folder = self.folder / flavour.folder
        folder.mkdir(parents=True, exist_ok=True)
        model = self.run.model
        if flavour.kind == fl.MERGED:
            model_cfg = OmegaConf.load(self.folder / "model" / CONFIG)
            fl.write_merged(model, model_cfg, folder)
            return fl.merged_recipe(model, model_cfg.peft.name)
        if flavour.kind == fl.ONNX:
            fl.check_onnx(merged.backbone)
            recipe = fl.export_onnx(merged.backbone, folder / fl.GRAPH, self.cfg.onnx.opset)
            return self._query_graph(merged, folder, recipe)
        if flavour.kind == fl.ONNX_INT8:
            return self._query_graph(merged, folder, self._quantised_graph(merged, folder))
        if flavour.kind == fl.INT8:
            return fl.int8_recipe(self.cfg.int8.config)
        return fl.pruned_recipe(flavour, fl.num_layers(merged.backbone))

    def _query_graph(self, merged: RecsysLM, folder: Path, recipe: dict) -> dict:
        """The head's own user-side network (Head.query_network), if it has one, as a second
        graph beside the backbone's."""
        network = merged.head.query_network()
        if network is not None:
            path = folder / fl.QUERY_GRAPH
            recipe["head"] = fl.export_query(network, network.dim, path, self.cfg.onnx.opset)
        return recipe

    def _quantised_graph(self, merged: RecsysLM, folder: Path) -> dict:
        onnx = self.cfg.onnx
        source = self.folder / fl.FOLDER / fl.ONNX / fl.GRAPH
        with tempfile.TemporaryDirectory() as scratch:
            if not source.is_file():  # onnx-int8 asked for without onnx
                fl.check_onnx(merged.backbone)
                source = Path(scratch) / fl.GRAPH
                fl.export_onnx(merged.backbone, source, onnx.opset)
            return fl.quantize_onnx(source, folder / fl.GRAPH, onnx.per_channel, onnx.reduce_range)


def export(cfg: DictConfig) -> dict:
    """Write the export of `cfg.run` into `cfg.out` (default <run>/export); returns the
    manifest. Raises ParityRefused (nothing written) when a flavour misses its thresholds."""
    run_dir = Path(cfg.run)
    _check_run(run_dir)
    out = Path(cfg.out) if cfg.get("out") else run_dir / "export"
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    run = load_run(run_dir)
    requested = list(cfg.flavours)
    total = _total_layers(run.model) if fl.PRUNED in requested else 0
    wanted = fl.expand(requested, _layers(cfg.pruned), total)
    with atomic_directory(out) as folder:
        shutil.copytree(run_dir / "model", folder / "model")
        _write_tables(run, folder)
        exporter = Exporter(cfg, run, folder)
        entries = {
            fl.EAGER: {"path": "model", "recipe": {}, "parity": exporter.measure_reference()}
        }
        _write_vectors(run.model, folder, fl.EAGER)
        merged = None
        for flavour in wanted:
            log.info("%s: writing and loading", flavour.name)
            entry = {"path": flavour.folder, "recipe": exporter.write(flavour, merged)}
            _write_entry(folder, flavour, {**entry, "parity": None})  # load_flavour reads it
            module = load_flavour(folder, flavour.name, cfg.threads)
            entry["parity"] = exporter.check(flavour, module)
            _write_entry(folder, flavour, entry)
            _write_vectors(module, folder, flavour.name)
            if flavour.kind == fl.MERGED:
                merged = module
            entries[flavour.name] = entry
        manifest = _manifest(run_dir, run, folder, entries)
        atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2))
    log.info("export %s (version %s) written to %s", cfg.run, manifest["version"], out)
    return manifest


@torch.no_grad()
def _write_vectors(module: RecsysLM, folder: Path, name: str) -> None:
    """vectors/<flavour>.npy: the catalogue's item vectors [n_items, d] (float32) for heads
    that rank by vectors, from the flavour that was just checked (after its test epoch, so
    a head that re-embeds item texts has done so with this flavour's backbone); serving
    loads them instead of embedding the catalogue at start-up."""
    head = module.head
    if not head.ranks_by_vectors:
        return
    batches = head.require_catalogue().item_batches(module.hparams.eval_batch_size)
    device = module.item_backbone.device
    parts = [
        head.item_vectors(module.item_backbone, move_data_to_device(b, device)).float().cpu()
        for b in batches
    ]
    (folder / VECTORS).mkdir(exist_ok=True)
    np.save(folder / VECTORS / f"{name}.npy", torch.cat(parts).numpy())


def _write_entry(folder: Path, flavour: fl.Flavour, entry: dict) -> None:
    text = json.dumps({"name": flavour.name, **entry}, indent=2)
    atomic_write_text(folder / flavour.folder / fl.RECIPE_FILE, text)


def _check_run(run_dir: Path) -> None:
    needs = [".hydra/config.yaml", "model/" + CONFIG, "metrics.json"]
    missing = [name for name in needs if not (run_dir / name).is_file()]
    if missing:
        raise RecsysLMError(
            f"run={run_dir}: not a finished run with a saved model (missing {missing}; "
            "a run trained with export_model=true writes model/)"
        )


def _layers(node) -> list[int] | None:
    return None if node is None else [int(n) for n in node]


def _total_layers(module: RecsysLM) -> int:
    model = module.backbone.model
    return len(
        fl.transformer_layers(model.get_base_model() if is_peft(module.backbone) else model)[2]
    )


# -- tables and manifest -------------------------------------------------------------------------
def _write_tables(run: Run, folder: Path) -> None:
    """catalogue.parquet, users.parquet and serving.json (serving/model.py reads them)."""
    data = run.data
    catalogue = catalogue_frame(data)
    pq.write_table(
        pa.Table.from_pandas(catalogue, preserve_index=False), folder / "catalogue.parquet"
    )
    users = user_histories(data)
    table = pa.table(
        {
            "user_id": pa.array(list(users), pa.string()),
            "history": pa.array(list(users.values()), pa.list_(pa.string())),
        }
    )
    pq.write_table(table, folder / "users.parquet")
    settings = dataclasses.asdict(serving_data(data))
    atomic_write_text(folder / "serving.json", json.dumps(settings, indent=2))


def _manifest(run_dir: Path, run: Run, folder: Path, entries: dict) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    files = checksums(folder)
    head = type(run.model.head)
    return {
        "format": FORMAT,
        "version": version(files),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source_run": str(run_dir.resolve()),
        "head": f"{head.__module__}.{head.__qualname__}",
        "task": run.model.task.name,
        "metrics": {k: metrics.get(k) for k in ("test", "val", "protocol")},
        "flavours": entries,
        "files": files,
    }


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` but the manifest, by relative path."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name != MANIFEST:
            out[name] = file_sha256(path)
    return out


def version(files: dict[str, str]) -> str:
    """12 hex digits of sha256 over the sorted `path sha256` lines of what is served (every
    file but the flavours' parity reports, which hold timings): the same weights, tables
    and settings give the same version."""
    lines = "".join(
        f"{name} {digest}\n"
        for name, digest in sorted(files.items())
        if not name.endswith("/" + fl.RECIPE_FILE)
    )
    return hashlib.sha256(lines.encode()).hexdigest()[:12]


def _summary(figures: dict) -> str:
    return (
        f"max score diff {figures['max_score_diff']:.3g}, top-{figures['k']} overlap "
        f"{figures['top_k_overlap']:.4f}, test {figures['metric']} {figures['metric_value']:.4f} "
        f"(trained {figures['metric_reference']:.4f}, {_percent(figures['metric_change'])}), "
        f"latency {figures['latency_ms']:.2f} ms (trained {figures['latency_ms_reference']:.2f})"
    )


def _percent(change: float | None) -> str:
    return "n/a" if change is None else f"{change:+.2%}"


def print_table(manifest: dict) -> None:
    """One line per flavour: the parity figures side by side."""
    print(f"{'flavour':<12} {'max diff':>9} {'overlap':>8} {'metric':>9} {'change':>8} {'ms':>8}")
    for name, entry in manifest["flavours"].items():
        p = entry["parity"]
        if name == fl.EAGER:
            print(
                f"{name:<12} {'':>9} {'':>8} {p['metric_value']:>9.4f} {'':>8} {p['latency_ms']:>8.2f}"
            )
            continue
        print(
            f"{name:<12} {p['max_score_diff']:>9.2g} {p['top_k_overlap']:>8.4f} "
            f"{p['metric_value']:>9.4f} {_percent(p['metric_change']):>8} {p['latency_ms']:>8.2f}"
        )


USER_ERRORS = (RecsysLMError, InstantiationException, OmegaConfBaseException)


def run(cfg: DictConfig) -> dict | int:
    """`export(cfg)`, with a user's mistake or a refused flavour reported as one `error: ...`
    line on stderr and exit status 2."""
    try:
        manifest = export(cfg)
    except USER_ERRORS as err:
        cause = err.__cause__ if isinstance(err.__cause__, RecsysLMError) else err
        print(f"error: {cause}", file=sys.stderr)
        return 2
    print_table(manifest)
    return manifest


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    result = run(cfg)
    if isinstance(result, int):
        sys.exit(result)


if __name__ == "__main__":
    main()
