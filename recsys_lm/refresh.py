"""`python -m recsys_lm.refresh run=<model> events=<event log or file> [registry=<dir>]`:
re-fine-tune a model on the behaviour logged since it was trained, gate it, version it.

One run, idempotent (conf/refresh.yaml documents every key):

1. **Parent**: `run` is a training run, an export or a registry version (`<registry>/current`).
   Its record says its data cut-off (interactions after it are new to it) and its watermark
   (the last event-log sequence number, or the newest file timestamp, it has read).
2. **Plan**: the new interactions are read once: the event log's events after the watermark,
   up to the log's end at that moment (or a file's rows after the cut-off). The range is
   written to `plan.json` before anything trains; a rerun of a killed refresh finds the plan
   and uses exactly those events again, and a finished refresh of the same range is not
   repeated. With `window=k` instead (the rolling protocol), the new data is window k-1 of
   the parent's own dataset.
3. **Fine-tune**: the parent's config, with its data plus every logged interaction so far
   (`data.new_interactions`), split `rolling` at the newest `holdout` share of the new ones;
   warm-started from the parent's weights (`init_from`), trained for `budget` on the fresh
   examples plus `replay` x as many older ones, early-stopped on the slice before the
   holdout. A killed fine-tune resumes from its newest checkpoint.
4. **Gate**: the parent and the new model are scored on the same held-out slice (the newest
   data, prequentially); the new one passes if not worse by more than `gate.margin`.
   `refresh.json` records both scores, the decision and the reason.
5. **Version**: with `registry`, the new model is exported and registered (parent, data
   window, watermark, metrics, gate); if it passed it is promoted and `service` hot-reloads.
   A refresh killed anywhere before the promotion leaves the served version and `current`
   as they were.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from recsys_lm import export as export_entry
from recsys_lm import registry as reg
from recsys_lm import train as train_entry
from recsys_lm.build import check_config, evaluate_saved
from recsys_lm.data.appended import read_interactions, seconds
from recsys_lm.data.prepared import EXTRA_TESTS, load_canonical
from recsys_lm.durable import atomic_write_text, newest_checkpoint
from recsys_lm.errors import ConfigError, RecsysLMError
from recsys_lm.serving.store import open_store

log = logging.getLogger("recsys_lm.refresh")
CONFIG_DIR = train_entry.CONFIG_DIR
PLAN, RECORD, EVENTS = "plan.json", "refresh.json", "events.parquet"
STORE_SCHEMES = ("sqlite://", "redis://", "rediss://")
# Tasks whose training examples know which interaction they predict (fresh or replayed).
REFRESHABLE = ("sequential", "retrieval")
PAGE = 10_000  # events read from the log per call


class RefreshError(RecsysLMError):
    """A refresh that cannot be carried out (the message says why)."""


class NothingNew(RefreshError):
    """No interaction after the parent's watermark: nothing to do (not a failure)."""


@dataclass
class Parent:
    """The model being refreshed."""

    run_dir: Path  # its training run (config)
    model_dir: Path  # the weights to start from
    version: str | None  # its registry version, if it has one
    cutoff: int  # Unix time: interactions at or after it are new to the model
    seq: int  # event-log watermark: the last sequence number it has read (0: none)
    newest: int  # file watermark: the newest timestamp in its data
    record: dict[str, Any]  # its refresh record ({} for a plain training run)

    @property
    def config(self) -> DictConfig:
        return OmegaConf.load(self.run_dir / ".hydra" / "config.yaml")

    @property
    def name(self) -> str:
        return self.version or self.run_dir.name


