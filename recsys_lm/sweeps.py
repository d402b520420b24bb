"""Collect the metrics.json of a run or a Hydra multirun into one table, one row per run.

python -m recsys_lm.sweeps logs/train/multiruns/2026-11-28_19-50-00 --csv sweep.csv
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
from rich.console import Console
from rich.table import Table

from recsys_lm.errors import DataError, RecsysLMError

METRICS_FILE = "metrics.json"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
PROTOCOL_KEYS = ("dataset", "eval_mode", "k", "split")
# The CLI prints only these groups by default: the full table is too wide for a terminal.
SHOWN_PREFIXES = ("test/", "params.trainable_pct", "timing.fit_s")
WIDE_OUTPUT = 400


def collect(path: str | Path) -> pd.DataFrame:
    """One row per metrics.json below `path` (a run folder or a multirun folder)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    files = list(root.rglob(METRICS_FILE))
    if not files:
        raise DataError(f"no {METRICS_FILE} found under {root}")
    rows = sorted(
        ((_overrides(f.parent), _row(root, f)) for f in files),
        key=lambda row: _natural_key(row[1]["run"]),
    )
    # Override columns come right after `run`, so the swept knobs sit next to the run name.
    override_keys = list(dict.fromkeys(k for overrides, _ in rows for k in overrides))
    table = pd.DataFrame([{**fields, **overrides} for overrides, fields in rows])
    rest = [c for c in table.columns if c != "run" and c not in override_keys]
    table = table[["run", *override_keys, *rest]]
    for key in override_keys:
        table[key] = _numeric_if_possible(table[key])
    return table


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    # Job folders are numbered 0_, 1_, ..., 10_: plain string order would put 10_ before 2_.
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]


def _row(root: Path, file: Path) -> dict[str, Any]:
    """The flat columns of one metrics.json (overrides are added by the caller)."""
    result = _read_json(file)
    row: dict[str, Any] = {"run": _run_name(root, file.parent)}
    row.update({f"run.{k}": v for k, v in result.get("run", {}).items()})
    for split in ("test", "val"):
        row.update({f"{split}/{m}": v for m, v in result.get(split, {}).items()})
    for name, scores in result.get("baselines", {}).items():
        row.update({f"{name}/test/{m}": v for m, v in scores.get("test", {}).items()})
    protocol = result.get("protocol", {})
    row.update({f"protocol.{k}": protocol.get(k) for k in PROTOCOL_KEYS})
    params = result.get("params", {})
    trainable, total = params.get("trainable"), params.get("total")
    row["params.trainable"], row["params.total"] = trainable, total
    row["params.trainable_pct"] = (
        100 * trainable / total if trainable is not None and total else None
    )
    timing = result.get("timing", {})
    row["timing.fit_s"], row["timing.total_s"] = timing.get("fit_s"), timing.get("total_s")
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


def _overrides(run_dir: Path) -> dict[str, str | None]:
    """The job's command-line overrides as key -> value; empty for runs without .hydra/."""
    file = run_dir / OVERRIDES_FILE
    if not file.is_file():
        return {}
    try:
        items = yaml.safe_load(file.read_text(encoding="utf-8")) or []
    except (yaml.YAMLError, ValueError) as err:
        raise DataError(f"{file}: not valid YAML: {err}") from err
    if not isinstance(items, list):
        raise DataError(f"{file}: expected a list of overrides, got {type(items).__name__}")
    return dict(_split_override(str(item)) for item in items)


def _split_override(item: str) -> tuple[str, str | None]:
    # Hydra's `+key=v`, `++key=v` and `~key` prefixes say how to apply, not which key.
    key, sep, value = item.partition("=")
    return key.lstrip("+~"), value if sep else None


def _numeric_if_possible(column: pd.Series) -> pd.Series:
    # Overrides are command-line text; a column of numbers (lr, seed) should sort and plot as such.
    try:
        return pd.to_numeric(column)
    except (ValueError, TypeError):
        return column


def shown_columns(table: pd.DataFrame) -> list[str]:
    """The columns the CLI prints by default: run, overrides, test metrics, baselines, cost."""
    fixed = ("run.", "test/", "val/", "protocol.", "params.", "timing.")
    overrides = [
        c for c in table.columns if c != "run" and "/test/" not in c and not c.startswith(fixed)
    ]
    picked = [c for c in table.columns if c.startswith(SHOWN_PREFIXES) or "/test/" in c]
    return ["run", *overrides, *picked]


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
    parser.add_argument("path", type=Path, help="a run folder or a multirun folder")
    parser.add_argument("--csv", type=Path, help="also write the full table to this CSV file")
    parser.add_argument("--all", action="store_true", help="print every column, not a summary")
    args = parser.parse_args(argv)
    try:
        table = collect(args.path)
    except RecsysLMError as err:
        # Same contract as recsys_lm.train: a user mistake is one line, not a traceback.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    rich_table = to_rich(table, None if args.all else shown_columns(table))
    console = Console()
    if not console.is_terminal:
        # Piped or logged output would be squeezed to 80 columns and cut every header.
        console = Console(width=Console(width=WIDE_OUTPUT).measure(rich_table).maximum)
    console.print(rich_table)
    if args.csv:
        table.to_csv(args.csv, index=False)
        print(f"wrote {len(table)} rows x {table.shape[1]} columns to {args.csv}")


if __name__ == "__main__":
    main()
