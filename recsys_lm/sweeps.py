"""Turn a run, a Hydra multirun, a seeds run or a search study into a report: one row per
run (failed ones included, with their error), one row per configuration with mean ± std over
its seeds, and the Pareto front of quality vs trainable parameters vs latency.

python -m recsys_lm.sweeps logs/train/multiruns/2026-11-28_19-50-00 [--out DIR] [--csv FILE]

writes <sweep>/report/{runs,summary}.{parquet,csv} and report.md (--out moves them).
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from rich.console import Console
from rich.table import Table

from recsys_lm.data.tasks import get_task
from recsys_lm.errors import DataError, RecsysLMError
from recsys_lm.launch.record import FAILED_FILE
from recsys_lm.report import format_mean_std, mean_std

METRICS_FILE = "metrics.json"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
PROTOCOL_KEYS = ("dataset", "eval_mode", "k", "split")
# Overrides that do not change what is measured: a configuration is its overrides less these.
NOT_CONFIG = ("seed", "seeds", "resume", "ckpt_path")
# The CLI prints only these groups by default: the full table is too wide for a terminal.
SHOWN_PREFIXES = ("test/", "params.trainable_pct", "timing.fit_s")
# The costs of a configuration, all lower-is-better: the Pareto front's other two axes.
COST_AXES = ("params.trainable", "cost.test_ms_per_query")
COST_COLUMNS = (
    "params.trainable",
    "params.trainable_pct",
    "timing.fit_s",
    "cost.train_samples_per_s",
    "cost.test_ms_per_query",
    "cost.peak_memory_mb",
)
WIDE_OUTPUT = 400
INCOMPLETE = "no metrics.json and no failed.json: killed, or still running"


def collect(path: str | Path) -> pd.DataFrame:
    """One row per run below `path` (a run folder, a multirun, a seeds run or a study):
    a folder with metrics.json, failed.json or .hydra/overrides.yaml and no run inside it.
    `status` is ok, failed (with `error` from failed.json) or incomplete."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    folders = _run_folders(root)
    if not folders:
        raise DataError(
            f"no runs found under {root} (no {METRICS_FILE}, {FAILED_FILE} or {OVERRIDES_FILE})"
        )
    rows = sorted(
        ((_overrides(folder), _row(root, folder)) for folder in folders),
        key=lambda row: _natural_key(row[1]["run"]),
    )
    # Override columns come right after `run`, so the swept knobs sit next to the run name.
    override_keys = list(dict.fromkeys(k for overrides, _ in rows for k in overrides))
    table = pd.DataFrame([{**fields, **overrides} for overrides, fields in rows])
    rest = [c for c in table.columns if c != "run" and c not in override_keys]
    table = table[["run", *override_keys, *rest]]
    for key in override_keys:
        table[key] = _numeric_if_possible(table[key])
    table.attrs["overrides"] = override_keys
    return table


def _run_folders(root: Path) -> list[Path]:
    marked = {f.parent for name in (METRICS_FILE, FAILED_FILE) for f in root.rglob(name)}
    marked |= {f.parent.parent for f in root.rglob(str(OVERRIDES_FILE))}
    # A seeds run or a search study is a folder of runs: only the runs inside count.
    return [f for f in marked if not any(other != f and f in other.parents for other in marked)]


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    # Job folders are numbered 0_, 1_, ..., 10_: plain string order would put 10_ before 2_.
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]


def _row(root: Path, folder: Path) -> dict[str, Any]:
    """The flat columns of one run (overrides are added by the caller)."""
    row: dict[str, Any] = {"run": _run_name(root, folder)}
    if not (folder / METRICS_FILE).is_file():
        failed = folder / FAILED_FILE
        error = _read_json(failed).get("error", "?") if failed.is_file() else INCOMPLETE
        row.update(status="failed" if failed.is_file() else "incomplete", error=error)
        return row
    result = _read_json(folder / METRICS_FILE)
    row.update(status="ok", error=None)
    row.update({f"run.{k}": v for k, v in result.get("run", {}).items()})
    for split in ("test", "val"):
        row.update({f"{split}/{m}": v for m, v in result.get(split, {}).items()})
    for name, scores in result.get("baselines", {}).items():
        row.update({f"{name}/test/{m}": v for m, v in scores.get("test", {}).items()})
    protocol = result.get("protocol", {})
    row.update({f"protocol.{k}": protocol.get(k) for k in (*PROTOCOL_KEYS, "task", "monitor")})
    params = result.get("params", {})
    trainable, total = params.get("trainable"), params.get("total")
    row["params.trainable"], row["params.total"] = trainable, total
    row["params.trainable_pct"] = (
        100 * trainable / total if trainable is not None and total else None
    )
    timing = result.get("timing", {})
    row["timing.fit_s"], row["timing.total_s"] = timing.get("fit_s"), timing.get("total_s")
    row.update({f"cost.{k}": v for k, v in result.get("cost", {}).items()})
    return row