# -- the parent ----------------------------------------------------------------------------------
def find_parent(path: str | Path) -> Parent:
    """A training run, an export or a registry version, with its cut-off and watermark."""
    path = Path(path).expanduser()
    version = None
    record: dict[str, Any] = {}
    if (path / reg.MANIFEST).is_file():  # an export or a registry version
        manifest = json.loads((path / reg.MANIFEST).read_text())
        run_dir, model_dir = Path(manifest["source_run"]), path / "model"
        if (path / reg.VERSION_FILE).is_file():
            version = json.loads((path / reg.VERSION_FILE).read_text())["version"]
    elif (path / ".hydra" / "config.yaml").is_file():
        run_dir, model_dir = path, path / "model"
    else:
        raise RefreshError(f"run={path}: not a training run, an export or a registry version")
    for needed in (run_dir / ".hydra" / "config.yaml", run_dir / "metrics.json", model_dir):
        if not needed.exists():
            raise RefreshError(
                f"run={path}: {needed} is missing (a finished run with export_model)"
            )
    if (run_dir / RECORD).is_file():
        record = json.loads((run_dir / RECORD).read_text())
        return Parent(
            run_dir, model_dir, version, record["cutoff"], record["watermark"]["seq"],
            record["watermark"]["newest"], record,
        )  # fmt: skip
    cutoff, newest = _data_cut(run_dir)
    return Parent(run_dir, model_dir, version, cutoff, 0, newest, record)


def _data_cut(run_dir: Path) -> tuple[int, int]:
    """(cut-off, newest timestamp) of a plain training run: a rolling run trained on what
    came before its validation slice; any other on its whole dataset."""
    protocol = json.loads((run_dir / "metrics.json").read_text())["protocol"]
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    checked = check_config(cfg)
    times = load_canonical(checked.source, checked.settings).interactions["timestamp"]
    newest = int(times.max())
    if "rolling" in protocol:
        return int(protocol["rolling"]["val_start"]), newest
    return newest + 1, newest


# -- the plan: which interactions are new --------------------------------------------------------
@dataclass
class Plan:
    parent: str
    source: str  # "window" | "log" | "file"
    window: int | None = None  # rolling protocol: the window refreshed for
    seq_from: int = 0  # event log: events after this sequence number...
    seq_to: int = 0  # ...up to and including this one
    newest: int = 0  # the newest timestamp of the data after this refresh
    new_rows: int = 0  # new interactions read
    holdout_start: int | None = None  # Unix time where the gate's held-out slice begins


def plan_refresh(cfg: DictConfig, parent: Parent, folder: Path) -> Plan:
    """The plan in `folder` if a refresh already made one there, else a new one (written
    before anything trains, with the new interactions as `events.parquet`)."""
    if (folder / PLAN).is_file():
        plan = Plan(**json.loads((folder / PLAN).read_text()))
        log.info("refresh %s: continuing its plan (%s)", folder, plan)
        return plan
    if cfg.window is not None:
        plan = Plan(parent.name, "window", window=int(cfg.window), newest=parent.newest)
    else:
        new, plan = _read_new(cfg, parent)
        _write_events(parent, new, folder / EVENTS)
        plan.holdout_start = _holdout_start(new["timestamp"].to_numpy(), cfg.holdout)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / PLAN, json.dumps(asdict(plan), indent=2))
    return plan


def _read_new(cfg: DictConfig, parent: Parent) -> tuple[pd.DataFrame, Plan]:
    source = str(cfg.events)
    if source.startswith(STORE_SCHEMES):
        frame, last = read_log(source, parent.seq)
        plan = Plan(parent.name, "log", seq_from=parent.seq, seq_to=last)
    else:
        rows = read_interactions(source)
        frame = rows[seconds(rows["timestamp"], source) > parent.newest]  # bad rows named
        plan = Plan(parent.name, "file", seq_from=parent.seq, seq_to=parent.seq)
    if frame.empty:
        raise NothingNew(
            f"events={source}: nothing new after the parent's watermark "
            f"(seq {parent.seq}, newest time {parent.newest}): nothing to refresh"
        )
    plan.new_rows = len(frame)
    plan.newest = max(parent.newest, int(pd.to_numeric(frame["timestamp"]).max()))
    return frame, plan


def read_log(url: str, after: int) -> tuple[pd.DataFrame, int]:
    """Every event after sequence number `after` up to the log's end now, as interactions,
    and the last sequence number read (the new watermark)."""
    store = open_store(url)
    try:
        end = store.last_seq()
        events, seq = [], after
        while seq < end:
            page = [e for e in store.events_after(seq, PAGE) if e.seq <= end]
            if not page:
                break
            events.extend(page)
            seq = page[-1].seq
    finally:
        store.close()
    frame = pd.DataFrame(
        {
            "user_id": [e.user for e in events],
            "item_id": [e.item for e in events],
            "timestamp": [int(e.time) for e in events],
        }
    )
    return frame, (events[-1].seq if events else after)


