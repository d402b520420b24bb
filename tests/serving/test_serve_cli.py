"""`python -m recsys_lm.serve`: the config and its checks in-process (uvicorn.run captured),
and one real server subprocess on 127.0.0.1 that is killed with SIGKILL after acknowledging
events, restarted, and found to have lost none of them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import recsys_lm.serve as serve
from recsys_lm.serving.store import open_store
from tests.conftest import ROOT, export_config, train_run
from tests.serving.service import free_port, metric

KEY = "cli-secret"


def serve_config(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=serve.CONFIG_DIR, version_base="1.3"):
        return compose("serve", overrides=overrides)


@pytest.fixture
def fake_export(tmp_path) -> Path:
    """A folder with a manifest offering onnx: enough for the checks, which load nothing."""
    folder = tmp_path / "export"
    folder.mkdir()
    manifest = {"format": 1, "version": "0123456789ab", "flavours": {"onnx": {}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture
def captured(monkeypatch):
    """uvicorn.run replaced by a recorder: what the entry point would serve, and how."""
    calls = []
    monkeypatch.setattr(serve.uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    return calls


def run_serve(overrides: list[str]) -> int:
    return serve.run(serve_config(overrides))


# -- in-process: config, checks, bind address, API key ----------------------------------------
def test_the_default_bind_address_is_loopback(fake_export, tmp_path, captured, capsys):
    cfg = serve_config([f"export={fake_export}"])
    assert cfg.host == "127.0.0.1"
    assert "\napi_key:" not in (ROOT / "conf" / "serve.yaml").read_text()  # never the key itself
    code = run_serve([f"export={fake_export}", f"store=sqlite:///{tmp_path / 'e.db'}"])
    assert code == 0
    ((app, options),) = captured
    assert options["host"] == "127.0.0.1" and options["port"] == 8000
    assert "http://127.0.0.1:8000" in capsys.readouterr().out
    settings = app.state.service.settings
    assert settings.reload_on_sighup and settings.max_k == 100 and settings.max_batch == 32


def test_the_api_key_is_read_from_the_environment_variable_the_config_names(
    fake_export, tmp_path, captured, monkeypatch, capsys
):
    store = f"store=sqlite:///{tmp_path / 'e.db'}"
    monkeypatch.setenv("RECSYS_LM_API_KEY", KEY)
    monkeypatch.delenv("OTHER_KEY", raising=False)
    assert run_serve([f"export={fake_export}", store]) == 0
    assert run_serve([f"export={fake_export}", store, "api_key_env=OTHER_KEY"]) == 0
    assert [app.state.service.settings.api_key for app, _ in captured] == [KEY, None]
    code = run_serve(
        [f"export={fake_export}", store, "api_key_env=OTHER_KEY", "require_api_key=true"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "api_key_env" in err and "OTHER_KEY" in err


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ([], ["export", "an export folder"]),
        (["export={missing}"], ["export", "manifest.json"]),
        (["export={export}", "flavour=int8"], ["flavour", "int8", "onnx"]),
        (["export={export}", "pipeline.rerank={missing}"], ["pipeline.rerank", "manifest.json"]),
        (["export={export}", "store=postgres://x/y"], ["postgres", "sqlite:///"]),
        (["export={export}", "limits.default_k=50", "limits.max_k=20"], ["limits", "max_k=20"]),
        (["export={export}", "+limits.max_kk=3"], ["max_kk"]),
        (["export={export}", "workers=0"], ["workers", "at least 1"]),
        (["export={export}", "blas_threads=0"], ["blas_threads", ">= 1"]),
        (["export={export}", "monitor.window=0"], ["monitor", "window", ">= 1"]),
        (["export={export}", "+monitor.windows=5"], ["monitor", "windows"]),
    ],
)
def test_a_config_mistake_exits_2_with_one_line_before_any_port_is_bound(
    fake_export, tmp_path, captured, capsys, overrides, words
):
    names = {"export": fake_export, "missing": tmp_path / "nowhere"}
    filled = [o.format(**names) for o in overrides]
    code = run_serve([f"store=sqlite:///{tmp_path / 'e.db'}", *filled])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    for word in words:
        assert word in err, f"{word!r} not in {err}"
    assert not captured  # uvicorn never started


def test_several_workers_build_their_app_from_the_config_in_the_environment(
    fake_export, tmp_path, captured, monkeypatch
):
    monkeypatch.delenv(serve.CONFIG_ENV, raising=False)
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    assert run_serve([f"export={fake_export}", f"store={store}", "workers=3", "port=8123"]) == 0
    ((target, options),) = captured
    assert target == "recsys_lm.serve:worker_app"
    assert options["factory"] and options["workers"] == 3 and options["host"] == "127.0.0.1"
    app = serve.worker_app()  # what each worker process runs
    settings = app.state.service.settings
    assert not settings.reload_on_sighup  # uvicorn's supervisor restarts workers on SIGHUP
    assert app.state.service.source["export"] == str(fake_export)
    assert app.state.service.store.path == tmp_path / "shared.db"
    app.state.service.store.close()


# -- a real server: SIGKILL loses no acknowledged event ------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny trained two-tower run, exported (eager only) by recsys_lm.export."""
    from recsys_lm.export import export

    overrides = ["head=retrieval", "peft=lora", "trainer.max_steps=2"]
    run_dir = train_run(tmp_path_factory.mktemp("run"), overrides)
    out = tmp_path_factory.mktemp("exports") / "v1"
    export(export_config(run_dir, [f"out={out}", "flavours=[]", "parity.users=5"]))
    return out


