"""Processes of the 2-process tests in tests/test_distributed.py, kept apart from the test
module so that spawned processes import little (torch and recsys_lm.metrics for `main`).

`main`: every process builds the same seeded evaluation rows, takes rows rank, rank + 2, ...
(the unpadded split), feeds them in batches of 2 (so the processes hold different numbers
of batches) to metric sets made `across_processes`, and rank 0 writes what they computed,
what its own rows alone give, and a baseline-style local set computed while the other
process waits elsewhere (a set that tried to gather would fail that wait).

`fsdp_catalogue`: see its docstring."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from recsys_lm.metrics import BehaviourMetrics, ClickMetrics, RankingMetrics, RatingMetrics

ROWS = 7  # odd: a padded split would repeat a row
BATCH = 2


def rows() -> dict[str, tuple[torch.Tensor, ...]]:
    """The evaluation rows of each metric set: the same in every process (seeded)."""
    g = torch.Generator().manual_seed(0)
    items = 12
    relevant = torch.zeros(ROWS, items, dtype=torch.bool)
    relevant[torch.arange(ROWS), torch.randint(items, (ROWS,), generator=g)] = True
    exclude = (torch.rand(ROWS, items, generator=g) < 0.3) & ~relevant
    return {
        "ranking": (torch.randn(ROWS, items, generator=g), relevant, exclude),
        "click": (torch.rand(ROWS, generator=g), (torch.rand(ROWS, generator=g) < 0.4).float()),
        "rating": (torch.rand(ROWS, generator=g) * 5, torch.randint(1, 6, (ROWS,), generator=g)),
        "behaviour": (torch.randn(ROWS, 4, generator=g), torch.randint(4, (ROWS,), generator=g)),
    }


SETS = {
    "ranking": lambda: RankingMetrics(k=3),
    "click": ClickMetrics,
    "rating": RatingMetrics,
    "behaviour": BehaviourMetrics,
}


def measure(name: str, tensors: tuple[torch.Tensor, ...], order: list[int], synced: bool):
    metrics = SETS[name]().across_processes(synced)
    for start in range(0, len(order), BATCH):
        picked = order[start : start + BATCH]
        metrics.update(*(t[picked] for t in tensors))
    return metrics.compute()


def single_process() -> dict[str, dict[str, float]]:
    """Every row in one process, in the same batches a single device would use."""
    return {name: measure(name, t, list(range(ROWS)), False) for name, t in rows().items()}


def main(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        mine = list(range(rank, ROWS, world))
        data = rows()
        combined = {name: measure(name, t, mine, True) for name, t in data.items()}
        local = {name: measure(name, t, mine, False) for name, t in data.items()}
        if rank == 0:  # rank 1 is already waiting in the barrier below
            alone = measure("ranking", data["ranking"], list(range(ROWS)), False)
            Path(out).write_text(json.dumps({"combined": combined, "local": local, "alone": alone}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def fsdp_catalogue(rank: int, world: int, store: str, out: str) -> None:
    """A tiny GPT-2 two-tower model sharded by FSDP over CPU processes (torch's FSDP with
    gloo: Lightning allows FSDP on GPUs only): embedding the catalogue outside a step must
    fail when called directly (the root unit's weights are sharded) and, through RecsysLM's
    epoch-start hook, give the unsharded model's item vectors."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    from recsys_lm.build import build_datamodule, build_module
    from recsys_lm.models.sharding import TransformerBlocks
    from tests.conftest import make_config

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        cfg = make_config(Path(out).parent / f"rank{rank}", ["backbone=tiny_gpt2"])
        module = build_module(cfg)
        datamodule = build_datamodule(cfg, module)
        datamodule.setup()
        module.attach(datamodule.data)
        module.eval()
        with torch.no_grad():
            module.on_validation_epoch_start()  # no trainer: plain
        expected = module.head._item_vectors.clone()
        wrapped = FullyShardedDataParallel(
            module,
            auto_wrap_policy=TransformerBlocks(),
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            use_orig_params=True,
            device_id=torch.device("cpu"),
        )
        strategy = FSDPStrategy()
        strategy.model = wrapped
        module._trainer = SimpleNamespace(strategy=strategy)
        direct = ""
        try:
            with torch.no_grad():
                module._begin_eval()
        except RuntimeError as err:
            direct = str(err)
        with torch.no_grad():
            module.on_validation_epoch_start()
        diff = float((module.head._item_vectors - expected).abs().max())
        units = sum(isinstance(m, FullyShardedDataParallel) for m in wrapped.modules())
        if rank == 0:
            Path(out).write_text(json.dumps({"direct": direct, "diff": diff, "units": units}))
        dist.barrier()
    finally:
        dist.destroy_process_group()