def _run_name(root: Path, run_dir: Path) -> str:
    # Collecting a single run folder would name it "."; its own name says more.
    relative = run_dir.relative_to(root)
    return root.resolve().name if relative == Path(".") else relative.as_posix()


def _read_json(file: Path) -> dict[str, Any]:
    try:
        result = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError both derive from it
        raise DataError(f"{file}: not valid JSON: {err}") from err
    if not isinstance(result, dict):
        raise DataError(f"{file}: expected a JSON object, got {type(result).__name__}")
    return result


def _overrides(run_dir: Path) -> dict[str, Any]:
    """The job's command-line overrides as key -> value, parsed by Hydra's own override
    parser (`+key=v`, `~key`, quoted values, lists); empty for runs without .hydra/."""
    file = run_dir / OVERRIDES_FILE
    if not file.is_file():
        return {}
    try:
        items = yaml.safe_load(file.read_text(encoding="utf-8")) or []
    except (yaml.YAMLError, ValueError) as err:
        raise DataError(f"{file}: not valid YAML: {err}") from err
    if not isinstance(items, list):
        raise DataError(f"{file}: expected a list of overrides, got {type(items).__name__}")
    try:
        parsed = OverridesParser.create().parse_overrides([str(item) for item in items])
    except HydraException as err:
        raise DataError(f"{file}: not a Hydra override: {err}") from err
    return {o.key_or_group: _override_value(o) for o in parsed}


def _override_value(override) -> Any:
    if override.is_delete():
        return None
    value = override.value()
    # Lists and dicts keep their command-line spelling ([popularity], not ['popularity']).
    return (
        value
        if isinstance(value, str | int | float | bool)
        else override.get_value_element_as_str()
    )


def _numeric_if_possible(column: pd.Series) -> pd.Series:
    # Overrides are command-line text; a column of numbers (lr, seed) should sort and plot as such.
    try:
        return pd.to_numeric(column)
    except (ValueError, TypeError):
        # a run without this override has no value: missing, not the text "nan"
        return column.map(lambda v: None if not _present(v) else str(v))


def config_keys(table: pd.DataFrame) -> list[str]:
    """The override columns that define a configuration: not the seed, not Hydra's own."""
    return [
        k
        for k in table.attrs.get("overrides", [])
        if k not in NOT_CONFIG and not k.startswith(("hydra.", "hydra/"))
    ]


def swept_keys(table: pd.DataFrame) -> list[str]:
    """The configuration keys whose value differs between runs: what names a configuration
    (the others are shared by all runs, and said once in the report's header)."""
    return [k for k in config_keys(table) if table[k].astype(str).nunique() > 1]


def shared_overrides(table: pd.DataFrame) -> list[str]:
    swept = swept_keys(table)
    return [
        f"{k}={table[k].iloc[0]}"
        for k in config_keys(table)
        if k not in swept and _present(table[k].iloc[0])
    ]


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (runs with the same overrides but the seed): each metric's
    mean and `<metric>.std` over the seeds that finished, `seeds` and `failed` counts, the
    costs' means, and `pareto`: True where no other configuration is at least as good on
    quality (test/<the monitored metric>), trainable parameters and test latency and
    better on one."""
    keys = config_keys(table)
    table = table.assign(config=_config_names(table))
    metrics = [c for c in table.columns if "test/" in c or c.startswith("val/")]
    rows = []
    for config, runs in table.groupby("config", sort=False):
        done = runs[runs["status"] == "ok"]
        row: dict[str, Any] = {"config": config, **runs.iloc[0][keys].to_dict()}
        row.update(seeds=len(done), failed=int((runs["status"] != "ok").sum()))
        for column in (*(f"protocol.{k}" for k in PROTOCOL_KEYS), "protocol.task"):
            if column in done:
                row[column] = done[column].iloc[0] if len(done) else None
        for metric in metrics:
            values = [float(v) for v in done[metric].dropna()] if metric in done else []
            stats = mean_std(values) if values else {"mean": None, "std": None}
            row[metric], row[f"{metric}.std"] = stats["mean"], stats["std"]
        for column in COST_COLUMNS:
            values = done[column].dropna() if column in done else []
            row[column] = float(values.mean()) if len(values) else None
        rows.append(row)
    summary = pd.DataFrame(rows)
    summary["pareto"] = pareto_front(summary, quality_column(table))
    summary.attrs["quality"] = quality_column(table)
    return summary


def _config_names(table: pd.DataFrame) -> list[str]:
    if not config_keys(table):  # runs without overrides: each run is its own configuration
        return list(table["run"])
    swept = swept_keys(table)
    return [
        " ".join(f"{k}={v}" for k, v in zip(swept, values, strict=True) if _present(v))
        or "(shared overrides only)"
        for values in table[swept].itertuples(index=False)
    ]


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def quality_column(table: pd.DataFrame) -> str | None:
    """test/<the metric the runs' checkpoints were chosen on>, e.g. test/ndcg@10."""
    monitors = table.get("protocol.monitor", pd.Series(dtype=object)).dropna().unique()
    return f"test/{monitors[0].removeprefix('val/')}" if len(monitors) == 1 else None


