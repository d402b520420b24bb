"""`python -m recsys_lm.bench.latency exports.sequential=<dir> exports.two_tower=<dir>
exports.click=<dir>`: latency of served exports over HTTP on loopback (conf/bench_latency.yaml
documents every key).

For each target (an export, a flavour, a route, batching on or off, optionally a re-ranking
export) it starts `python -m recsys_lm.serve` on 127.0.0.1 at a free port, pinned to the
configured cores and threads, waits for `/readyz`, runs each load, and stops the server
(SIGTERM, then SIGKILL). A load is a closed loop (c clients, each sending its next request when
the last is answered) or an open loop (Poisson arrivals at a fixed rate, sent whether or not
earlier ones were answered, latency counted from each scheduled arrival so a generator that
falls behind cannot hide it); both stop at a request count or a time bound, whichever comes
first, after warm-up requests that are not counted.

Requests come from the export itself: its users (users.parquet) as stored user ids or as
explicit histories, and for /score the user's held-out (latest) item among other items drawn
with a fixed seed. The server and this generator share the cores, so every figure includes
the client's own cost; the output says so.

Results: a table on stdout, `latency.json` (every figure, the command, the machine, thread
counts probed with the servers' own settings) and `latency.md` (tables for
experiments/serving.md) in the run folder. `crosscheck.run=true` also runs `hey` (a standard
load tool) on one target with one fixed body, beside our generator on that same body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import httpx
import hydra
import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from recsys_lm.errors import ConfigError, DataError, RecsysLMError

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
REPO_ROOT = Path(__file__).resolve().parents[2]  # servers run `python -m` from here
HOST = "127.0.0.1"
JSON_HEADERS = {"content-type": "application/json"}
ROUTES = ("recommend", "score")
MODES = ("closed", "open")
REQUEST_MODES = ("users", "histories")
STATS = ("p50", "p95", "p99", "mean", "max", "throughput", "sent", "ok", "errors", "5xx")
RATIO_STATS = ("p50", "p95", "p99", "mean", "max", "throughput")
BATCH_METRIC = "recsys_lm_batch_size"  # serving/telemetry.py: requests per model call
VERSIONS = (
    "torch",
    "onnxruntime",
    "transformers",
    "peft",
    "fastapi",
    "uvicorn",
    "uvloop",
    "httptools",
    "aiohttp",
    "httpx",
)
T = TypeVar("T")
# Run in a subprocess with a server's environment and affinity: the torch thread counts it gets.
# (Its onnxruntime sessions take the `threads` the server is given: serving/flavours.py.)
THREAD_PROBE = (
    "import json, torch\n"
    "print(json.dumps({'torch_intra_op': torch.get_num_threads(),"
    " 'torch_inter_op': torch.get_num_interop_threads()}))"
)
SHARED_CORES = (
    "the servers and the load generator share cpus {cpus}: each figure includes the client's "
    "own work (asyncio + {client}, one thread; on uvloop where installed)"
)
APART = (
    "the servers run on cpus {cpus}, the load generator on cpus {cpus_client} (asyncio + "
    "{client}, one thread; on uvloop where installed): the client's work is not in the "
    "servers' cores"
)


# -- configuration ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Load:
    """One measured load: closed loop at `concurrency`, or open loop at `rate` per second;
    it stops at `requests` or `seconds`, whichever comes first."""

    name: str
    mode: str
    requests: int
    seconds: float
    concurrency: int = 1
    rate: float | None = None
    warmup: int = 0

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.mode == "closed" else f"open {self.rate:g}/s"


@dataclass(frozen=True)
class Target:
    """What one server serves and which loads it gets."""

    name: str
    export: Path | None
    flavour: str = "eager"
    route: str = "recommend"
    pipeline: bool = False  # a `rerank` key was given: retrieve with export, re-rank with rerank
    rerank: Path | None = None
    rerank_flavour: str = "eager"
    n: int = 100
    batching: bool = True
    loads: tuple[Load, ...] = ()
    overrides: tuple[str, ...] = ()

    @property
    def flavour_label(self) -> str:
        return f"{self.flavour}+{self.rerank_flavour}" if self.pipeline else self.flavour


@dataclass(frozen=True)
class RequestSpec:
    mode: str = "users"
    k: int = 10
    candidates: int = 100
    max_history: int = 200
    users: int | None = None
    seed: int = 0


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(key, value, expected)


def parse_load(node: dict, key: str) -> Load:
    known = {"name", "mode", "requests", "seconds", "concurrency", "rate", "warmup"}
    unknown = sorted(set(node) - known)
    _require(not unknown, key, unknown, f"load keys among {sorted(known)}")
    _require(bool(node.get("name")), f"{key}.name", node.get("name"), "a label")
    _require(node.get("mode") in MODES, f"{key}.mode", node.get("mode"), f"one of {MODES}")
    load = Load(
        name=str(node["name"]),
        mode=str(node["mode"]),
        requests=int(node.get("requests") or 0),
        seconds=float(node.get("seconds") or 0),
        concurrency=int(node.get("concurrency") or 1),
        rate=None if node.get("rate") is None else float(node["rate"]),
        warmup=int(node.get("warmup") or 0),
    )
    _require(load.requests >= 1, f"{key}.requests", load.requests, "at least 1")
    _require(load.seconds > 0, f"{key}.seconds", load.seconds, "a time bound > 0")
    _require(load.warmup >= 0, f"{key}.warmup", load.warmup, ">= 0")
    _require(load.concurrency >= 1, f"{key}.concurrency", load.concurrency, "at least 1")
    if load.mode == "open":
        _require(bool(load.rate and load.rate > 0), f"{key}.rate", load.rate, "requests/s > 0")
    return load


def parse_target(node: dict, key: str, default_loads: Any) -> Target:
    known = {"name", "export", "flavour", "route", "rerank", "rerank_flavour", "n", "batching"}
    known |= {"loads", "overrides"}
    unknown = sorted(set(node) - known)
    _require(not unknown, key, unknown, f"target keys among {sorted(known)}")
    _require(bool(node.get("name")), f"{key}.name", node.get("name"), "a unique name")
    route = node.get("route", "recommend")
    _require(route in ROUTES, f"{key}.route", route, f"one of {ROUTES}")
    pipeline = "rerank" in node
    _require(
        not (pipeline and route != "recommend"), f"{key}.route", route, "recommend (a pipeline)"
    )
    loads = node.get("loads", default_loads)
    _require(isinstance(loads, list) and bool(loads), f"{key}.loads", loads, "a list of loads")
    parsed = tuple(parse_load(dict(x), f"{key}.loads[{i}]") for i, x in enumerate(loads))
    names = [x.name for x in parsed]
    _require(len(set(names)) == len(names), f"{key}.loads", names, "loads with distinct names")
    n = int(node.get("n", 100))
    _require(n >= 1, f"{key}.n", n, "at least 1 item retrieved for the re-ranker")
    return Target(
        name=str(node["name"]),
        export=_path(node.get("export")),
        flavour=str(node.get("flavour", "eager")),
        route=route,
        pipeline=pipeline,
        rerank=_path(node.get("rerank")),
        rerank_flavour=str(node.get("rerank_flavour", "eager")),
        n=n,
        batching=bool(node.get("batching", True)),
        loads=parsed,
        overrides=tuple(str(o) for o in node.get("overrides") or ()),
    )


def _path(value: Any) -> Path | None:
    return None if value in (None, "", "???") else Path(str(value)).expanduser().resolve()


def parse_targets(cfg: DictConfig) -> list[Target]:
    nodes = OmegaConf.to_container(cfg.targets, resolve=True)
    _require(isinstance(nodes, list) and bool(nodes), "targets", nodes, "a list of targets")
    default = OmegaConf.to_container(cfg.fast_loads, resolve=True) if "fast_loads" in cfg else []
    targets = [parse_target(dict(t), f"targets[{i}]", default) for i, t in enumerate(nodes)]
    names = [t.name for t in targets]
    twice = sorted({n for n in names if names.count(n) > 1})
    _require(not twice, "targets", twice, "distinct target names")
    only = cfg.get("only")
    if only is None:
        return targets
    only = (
        [str(x) for x in OmegaConf.to_container(only)] if OmegaConf.is_list(only) else [str(only)]
    )
    missing = [x for x in only if x not in names]
    _require(not missing, "only", missing, f"target names among {names}")
    return [t for t in targets if t.name in only]


def parse_requests(node: DictConfig) -> RequestSpec:
    spec = RequestSpec(**OmegaConf.to_container(node, resolve=True))
    _require(spec.mode in REQUEST_MODES, "requests.mode", spec.mode, f"one of {REQUEST_MODES}")
    _require(spec.k >= 1, "requests.k", spec.k, "at least 1")
    _require(spec.candidates >= 1, "requests.candidates", spec.candidates, "at least 1")
    _require(spec.max_history >= 1, "requests.max_history", spec.max_history, "at least 1")
    _require(spec.users is None or spec.users >= 1, "requests.users", spec.users, "null or >= 1")
    return spec


def offered_flavours(export: Path, key: str) -> list[str]:
    manifest = export / "manifest.json"
    _require(manifest.is_file(), key, str(export), "an export folder (python -m recsys_lm.export)")
    try:
        return ["eager", *json.loads(manifest.read_text()).get("flavours", {})]
    except (OSError, ValueError) as err:
        raise ConfigError(key, str(export), f"a readable manifest.json: {err}") from err


def skip_reason(target: Target, key: str) -> str | None:
    """Why a target cannot run with these exports (None: it can). A folder given but not an
    export is a mistake (ConfigError); a null export or a flavour not exported is a skip."""
    if target.export is None:
        return "no export given (its exports.* key is null)"
    if target.pipeline and target.rerank is None:
        return "no re-ranking export given (its exports.* key is null)"
    pairs = [(target.export, target.flavour, f"{key}.export")]
    if target.pipeline:
        pairs.append((target.rerank, target.rerank_flavour, f"{key}.rerank"))
    for export, flavour, where in pairs:
        offered = offered_flavours(export, where)
        if flavour not in offered:
            return f"flavour {flavour} not exported in {export} (has {offered})"
    return None


# -- figures --------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One request: when it was due (open loop) or sent (closed loop), when its answer came,
    and its label: the HTTP status ("200") or what went wrong ("timeout", "connect",
    "dropped": not sent, too many in flight; "unfinished": unanswered when the load ended)."""

    start: float
    end: float
    label: str
    stages: dict[str, float] | None = None

    @property
    def ok(self) -> bool:
        return self.label.startswith("2")


