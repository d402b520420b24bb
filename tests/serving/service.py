"""Helpers for the HTTP service's tests: tiny models built in-process, an app driven through
its lifespan with an in-process client, free ports and Prometheus text parsing."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from recsys_lm.build import build_module
from recsys_lm.serving.app import ServiceSettings, create_app
from recsys_lm.serving.model import ServedModel
from recsys_lm.serving.store import open_store
from tests.conftest import fresh_datamodule, make_config

HEADS = {
    "retrieval": ["head=retrieval", "peft=none"],
    "sequential": ["head=sequential", "peft=none", "freeze=head_only"],
    "click": ["head=click", "peft=none"],
}


def build_untrained(folder: Path, name: str):
    """(module, prepared data) of a head, untrained: the service must answer whatever the
    weights (test_model.py checks that serving matches the head itself)."""
    torch.manual_seed(0)
    cfg = make_config(folder, HEADS[name])
    module = build_module(cfg)
    data = fresh_datamodule(cfg, module).data
    module.attach(data)
    module.eval()
    module.head.on_fit_start(module.backbone, module._item_batches())  # cache item texts
    return module.eval(), data


def served(built, name: str, **kwargs) -> ServedModel:
    module, data = built[name]
    return ServedModel.from_prepared(module, data, **kwargs)


@contextlib.asynccontextmanager
async def serving(
    loader: Callable,
    folder: Path,
    reopen: Callable | None = None,
    source: dict | None = None,
    ready: bool = True,
    **settings,
):
    """(client, app) of a service over a fresh SQLite store in `folder`, its lifespan
    running; waits until the model is loaded unless `ready` is False."""
    store = open_store(f"sqlite:///{folder / 'events.db'}")
    app = create_app(ServiceSettings(**settings), loader, store, reopen, source, close_store=True)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            if ready:
                await wait_ready(client)
            yield client, app


async def wait_ready(client, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        answer = await client.get("/readyz")
        if answer.status_code == 200:
            return answer.json()
        assert time.monotonic() < deadline, answer.text
        await anyio.sleep(0.02)


def export_source(export: str | Path) -> dict:
    """The model source `python -m recsys_lm.serve export=<export>` builds (eager, one stage)."""
    return {
        "export": str(export),
        "flavour": "eager",
        "rerank": None,
        "rerank_flavour": "eager",
        "n": 100,
        "threads": None,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus exposition `text` (0.0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def sample_labels(text: str, name: str) -> list[dict[str, str]]:
    return [
        sample.labels
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]
