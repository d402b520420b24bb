"""Serving latency: sequential head with cached item embeddings vs the click cross-encoder.

    python benchmarks/bench_serving.py [--root ../shared/data] [--users 200] [--device cpu]

One request = one user. The sequential head reads the user's last 50 items through its small
causal transformer and scores the WHOLE catalogue against the cached item vectors (MiniLM ran
once per item, offline), then takes the top 10. The click head runs MiniLM over 100
"history [SEP] candidate" pairs (the held-out item + 99 sampled candidates) and takes the top
10 of those. Token ids come from the same pre-tokenised cache for both, so neither pays
tokenisation. Both are timed in one run, interleaved user by user, on the same device and
threads; medians and p95 are printed with their ratio. Exits 1 if the sequential head is not
faster. Weights are as built (no training): latency does not depend on their values.

MovieLens-100K (1,682 items) is read from --root or $RECSYS_LM_DATA_ROOT; without it the
built-in video sample (400 items) is used and the figures say so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from lightning.fabric.utilities.apply_func import move_data_to_device

from recsys_lm.build import build_datamodule, build_module
from recsys_lm.train import CONFIG_DIR

CANDIDATES = 100  # click: the held-out item + 99 sampled


def compose_config(head: str, data: list[str]) -> object:
    overrides = [f"head={head}", "peft=none", "freeze=head_only", *data]
    if head == "sequential":
        overrides.append("head.net.item_embeddings=cached")
    else:
        overrides.append(f"data.eval_negatives={CANDIDATES - 1}")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def setup(head: str, data: list[str], device: torch.device):
    cfg = compose_config(head, data)
    module = build_module(cfg)
    datamodule = build_datamodule(cfg, module)
    datamodule.prepare_data()
    datamodule.setup()
    module.attach(datamodule.data)
    return module.to(device).eval(), datamodule.data


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.environ.get("RECSYS_LM_DATA_ROOT"))
    parser.add_argument("--users", type=int, default=200, help="timed requests per head")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    has_ml = args.root and (Path(args.root) / "movielens-100k" / "u.data").exists()
    data = ["data=movielens_100k", f"data.root={args.root}"] if has_ml else ["data=sample_video"]

    sequential, seq_data = setup("sequential", data, device)
    click, click_data = setup("click", data, device)
    with torch.no_grad():
        catalogue = sequential.head.require_catalogue()
        batches = (move_data_to_device(b, device) for b in catalogue.item_batches(128))
        sequential.head.cache_items(sequential.backbone, batches)  # offline, once
        sequential.head.on_eval_start(None, [])

    histories = seq_data.datasets["test"]
    pairs = click_data.datasets["test"]  # rows: one user's positive then its 99 negatives
    users = min(args.users, len(histories), len(pairs) // CANDIDATES)
    timings: dict[str, list[float]] = {"sequential": [], "click": []}

    def serve_sequential(u: int) -> None:
        _, history, _ = histories[u]
        sequential.head.recommend(None, history, k=10)

    def serve_click(u: int) -> None:
        rows = [pairs[i] for i in range(u * CANDIDATES, (u + 1) * CANDIDATES)]
        batch = move_data_to_device(pairs.collate(rows), device)
        scores = click.head(click.backbone, batch)  # P(click) per candidate
        scores.topk(10)

    with torch.no_grad():
        for u in range(min(5, users)):  # warm-up: kernels, allocator, caches
            serve_sequential(u)
            serve_click(u)
        for u in range(users):
            for name, serve in (("sequential", serve_sequential), ("click", serve_click)):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                serve(u)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timings[name].append(time.perf_counter() - start)

    dataset = "MovieLens-100K" if has_ml else "built-in video sample"
    print(
        f"{dataset}: {seq_data.num_items} items | device {device} | "
        f"threads {torch.get_num_threads()} | {users} users, one request each"
    )
    median = {}
    for name, what in (
        ("sequential", f"top-10 of all {seq_data.num_items} items (cached item vectors)"),
        ("click", f"top-10 of {CANDIDATES} candidates (MiniLM cross-encoder)"),
    ):
        median[name] = statistics.median(timings[name]) * 1000
        p95 = percentile(timings[name], 0.95) * 1000
        print(f"  {name:<10} {what}: median {median[name]:.2f} ms, p95 {p95:.2f} ms")
    ratio = median["click"] / median["sequential"]
    print(f"  click / sequential latency: {ratio:.1f}x")
    return 0 if ratio > 1 else 1


if __name__ == "__main__":
    sys.exit(main())