def percentiles(samples: Sequence[float], qs: Sequence[float]) -> list[float | None]:
    """Percentiles by linear interpolation between order statistics (numpy's default, type 7
    of Hyndman and Fan): the p-th of n sorted values sits at rank (n - 1) * p / 100."""
    if len(samples) == 0:
        return [None] * len(qs)
    return [float(v) for v in np.percentile(np.asarray(samples, float), qs, method="linear")]


@dataclass
class Summary:
    """A load's figures. Latencies (ms) are of answered (2xx) requests; throughput is those
    per second over the window from the first start to the last answer."""

    sent: int
    ok: int
    errors: dict[str, int]
    p50: float | None
    p95: float | None
    p99: float | None
    mean: float | None
    max: float | None
    throughput: float
    seconds: float
    stages_ms: dict[str, float] = field(default_factory=dict)  # median per server stage

    def stat(self, name: str) -> float | None:
        if name == "errors":
            return float(sum(self.errors.values()))
        if name == "5xx":
            return float(sum(n for label, n in self.errors.items() if label.startswith("5")))
        return getattr(self, name)


def summarise(outcomes: Sequence[Outcome]) -> Summary:
    answered = [o for o in outcomes if o.ok]
    latencies = [(o.end - o.start) * 1000.0 for o in answered]
    p50, p95, p99 = percentiles(latencies, (50, 95, 99))
    window = max(o.end for o in outcomes) - min(o.start for o in outcomes) if outcomes else 0.0
    stages: dict[str, list[float]] = {}
    for o in answered:
        for stage, ms in (o.stages or {}).items():
            stages.setdefault(stage, []).append(ms)
    return Summary(
        sent=len(outcomes),
        ok=len(answered),
        errors=dict(sorted(Counter(o.label for o in outcomes if not o.ok).items())),
        p50=p50,
        p95=p95,
        p99=p99,
        mean=float(np.mean(latencies)) if latencies else None,
        max=max(latencies) if latencies else None,
        throughput=len(answered) / window if window > 0 else 0.0,
        seconds=window,
        stages_ms={s: float(np.median(v)) for s, v in sorted(stages.items())},
    )