def pareto_front(summary: pd.DataFrame, quality: str | None) -> list[bool]:
    """Non-dominated configurations over (quality, trainable parameters, latency)."""
    axes = [quality, *COST_AXES]
    if quality is None or any(a not in summary for a in axes):
        return [False] * len(summary)
    higher = _higher_is_better(summary)
    points = [
        None
        if any(not _present(r[a]) for a in axes)
        else (r[quality] * (1 if higher else -1),) + tuple(-float(r[a]) for a in COST_AXES)
        for _, r in summary.iterrows()
    ]
    return [p is not None and not any(_dominates(q, p) for q in points if q) for p in points]


def _higher_is_better(summary: pd.DataFrame) -> bool:
    tasks = summary.get("protocol.task", pd.Series(dtype=object)).dropna().unique()
    try:
        return get_task(str(tasks[0])).monitor_mode == "max" if len(tasks) else True
    except RecsysLMError:
        return True


def _dominates(a: tuple, b: tuple) -> bool:
    return all(x >= y for x, y in zip(a, b, strict=True)) and a != b


def write_report(table: pd.DataFrame, out: Path) -> pd.DataFrame:
    """runs.{parquet,csv}, summary.{parquet,csv} and report.md in `out`; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(table)
    for name, frame in (("runs", table), ("summary", summary)):
        _parquet_safe(frame).to_parquet(out / f"{name}.parquet", index=False)
        frame.to_csv(out / f"{name}.csv", index=False)
    (out / "report.md").write_text(to_markdown(table, summary), encoding="utf-8")
    return summary


def _parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    # Parquet needs one type per column; an override may hold numbers and text (lr=1e-3,auto).
    mixed = [c for c in frame.columns if frame[c].dtype == object]
    return frame.astype({c: "string" for c in mixed})


def to_markdown(table: pd.DataFrame, summary: pd.DataFrame) -> str:
    quality = summary.attrs.get("quality")
    metrics = [c for c in summary.columns if c.startswith("test/") and not c.endswith(".std")]
    baselines = [c for c in summary.columns if "/test/" in c and not c.endswith(".std") and quality]
    baselines = [c for c in baselines if c.endswith(quality.removeprefix("test/"))]
    lines = [
        "# Sweep report",
        "",
        f"Protocol: {_protocol_title(table)}. Metrics are mean ± std over the seeds that "
        "finished (sample std, n in `seeds`). Costs are means over those seeds: training "
        "samples/s over the optimisation batches, test ms per query over the batched test "
        "pass, peak memory as recorded (CUDA max allocated on a GPU, process peak RSS on a "
        f"CPU). ★ = on the Pareto front of {quality or 'quality'} vs trainable parameters "
        "vs test latency.",
        "",
        "Shared by every run: " + (" ".join(f"`{o}`" for o in shared_overrides(table)) or "-"),
        "",
    ]
    header = ["config", "seeds", *metrics, *baselines, "trainable", "trainable %"]
    header += ["fit s", "train samples/s", "test ms/query", "peak MB", "Pareto"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in summary.iterrows():
        cells = [
            f"`{row['config']}`",
            f"{row['seeds']}" + (f" ({row['failed']} failed)" if row["failed"] else ""),
        ]
        cells += [_md_stat(row, m) for m in (*metrics, *baselines)]
        cells += [_md_number(row.get(c), c) for c in COST_COLUMNS]
        cells.append("★" if row["pareto"] else "")
        lines.append("| " + " | ".join(cells) + " |")
    failed = table[table["status"] != "ok"]
    if len(failed):
        lines += ["", f"## Failed or incomplete runs ({len(failed)})", ""]
        swept = [*swept_keys(table), *(k for k in ("seed",) if k in table)]
        for _, row in failed.iterrows():
            error = str(row["error"]).strip().splitlines()[-1] if row["error"] else "?"
            label = " ".join(f"{k}={row[k]}" for k in swept if _present(row[k])) or row["run"]
            lines.append(f"- `{label}` ({row['status']}; folder `{row['run']}`): {error}")
    return "\n".join(lines) + "\n"


def _md_stat(row: pd.Series, metric: str) -> str:
    if not _present(row.get(metric)):
        return "-"
    return format_mean_std({"mean": row[metric], "std": row.get(f"{metric}.std") or 0.0})


def _md_number(value: Any, column: str) -> str:
    if not _present(value):
        return "-"
    if column == "params.trainable":
        return f"{int(value):,}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"


def shown_columns(table: pd.DataFrame) -> list[str]:
    """The columns the CLI prints by default: run, overrides, test metrics, baselines, cost."""
    fixed = ("run.", "test/", "val/", "protocol.", "params.", "timing.", "cost.")
    overrides = [
        c
        for c in table.columns
        if c not in ("run", "status", "error") and "/test/" not in c and not c.startswith(fixed)
    ]
    picked = [c for c in table.columns if c.startswith(SHOWN_PREFIXES) or "/test/" in c]
    return ["run", *overrides, "status", *picked]


def to_rich(table: pd.DataFrame, columns: Sequence[str] | None = None) -> Table:
    """A rich Table of `table`; the title states the protocol when all runs share it."""
    columns = list(columns or table.columns)
    out = Table(title=_protocol_title(table), title_justify="left")
    for name in columns:
        numeric = pd.api.types.is_numeric_dtype(table[name])
        out.add_column(name, justify="right" if numeric else "left")
    for record in table[columns].itertuples(index=False):
        out.add_row(*(_cell(name, value) for name, value in zip(columns, record, strict=True)))
    return out


def _protocol_title(table: pd.DataFrame) -> str:
    parts = []
    for key in PROTOCOL_KEYS:
        values = table.get(f"protocol.{key}", pd.Series(dtype=object)).dropna().unique()
        # Mixed protocols are not comparable: say so instead of picking one.
        shown = values[0] if len(values) == 1 else "MIXED" if len(values) > 1 else "?"
        # a failed run's empty cell turns the column to floats: k=10, not k=10.0
        shown = int(shown) if isinstance(shown, float) and shown.is_integer() else shown
        parts.append(f"{key}={shown}")
    return " | ".join(parts)


def _cell(name: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if "/" in name else f"{value:.4g}"
    if isinstance(value, numbers.Integral) and name.startswith("params."):
        return f"{value:,}"
    return str(value)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m recsys_lm.sweeps", description=__doc__.splitlines()[0]
    )
    parser.add_argument("path", type=Path, help="a run, multirun, seeds run or study folder")
    parser.add_argument("--out", type=Path, help="report folder (default: <path>/report)")
    parser.add_argument("--csv", type=Path, help="also write the runs table to this CSV file")
    parser.add_argument("--all", action="store_true", help="print every column, not a summary")
    args = parser.parse_args(argv)
    try:
        table = collect(args.path)
        out = args.out or args.path / "report"
        write_report(table, out)
    except (RecsysLMError, OSError) as err:
        # Same contract as recsys_lm.train: a user mistake is one line, not a traceback.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    rich_table = to_rich(table, None if args.all else shown_columns(table))
    console = Console()
    if not console.is_terminal:
        # Piped or logged output would be squeezed to 80 columns and cut every header.
        console = Console(width=Console(width=WIDE_OUTPUT).measure(rich_table).maximum)
    console.print(rich_table)
    failed = table[table["status"] != "ok"]
    for _, row in failed.iterrows():
        console.print(
            f"{row['status']}: {row['run']}: {str(row['error']).strip().splitlines()[-1]}"
        )
    if args.csv:
        table.to_csv(args.csv, index=False)
        print(f"wrote {len(table)} rows x {table.shape[1]} columns to {args.csv}")
    print(f"report: {out / 'report.md'} (runs and summary as .parquet and .csv beside it)")


if __name__ == "__main__":
    main()