def _write_events(parent: Parent, new: pd.DataFrame, path: Path) -> None:
    """Every logged interaction so far: the parent's (if it had any) plus the new ones."""
    earlier = parent.config.data.get("new_interactions")
    parts = [read_interactions(earlier)] if earlier else []
    frame = pd.concat([*parts, new], ignore_index=True).astype(
        {"user_id": str, "item_id": str, "timestamp": "int64"}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def _holdout_start(times: np.ndarray, share: float) -> int:
    if not 0 < share < 1:
        raise ConfigError("holdout", share, "a fraction between 0 and 1")
    ordered = np.sort(times)
    return int(ordered[-max(1, int(round(share * len(ordered))))])


# -- the fine-tune -------------------------------------------------------------------------------
def child_config(cfg: DictConfig, parent: Parent, plan: Plan, folder: Path) -> DictConfig:
    """The parent's training config, changed into this refresh's fine-tune."""
    child = parent.config
    split = {"method": "rolling", "fresh_after": parent.cutoff - 1, "replay": float(cfg.replay)}
    if plan.source == "window":
        split["window"] = plan.window
    else:
        split.update(
            {"cuts": [plan.holdout_start], "windows": 1, "window": 0, "val_ratio": cfg.val_ratio}
        )
    with open_dict(child):
        for key, value in split.items():
            child.data.split[key] = value
        if plan.source != "window":
            child.data.new_interactions = str((folder / EVENTS).resolve())
        child.init_from = str(parent.model_dir.resolve())
        child.ckpt_path = None
        child.resume = None
        child.export_model = True
        child.baselines = list(cfg.baselines)
        child.paths.output_dir = str(folder.resolve())
        for key, value in cfg.budget.items():
            child.trainer[key] = value
        if cfg.lr is not None:
            child.optim.lr = float(cfg.lr)
            child.optim.head_lr = float(cfg.lr)
    # `key=value` as on a command line (values parsed as YAML; a leading + is accepted)
    extra = [str(o).lstrip("+") for o in cfg.overrides or []]
    child = OmegaConf.merge(child, OmegaConf.from_dotlist(extra))
    task = check_config(child).task.name
    if task not in REFRESHABLE:
        raise ConfigError(
            "run", str(parent.run_dir), f"a model of a task in {REFRESHABLE}, not {task}"
        )
    return child


def fine_tune(child: DictConfig, folder: Path) -> dict:
    """Train (or finish training) the child in `folder`; its metrics.json (with `timing`)."""
    if (folder / "metrics.json").is_file():
        return json.loads((folder / "metrics.json").read_text())
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(child, folder / ".hydra" / "config.yaml")
    checkpoint = newest_checkpoint(folder / "checkpoints")
    if checkpoint is not None:  # a killed refresh: continue its fine-tune
        with open_dict(child):
            child.ckpt_path = str(checkpoint)
    return train_entry.train(child)


# -- the gate ------------------------------------------------------------------------------------
def gate(cfg: DictConfig, result: dict, current: dict) -> dict[str, Any]:
    """Promote when the new model's held-out metric is not worse than the current model's
    by more than `gate.margin` (relative)."""
    metric = cfg.gate.metric or result["protocol"]["monitor"].removeprefix("val/")
    new, old = result["test"].get(metric), current.get(metric)
    if new is None or old is None:
        raise RefreshError(
            f"gate.metric={metric}: not among the test metrics {list(result['test'])}"
        )
    margin = float(cfg.gate.margin)
    floor = old - margin * abs(old)
    passed = bool(new >= floor)
    change = (new - old) / abs(old) if old else float("inf") if new > old else 0.0
    verdict = "not worse than" if passed else "worse than"
    reason = (
        f"held-out {metric} {new:.4f} vs current {old:.4f} ({change:+.2%}): {verdict} the "
        f"allowed {margin:.1%} below the current model"
    )
    return {
        "metric": metric,
        "new": new,
        "current": old,
        "margin": margin,
        "change": change,
        "decision": "promote" if passed else "reject",
        "reason": reason,
        "rows": result["protocol"].get("eval_rows", {}).get("test"),
    }


# -- the whole run -------------------------------------------------------------------------------
def refresh(cfg: DictConfig) -> dict[str, Any]:
    """One refresh (module doc); returns its record (refresh.json)."""
    _check(cfg)
    parent = find_parent(cfg.run)
    folder = _folder(cfg, parent)
    if (folder / RECORD).is_file():
        log.info("refresh %s: already done", folder)
        return {**json.loads((folder / RECORD).read_text()), "repeated": True}
    plan = plan_refresh(cfg, parent, folder)
    child = child_config(cfg, parent, plan, folder)
    result = fine_tune(child, folder)
    current = evaluate_saved(parent.model_dir, child, ("test", *EXTRA_TESTS))
    decision = gate(cfg, result, current["test"])
    if plan.source == "window":  # its data ends with the window it was tested on
        plan.newest = int(result["protocol"]["rolling"]["bounds"][plan.window + 1]) - 1
    record = {
        "parent": parent.name,
        "parent_run": str(parent.run_dir.resolve()),
        "folder": str(folder.resolve()),
        "plan": asdict(plan),
        "cutoff": result["protocol"]["rolling"]["val_start"],
        "watermark": {"seq": plan.seq_to, "newest": plan.newest},
        "data_window": [parent.cutoff, plan.newest],
        "metrics": {k: result.get(k) for k in ("test", "val", *EXTRA_TESTS)},
        "current_metrics": current,
        "gate": decision,
        "timing": result.get("timing"),
        "version": None,
        "promoted": False,
    }
    if cfg.registry:
        _version(cfg, parent, folder, record)
    log_lineage(child, parent, folder, record)
    atomic_write_text(folder / RECORD, json.dumps(record, indent=2))
    log.info("refresh %s: %s (%s)", folder, decision["decision"], decision["reason"])
    return record


def _check(cfg: DictConfig) -> None:
    if (cfg.events is None) == (cfg.window is None):
        raise ConfigError("events", cfg.events, "an event log or file, or else `window` (not both)")
    if cfg.service and not cfg.registry:
        raise ConfigError(
            "service", cfg.service, "null unless `registry` is set (it reloads a promotion)"
        )


def _folder(cfg: DictConfig, parent: Parent) -> Path:
    """Where this refresh's run lives: `out`, else one folder per parent and event range
    under `<registry>/refresh` (or the Hydra run folder): a rerun finds its own."""
    if cfg.out:
        return Path(cfg.out)
    base = Path(cfg.registry) / "refresh" if cfg.registry else Path(cfg.paths.output_dir)
    if cfg.window is not None:
        return base / f"{parent.name}-window{cfg.window}"
    pending = sorted(base.glob(f"{parent.name}-from{parent.seq}-*"))
    unfinished = [p for p in pending if not (p / RECORD).is_file()]
    if unfinished:  # a killed refresh of this parent: same folder, same plan, same events
        return unfinished[-1]
    if pending:  # this parent was refreshed (and not replaced: rejected) up to...
        end = _source_end(cfg)
        for folder in reversed(pending):
            plan = json.loads((folder / PLAN).read_text())
            if end == (plan["seq_to"] if plan["source"] == "log" else plan["newest"]):
                return folder  # ...the same end: done already, not a new version
    return base / f"{parent.name}-from{parent.seq}-{time.strftime('%Y%m%d-%H%M%S')}"


def _source_end(cfg: DictConfig) -> int:
    """The event log's last sequence number, or a file's newest timestamp, now."""
    source = str(cfg.events)
    if source.startswith(STORE_SCHEMES):
        store = open_store(source)
        try:
            return store.last_seq()
        finally:
            store.close()
    return int(seconds(read_interactions(source)["timestamp"], source).max())


def _version(cfg: DictConfig, parent: Parent, folder: Path, record: dict) -> None:
    """Export, register and (if the gate passed) promote; the record learns the version."""
    registry = reg.Registry(cfg.registry)
    export_dir = folder / "export"
    if not (export_dir / reg.MANIFEST).is_file():
        export_entry.export(_export_config(folder, export_dir, cfg.export_flavours))
    name = _registered(registry, folder)
    if name is None:
        name = registry.register(
            export_dir,
            parent=parent.version,
            window=[str(w) for w in record["data_window"]],
            watermark=record["watermark"]["seq"],
            gate=record["gate"],
            note=f"refresh of {parent.name}",
            extra={"refresh": {k: record[k] for k in ("plan", "cutoff", "watermark", "timing")}},
        )
    record["version"] = name
    if record["gate"]["decision"] == "promote":
        registry.promote(name, reason=record["gate"]["reason"])
        record["promoted"] = True
        if cfg.service:
            record["reload"] = reg.reload_service(cfg.service)


def log_lineage(child: DictConfig, parent: Parent, folder: Path, record: dict) -> None:
    """With W&B logging on (the parent's `logger.wandb`): one `refresh` run that logs the
    new model as an artifact (aliases: its registry version and the gate's outcome) and,
    online, uses the parent's model artifact, so W&B's lineage graph shows every version's
    ancestry. W&B cannot use artifacts offline: there the metadata names the parent."""
    node = (child.get("logger") or {}).get("wandb")
    if node is None:
        return
    import wandb

    name = f"{child.task_name}-model"  # the original run's task name: one name per chain
    offline = bool(node.offline) or os.environ.get("WANDB_MODE") == "offline"
    run = wandb.init(
        project=node.project,
        name=f"refresh-{record['version'] or folder.name}",
        job_type="refresh",
        dir=str(folder),
        mode="offline" if offline else "online",
        config={"gate": record["gate"], "plan": record["plan"]},
    )
    try:
        if not offline:
            used = wandb.Artifact(name, type="model", metadata={"version": parent.version})
            used.add_dir(str(parent.model_dir))
            run.use_artifact(used)
        keep = ("gate", "watermark", "data_window", "metrics", "parent", "parent_run")
        made = wandb.Artifact(name, type="model", metadata={k: record[k] for k in keep})
        made.add_dir(str(folder / "model"))
        state = "promoted" if record["promoted"] else record["gate"]["decision"]
        run.log_artifact(made, aliases=[record["version"] or folder.name, state])
    finally:
        run.finish()


def _registered(registry: reg.Registry, folder: Path) -> str | None:
    """The version a killed refresh already registered from this folder, if any."""
    source = str((folder / "export").resolve())
    for name in registry.names():
        if registry.record(name).get("source") == source:
            return name
    return None


def _export_config(run_dir: Path, out: Path, flavours) -> DictConfig:
    from hydra import compose, initialize_config_dir

    overrides = [f"run={run_dir}", f"out={out}", f"flavours=[{','.join(flavours)}]"]
    if GlobalHydra.instance().is_initialized():
        return compose("export", overrides=overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("export", overrides=overrides)


USER_ERRORS = (RecsysLMError, InstantiationException, OmegaConfBaseException)


def run(cfg: DictConfig) -> dict | int:
    """`refresh(cfg)`, with a user's mistake as one `error: ...` line and exit status 2;
    nothing new since the watermark is exit status 0 (a scheduled run may find nothing)."""
    try:
        record = refresh(cfg)
    except NothingNew as idle:  # a scheduled run with nothing to do has not failed
        print(f"nothing to refresh: {idle}", file=sys.stderr)
        return 0
    except USER_ERRORS as err:
        cause = err.__cause__ if isinstance(err.__cause__, RecsysLMError) else err
        print(f"error: {cause}", file=sys.stderr)
        return 2
    gate_ = record["gate"]
    if record.get("repeated"):
        print(f"already refreshed over the same events ({record['folder']}):")
    print(f"{gate_['decision']}: {gate_['reason']}")
    if record.get("version"):
        state = "promoted" if record["promoted"] else "registered, not promoted"
        print(f"version {record['version']} {state}")
    return record


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="refresh")
def main(cfg: DictConfig) -> None:
    result = run(cfg)
    if isinstance(result, int):
        sys.exit(result)


if __name__ == "__main__":
    main()