# -- load generators ------------------------------------------------------------------------
# send(i) posts request i and returns (label, the reply's stages_ms or None); it never raises.
Send = Callable[[int], Awaitable[tuple[str, dict | None]]]


async def closed_loop(
    send: Send, requests: int, concurrency: int, seconds: float, first: int = 0
) -> list[Outcome]:
    """`concurrency` clients, each sending its next request once the last is answered, until
    `requests` were sent or `seconds` passed (requests in flight then are answered)."""
    outcomes: list[Outcome] = []
    deadline = time.perf_counter() + seconds
    numbers = iter(range(first, first + requests))  # shared: each request is sent once

    async def client() -> None:
        for i in numbers:
            if time.perf_counter() >= deadline:
                return
            started = time.perf_counter()
            label, stages = await send(i)
            outcomes.append(Outcome(started, time.perf_counter(), label, stages))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return outcomes


async def open_loop(
    send: Send,
    requests: int,
    rate: float,
    seconds: float,
    seed: int = 0,
    max_in_flight: int = 1024,
    drain_s: float = 30.0,
    first: int = 0,
) -> tuple[list[Outcome], float]:
    """Poisson arrivals at `rate` per second (seeded), each sent when due whatever is still in
    flight, until `requests` arrivals or `seconds`; then up to `drain_s` for the answers.
    Latency counts from the scheduled arrival. Returns the outcomes and the largest lag (s)
    between an arrival and its sending (a generator short of CPU shows here)."""
    arrivals = random.Random(seed)
    outcomes: list[Outcome] = []
    in_flight: dict[asyncio.Task, float] = {}
    lag = 0.0

    async def one(i: int, due: float) -> None:
        label, stages = await send(i)
        outcomes.append(Outcome(due, time.perf_counter(), label, stages))

    start = due = time.perf_counter()
    for i in range(first, first + requests):
        due += arrivals.expovariate(rate)
        if due - start > seconds:
            break
        wait = due - time.perf_counter()
        await asyncio.sleep(max(wait, 0.0))  # 0: still yield, so answers are read
        lag = max(lag, time.perf_counter() - due)
        if len(in_flight) >= max_in_flight:
            outcomes.append(Outcome(due, due, "dropped"))
            continue
        task = asyncio.create_task(one(i, due))
        in_flight[task] = due
        task.add_done_callback(lambda t: in_flight.pop(t, None))
    if in_flight:
        waiting = dict(in_flight)
        _, pending = await asyncio.wait(list(waiting), timeout=drain_s)
        for task in pending:
            task.cancel()
            outcomes.append(Outcome(waiting[task], time.perf_counter(), "unfinished"))
        await asyncio.gather(*pending, return_exceptions=True)
    return outcomes, lag


def http_sender(client: LoadClient, route: str, bodies: Sequence[bytes]) -> Send:
    """POST /<route> with body i (cycling through `bodies`)."""
    path = f"/{route}"

    async def send(i: int) -> tuple[str, dict | None]:
        try:
            status, answer = await client.post(path, bodies[i % len(bodies)])
        except Unanswered as err:
            return err.label, None
        if status == 200 and route == "recommend":
            return "200", json.loads(answer).get("stages_ms")
        return str(status), None

    return send


# -- the load generator's HTTP client -----------------------------------------------------------
class Unanswered(Exception):
    """A request that got no HTTP answer; `label` says why (timeout, connect, or the
    client's error class)."""

    def __init__(self, label: str) -> None:
        super().__init__(label)
        self.label = label


