"""Training throughput of the framework's click pipeline vs the naive tutorial loop, on CPU.

    python benchmarks/bench_throughput.py [--root DIR] [--steps 20] [--batch-size 16]
                                          [--backbone minilm|tiny_bert] [--seed 0]

Both loaders feed the same model class (RecsysLM + ClickHead, seeded init) the same training
rows of MovieLens-100K (history [SEP] candidate) with the same batch size and step count; only
the data path differs. Naive: a Dataset that joins the history titles with " ; " and calls the
tokenizer on every sample, padding to max_length=128 (default collate). Framework: RecDataModule's
loader (token ids cached once, dynamic padding, length-grouped batches). Each config runs 2
untimed warm-up steps on other rows, then times one pass over the measured rows, loader
construction and data loading included (num_workers=0 for both).

The measured rows are a seeded random sample of the training rows. Length grouping sorts
within mega-batches of min(rows // (4 * batch), 50) batches, so a short run groups less than a
full epoch does: the padding saving here is a lower bound. The two paths also truncate
differently (the tokenizer cuts the joined history at 128 tokens, keeping its oldest part; the
framework keeps whole recent items within 96 tokens), hence the real-tokens column.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from omegaconf import OmegaConf
from peft import LoraConfig
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

from recsys_lm.data.datamodule import RecDataModule
from recsys_lm.data.datasets.examples import ClickSet
from recsys_lm.data.settings import data_settings
from recsys_lm.data.sources.movielens import MovieLens100K
from recsys_lm.data.sources.sample import SampleSource
from recsys_lm.data.tasks import get_task
from recsys_lm.data.text import render
from recsys_lm.models.backbone import Backbone, build_tiny_bert, load_pretrained
from recsys_lm.models.heads.click import ClickHead
from recsys_lm.models.module import RecsysLM

WARMUP = 2
MAX_LENGTH = 128
Row = tuple[int, list[int], int, float]


class NaiveClickSet(Dataset):
    """The tutorial pattern: build the texts and tokenize every sample, padded to max_length."""

    def __init__(self, rows: list[Row], items: list[str], history: list[str], tokenizer) -> None:
        self.rows, self.items, self.history, self.tokenizer = rows, items, history, tokenizer

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        _, past, item, label = self.rows[index]
        text = " ; ".join(self.history[i] for i in past)  # oldest first, most recent last
        encoded = self.tokenizer(
            text,
            self.items[item],
            padding="max_length",
            max_length=MAX_LENGTH,
            truncation=True,
            return_tensors="pt",
        )
        return {**{k: v.squeeze(0) for k, v in encoded.items()}, "labels": torch.tensor(label)}


@dataclass
class Result:
    samples: int = 0
    seconds: float = 0.0
    loading: float = 0.0  # seconds spent waiting for the next batch (text, tokenizer, collate)
    widths: list[int] = field(default_factory=list)
    real: int = 0  # non-padding tokens
    slots: int = 0  # all token positions, padding included


def make_backbone(name: str, seed: int) -> Backbone:
    return build_tiny_bert(seed=seed) if name == "tiny_bert" else load_pretrained()


def make_model(name: str, lora: bool, seed: int) -> RecsysLM:
    torch.manual_seed(seed)  # the same head (and LoRA) init for both loaders
    backbone = make_backbone(name, seed)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1) if lora else None
    return RecsysLM(backbone, ClickHead(backbone.hidden_size), "lora" if lora else "none", config)


def steps(model: RecsysLM, optimizer, loader: Iterable, result: Result | None = None) -> None:
    """Forward + BCE + backward + AdamW step per batch; records timings into `result`."""
    batches = iter(loader)
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            return
        if isinstance(batch, dict):  # default collate: a dict of tensors
            batch = SimpleNamespace(**batch)
        if result is not None:
            result.loading += time.perf_counter() - start
            mask = batch.attention_mask
            result.widths.append(mask.shape[1])
            result.real, result.slots = result.real + int(mask.sum()), result.slots + mask.numel()
            result.samples += mask.shape[0]
        model.head.loss(model.backbone, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def measure(
    args, lora: bool, loader: Callable[[list[Row]], Iterable], warm: list[Row], timed: list[Row]
) -> Result:
    model = make_model(args.backbone, lora, args.seed)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.01
    )
    steps(model, optimizer, loader(warm))  # warm-up on other rows: allocator, kernels, caches
    torch.manual_seed(args.seed)  # the same dropout draws for both loaders
    result = Result()
    start = time.perf_counter()
    steps(model, optimizer, loader(timed), result)  # loader construction counts too
    result.seconds = time.perf_counter() - start
    return result


def data_module(args, tokenizer, scratch: str) -> RecDataModule:
    if (Path(args.root) / "movielens-100k").is_dir():
        source, item_template = MovieLens100K(root=args.root), "{title}. Genres: {genres}."
    else:
        print(f"note: no movielens-100k/ under {args.root}; using the built-in sample data")
        source = SampleSource(flavour="video")
        item_template = "{title}. Genres: {genres}. Director: {director}."
    settings = {
        "eval_mode": "sampled",
        "item_template": item_template,
        "history_template": "{title}",
        "batch_size": args.batch_size,
        "length_grouping": True,
        "max_history_tokens": 96,
        "max_item_tokens": 28,
        "seed": args.seed,
        "use_cache": True,
        "cache_dir": scratch,
    }
    dm = RecDataModule(
        source,
        data_settings(OmegaConf.create(settings)),
        get_task("click"),
        tokenizer,
        MAX_LENGTH,
    )
    dm.prepare_data()
    dm.setup()
    return dm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", default=os.environ.get("RECSYS_LM_DATA_ROOT", "/work/shared/data")
    )
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backbone", choices=("minilm", "tiny_bert"), default="minilm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tokenizer = make_backbone(args.backbone, args.seed).tokenizer
    with tempfile.TemporaryDirectory() as scratch:
        dm = data_module(args, tokenizer, scratch)
    # A seeded random sample of the training rows: the first rows in order all belong to one
    # user, whose history lengths would not represent the data set.
    rows = dm.data.datasets["train"].rows
    need = (args.steps + WARMUP) * args.batch_size
    if need > len(rows):
        raise SystemExit(f"--steps/--batch-size need {need} rows; the data has {len(rows)}")
    chosen = [rows[i] for i in np.random.default_rng(args.seed).permutation(len(rows))[:need]]
    timed, warm = chosen[: args.steps * args.batch_size], chosen[args.steps * args.batch_size :]

    # Naive texts come from the same rendered item table the framework tokenizes.
    items = dm.data.data.items.reset_index(drop=True)
    item_texts = render(items, dm.settings.item_template, "data.item_template")
    history_texts = render(items, dm.settings.history_template, "data.history_template")

    def naive(rows: list[Row]) -> DataLoader:
        dataset = NaiveClickSet(rows, item_texts, history_texts, tokenizer)
        return DataLoader(dataset, batch_size=args.batch_size, num_workers=0)  # rows are shuffled

    def framework(rows: list[Row]) -> DataLoader:
        dm.data.datasets["train"] = ClickSet(rows, dm.data.tokens, dm.settings.max_history_tokens)
        return dm.train_dataloader()

    results: dict[tuple[str, str], Result] = {}
    for tuning, lora in (("full", False), ("LoRA", True)):
        for name, loader in (("naive", naive), ("framework", framework)):
            results[name, tuning] = measure(args, lora, loader, warm, timed)

    rate = {key: r.samples / r.seconds for key, r in results.items()}
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, fp32 CPU"
    )
    print(
        f"data: {dm.source.name}, {len(rows)} training rows, {len(timed)} timed "
        f"({WARMUP} warm-up steps on {len(warm)} other rows)"
    )
    print(f"backbone: {args.backbone}, batch size {args.batch_size}, {args.steps} timed steps")
    # Real tokens/sample: the paths truncate differently, so part of a speed-up can come from
    # reading less text rather than from padding less (see the module docstring).
    table = Table(
        "loader",
        "tuning",
        "samples/s",
        "mean padded length",
        "padding %",
        "real tokens/sample",
        "loading %",
    )
    for (name, tuning), r in results.items():
        table.add_row(
            name,
            tuning,
            f"{rate[name, tuning]:.1f}",
            f"{sum(r.widths) / len(r.widths):.1f}",
            f"{100 * (1 - r.real / r.slots):.1f}",
            f"{r.real / r.samples:.1f}",
            f"{100 * r.loading / r.seconds:.1f}",
        )
    Console(width=120).print(table)  # a fixed width: piped output would otherwise wrap at 80
    for label, ours, theirs in (
        ("framework vs naive, full fine-tuning", ("framework", "full"), ("naive", "full")),
        ("framework vs naive, LoRA", ("framework", "LoRA"), ("naive", "LoRA")),
        (
            "framework LoRA vs naive full fine-tuning (the tutorial setup)",
            ("framework", "LoRA"),
            ("naive", "full"),
        ),
    ):
        print(f"{label}: {rate[ours] / rate[theirs]:.2f}×")


if __name__ == "__main__":
    main()