class Server:
    """`python -m recsys_lm.serve` in a subprocess, its output in a file."""

    def __init__(self, export: Path, folder: Path, port: int) -> None:
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.log = folder / f"server-{time.time_ns()}.log"
        args = [
            f"export={export}",
            f"store=sqlite:///{folder / 'events.db'}",
            f"port={port}",
            f"paths.log_dir={folder / 'logs'}",
            "access_log=false",
        ]
        env = {**os.environ, "RECSYS_LM_API_KEY": KEY}
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "recsys_lm.serve", *args],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def output(self) -> str:
        return self.log.read_text()

    def wait_ready(self, timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited:\n{self.output()[-3000:]}"
            try:
                answer = httpx.get(f"{self.url}/readyz", timeout=2)
                if answer.status_code == 200:
                    return answer.json()
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.output()[-3000:]}")

    def stop(self, sig: int = signal.SIGKILL) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(60)


def listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) == 0


async def post_events(url: str, events: list[dict]) -> list[int]:
    """Each event in its own request, all at once (the service group-commits them)."""
    headers = {"X-API-Key": KEY}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        answers = await asyncio.gather(*(client.post("/events", json=e) for e in events))
    assert [a.status_code for a in answers] == [200] * len(events), answers[0].text
    return [a.json()["seq"][0] for a in answers]


@pytest.mark.slow
def test_sigkill_after_acknowledged_events_loses_none_of_them(exported, tmp_path):
    """Acceptance: N events acknowledged, the server SIGKILLed at once, then restarted on
    the same store: all N are in the event log and in their users' state, after the users'
    seeded histories (seeded once, not again on restart). Also: the server binds 127.0.0.1
    only, wants the API key from its environment, and reloads on SIGHUP."""
    items = pd.read_parquet(exported / "catalogue.parquet")["item_id"].tolist()
    users = pd.read_parquet(exported / "users.parquet")
    seeded = {u: list(h) for u, h in zip(users["user_id"], users["history"], strict=True)}
    known = list(seeded)[:4]
    port = free_port()
    server = Server(exported, tmp_path, port)
    try:
        ready = server.wait_ready()
        assert ready["task"] == "retrieval" and ready["flavour"] == "eager"
        assert f"http://127.0.0.1:{port}" in server.output()
        assert listening("127.0.0.1", port) and not listening("127.0.0.2", port)
        assert httpx.post(f"{server.url}/recommend", json={"user": known[0]}).status_code == 401

        events = [
            {
                "user": [*known, "walk-in"][n % 5],
                "item": items[(7 * n) % len(items)],
                "time": 1e9 + n,
            }
            for n in range(40)
        ]
        seqs = asyncio.run(post_events(server.url, events))
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    finally:
        server.stop()

    store = open_store(f"sqlite:///{tmp_path / 'events.db'}")
    try:
        logged = {e.seq: e for e in store.events_after(0, limit=10_000)}
        assert len(logged) == len(events)
        for seq, sent in zip(seqs, events, strict=True):
            assert (logged[seq].user, logged[seq].item, logged[seq].time) == (
                sent["user"],
                sent["item"],
                sent["time"],
            )
        in_order = [e for _, e in sorted(zip(seqs, events, strict=True), key=lambda p: p[0])]
        posted = {u: [e["item"] for e in in_order if e["user"] == u] for u in [*known, "walk-in"]}
        for user in known:
            assert store.history(user) == seeded[user] + posted[user]
        assert store.history("walk-in") == posted["walk-in"]
    finally:
        store.close()

    again = Server(exported, tmp_path, port)
    headers = {"X-API-Key": KEY}
    try:
        first = again.wait_ready()
        for user in known:  # seeded again at start: nothing doubled
            state = httpx.get(f"{again.url}/users/{user}", headers=headers).json()
            assert state["history"] == seeded[user] + posted[user]
        walk_in = httpx.get(f"{again.url}/users/walk-in", headers=headers).json()["history"]
        assert walk_in == posted["walk-in"]
        answer = httpx.post(f"{again.url}/recommend", json={"user": "walk-in"}, headers=headers)
        assert answer.status_code == 200 and not set(answer.json()["items"]) & set(walk_in)
        # SIGHUP reloads the export in place.
        again.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while httpx.get(f"{again.url}/readyz").json()["loaded_at"] == first["loaded_at"]:
            assert time.monotonic() < deadline, again.output()[-3000:]
            time.sleep(0.2)
        # The admin route opens another export folder (here: the same one again)...
        url = f"{again.url}/admin/reload"
        moved = httpx.post(url, json={"export": str(exported)}, headers=headers, timeout=60)
        assert moved.status_code == 200 and moved.json()["source"]["export"] == str(exported)
        # ...and refuses one that is not an export, still serving the old model.
        wrong = httpx.post(url, json={"export": str(tmp_path)}, headers=headers)
        assert wrong.status_code == 422 and "manifest.json" in wrong.json()["detail"]
        text = httpx.get(f"{again.url}/metrics").text
        assert metric(text, "recsys_lm_reloads_total", outcome="ok") == 3
        assert metric(text, "recsys_lm_event_log_last_seq") == max(seqs)
        # SIGTERM: uvicorn's graceful shutdown (the app's shutdown runs); recent uvicorn then
        # re-raises the signal, so the exit status may say SIGTERM.
        assert again.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in again.output()
    finally:
        again.stop()


def test_blas_runs_on_the_configured_threads_and_null_leaves_it_alone():
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    before = blas_threads()
    if not before:
        pytest.skip("numpy here links no BLAS that threadpoolctl can see")
    with threadpool_limits(limits=None):  # restores the process's setting afterwards
        threadpool_limits(limits=2, user_api="blas")
        serve.limit_blas(None)
        assert blas_threads() == {2}
        serve.limit_blas(1)
        assert blas_threads() == {1}
    assert blas_threads() == before
    assert serve_config([])["blas_threads"] == 1  # the service's default