class AiohttpClient:
    """aiohttp (C-accelerated HTTP parsing), the default: httpx's own work added 0.9-1.2 ms
    to each request's p50 on the cores the server shares (sequential head at c1: 2.89-3.33
    against 1.99-2.15 ms, the server's stage unchanged; experiments/serving.md)."""

    def __init__(self, url: str, timeout: float, connections: int) -> None:
        # trust_env=False: a proxy from the environment (HTTP_PROXY) must not carry loopback
        self.session = aiohttp.ClientSession(
            base_url=url,
            connector=aiohttp.TCPConnector(limit=connections),
            timeout=aiohttp.ClientTimeout(total=timeout),
            trust_env=False,
        )

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        return await self._call(self.session.post(path, data=body, headers=JSON_HEADERS))

    async def get(self, path: str) -> tuple[int, bytes]:
        return await self._call(self.session.get(path))

    @staticmethod
    async def _call(request) -> tuple[int, bytes]:
        try:
            async with request as reply:
                return reply.status, await reply.read()  # the whole answer, as any client
        except TimeoutError:
            raise Unanswered("timeout") from None
        except aiohttp.ClientConnectorError:
            raise Unanswered("connect") from None
        except aiohttp.ClientError as err:
            raise Unanswered(type(err).__name__) from None

    async def aclose(self) -> None:
        await self.session.close()


class HttpxClient:
    """httpx, the issue's first choice: kept to compare clients (`client.library=httpx`)."""

    def __init__(self, url: str, timeout: float, connections: int) -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.client = httpx.AsyncClient(
            base_url=url, timeout=httpx.Timeout(timeout), limits=limits, trust_env=False
        )

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        return await self._call(self.client.post(path, content=body, headers=JSON_HEADERS))

    async def get(self, path: str) -> tuple[int, bytes]:
        return await self._call(self.client.get(path))

    @staticmethod
    async def _call(request) -> tuple[int, bytes]:
        try:
            reply = await request
        except httpx.TimeoutException:
            raise Unanswered("timeout") from None
        except httpx.ConnectError:
            raise Unanswered("connect") from None
        except httpx.HTTPError as err:
            raise Unanswered(type(err).__name__) from None
        return reply.status_code, reply.content

    async def aclose(self) -> None:
        await self.client.aclose()


LoadClient = AiohttpClient | HttpxClient
CLIENTS: dict[str, type[LoadClient]] = {"aiohttp": AiohttpClient, "httpx": HttpxClient}


@contextlib.asynccontextmanager
async def client_for(url: str, cfg: DictConfig, connections: int) -> AsyncIterator[LoadClient]:
    """The configured client (`client.library`), closed on the way out."""
    client = CLIENTS[str(cfg.client.library)](url, float(cfg.client.timeout_s), connections)
    try:
        yield client
    finally:
        await client.aclose()


# -- requests -------------------------------------------------------------------------------
def request_bodies(export: Path, route: str, spec: RequestSpec) -> list[bytes]:
    """JSON bodies from an export's users (those with 2+ interactions, in a seeded order):
    the user id (spec.mode=users) or their history without its latest item (histories);
    /score adds the latest item and `candidates - 1` others outside the history."""
    users = pd.read_parquet(export / "users.parquet", columns=["user_id", "history"])
    items = pd.read_parquet(export / "catalogue.parquet", columns=["item_id"])["item_id"]
    catalogue = [str(i) for i in items]
    rows = [
        (str(u), [str(i) for i in h])
        for u, h in zip(users["user_id"], users["history"], strict=True)
        if len(h) >= 2
    ]
    if not rows:
        raise DataError(f"{export / 'users.parquet'}: no user with 2 or more interactions")
    rng = random.Random(spec.seed)
    rng.shuffle(rows)
    rows = rows[: spec.users] if spec.users else rows
    bodies = [request_body(u, h, route, spec, catalogue, rng) for u, h in rows]
    return [json.dumps(b, separators=(",", ":")).encode() for b in bodies]


def request_body(
    user: str,
    history: list[str],
    route: str,
    spec: RequestSpec,
    catalogue: list[str],
    rng: random.Random,
) -> dict:
    held_out, before = history[-1], history[:-1]
    body: dict[str, Any] = (
        {"user": user} if spec.mode == "users" else {"history": before[-spec.max_history :]}
    )
    if route == "recommend":
        body["k"] = spec.k
        return body
    seen = set(history)
    others = [i for i in catalogue if i not in seen]
    candidates = [held_out, *rng.sample(others, min(spec.candidates - 1, len(others)))]
    rng.shuffle(candidates)
    body["candidates"] = candidates
    return body


# -- servers --------------------------------------------------------------------------------
class ServerFailed(RuntimeError):
    """A server that exited or never became ready; the message ends with its log's tail."""


@dataclass
class Server:
    target: Target
    process: subprocess.Popen
    url: str
    folder: Path
    log: Any  # the open log file (stdout + stderr)

    def log_tail(self, lines: int = 20) -> str:
        self.log.flush()
        text = (self.folder / "server.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def hydra_value(value: Any) -> str:
    """A value quoted for Hydra's override grammar (paths may hold `=`, `,` or spaces)."""
    text = str(value)
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def serve_command(
    target: Target, port: int, folder: Path, cfg: DictConfig, threads: int
) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "recsys_lm.serve",
        f"export={hydra_value(target.export)}",
        f"flavour={target.flavour}",
        f"host={HOST}",
        f"port={port}",
        f"threads={threads}",  # torch and onnxruntime intra-op threads
        f"store={hydra_value('sqlite:///' + str(folder / 'events.db'))}",
        f"log_level={cfg.server.log_level}",
        f"access_log={str(bool(cfg.server.access_log)).lower()}",
        f"hydra.run.dir={hydra_value(folder)}",
    ]
    if target.pipeline:
        args += [
            f"pipeline.rerank={hydra_value(target.rerank)}",
            f"pipeline.rerank_flavour={target.rerank_flavour}",
            f"pipeline.n={target.n}",
        ]
    if not target.batching:
        args.append("batching.max_batch=1")
    return [*args, *[str(o) for o in cfg.server.overrides or ()], *target.overrides]


