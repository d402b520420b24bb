"""`python -m recsys_lm.bench.latency`: the percentile and summary arithmetic on known samples,
the closed- and open-loop generators against a fake sender (counts, time bounds, concurrency),
the request mix, hey's output, ratios and goals, the config's checks, and (slow) one real run
against tiny exports served by `python -m recsys_lm.serve`."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import uvicorn
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from recsys_lm.bench import latency as bench
from recsys_lm.errors import ConfigError
from tests.conftest import export_config, train_run


def bench_config(tmp_path: Path, overrides: list[str] | None = None):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=bench.CONFIG_DIR, version_base="1.3"):
        cfg = compose("bench_latency", overrides=overrides or [])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "bench")
    return cfg


def outcome(start: float, ms: float, label: str = "200", stages=None) -> bench.Outcome:
    return bench.Outcome(start, start + ms / 1000.0, label, stages)


# -- arithmetic ------------------------------------------------------------------------------
def test_percentiles_interpolate_linearly_between_order_statistics():
    shuffled = [float(x) for x in range(100, 0, -1)]  # 1..100 ms, in reverse order
    assert bench.percentiles(shuffled, (50, 95, 99)) == pytest.approx([50.5, 95.05, 99.01])
    assert bench.percentiles([1.0, 2.0, 3.0, 4.0], (50, 99)) == pytest.approx([2.5, 3.97])
    assert bench.percentiles([7.0], (50, 99)) == [7.0, 7.0]
    assert bench.percentiles([], (50,)) == [None]


def test_a_summary_times_answered_requests_and_counts_the_rest_by_label():
    outcomes = [
        outcome(0.0, 10.0, stages={"retrieve": 1.0}),
        outcome(0.1, 30.0, stages={"retrieve": 3.0, "rerank": 8.0}),
        outcome(0.2, 20.0, stages={"retrieve": 2.0, "rerank": 6.0}),
        outcome(0.3, 5.0, "500"),
        outcome(0.4, 1.0, "503"),
        outcome(0.5, 500.0, "timeout"),  # ends last: 1.0 s after the first start
    ]
    s = bench.summarise(outcomes)
    assert (s.sent, s.ok) == (6, 3)
    assert s.errors == {"500": 1, "503": 1, "timeout": 1}
    assert s.stat("5xx") == 2 and s.stat("errors") == 3
    assert (s.p50, s.mean, s.max) == pytest.approx((20.0, 20.0, 30.0))
    assert s.p99 == pytest.approx(29.8)  # 20 + 0.98 * (30 - 20)
    assert s.seconds == pytest.approx(1.0)
    assert s.throughput == pytest.approx(3.0)  # answered requests per second of the window
    assert s.stages_ms == {"rerank": 7.0, "retrieve": 2.0}
    empty = bench.summarise([outcome(0.0, 3.0, "422")])
    assert empty.ok == 0 and empty.p50 is None and empty.throughput == 0.0


# -- the generators against a fake sender -------------------------------------------------
class FakeSender:
    """Answers after `seconds`; records which requests came and the most in flight at once."""

    def __init__(self, seconds: float = 0.0, label: str = "200") -> None:
        self.seconds, self.label = seconds, label
        self.sent: list[int] = []
        self.in_flight = self.most = 0

    async def __call__(self, i: int):
        self.sent.append(i)
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self.in_flight -= 1
        return self.label, None


def test_the_open_loop_sends_the_configured_count_and_then_stops():
    send = FakeSender(0.001)
    started = time.perf_counter()
    outcomes, lag = asyncio.run(bench.open_loop(send, 40, rate=2000, seconds=10, first=7))
    assert time.perf_counter() - started < 2.0  # 40 arrivals at 2,000/s: about 20 ms
    assert sorted(send.sent) == list(range(7, 47))
    assert len(outcomes) == 40 and all(o.ok for o in outcomes)
    assert lag >= 0.0


def test_the_open_loop_stops_at_its_time_bound():
    send = FakeSender()
    started = time.perf_counter()
    outcomes, _ = asyncio.run(bench.open_loop(send, 100_000, rate=200, seconds=0.3))
    elapsed = time.perf_counter() - started
    assert 0.25 < elapsed < 3.0  # 100,000 arrivals at 200/s would take 500 s
    # Seeded arrivals: the count is fixed; 60 expected at 200/s over 0.3 s (sd ~8).
    assert 20 <= len(outcomes) <= 120


def test_the_open_loop_sends_on_schedule_without_waiting_for_answers():
    send = FakeSender(0.5)
    started = time.perf_counter()
    outcomes, _ = asyncio.run(bench.open_loop(send, 20, rate=200, seconds=10))
    assert time.perf_counter() - started < 3.0  # one at a time would take 20 * 0.5 = 10 s
    assert send.most >= 10
    # Latency counts from each scheduled arrival, so it is at least the answer's 0.5 s.
    assert min(o.end - o.start for o in outcomes) >= 0.499


def test_the_open_loop_drops_beyond_its_in_flight_bound_and_marks_unanswered_requests():
    send = FakeSender(30.0)
    started = time.perf_counter()
    outcomes, _ = asyncio.run(
        bench.open_loop(send, 10, rate=1000, seconds=10, max_in_flight=3, drain_s=0.1)
    )
    assert time.perf_counter() - started < 2.0  # the drain bound, not the 30 s answers
    labels = sorted(o.label for o in outcomes)
    assert labels == ["dropped"] * 7 + ["unfinished"] * 3
    assert len(send.sent) == 3


def test_the_closed_loop_keeps_its_concurrency_and_sends_each_request_once():
    send = FakeSender(0.002)
    outcomes = asyncio.run(bench.closed_loop(send, 40, concurrency=4, seconds=10, first=100))
    assert sorted(send.sent) == list(range(100, 140))
    assert len(outcomes) == 40 and send.most == 4
    assert all(o.end - o.start >= 0.0019 for o in outcomes)


def test_the_closed_loop_stops_at_its_time_bound():
    send = FakeSender(0.01)
    started = time.perf_counter()
    outcomes = asyncio.run(bench.closed_loop(send, 1_000_000, concurrency=2, seconds=0.2))
    assert time.perf_counter() - started < 1.5  # a million requests would take hours
    assert 1 <= len(outcomes) <= 42  # 2 clients * 0.2 s / 10 ms = 40 at most


# -- requests ---------------------------------------------------------------------------------
@pytest.fixture
def export_tables(tmp_path) -> Path:
    """The two tables the request mix reads, as an export writes them."""
    folder = tmp_path / "export"
    folder.mkdir()
    items = [f"i{n}" for n in range(1000)]
    pd.DataFrame({"index": range(1000), "item_id": items}).to_parquet(folder / "catalogue.parquet")
    # 5 to 11 items each, no item in two histories: a body's history names its user.
    histories = {f"u{n}": items[12 * n : 12 * n + 5 + n % 7] for n in range(50)}
    histories["lonely"] = ["i3"]  # one interaction: nothing to hold out
    users = pd.DataFrame({"user_id": list(histories), "history": list(histories.values())})
    users.to_parquet(folder / "users.parquet")
    return folder


def test_score_requests_hold_the_latest_item_among_others_outside_the_history(export_tables):
    spec = bench.RequestSpec(mode="histories", candidates=100, max_history=3, seed=1)
    bodies = [json.loads(b) for b in bench.request_bodies(export_tables, "score", spec)]
    histories = pd.read_parquet(export_tables / "users.parquet").set_index("user_id")["history"]
    assert len(bodies) == 50  # every user but the one with a single interaction
    for body in bodies:
        full = next(list(h) for h in histories if list(h)[:-1][-3:] == body["history"])
        assert len(body["history"]) == 3
        candidates = body["candidates"]
        assert len(candidates) == len(set(candidates)) == 100
        assert full[-1] in candidates
        assert not set(candidates) & set(full[:-1])
    again = [json.loads(b) for b in bench.request_bodies(export_tables, "score", spec)]
    other = bench.request_bodies(export_tables, "score", bench.RequestSpec(seed=2))
    assert again == bodies and [json.loads(b) for b in other] != bodies


def test_recommend_requests_name_stored_users(export_tables):
    spec = bench.RequestSpec(mode="users", k=7, users=10)
    bodies = [json.loads(b) for b in bench.request_bodies(export_tables, "recommend", spec)]
    assert len(bodies) == 10 and len({b["user"] for b in bodies}) == 10
    assert all(set(b) == {"user", "k"} and b["k"] == 7 and b["user"] != "lonely" for b in bodies)


# -- hey, ratios, goals -------------------------------------------------------------------------
HEY = """
Summary:
  Total:\t0.0375 secs
  Slowest:\t0.0109 secs
  Fastest:\t0.0014 secs
  Average:\t0.0037 secs
  Requests/sec:\t533.1741

