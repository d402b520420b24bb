"""Training throughput of the framework's click pipeline vs the naive tutorial loop, on CPU.

    python benchmarks/bench_throughput.py [--root DIR] [--steps 20] [--batch-size 16]
                                          [--passes 3] [--val-rows 256] [--configs a,b,...]
                                          [--k 4] [--backbone minilm|tiny_bert] [--seed 0]
                                          [--target-from CONFIG | --budget-from CONFIG]
                                          [--max-passes 12]

Every row feeds the same model class (RecsysLM + ClickHead, seeded init) the same training
rows of MovieLens-100K (history [SEP] candidate) with the same batch size and step count; the
rows differ in the data path and the model-side settings named in the table:

- naive: a Dataset that joins the history titles with " ; " and calls the tokenizer on every
  sample, padding to max_length=128 (default collate); framework: RecDataModule's loader
  (token ids cached once, dynamic padding, length-grouped batches);
- tuning: full fine-tuning or LoRA (r=8 on query/value), each at its strategy's learning rate
  (conf/peft: 5e-5 and 3e-3, head included, AdamW, weight decay 0.01);
- `lora-k`: freeze=bottom_k with k=--k (4 of MiniLM's 6 layers), LoRA only above it
  (`layers_to_transform`: layers 4-5); `cached`: freeze.cache_frozen=true (models/frozen_cache.py);
  `full-k-cached`: the layers above k fully fine-tuned (no adapter, full fine-tuning's rate), cached;
- `eager`: attn_implementation="eager" instead of the default SDPA; `bf16`: CPU autocast to
  bfloat16; `compile`: torch.compile (dynamic shapes) of the layers above k.

Each config runs 2 untimed warm-up steps on other rows, then `--passes` timed passes over the
measured rows (loader construction and data loading included, num_workers=0): the first pass
of a cached config pays for filling the cache, the later ones read it, so both are printed.
After the last pass each model is scored on the same `--val-rows` validation rows (a seeded
sample, each path encoding them its own way): val AUROC, for "equal or better" to be read off,
with a 95% paired bootstrap interval of each compared pair's AUROC difference (same rows).

Time to accuracy (`--target-from naive-full`): that config runs first, for `--passes` passes;
every other config then validates after each of its passes and stops at the first whose val
AUROC reaches the reference's (at most `--max-passes`). Printed: the training seconds each
needed (validation excluded) against the reference's, i.e. how much faster it gets to the same
validation metric, not just how many more samples a second it reads. Stopping at the first
pass that reaches the target picks the best of a noisy curve, which favours the other config.

Equal training time (`--budget-from naive-full`): that config runs first, for `--passes`
passes, and its training seconds are the budget; every other config trains whole passes while
the next one (estimated by its last) still fits in the budget (at least one, at most
`--max-passes`) and is validated once, at the end. No pass is chosen by its validation
metric, so the AUROC difference is an unbiased reading of "equal or better at equal time".

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
from collections.abc import Iterable
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
from torchmetrics.functional.classification import binary_auroc

from recsys_lm.data.datamodule import RecDataModule
from recsys_lm.data.datasets.examples import ClickSet
from recsys_lm.data.settings import data_settings
from recsys_lm.data.sources.movielens import MovieLens100K
from recsys_lm.data.sources.sample import SampleSource
from recsys_lm.data.tasks import get_task
from recsys_lm.data.text import render
from recsys_lm.models.backbone import Backbone, build_tiny_bert, load_pretrained
from recsys_lm.models.freezing import BottomK, layer_stack
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


@dataclass(frozen=True)
class Config:
    """One row of the table: the data path and the model-side settings."""

    name: str
    loader: str  # naive | framework
    lora: bool
    bottom_k: bool = False  # freeze=bottom_k with k=--k, LoRA only above it
    cache: bool = False  # freeze.cache_frozen
    attention: str = "sdpa"  # sdpa | eager
    bf16: bool = False  # torch.autocast("cpu", torch.bfloat16) around forward and loss
    compile: bool = False  # torch.compile of the layers above k


CONFIGS = {
    c.name: c
    for c in (
        Config("naive-full", "naive", lora=False),
        Config("naive-lora", "naive", lora=True),
        Config("framework-full", "framework", lora=False),
        Config("framework-lora", "framework", lora=True),
        Config("lora-k", "framework", lora=True, bottom_k=True),
        Config("lora-k-cached", "framework", lora=True, bottom_k=True, cache=True),
        Config("full-k-cached", "framework", lora=False, bottom_k=True, cache=True),
        Config(
            "lora-k-cached-eager",
            "framework",
            lora=True,
            bottom_k=True,
            cache=True,
            attention="eager",
        ),
        Config("lora-k-cached-bf16", "framework", lora=True, bottom_k=True, cache=True, bf16=True),
        Config(
            "lora-k-cached-compile", "framework", lora=True, bottom_k=True, cache=True, compile=True
        ),
    )
}
LEARNING_RATES = {False: 5e-5, True: 3e-3}  # conf/peft/none.yaml, conf/peft/lora.yaml


@dataclass
class Result:
    samples: int = 0  # per pass
    passes: list[float] = field(default_factory=list)  # seconds of each timed pass
    loading: float = 0.0  # seconds spent waiting for the next batch (text, tokenizer, collate)
    widths: list[int] = field(default_factory=list)
    real: int = 0  # non-padding tokens
    slots: int = 0  # all token positions, padding included
    auroc: float = float("nan")  # on the validation rows, after the last pass
    scores: torch.Tensor | None = None  # per validation row, in val_rows order (paired tests)
    labels: torch.Tensor | None = None
    cache: str = ""  # the cache's counters after the passes
    curve: list[float] = field(default_factory=list)  # val AUROC after each pass (--target-from)
    reached: int | None = None  # first pass whose val AUROC reached the reference's

    def seconds(self, passes: int) -> float:
        """Training seconds of the first `passes` passes (validation excluded)."""
        return sum(self.passes[:passes])

    def rate(self, passes: slice) -> float:
        chosen = self.passes[passes]
        if not chosen:  # a --target-from row that reached the target on its first pass
            return float("nan")
        return self.samples * len(chosen) / sum(chosen)


def make_backbone(name: str, seed: int, attention: str = "sdpa") -> Backbone:
    backbone = build_tiny_bert(seed=seed) if name == "tiny_bert" else load_pretrained()
    backbone.model.set_attn_implementation(attention)
    return backbone


def make_model(args, config: Config) -> RecsysLM:
    torch.manual_seed(args.seed)  # the same head (and LoRA) init for every row
    backbone = make_backbone(args.backbone, args.seed, config.attention)
    depth = len(layer_stack(backbone.model))
    k = args.k if config.bottom_k else 0
    lora = None
    if config.lora:  # adapters only above k: below, bottom_k would freeze them at zero
        above = list(range(k, depth)) if k else None
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, layers_to_transform=above)
    freeze = BottomK(k=k, cache_frozen=config.cache) if k else None
    model = RecsysLM(
        backbone, ClickHead(backbone.hidden_size), "lora" if lora else "none", lora, freeze
    )
    if config.compile:
        for layer in layer_stack(model.backbone.model)[k:]:
            layer.compile(dynamic=True)
    return model


def as_batch(batch):
    return SimpleNamespace(**batch) if isinstance(batch, dict) else batch  # default collate


def steps(
    model: RecsysLM, optimizer, loader: Iterable, bf16: bool, result: Result | None = None
) -> None:
    """Forward + BCE + backward + AdamW step per batch; records timings into `result`."""
    batches = iter(loader)
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            return
        batch = as_batch(batch)
        if result is not None:
            result.loading += time.perf_counter() - start
            mask = batch.attention_mask
            result.widths.append(mask.shape[1])
            result.real, result.slots = result.real + int(mask.sum()), result.slots + mask.numel()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.head.loss(model.backbone, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def val_scores(model: RecsysLM, loader: Iterable, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and labels of the validation rows, in their order (no shuffling)."""
    model.eval()
    scores, labels = [], []
    for batch in loader:
        batch = as_batch(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            scores.append(model.head(model.backbone, batch).float())
        labels.append(batch.labels.long())
    model.train()
    return torch.cat(scores), torch.cat(labels)


def auroc_difference(a: Result, b: Result, reps: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% paired bootstrap interval of AUROC(a) - AUROC(b): both scored the same rows, so
    resampling rows jointly removes the rows' own difficulty from the noise."""
    generator = torch.Generator().manual_seed(seed)
    n, diffs = len(a.labels), []
    for _ in range(reps):
        idx = torch.randint(n, (n,), generator=generator)
        labels = a.labels[idx]
        if labels.min() == labels.max():  # a resample with one class has no AUROC
            continue
        diffs.append(
            float(binary_auroc(a.scores[idx], labels) - binary_auroc(b.scores[idx], labels))
        )
    low, high = np.quantile(diffs, [0.025, 0.975])
    return float(low), float(high)


def measure(
    args,
    config: Config,
    loader,
    val_loader,
    warm: list[Row],
    timed: list[Row],
    target: float | None = None,
    time_budget: float | None = None,
) -> Result:
    """`--passes` timed passes, then val AUROC; with a `target` (the reference's val AUROC),
    val AUROC after every pass instead, stopping at the first pass that reaches it or after
    `--max-passes`; with a `time_budget` (training seconds), whole passes while the next fits."""
    model = make_model(args, config)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=LEARNING_RATES[config.lora],
        weight_decay=0.01,
    )
    steps(model, optimizer, loader(warm), config.bf16)  # warm-up on other rows
    torch.manual_seed(args.seed)  # the same dropout draws for every row
    result = Result(samples=len(timed))
    bounded = target is not None or time_budget is not None
    for index in range(args.max_passes if bounded else args.passes):
        start = time.perf_counter()
        steps(model, optimizer, loader(timed), config.bf16, result)  # loader construction counts
        result.passes.append(time.perf_counter() - start)
        if target is not None:  # eval mode draws no dropout: the training stream is unchanged
            result.scores, result.labels = val_scores(model, val_loader(), config.bf16)
            result.curve.append(float(binary_auroc(result.scores, result.labels)))
            if result.curve[-1] >= target:
                result.reached = index + 1
                break
        # The next pass takes about as long as this one (the cache is filled in the first).
        elif time_budget is not None and sum(result.passes) + result.passes[-1] > time_budget:
            break
    if target is None:
        result.scores, result.labels = val_scores(model, val_loader(), config.bf16)
        result.auroc = float(binary_auroc(result.scores, result.labels))
    else:  # the last pass's scores: validated above
        result.auroc = result.curve[-1]
    cache = model.backbone.frozen_cache
    if cache is not None:
        result.cache = f"{len(cache)} texts, {cache.stats.bytes / 2**20:.0f} MB"
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
        "eval_negatives": 4,  # validation: 1 positive in 5, so a few hundred rows rank enough pairs
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


def sample(rows: list, count: int, seed: int) -> list:
    """A seeded random sample: rows in order all belong to one user, whose history lengths
    would not represent the data set."""
    if count > len(rows):
        raise SystemExit(f"asked for {count} rows; the data has {len(rows)}")
    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", default=os.environ.get("RECSYS_LM_DATA_ROOT", "/work/shared/data")
    )
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per pass")
    parser.add_argument("--passes", type=int, default=3, help="timed passes over those rows")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--val-rows", type=int, default=256, help="validation rows scored")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="rows to run, in order")
    parser.add_argument("--backbone", choices=("minilm", "tiny_bert"), default="minilm")
    parser.add_argument("--k", type=int, default=4, help="bottom_k's k in the lora-k rows")
    parser.add_argument("--seed", type=int, default=0)
    reference = parser.add_mutually_exclusive_group()
    reference.add_argument(
        "--target-from",
        default=None,
        help="time to accuracy: this config (run first) trains --passes passes; every other "
        "one trains until its val AUROC reaches that config's, validating after each pass",
    )
    reference.add_argument(
        "--budget-from",
        default=None,
        help="equal training time: this config (run first) trains --passes passes; every other "
        "one trains whole passes within the same training seconds, validated once at the end",
    )
    parser.add_argument(
        "--max-passes", type=int, default=12, help="bound with --target-from / --budget-from"
    )
    args = parser.parse_args()
    names = args.configs.split(",")
    first = args.target_from or args.budget_from
    if first is not None:  # the reference first: the others need its AUROC or its seconds
        flag = "--target-from" if args.target_from else "--budget-from"
        if first not in names:
            raise SystemExit(f"{flag} {first} is not among --configs {names}")
        names = [first] + [n for n in names if n != first]
    chosen_configs = [CONFIGS[name] for name in names]
    tokenizer = make_backbone(args.backbone, args.seed).tokenizer
    with tempfile.TemporaryDirectory() as scratch:
        dm = data_module(args, tokenizer, scratch)
    rows = dm.data.datasets["train"].rows
    chosen = sample(rows, (args.steps + WARMUP) * args.batch_size, args.seed)
    timed, warm = chosen[: args.steps * args.batch_size], chosen[args.steps * args.batch_size :]
    val_rows = sample(dm.data.datasets["val"].rows, args.val_rows, args.seed)

    # Naive texts come from the same rendered item table the framework tokenizes.
    items = dm.data.data.items.reset_index(drop=True)
    item_texts = render(items, dm.settings.item_template, "data.item_template")
    history_texts = render(items, dm.settings.history_template, "data.history_template")
    budget = dm.settings.max_history_tokens

    def naive(rows: list[Row]) -> DataLoader:
        dataset = NaiveClickSet(rows, item_texts, history_texts, tokenizer)
        return DataLoader(dataset, batch_size=args.batch_size, num_workers=0)  # rows are shuffled

    def framework(rows: list[Row]) -> DataLoader:
        dm.data.datasets["train"] = ClickSet(rows, dm.data.tokens, budget)
        return dm.train_dataloader()

    def naive_val() -> DataLoader:
        dataset = NaiveClickSet(val_rows, item_texts, history_texts, tokenizer)
        return DataLoader(dataset, batch_size=64)

    def framework_val() -> DataLoader:
        dataset = ClickSet(val_rows, dm.data.tokens, budget)
        return DataLoader(dataset, batch_size=64, collate_fn=dataset.collate)

    loaders = {"naive": (naive, naive_val), "framework": (framework, framework_val)}
    results: dict[str, Result] = {}
    target = time_budget = None
    for config in chosen_configs:
        train_loader, val_loader = loaders[config.loader]
        r = results[config.name] = measure(
            args, config, train_loader, val_loader, warm, timed, target, time_budget
        )
        # As each row ends: a long run (torch.compile on a busy machine) cut short keeps them.
        curve = f" (after each pass: {[round(a, 3) for a in r.curve]})" if r.curve else ""
        print(
            f"{config.name}: passes {[round(t, 1) for t in r.passes]} s, val AUROC "
            f"{r.auroc:.3f}{curve}",
            flush=True,
        )
        if config.name == args.target_from:
            target = r.auroc
        if config.name == args.budget_from:
            time_budget = r.seconds(args.passes)

    print(
        f"machine: {os.cpu_count()} cores ({torch.backends.cpu.get_cpu_capability()}), torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads, fp32 CPU unless bf16"
    )
    print(
        f"data: {dm.source.name}, {len(rows)} training rows, {len(timed)} timed x "
        f"{args.passes} passes ({WARMUP} warm-up steps on {len(warm)} other rows); val AUROC "
        f"on {len(val_rows)} validation rows"
    )
    print(f"backbone: {args.backbone}, batch size {args.batch_size}, {args.steps} steps a pass")
    # Real tokens/sample: the paths truncate differently, so part of a speed-up can come from
    # reading less text rather than from padding less (see the module docstring).
    table = Table(
        "config",
        "passes",
        "samples/s pass 1",
        "samples/s later",
        "mean padded length",
        "padding %",
        "real tokens/sample",
        "loading %",
        "val AUROC",
        "cache",
    )
    later = slice(1, None) if args.passes > 1 else slice(0, 1)
    for name, r in results.items():
        table.add_row(
            name,
            str(len(r.passes)),
            f"{r.rate(slice(0, 1)):.1f}",
            f"{r.rate(later):.1f}",
            f"{sum(r.widths) / len(r.widths):.1f}",
            f"{100 * (1 - r.real / r.slots):.1f}",
            f"{r.real / (r.samples * len(r.passes)):.1f}",
            f"{100 * r.loading / sum(r.passes):.1f}",
            f"{r.auroc:.3f}",
            r.cache,
        )
    Console(width=160).print(table)  # a fixed width: piped output would otherwise wrap at 80
    if target is not None:
        print_time_to_target(args, results, target)
    if time_budget is not None:
        print_equal_time(args, results, time_budget)
    every = slice(None)
    for ours, theirs in (
        ("framework-full", "naive-full"),
        ("framework-lora", "naive-lora"),
        ("framework-lora", "naive-full"),
        ("lora-k-cached", "naive-full"),
        ("full-k-cached", "naive-full"),
        ("full-k-cached", "framework-full"),
        ("lora-k-cached", "naive-lora"),
        ("lora-k-cached", "framework-lora"),
        ("lora-k-cached", "lora-k"),
        ("lora-k-cached-eager", "lora-k-cached"),
        ("lora-k-cached-bf16", "lora-k-cached"),
        ("lora-k-cached-compile", "lora-k-cached"),
    ):
        if ours in results and theirs in results:
            a, b = results[ours], results[theirs]
            low, high = auroc_difference(a, b, seed=args.seed)
            print(
                f"{ours} vs {theirs}: {a.rate(every) / b.rate(every):.2f}x over all passes "
                f"({len(a.passes)} and {len(b.passes)}; {a.rate(later) / b.rate(later):.2f}x "
                "after the first); "
                f"val AUROC {a.auroc:.3f} vs {b.auroc:.3f} (difference {a.auroc - b.auroc:+.3f}, "
                f"95% paired bootstrap {low:+.3f} to {high:+.3f})"
            )


