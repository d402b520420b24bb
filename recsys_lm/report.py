"""The readable end-of-run summary: model beside baselines, with the evaluation protocol."""

from __future__ import annotations

from pathlib import Path
from statistics import fmean, stdev

from rich.console import Console
from rich.table import Table


def print_summary(result: dict, output_dir: Path, console: Console | None = None) -> None:
    console = console or Console()
    protocol = result["protocol"]
    cut_off = f" | k={protocol['k']}" if "k" in protocol else ""  # pointwise tasks rank nothing
    table = Table(
        title=f"{protocol['dataset']} | {protocol['split']} | eval {protocol['eval_mode']}"
        f"{cut_off}",
        title_justify="left",
    )
    table.add_column("model")
    metrics = list(result["test"])
    for name in metrics:
        table.add_column(f"test {name}", justify="right")
    run = result["run"]
    table.add_row(
        f"{run['head']} peft={run['peft']} freeze={run['freeze']}",
        *(f"{result['test'][m]:.4f}" for m in metrics),
        style="bold",
    )
    skipped = {n: s["skipped"] for n, s in result["baselines"].items() if "skipped" in s}
    for name, scores in result["baselines"].items():
        if name not in skipped:
            table.add_row(name, *(f"{scores['test'].get(m, float('nan')):.4f}" for m in metrics))
    console.print(table)
    for why in skipped.values():
        console.print(f"baseline skipped: {why}")
    params, timing = result["params"], result["timing"]
    console.print(
        f"trainable params {params['trainable']:,} / {params['total']:,} "
        f"({100 * params['trainable'] / params['total']:.2f}%) | "
        f"fit {timing['fit_s']:.0f}s, eval {timing['eval_s']:.0f}s, total {timing['total_s']:.0f}s"
    )
    console.print(f"outputs: {output_dir.resolve()}  (metrics.json)")


def mean_std(values: list[float]) -> dict[str, float | int]:
    """{"mean", "std", "n"}: std is the sample standard deviation (ddof=1; 0 for one value),
    the spread a reader expects behind "mean ± std over seeds"."""
    n = len(values)
    return {"mean": fmean(values), "std": stdev(values) if n > 1 else 0.0, "n": n}


def over_seeds(results: list[dict]) -> dict[str, dict[str, dict[str, float | int]]]:
    """Each metric of `test`, `val` and every baseline's test over the runs of one
    configuration with different seeds: {"test": {metric: mean_std}, ...}."""
    groups: dict[str, list[dict[str, float]]] = {
        "test": [r["test"] for r in results],
        "val": [r["val"] for r in results],
    }
    for name in results[0].get("baselines", {}):
        tests = [r["baselines"].get(name, {}).get("test") for r in results]
        if all(tests):
            groups[f"{name}/test"] = tests
    return {
        group: {
            m: mean_std([s[m] for s in scores]) for m in scores[0] if all(m in s for s in scores)
        }
        for group, scores in groups.items()
    }


def format_mean_std(stats: dict[str, float | int], digits: int = 4) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