Latency distribution:
  10% in 0.0016 secs
  50% in 0.0030 secs
  95% in 0.0109 secs
  0% in 0.0000 secs

Status code distribution:
  [200]\t18 responses
  [503]\t1 responses

Error distribution:
  [1]\tPost "http://127.0.0.1:1/recommend": EOF
"""


def test_hey_output_is_read_and_its_unfilled_percentiles_left_out():
    found = bench.parse_hey(HEY)
    assert found["percentiles_ms"] == pytest.approx({"p10": 1.6, "p50": 3.0, "p95": 10.9})
    assert found["throughput"] == pytest.approx(533.1741)
    assert found["mean_ms"] == pytest.approx(3.7) and found["max_ms"] == pytest.approx(10.9)
    assert found["status"] == {"200": 18, "503": 1}
    assert found["errors"] == 1


def measured(name: str, p50: float, throughput: float, errors=None) -> dict:
    summary = bench.Summary(100, 100, errors or {}, p50, p50, p50, p50, p50, throughput, 1.0)
    load = bench.Load(name, "closed", 100, 10.0)
    return {"load": vars(load), "summary": vars(summary)}


def test_ratios_and_goals_read_the_measured_figures():
    results = {
        "fast": {"status": "ok", "loads": [measured("c1", 2.0, 400), measured("c16", 5.0, 900)]},
        "slow": {"status": "ok", "loads": [measured("c1", 8.0, 100, {"500": 2})]},
        "gone": {"status": "skipped", "skipped": "no export"},
    }
    ratios = bench.compute_ratios(
        [
            {"name": "slow/fast", "a": "slow", "b": "fast", "load": "c1", "stat": "p50"},
            {"name": "missing", "a": "gone", "b": "fast", "load": "c1", "stat": "p50"},
        ],
        results,
    )
    assert [r["value"] for r in ratios] == [4.0, None]
    goals = bench.check_goals(
        [
            {"name": "fast", "target": "fast", "load": "c1", "stat": "p99", "max": 5},
            {"name": "ratio", "ratio": "slow/fast", "min": 5},
            {"name": "no 5xx", "target": "*", "load": "*", "stat": "5xx", "max": 0},
            {"name": "gone", "target": "gone", "load": "c1", "stat": "p50", "max": 1},
        ],
        results,
        ratios,
    )
    assert [(g["result"], g["value"]) for g in goals] == [
        ("pass", 2.0),
        ("fail", 4.0),
        ("fail", 2.0),  # the worst of every load
        ("not measured", None),
    ]


# -- config and servers ---------------------------------------------------------------------
def test_without_exports_every_target_is_skipped_with_its_reason(tmp_path):
    checked = bench.plan(bench_config(tmp_path))
    assert len(checked.targets) >= 8 and not checked.bodies
    assert all("no export" in reason for reason in checked.skipped.values())
    assert checked.threads == len(checked.cpus) >= 1


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["only=[nope]"], "only"),
        (["fast_loads.0.mode=sideways"], "mode"),
        (["fast_loads.1.requests=0"], "requests"),
        (["fast_loads.2.rate=0"], "rate"),
        (["requests.mode=guess"], "requests.mode"),
        (["exports.sequential={folder}"], "export"),  # a folder with no manifest.json
        (["ratios.0.a=nope"], "ratios[0].a"),
        (["goals.0.stat=p42"], "goals[0].stat"),
        (["cpus=[4096]"], "cpus"),
        (["client_cpus=[4096]"], "client_cpus"),
        (["client.library=curl"], "client.library"),
    ],
)
def test_config_mistakes_name_their_key_before_any_server_starts(tmp_path, overrides, key):
    overrides = [o.format(folder=tmp_path) for o in overrides]
    with pytest.raises(ConfigError) as err:
        bench.plan(bench_config(tmp_path, overrides))
    assert key in err.value.key


def test_the_note_says_whether_the_load_generator_shares_the_servers_cores():
    assert "share cpus [0, 1]" in bench.cores_note([0, 1], None)
    assert "share cpus [0, 1]" in bench.cores_note([1], [0, 1])
    apart = bench.cores_note([1], [0])
    assert "servers run on cpus [1]" in apart and "on cpus [0]" in apart and "share" not in apart


@pytest.fixture(scope="module")
def tiny_server():
    """A real uvicorn on loopback answering /recommend and /metrics as the service does."""
    from fastapi import FastAPI, Response
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    registry = CollectorRegistry()
    sizes = Histogram(bench.BATCH_METRIC, "requests per model call", ["route"], registry=registry)
    for size in (2, 4):
        sizes.labels(route="/recommend").observe(size)
    app = FastAPI()

    @app.post("/recommend")
    async def recommend(body: dict):
        return {"items": [], "stages_ms": {"retrieve": 1.5}}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type="text/plain")

    server = uvicorn.Server(
        uvicorn.Config(app, host=bench.HOST, port=bench.free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    yield f"http://{bench.HOST}:{server.config.port}"
    server.should_exit = True
    thread.join(10)


@pytest.mark.parametrize("library", sorted(bench.CLIENTS))
def test_each_client_sends_reads_the_metrics_and_labels_a_refused_connection(
    tmp_path, tiny_server, library
):
    cfg = bench_config(tmp_path, [f"client.library={library}"])

    async def check():
        async with bench.client_for(tiny_server, cfg, 2) as client:
            send = bench.http_sender(client, "recommend", [b'{"user": "u"}'])
            assert await send(0) == ("200", {"retrieve": 1.5})
            missing = bench.http_sender(client, "score", [b"{}"])
            assert await missing(0) == ("404", None)
            assert await bench.scrape(client, "/recommend") == (6.0, 2.0)
        nobody = f"http://{bench.HOST}:{bench.free_port()}"
        async with bench.client_for(nobody, cfg, 1) as client:
            assert await bench.http_sender(client, "recommend", [b"{}"])(0) == ("connect", None)
            assert await bench.scrape(client, "/recommend") is None

    asyncio.run(check())


def test_a_flavour_the_export_lacks_skips_its_target(tmp_path, export_tables):
    (export_tables / "manifest.json").write_text(json.dumps({"flavours": {"onnx": {}}}))
    checked = bench.plan(
        bench_config(
            tmp_path, [f"exports.two_tower={export_tables}", "only=[two-tower-onnx,two-tower-int8]"]
        )
    )
    assert checked.skipped["two-tower-onnx"] is None
    assert "int8 not exported" in checked.skipped["two-tower-int8"]
    assert list(checked.bodies) == ["two-tower-onnx"]


def test_the_server_command_carries_the_target_and_the_pinned_threads(tmp_path):
    odd = tmp_path / "it's, an=export"
    target = bench.Target(
        "p", odd, "onnx", pipeline=True, rerank=tmp_path / "click", n=50, batching=False
    )
    cfg = bench_config(tmp_path)
    command = bench.serve_command(target, 8123, tmp_path / "srv", cfg, threads=3)
    assert command[1:3] == ["-m", "recsys_lm.serve"]
    assert f"export='{str(odd).replace(chr(39), chr(92) + chr(39))}'" in command
    assert {"flavour=onnx", "port=8123", "host=127.0.0.1", "batching.max_batch=1"} <= set(command)
    assert "threads=3" in command
    assert {"pipeline.n=50", "pipeline.rerank_flavour=eager", "access_log=false"} <= set(command)
    assert f"store='sqlite:///{tmp_path / 'srv' / 'events.db'}'" in command
    env = bench.server_env(3)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"


# -- end to end (slow): tiny exports, real servers, the real config -----------------------------
@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """Tiny trained sequential and click runs on the same sample data, exported by
    recsys_lm.export (the click one with its onnx-int8 flavour)."""
    from recsys_lm.export import export

    heads = {
        "sequential": (["head=sequential", "peft=none", "freeze=head_only"], ["onnx"]),
        "click": (["head=click", "peft=none"], ["onnx-int8"]),
    }
    out = {}
    for name, (overrides, flavours) in heads.items():
        run_dir = train_run(
            tmp_path_factory.mktemp(f"run_{name}"), [*overrides, "trainer.max_steps=2"]
        )
        out[name] = tmp_path_factory.mktemp("exports") / name
        export_overrides = [
            f"out={out[name]}",
            f"flavours=[{','.join(flavours)}]",
            "parity.users=5",
            # Two training steps of a random tiny BERT: int8 is judged by the
            # benchmark's figures here, not by parity with an untrained model.
            "parity.int8.min_overlap=0",
            "parity.int8.max_metric_change=null",
        ]
        export(export_config(run_dir, export_overrides))
    return out


@pytest.mark.slow
def test_one_run_measures_every_target_over_http_with_no_errors(exports, tmp_path, capsys):
    small = (
        "[{name: c1, mode: closed, concurrency: 1, requests: 10, seconds: 30, warmup: 2},"
        " {name: c4, mode: closed, concurrency: 4, requests: 12, seconds: 30, warmup: 0},"
        " {name: open, mode: open, rate: 20, requests: 8, seconds: 30, warmup: 0}]"
    )
    only = "[sequential,sequential-nobatch,pipeline,click-score-onnx-int8]"
    cfg = bench_config(
        tmp_path,
        [
            f"exports.sequential={exports['sequential']}",
            f"exports.click={exports['click']}",
            f"fast_loads={small}",
            f"slow_loads={small}",
            f"only={only}",
            "requests.users=10",
            "ratios=[{name: nobatch/batch, a: sequential-nobatch, b: sequential, load: c4, stat: p50}]",
            "goals=[{name: no errors, target: '*', load: '*', stat: errors, max: 0}]",
        ],
    )
    assert bench.run(cfg, ["(test)"]) == 0
    report = json.loads((tmp_path / "bench" / "latency.json").read_text())
    names = ["sequential", "sequential-nobatch", "pipeline", "click-score-onnx-int8"]
    assert list(report["results"]) == names
    for name in names:
        record = report["results"][name]
        assert record["status"] == "ok", record
        assert [m["load"]["name"] for m in record["loads"]] == ["c1", "c4", "open"]
        for m in record["loads"]:
            s = m["summary"]
            assert s["errors"] == {} and s["ok"] == s["sent"] == m["load"]["requests"], (name, s)
            assert 0 < s["p50"] <= s["p95"] <= s["p99"] <= s["max"]
        # Stopped by SIGTERM within the timeout: uvicorn shut down, then re-raised the signal.
        assert record["server_stop"] == {"exit": -15, "killed": False}
    assert report["results"]["click-score-onnx-int8"]["ready"]["flavour"] == "onnx-int8"
    stages = report["results"]["pipeline"]["loads"][0]["summary"]["stages_ms"]
    assert set(stages) == {"retrieve", "rerank"}
    # Batching off: every model call answers one request.
    nobatch = report["results"]["sequential-nobatch"]["loads"][1]
    assert nobatch["batch_mean"] == pytest.approx(1.0)
    assert report["ratios"][0]["value"] is not None
    assert report["goals"][0]["result"] == "pass"
    threads = report["server_threads"]
    assert threads["torch_intra_op"] == threads["threads"] == len(threads["cpus"])
    assert "hey -n 2000 -c 16" in report["crosscheck"]["hey_command"]
    markdown = (tmp_path / "bench" / "latency.md").read_text()
    assert "| sequential | onnx | /recommend | on | c1 (c=1) | 10 / 10 | 0 |" in markdown