def print_time_to_target(args, results: dict[str, Result], target: float) -> None:
    reference = results[args.target_from]
    base = reference.seconds(args.passes)
    print(
        f"time to accuracy: {args.target_from} trained {args.passes} passes "
        f"({base:.0f} s) to val AUROC {target:.3f}; training seconds (validation excluded) "
        "for each other config to reach it:"
    )
    for name, r in results.items():
        if name == args.target_from:
            continue
        if r.reached is None:
            print(
                f"  {name}: not reached in {args.max_passes} passes "
                f"({r.seconds(args.max_passes):.0f} s; best {max(r.curve):.3f})"
            )
            continue
        spent = r.seconds(r.reached)
        print(
            f"  {name}: {spent:.0f} s ({r.reached} passes, val AUROC {r.auroc:.3f}): "
            f"{base / spent:.2f}x faster"
        )


def print_equal_time(args, results: dict[str, Result], budget: float) -> None:
    reference = results[args.budget_from]
    print(
        f"equal training time: {args.budget_from} trained {args.passes} passes ({budget:.0f} s, "
        f"val AUROC {reference.auroc:.3f}); each other config within the same seconds:"
    )
    for name, r in results.items():
        if name != args.budget_from:
            print(
                f"  {name}: {len(r.passes)} passes in {r.seconds(len(r.passes)):.0f} s, "
                f"{len(r.passes) * r.samples} samples against {args.passes * r.samples}, "
                f"val AUROC {r.auroc:.3f} ({r.auroc - reference.auroc:+.3f})"
            )


if __name__ == "__main__":
    main()