def server_env(threads: int) -> dict[str, str]:
    """The environment of a server: torch's (OpenMP's, MKL's) thread count fixed."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false"
    )
    return env


def pinned(cpus: Sequence[int]) -> Callable[[], None]:
    # Runs in the child before exec: every thread torch or onnxruntime starts inherits it.
    return lambda: os.sched_setaffinity(0, cpus)


def start_server(target: Target, cfg: DictConfig, folder: Path, cpus, threads: int) -> Server:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = serve_command(target, port, folder, cfg, threads)
    log = open(folder / "server.log", "w")  # noqa: SIM115 (closed by stop_server)
    log.write(shlex.join(command) + "\n")
    log.flush()
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=server_env(threads),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=pinned(cpus),
        start_new_session=True,  # a Ctrl-C here reaches the benchmark, which stops it
    )
    return Server(target, process, f"http://{HOST}:{port}", folder, log)


def wait_ready(server: Server, timeout: float) -> dict:
    """The /readyz reply once the model is loaded; ServerFailed if the server exits first or
    `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    with httpx.Client(base_url=server.url, timeout=5.0, trust_env=False) as client:
        while True:
            code = server.process.poll()
            if code is not None:
                raise ServerFailed(f"server exited with status {code}:\n{server.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                reply = client.get("/readyz")
                if reply.status_code == 200:
                    return reply.json()
                last = f"{reply.status_code} {reply.text[:200]}"
            if time.monotonic() > deadline:
                raise ServerFailed(
                    f"not ready after {timeout:g} s (last /readyz: {last}):\n{server.log_tail()}"
                )
            time.sleep(0.2)


def stop_server(server: Server, timeout: float) -> dict:
    """SIGTERM (uvicorn's graceful shutdown, after which it re-raises the signal: exit status
    -15), SIGKILL after `timeout` seconds. Returns the exit status and whether it was killed."""
    process, killed = server.process, False
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            killed = True
    server.log.close()
    return {"exit": process.returncode, "killed": killed}


def probe_threads(cpus: Sequence[int], threads: int) -> dict:
    """The thread counts a server gets: torch's, probed in a subprocess with the servers'
    environment and affinity; onnxruntime's is the `threads` each server is given."""
    done = subprocess.run(
        [sys.executable, "-c", THREAD_PROBE],
        cwd=REPO_ROOT,
        env=server_env(threads),
        preexec_fn=pinned(cpus),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or done.returncode}
    probed = json.loads(done.stdout)
    return {"cpus": list(cpus), "threads": threads, **probed, "onnxruntime_intra_op": threads}


# -- one target -----------------------------------------------------------------------------
def batch_totals(text: str, route: str) -> tuple[float, float]:
    """(sum, count) of the service's batch-size histogram for `route`."""
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != BATCH_METRIC:
            continue
        for sample in family.samples:
            if sample.labels.get("route") != route:
                continue
            if sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
    return total, count


async def scrape(client: LoadClient, route: str) -> tuple[float, float] | None:
    try:
        status, text = await client.get("/metrics")
    except Unanswered:
        return None
    return batch_totals(text.decode(), route) if status == 200 else None


@dataclass
class Measured:
    load: Load
    summary: Summary
    batch_mean: float | None  # requests per model call during the load (server's histogram)
    max_lag_ms: float | None = None  # open loop: how late the generator sent its latest request


async def run_load(
    client: LoadClient, send: Send, load: Load, route: str, cfg: DictConfig, first: int
) -> Measured:
    if load.warmup:
        warm = 1 if load.mode == "open" else load.concurrency
        await closed_loop(send, load.warmup, warm, load.seconds, first)
    first += load.warmup
    before = await scrape(client, f"/{route}")
    lag = None
    if load.mode == "closed":
        outcomes = await closed_loop(send, load.requests, load.concurrency, load.seconds, first)
    else:
        outcomes, lag = await open_loop(
            send,
            load.requests,
            load.rate,
            load.seconds,
            seed=int(cfg.requests.seed),
            max_in_flight=int(cfg.client.max_in_flight),
            drain_s=float(cfg.client.timeout_s),
            first=first,
        )
    after = await scrape(client, f"/{route}")
    batch = None
    if before and after and after[1] > before[1]:
        batch = (after[0] - before[0]) / (after[1] - before[1])
    return Measured(load, summarise(outcomes), batch, None if lag is None else lag * 1000.0)


def run_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run the load generator on uvloop where installed (the serve extra has it, and the
    server runs on it too): the client's share of each figure, on the same cores, shrinks."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


async def measure(server: Server, bodies: list[bytes], cfg: DictConfig) -> list[Measured]:
    target = server.target
    width = max(x.concurrency for x in target.loads)
    if any(x.mode == "open" for x in target.loads):
        width = max(width, int(cfg.client.max_in_flight))
    out, first = [], 0
    async with client_for(server.url, cfg, width) as client:
        send = http_sender(client, target.route, bodies)
        for load in target.loads:
            print(f"  {target.name}: {load.name} ({load.label}) ...", flush=True)
            out.append(await run_load(client, send, load, target.route, cfg, first))
            first += load.warmup + load.requests  # the next load continues through the users
    return out


# -- cross-check with hey ---------------------------------------------------------------------
def hey_command(url: str, body: bytes, requests: int, concurrency: int, timeout: float) -> list:
    options = (
        f"-n {requests} -c {concurrency} -t {int(max(1, timeout))} -m POST -T application/json"
    )
    return ["hey", *options.split(), "-d", body.decode(), url]


def wrk_script(body: bytes) -> str:
    return (
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(body.decode())}\n"
    )


def parse_hey(text: str) -> dict:
    """hey's summary: its percentiles (ms), requests/s and status counts. hey prints
    "0% in 0.0000 secs" for the percentiles it could not fill (fewer answers than needed):
    those are left out."""
    found: dict[str, Any] = {"percentiles_ms": {}, "status": {}}
    for share, secs in re.findall(r"^\s*(\d+(?:\.\d+)?)% in ([\d.]+) secs", text, re.M):
        if float(share) > 0:
            found["percentiles_ms"][f"p{share}"] = float(secs) * 1000.0
    for key, name in (
        ("throughput", "Requests/sec"),
        ("mean_ms", "Average"),
        ("max_ms", "Slowest"),
    ):
        match = re.search(rf"^\s*{re.escape(name)}:\s*([\d.]+)", text, re.M)
        if match:
            value = float(match.group(1))
            found[key] = value if key == "throughput" else value * 1000.0
    for code, count in re.findall(r"^\s*\[(\d+)\]\s+(\d+) responses", text, re.M):
        found["status"][code] = int(count)
    errors = text.split("Error distribution:", 1)
    found["errors"] = (
        sum(int(n) for n in re.findall(r"^\s*\[(\d+)\]", errors[1], re.M)) if len(errors) > 1 else 0
    )
    return found


async def ours_on_one_body(server: Server, body: bytes, cfg: DictConfig) -> Summary:
    """Our closed loop with hey's settings and its one body: the like-for-like figure."""
    requests, concurrency = int(cfg.crosscheck.requests), int(cfg.crosscheck.concurrency)
    async with client_for(server.url, cfg, concurrency) as client:
        send = http_sender(client, server.target.route, [body])
        seconds = float(cfg.crosscheck.seconds)
        await closed_loop(send, concurrency, concurrency, seconds)  # open the connections
        return summarise(await closed_loop(send, requests, concurrency, seconds))


def crosscheck(server: Server, body: bytes, cfg: DictConfig, run_dir: Path) -> dict:
    """The equivalent hey and wrk commands; with crosscheck.run, hey's figures beside ours."""
    url = f"{server.url}/{server.target.route}"
    requests, concurrency = int(cfg.crosscheck.requests), int(cfg.crosscheck.concurrency)
    hey = hey_command(url, body, requests, concurrency, float(cfg.client.timeout_s))
    (run_dir / "wrk_post.lua").write_text(wrk_script(body))
    wrk = ["wrk", "-t1", f"-c{concurrency}", "-d30s", "--latency", "-s", "wrk_post.lua", url]
    out: dict[str, Any] = {
        "target": server.target.name,
        "hey_command": shlex.join(hey),
        "wrk_command": shlex.join(wrk) + "   # wrk_post.lua is in the run folder",
        "note": "hey sends one fixed body; `ours` is our closed loop on that same body",
    }
    print(f"cross-check command: {out['hey_command']}")
    if not cfg.crosscheck.run:
        return out
    if shutil.which("hey") is None:
        out["hey"] = {"error": "hey is not on PATH"}
        return out
    out["ours"] = asdict(run_loop(ours_on_one_body(server, body, cfg)))
    limit = float(cfg.crosscheck.seconds) + float(cfg.client.timeout_s)
    try:
        done = subprocess.run(hey, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        out["hey"] = {"error": f"hey ran past crosscheck.seconds + client.timeout_s ({limit:g} s)"}
        return out
    out["hey"] = parse_hey(done.stdout) if done.returncode == 0 else {"error": done.stderr}
    (run_dir / "hey.txt").write_text(done.stdout + done.stderr)
    return out


def run_target(
    target: Target, cfg: DictConfig, run_dir: Path, cpus, threads: int, bodies: list[bytes]
) -> dict:
    """Start a server for `target`, measure its loads, stop it: the target's record."""
    folder = run_dir / "servers" / target.name
    record: dict[str, Any] = {"requests_pool": len(bodies)}
    started = time.perf_counter()
    server = start_server(target, cfg, folder, cpus, threads)
    try:
        record["ready"] = wait_ready(server, float(cfg.server.ready_timeout_s))
        record["startup_s"] = time.perf_counter() - started
        record["loads"] = [_plain(m) for m in run_loop(measure(server, bodies, cfg))]
        if cfg.crosscheck.target == target.name:
            record["crosscheck"] = crosscheck(server, bodies[0], cfg, run_dir)
    finally:
        record["server_stop"] = stop_server(server, float(cfg.server.stop_timeout_s))
        record["server_log"] = str(folder / "server.log")
    return record


def _plain(measured: Measured) -> dict:
    return {
        "load": asdict(measured.load),
        "summary": asdict(measured.summary),
        "batch_mean": measured.batch_mean,
        "max_lag_ms": measured.max_lag_ms,
    }


# -- ratios, goals and the report ------------------------------------------------------------
def stat_of(results: dict, target: str, load: str, stat: str) -> float | None:
    record = results.get(target) or {}
    for measured in record.get("loads", []):
        if measured["load"]["name"] == load:
            return Summary(**measured["summary"]).stat(stat)
    return None


def parse_ratios(cfg: DictConfig, names: list[str]) -> list[dict]:
    ratios = OmegaConf.to_container(cfg.ratios, resolve=True) or []
    for n, r in enumerate(ratios):
        key = f"ratios[{n}]"
        missing = [k for k in ("name", "a", "b", "load", "stat") if k not in r]
        _require(not missing, key, r, "keys name, a, b, load and stat")
        for side in ("a", "b"):
            _require(r[side] in names, f"{key}.{side}", r[side], f"a target among {names}")
        _require(r["stat"] in RATIO_STATS, f"{key}.stat", r["stat"], f"one of {RATIO_STATS}")
    return ratios


def parse_goals(cfg: DictConfig, names: list[str], ratios: list[dict]) -> list[dict]:
    goals = OmegaConf.to_container(cfg.goals, resolve=True) or []
    ratio_names = [r["name"] for r in ratios]
    for n, g in enumerate(goals):
        key = f"goals[{n}]"
        _require("name" in g, key, g, "a name")
        _require(g.get("min") is not None or g.get("max") is not None, key, g, "min and/or max")
        if "ratio" in g:
            _require(g["ratio"] in ratio_names, f"{key}.ratio", g["ratio"], str(ratio_names))
            continue
        _require(g.get("target") in ["*", *names], f"{key}.target", g.get("target"), "* or a name")
        _require("load" in g, f"{key}.load", None, "* or a load name")
        _require(g.get("stat") in STATS, f"{key}.stat", g.get("stat"), f"one of {STATS}")
    return goals


def compute_ratios(ratios: list[dict], results: dict) -> list[dict]:
    out = []
    for r in ratios:
        a = stat_of(results, r["a"], r["load"], r["stat"])
        b = stat_of(results, r["b"], r["load"], r["stat"])
        value = a / b if a is not None and b else None
        out.append({**r, "value": value, "a_value": a, "b_value": b})
    return out


def check_goals(goals: list[dict], results: dict, ratios: list[dict]) -> list[dict]:
    """Each goal: pass / fail / not measured, and the value judged (the worst over `*`)."""
    out = []
    for goal in goals:
        if "ratio" in goal:
            values = [r["value"] for r in ratios if r["name"] == goal["ratio"]]
        else:
            values = [
                Summary(**m["summary"]).stat(goal["stat"])
                for name, record in results.items()
                if goal["target"] in ("*", name)
                for m in record.get("loads", [])
                if goal["load"] in ("*", m["load"]["name"])
            ]
        values = [v for v in values if v is not None]
        low, high = goal.get("min"), goal.get("max")
        if not values:
            out.append({**goal, "value": None, "result": "not measured"})
            continue
        worst = max(values) if high is not None else min(values)
        passed = all((low is None or v >= low) and (high is None or v <= high) for v in values)
        out.append({**goal, "value": worst, "result": "pass" if passed else "fail"})
    return out


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _number(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{label}: {n}" for label, n in errors.items()) or "0"


def table_rows(targets: list[Target], results: dict) -> list[list[str]]:
    rows = []
    for t in targets:
        record = results[t.name]
        head = [t.name, t.flavour_label, f"/{t.route}", "on" if t.batching else "off"]
        if "loads" not in record:
            reason = record.get("skipped") or record.get("error", "").splitlines()[0]
            rows.append([*head, "–", f"{record['status']}: {reason}", *["–"] * 7])
            continue
        for m in record["loads"]:
            s, load = Summary(**m["summary"]), Load(**m["load"])
            rows.append(
                [
                    *head,
                    f"{load.name} ({load.label})",
                    f"{s.ok} / {s.sent}",
                    _errors(s.errors),
                    _ms(s.p50),
                    _ms(s.p95),
                    _ms(s.p99),
                    f"{s.throughput:.1f}",
                    "–" if m["batch_mean"] is None else f"{m['batch_mean']:.1f}",
                    ", ".join(f"{k} {_ms(v)}" for k, v in s.stages_ms.items()) or "–",
                ]
            )
    return rows


HEADER = ["target", "flavour", "route", "batching", "load", "ok / sent", "errors"]
HEADER += ["p50 ms", "p95 ms", "p99 ms", "req/s", "mean batch", "server stages ms (median)"]


def markdown(report: dict, targets: list[Target]) -> str:
    rows = table_rows(targets, report["results"])
    lines = [
        f"Command: `{report['command']}`",
        "",
        f"Machine: {machine_line(report)}. Note: {report['note']}.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "| ratio | load | value |",
        "|---|---|---|",
        *(
            f"| {r['name']} | {r['load']} | {_number(r['value'], '.2f')} |"
            for r in report["ratios"]
        ),
        "",
        "| goal | value | result |",
        "|---|---|---|",
        *(
            f"| {g['name']} | {_number(g['value'], '.4g')} | {g['result']} |"
            for g in report["goals"]
        ),
    ]
    check = report.get("crosscheck")
    if check:
        lines += ["", f"Cross-check ({check['target']}): `{check['hey_command']}`"]
        if "hey" in check and "percentiles_ms" in check["hey"]:
            hey, ours = check["hey"], check["ours"]
            lines += [
                "",
                "| tool | p50 ms | p99 ms | req/s |",
                "|---|---|---|---|",
                f"| ours | {_ms(ours['p50'])} | {_ms(ours['p99'])} | {ours['throughput']:.1f} |",
                f"| hey | {_ms(hey['percentiles_ms'].get('p50'))} | "
                f"{_ms(hey['percentiles_ms'].get('p99'))} | {hey.get('throughput', 0):.1f} |",
            ]
    return "\n".join(lines) + "\n"


def machine_line(report: dict) -> str:
    m, threads = report["machine"], report["server_threads"]
    return (
        f"{m['cores']} cores ({m['cpu']}), servers pinned to cpus {threads.get('cpus')}, "
        f"torch {m['versions'].get('torch')} ({threads.get('torch_intra_op')} intra-op threads), "
        f"onnxruntime {m['versions'].get('onnxruntime')} "
        f"({threads.get('onnxruntime_intra_op')} threads)"
    )


def print_report(report: dict, targets: list[Target]) -> None:
    console = Console(width=max(160, Console().width))
    table = Table(title="latency over HTTP on loopback", show_lines=False)
    for column in HEADER:
        table.add_column(column, justify="left" if column in HEADER[:7] else "right")
    for row in table_rows(targets, report["results"]):
        table.add_row(*row)
    console.print(table)
    for r in report["ratios"]:
        value = "not measured" if r["value"] is None else f"{r['value']:.2f}"
        console.print(f"ratio {r['name']} ({r['load']}): {value}")
    for g in report["goals"]:
        console.print(f"goal {g['name']}: {g['result']} (value {g['value']})")
    console.print(f"machine: {machine_line(report)}")
    console.print(f"note: {report['note']}")


def machine() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in VERSIONS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "affinity": sorted(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "commit": commit.stdout.strip() or None,
        "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None,
    }


# -- the run --------------------------------------------------------------------------------
@dataclass
class Plan:
    """A checked config: what runs, with which requests, where, on which cores."""

    targets: list[Target]
    skipped: dict[str, str | None]
    bodies: dict[str, list[bytes]]
    ratios: list[dict]
    goals: list[dict]
    cpus: list[int]
    threads: int
    client_cpus: list[int] | None = None  # the load generator's cores; None: not pinned


def plan(cfg: DictConfig) -> Plan:
    """Every check before any server starts: keys, exports, flavours, request bodies."""
    targets = parse_targets(cfg)
    names = [str(t["name"]) for t in OmegaConf.to_container(cfg.targets, resolve=True)]
    ratios = parse_ratios(cfg, names)
    goals = parse_goals(cfg, names, ratios)
    spec = parse_requests(cfg.requests)
    skipped = {t.name: skip_reason(t, f"targets[{t.name}]") for t in targets}
    bodies = {
        t.name: request_bodies(t.export, t.route, spec) for t in targets if not skipped[t.name]
    }
    cpus = cpu_list(cfg.cpus, "cpus")
    client = cpu_list(cfg.client_cpus, "client_cpus") if cfg.get("client_cpus") else None
    library = cfg.client.get("library")
    _require(library in CLIENTS, "client.library", library, " | ".join(CLIENTS))
    threads = int(cfg.threads or len(cpus))
    _require(threads >= 1, "threads", threads, "null or at least 1")
    return Plan(targets, skipped, bodies, ratios, goals, cpus, threads, client)


def cpu_list(value: Any, key: str) -> list[int]:
    """CPU ids from the config (null: every one this process may use), each one it may use."""
    cpus = sorted(int(c) for c in value) if value else sorted(os.sched_getaffinity(0))
    missing = sorted(set(cpus) - os.sched_getaffinity(0))
    _require(not missing, key, cpus, "cpus this process may run on")
    return cpus


def cores_note(cpus: list[int], client: list[int] | None, library: str = "aiohttp") -> str:
    if client is None or set(client) & set(cpus):
        return SHARED_CORES.format(cpus=sorted(set(cpus) | set(client or ())), client=library)
    return APART.format(cpus=cpus, cpus_client=client, client=library)


def bench(cfg: DictConfig, command: str) -> int:
    """Check the config, run every target, write the report; the exit status: 0 when every
    runnable target ran, 1 when a server failed (the others still run)."""
    checked = plan(cfg)
    # httpx (the readiness probe) logs every request at INFO, on the cores being measured.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if checked.client_cpus:  # the servers are pinned as they start (start_server)
        os.sched_setaffinity(0, checked.client_cpus)
    report: dict[str, Any] = {
        "command": command,
        "started": _now(),
        "machine": machine(),
        "server_threads": probe_threads(checked.cpus, checked.threads),
        "note": cores_note(checked.cpus, checked.client_cpus, str(cfg.client.library)),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "results": {},
    }
    results = report["results"]
    for target in checked.targets:
        results[target.name] = run_or_skip(target, checked, cfg, run_dir)
        if "crosscheck" in results[target.name]:
            report["crosscheck"] = results[target.name].pop("crosscheck")
    report["ratios"] = compute_ratios(checked.ratios, results)
    report["goals"] = check_goals(checked.goals, results, report["ratios"])
    report["finished"] = _now()
    (run_dir / "latency.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (run_dir / "latency.md").write_text(markdown(report, checked.targets))
    print_report(report, checked.targets)
    print(f"results: {run_dir / 'latency.json'} and {run_dir / 'latency.md'}")
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


def run_or_skip(target: Target, checked: Plan, cfg: DictConfig, run_dir: Path) -> dict:
    reason = checked.skipped[target.name]
    if reason:
        print(f"{target.name}: skipped ({reason})")
        return {"status": "skipped", "skipped": reason}
    print(f"{target.name}: serving {target.export} ({target.flavour_label})", flush=True)
    bodies = checked.bodies[target.name]
    try:
        record = run_target(target, cfg, run_dir, checked.cpus, checked.threads, bodies)
    except ServerFailed as err:
        print(f"{target.name}: failed: {err}", file=sys.stderr)
        return {"status": "failed", "spec": _spec(target), "error": str(err)}
    return {"status": "ok", "spec": _spec(target), **record}


def _spec(target: Target) -> dict:
    spec = asdict(target)
    spec.pop("loads")
    return {k: str(v) if isinstance(v, Path) else v for k, v in spec.items()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run(cfg: DictConfig, overrides: list[str]) -> int:
    command = shlex.join(["python", "-m", "recsys_lm.bench.latency", *overrides])
    try:
        return bench(cfg, command)
    except (RecsysLMError, OmegaConfBaseException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="bench_latency")
def main(cfg: DictConfig) -> None:
    sys.exit(run(cfg, list(HydraConfig.get().overrides.task)))


if __name__ == "__main__":
    main()
