"""`python -m recsys_lm.rolling experiment=refresh_video`: the rolling time protocol, end to end.

For each window k of `data.split` (method=rolling) it measures three models on window k,
each interaction ranked given the history up to it (prequential):

  stale      the model trained for window 0, never updated (only its inputs grow)
  refreshed  window k-1's refreshed model, fine-tuned by `python -m recsys_lm.refresh
             window=k` (warm start, fresh data + replay, `rolling.refresh.*`)
  retrained  trained from scratch on everything before window k (`data.split.window=k`)

plus the baselines of the retrain runs (an ID-only model among them), and the same metrics
over the window's new-item events. Wall times of each retrain and refresh are recorded.
Writes `<run>/rolling.json` and `<run>/rolling.md` (one table per metric). Each step's run
folder is kept: a rerun skips the finished steps (an interrupted protocol resumes).

`seeds=N` runs the whole protocol with seed, seed+1, ... (each in `<run>/seed_<s>/`, a
protocol folder of its own) and adds `<run>/rolling_seeds.json` and `rolling_seeds.md`: every
window's figures as mean ± std over the seeds.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra import compose
from omegaconf import DictConfig, OmegaConf, open_dict

from recsys_lm import refresh as refresh_entry
from recsys_lm import train as train_entry
from recsys_lm.build import evaluate_saved
from recsys_lm.data.prepared import EXTRA_TESTS, NEW_AMONG_NEW, NEW_ITEMS
from recsys_lm.durable import atomic_write_text
from recsys_lm.errors import ConfigError
from recsys_lm.report import format_mean_std, mean_std

log = logging.getLogger("recsys_lm.rolling")
STAGES = ("test", *EXTRA_TESTS)
MODELS = ("stale", "refreshed", "retrained")  # per window, in every table
BASELINES = ("sasrec", "popularity")  # the retrains' ID-only references shown beside them


def retrain(cfg: DictConfig, window: int, folder: Path) -> dict[str, Any]:
    """Train from scratch for `window` in `folder` (or read the finished run)."""
    if (folder / "metrics.json").is_file():
        return json.loads((folder / "metrics.json").read_text())
    run_cfg = cfg.copy()
    with open_dict(run_cfg):
        run_cfg.data.split.window = window
        run_cfg.paths.output_dir = str(folder)
        run_cfg.pop("rolling", None)
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(run_cfg, folder / ".hydra" / "config.yaml")
    return train_entry.train(run_cfg)


def refresh_window(cfg: DictConfig, parent: Path, window: int, folder: Path) -> dict[str, Any]:
    """Refresh `parent` for `window` into `folder` (or read the finished refresh)."""
    if (folder / refresh_entry.RECORD).is_file():
        return json.loads((folder / refresh_entry.RECORD).read_text())
    return refresh_entry.refresh(refresh_config(cfg, parent, window, folder))


def refresh_config(cfg: DictConfig, parent: Path, window: int, folder: Path) -> DictConfig:
    """conf/refresh.yaml for this window, with the experiment's `rolling.refresh` merged in:
    a key refresh.yaml lacks is refused, naming it, except under `budget`, which takes any
    trainer key (val_check_interval, ...)."""
    refresh_cfg = compose(
        "refresh", overrides=[f"run={parent}", f"window={window}", f"out={folder}"]
    )
    options = OmegaConf.to_container(cfg.rolling.refresh, resolve=True)
    budget = options.pop("budget", None) or {}
    refresh_cfg.merge_with(options)
    with open_dict(refresh_cfg):
        refresh_cfg.budget.merge_with(budget)
        refresh_cfg.paths.output_dir = str(folder)
    return refresh_cfg


def protocol(cfg: DictConfig) -> dict[str, Any]:
    split = cfg.data.split
    if split.method != "rolling":
        raise ConfigError("data.split.method", split.method, "rolling (the rolling protocol)")
    out = Path(cfg.paths.output_dir)
    rows = []
    stale_model = refreshed = None
    for window in range(int(split.windows)):
        retrained = retrain(cfg, window, out / f"retrain-w{window}")
        row = {
            "window": window,
            "protocol": retrained["protocol"]["rolling"],
            "new_item_share": retrained["protocol"].get("new_item_share"),
            "new_item_rows": retrained["protocol"]["eval_rows"].get(NEW_ITEMS, 0),
            "new_items": retrained["protocol"].get("new_items", 0),
            "retrained": _scores(retrained),
            "retrain_fit_s": retrained["timing"]["fit_s"],
            "retrain_steps": retrained["timing"]["train_steps"],
            "retrain_total_s": retrained["timing"]["total_s"],
            "baselines": retrained["baselines"],
        }
        if window == 0:
            stale_model = refreshed = out / "retrain-w0"
            row["stale"] = row["refreshed"] = row["retrained"]
        else:
            run_cfg = OmegaConf.load(out / f"retrain-w{window}" / ".hydra" / "config.yaml")
            row["stale"] = evaluate_saved(stale_model / "model", run_cfg, STAGES)
            record = refresh_window(cfg, refreshed, window, out / f"refresh-w{window}")
            row["refreshed"] = {stage: record["metrics"].get(stage) for stage in STAGES}
            row["refresh_fit_s"] = record["timing"]["fit_s"]
            row["refresh_steps"] = record["timing"]["train_steps"]
            row["refresh_total_s"] = record["timing"]["total_s"]
            row["refresh_gate"] = record["gate"]
            refreshed = out / f"refresh-w{window}"
        rows.append(row)
        atomic_write_text(out / "rolling.json", json.dumps(rows, indent=2))
    atomic_write_text(out / "rolling.md", table(rows, int(cfg.data.k)))
    return {"windows": rows}


def protocol_seeds(cfg: DictConfig) -> dict[str, Any]:
    """`seeds=N`: the protocol once per seed in `<run>/seed_<s>/` (finished steps are read
    back, as in one protocol), then `rolling_seeds.json` / `.md` with mean ± std per window."""
    seeds = train_entry.seed_range(cfg)
    if len(seeds) == 1:
        return protocol(cfg)
    out = Path(cfg.paths.output_dir)
    runs = {}
    for seed in seeds:
        one = train_entry.seed_copy(cfg, seed, out / f"seed_{seed}")
        runs[seed] = protocol(one)["windows"]
    summary = summarize_seeds(runs, int(cfg.data.k))
    atomic_write_text(out / "rolling_seeds.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "rolling_seeds.md", seeds_table(summary))
    return summary


def _figures(row: dict, metric: str) -> dict[str, float | None]:
    """The numbers of one window of one seed that `summarize_seeds` averages (None: not run)."""

    def score(scores: dict | None, stage: str) -> float | None:
        return ((scores or {}).get(stage) or {}).get(metric)

    out: dict[str, float | None] = {}
    for stage, label in (("test", "all"), (NEW_AMONG_NEW, "new_among_new")):
        for model in MODELS:
            out[f"{label}/{model}"] = score(row[model], stage)
        for name in BASELINES:
            out[f"{label}/{name}"] = score(row["baselines"].get(name), stage)
    refreshed, retrained = out["all/refreshed"], out["all/retrained"]
    out["all/refreshed_over_retrained"] = (
        refreshed / retrained if row["window"] and refreshed and retrained else None
    )
    for step in ("refresh", "retrain"):
        for what in ("steps", "fit_s"):
            out[f"{step}_{what}"] = row.get(f"{step}_{what}")
    return out


def summarize_seeds(runs: dict[int, list[dict]], k: int) -> dict[str, Any]:
    """{"seeds", "metric", "windows": [{"window", figure: {"mean", "std", "n"}}]}: each
    figure over the seeds that have it (window 0 has no refresh)."""
    metric, windows = f"ndcg@{k}", []
    for window in range(min(len(rows) for rows in runs.values())):
        figures = [_figures(rows[window], metric) for rows in runs.values()]
        entry: dict[str, Any] = {"window": window}
        for name in figures[0]:
            values = [f[name] for f in figures if f[name] is not None]
            if values:
                entry[name] = mean_std(values)
        windows.append(entry)
    return {"seeds": list(runs), "metric": metric, "windows": windows}


def seeds_table(summary: dict) -> str:
    """Markdown: per window, the stale / refreshed / retrained models and the baselines as
    mean ± std over the seeds, on all events and on the new-item events (among the new)."""
    seeds = ", ".join(map(str, summary["seeds"]))
    names = "stale | refreshed | retrained | ID-SASRec | popularity"
    lines = [
        f"All test events, {summary['metric']}, mean ± std over seeds {seeds}:",
        "",
        f"| window | {names} | refreshed / retrained | refresh: steps, fit s | "
        "retrain: steps, fit s |",
        "|---" * 9 + "|",
    ]
    for e in summary["windows"]:
        models = [_cell(e, f"all/{m}") for m in (*MODELS, *BASELINES)]
        ratio = _cell(e, "all/refreshed_over_retrained") if e["window"] else "(same model)"
        lines.append(
            f"| {e['window']} | " + " | ".join(models) + f" | {ratio} | "
            f"{_mean(e, 'refresh_steps')}, {_mean(e, 'refresh_fit_s')} | "
            f"{_mean(e, 'retrain_steps')}, {_mean(e, 'retrain_fit_s')} |"
        )
    lines += [
        "",
        f"New-item events, {summary['metric']} among the window's new items, mean ± std:",
        "",
        f"| window | {names} |",
        "|---" * 6 + "|",
    ]
    for e in summary["windows"]:
        models = [_cell(e, f"new_among_new/{m}") for m in (*MODELS, *BASELINES)]
        lines.append(f"| {e['window']} | " + " | ".join(models) + " |")
    return "\n".join(lines) + "\n"


def _cell(entry: dict, name: str) -> str:
    return format_mean_std(entry[name]) if name in entry else "-"


def _mean(entry: dict, name: str) -> str:
    return f"{entry[name]['mean']:.0f}" if name in entry else "-"


def _scores(result: dict) -> dict:
    return {stage: result.get(stage) for stage in STAGES}


def table(rows: list[dict], k: int) -> str:
    """Markdown, two tables: per window, NDCG@k of the stale / refreshed / retrained models
    and the baselines over all events, with the compute; then over the new-item events,
    ranked among all items and among the new ones."""
    metric = f"ndcg@{k}"

    def get(scores: dict | None, stage: str = "test") -> str:
        value = ((scores or {}).get(stage) or {}).get(metric)
        return "n/a" if value is None else f"{value:.4f}"

    def models(row: dict, stage: str) -> list[str]:
        base = row["baselines"]
        return [get(row[m], stage) for m in MODELS] + [get(base.get(b), stage) for b in BASELINES]

    names = "stale | refreshed | retrained | ID-SASRec | popularity"
    lines = [
        f"All test events, {metric}:",
        "",
        f"| window | events | {names} | refreshed / retrained | refresh: steps, fit s | "
        "retrain: steps, fit s |",
        "|---" * 10 + "|",
    ]
    for row in rows:
        refresh = f"{row['refresh_steps']}, {row['refresh_fit_s']}" if row["window"] else "-"
        lines.append(
            f"| {row['window']} | {row['protocol']['test_interactions']:,} | "
            + " | ".join(models(row, "test"))
            + f" | {_ratio(row['refreshed'], row['retrained'], metric)} | {refresh} | "
            f"{row['retrain_steps']}, {row['retrain_fit_s']} |"
        )
    lines += [
        "",
        f"New-item events (the item first seen in the window), {metric} among all items / "
        "among the window's new items:",
        "",
        f"| window | new-item events (share) | new items | {names} |",
        "|---" * 8 + "|",
    ]
    for row in rows:
        cells = [
            f"{a} / {b}"
            for a, b in zip(models(row, NEW_ITEMS), models(row, NEW_AMONG_NEW), strict=True)
        ]
        lines.append(
            f"| {row['window']} | {row['new_item_rows']:,} ({(row['new_item_share'] or 0):.1%}) | "
            f"{row['new_items']:,} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def _ratio(a: dict, b: dict, metric: str) -> str:
    x, y = (a.get("test") or {}).get(metric), (b.get("test") or {}).get(metric)
    return "n/a" if not x or not y else f"{x / y:.3f}"


@hydra.main(version_base="1.3", config_path=train_entry.CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        result = protocol_seeds(cfg)
    except train_entry.USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if "seeds" in result:
        print(seeds_table(result))
    else:
        print(table(result["windows"], int(cfg.data.k)))


if __name__ == "__main__":
    main()
