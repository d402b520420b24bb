"""`python -m recsys_lm.refresh`: a served model refreshed from the service's event log, gated,
versioned, promoted and hot-reloaded; a bad refresh refused; a killed one leaving nothing
behind and using the same events when run again; the rolling protocol's window refresh."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
import uvicorn
from omegaconf import DictConfig

from recsys_lm.refresh import NothingNew, Plan, RefreshError, find_parent, gate, refresh, run
from recsys_lm.registry import Registry
from recsys_lm.serving.store import Event, open_store
from tests.conftest import ROOT, entry_config, export_config, train_run
from tests.serving.service import export_source, free_port

PARENT = [
    "head=sequential",
    "peft=none",
    "freeze=head_only",
    "trainer.max_steps=60",
    "trainer.max_epochs=30",
    "optim.head_lr=3e-3",
]
T0 = 1_800_000_000  # events come after the sample data (2020): new to the parent


def refresh_config(tmp_path: Path, overrides: list[str]) -> DictConfig:
    cfg = entry_config("refresh", overrides)
    cfg.paths.output_dir = str(tmp_path / "hydra")
    return cfg


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """A tiny sequential model trained on the sample data, exported (eager)."""
    from recsys_lm.export import export

    run_dir = train_run(tmp_path_factory.mktemp("parent"), PARENT)
    out = run_dir / "export"
    export(export_config(run_dir, [f"out={out}", "flavours=[]", "parity.users=5"]))
    return out


def new_registry(folder: Path, export: Path) -> Registry:
    registry = Registry(folder / "registry")
    registry.register(export)
    registry.promote("v0001", "first")
    return registry


def predicted_events(export: Path, count: int) -> list[dict]:
    """Events the parent foresees (see predicted_events_of_run), for an export."""
    run_dir = json.loads((export / "manifest.json").read_text())["source_run"]
    return predicted_events_of_run(run_dir, count)


def predicted_events_of_run(run_dir: Path | str, count: int) -> list[dict]:
    """Events the parent foresees: round the users, each taking the parent's top pick for
    its history so far. The parent ranks every one of them first (held-out NDCG@10 1.0),
    so a refresh that breaks the model shows at once."""
    from recsys_lm.build import load_run

    run = load_run(run_dir)
    data = run.data
    users = list(range(min(20, len(data.user_ids))))
    histories = {u: data.history(u) for u in users}
    events = []
    for n in range(count):
        user = users[n % len(users)]
        (item,) = run.model.recommend(histories[user], k=1).items
        histories[user].append(item)
        events.append(
            {"user": str(data.user_ids[user]), "item": str(data.item_ids[item]), "time": T0 + n}
        )
    return events


def append(url: str, events: list[dict]) -> list[int]:
    store = open_store(url)
    try:
        return store.append([Event(e["user"], e["item"], e["time"]) for e in events])
    finally:
        store.close()


def test_the_gate_promotes_within_the_margin_and_says_why():
    cfg = refresh_config(Path("/tmp"), ["run=x", "gate.margin=0.05"])
    result = {"test": {"ndcg@10": 0.096}, "protocol": {"monitor": "val/ndcg@10"}}
    passed = gate(cfg, result, {"ndcg@10": 0.1})
    assert passed["decision"] == "promote" and passed["change"] == pytest.approx(-0.04)
    assert "0.0960 vs current 0.1000 (-4.00%)" in passed["reason"]
    failed = gate(cfg, {**result, "test": {"ndcg@10": 0.094}}, {"ndcg@10": 0.1})
    assert failed["decision"] == "reject" and "worse than the allowed 5.0%" in failed["reason"]
    with pytest.raises(RefreshError, match="gate.metric=auroc"):
        cfg.gate.metric = "auroc"
        gate(cfg, result, {"ndcg@10": 0.1})


@pytest.mark.slow
def test_served_model_is_refreshed_promoted_and_hot_reloaded_without_a_failed_request(
    parent, tmp_path
):
    """Acceptance: serve `<registry>/current`, post events, refresh from the event log: the
    new version is promoted, the service reloads it and /recommend names it; requests sent
    all along never fail; a rollback brings the previous version back into the service."""
    from recsys_lm.serve import model_loader
    from recsys_lm.serving.app import ServiceSettings, create_app

    registry = new_registry(tmp_path, parent)
    url = f"sqlite:///{tmp_path / 'events.db'}"
    source = export_source(registry.root / "current")
    loader = model_loader(source, {"backend": "exact", "options": {}})
    app = create_app(ServiceSettings(), loader, open_store(url), source=source, close_store=True)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    versions = [registry.record("v0001")["model_version"]]
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def keep_asking() -> None:  # bounded: stops with the test, at most 5 minutes
        deadline = time.monotonic() + 300
        with httpx.Client(base_url=base, timeout=30) as client:
            while not stop.is_set() and time.monotonic() < deadline:
                reply = client.post("/recommend", json={"user": user, "k": 5})
                answers.append((reply.status_code, reply.json().get("model_version")))

    try:
        wait_for(base)
        events = predicted_events(parent, 300)
        user = events[0]["user"]
        with httpx.Client(base_url=base, timeout=30) as client:
            for chunk in range(0, len(events), 50):
                body = {"events": events[chunk : chunk + 50]}
                assert client.post("/events", json=body).status_code == 200
        asker = threading.Thread(target=keep_asking, daemon=True)
        asker.start()
        cfg = refresh_config(
            tmp_path,
            [
                f"run={registry.root / 'current'}",
                f"events={url}",
                f"registry={registry.root}",
                f"service={base}",
                "gate.margin=0.5",
            ],
        )
        record = refresh(cfg)
        time.sleep(0.5)  # a few requests on the new model
        assert record["version"] == "v0002" and record["promoted"], record["gate"]
        assert record["plan"]["seq_from"] == 0 and record["plan"]["seq_to"] == 300
        assert record["watermark"] == {"seq": 300, "newest": T0 + 299}
        assert registry.current() == "v0002"
        versions.append(registry.record("v0002")["model_version"])
        assert versions[0] != versions[1]
        with httpx.Client(base_url=base, timeout=30) as client:
            reply = client.post("/recommend", json={"user": user, "k": 5}).json()
            assert reply["model_version"] == versions[1]
            registry.rollback("test rollback")
            assert client.post("/admin/reload").status_code == 200
            back = client.post("/recommend", json={"user": user, "k": 5}).json()
            assert back["model_version"] == versions[0]
    finally:
        stop.set()
        server.should_exit = True
    assert answers and all(status == 200 for status, _ in answers), answers[:3]
    seen = [v for _, v in answers]
    assert set(seen) <= set(versions) and seen[0] == versions[0] and versions[1] in seen
    record = registry.record("v0002")
    assert record["parent"] == "v0001" and record["watermark"] == 300
    assert record["gate"]["decision"] == "promote" and record["refresh"]["plan"]["new_rows"] == 300


def wait_for(base: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("service not ready")


@pytest.mark.slow
def test_a_refresh_with_a_learning_rate_1000x_too_high_is_not_promoted(parent, tmp_path):
    registry = new_registry(tmp_path, parent)
    url = f"sqlite:///{tmp_path / 'events.db'}"
    append(url, predicted_events(parent, 300))
    cfg = refresh_config(
        tmp_path,
        [
            f"run={registry.root / 'current'}",
            f"events={url}",
            f"registry={registry.root}",
            "lr=3.0",  # the parent trained at 3e-3
        ],
    )
    record = refresh(cfg)
    assert record["gate"]["decision"] == "reject" and not record["promoted"]
    assert record["gate"]["new"] < record["gate"]["current"] * 0.99
    assert "worse than the allowed 1.0%" in record["gate"]["reason"]
    assert registry.current() == "v0001" and registry.names() == ["v0001", "v0002"]
    assert registry.record("v0002")["gate"] == record["gate"]
    assert [e["to"] for e in registry.history()] == ["v0001"]
    # Run again (the nightly job): the same parent and events were judged: nothing new made.
    assert refresh(cfg) == {**record, "repeated": True}
    assert registry.names() == ["v0001", "v0002"]


@pytest.mark.slow
def test_a_killed_refresh_changes_nothing_and_reruns_on_the_same_events(parent, tmp_path, capsys):
    """Acceptance: SIGKILL mid fine-tune leaves `current` and the versions as they were;
    events logged after the kill wait for the next refresh: the rerun reads exactly the
    planned range (watermark), the next refresh starts after it."""
    registry = new_registry(tmp_path, parent)
    url = f"sqlite:///{tmp_path / 'events.db'}"
    events = predicted_events(parent, 400)
    append(url, events[:300])
    marker = tmp_path / "killed"
    args = [
        f"run={registry.root / 'current'}",
        f"events={url}",
        f"registry={registry.root}",
        "gate.margin=0.5",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    kill = (
        "overrides=['+callbacks.killer._target_=tests.killer.KillAt',"
        f"'+callbacks.killer.step=3','+callbacks.killer.marker={marker}']"
    )
    first = subprocess.run(
        [sys.executable, "-m", "recsys_lm.refresh", *args, kill], cwd=ROOT, capture_output=True
    )
    assert first.returncode == -9 and marker.read_text() == "3", first.stderr[-2000:]
    assert registry.current() == "v0001" and registry.names() == ["v0001"]
    (folder,) = (registry.root / "refresh").iterdir()
    planned = Plan(**json.loads((folder / "plan.json").read_text()))
    assert (planned.seq_from, planned.seq_to, planned.new_rows) == (0, 300, 300)

    append(url, events[300:])  # logged after the kill: not this refresh's
    # run again, as the scheduler would (in-process: the same command, no second start-up)
    again = refresh_config(tmp_path, [*args[:-1], kill])  # not hydra.run.dir: Hydra's own
    assert run(again) != 2
    assert "version v0002 promoted" in capsys.readouterr().out
    record = json.loads((folder / "refresh.json").read_text())
    assert record["plan"] == json.loads((folder / "plan.json").read_text())
    assert record["watermark"]["seq"] == 300 and registry.current() == "v0002"
    assert len(pd.read_parquet(folder / "events.parquet")) == 300

    cfg = refresh_config(
        tmp_path,
        [f"run={registry.root / 'current'}", f"events={url}", f"registry={registry.root}"],
    )
    cfg.gate.margin = 0.5
    next_one = refresh(cfg)
    assert next_one["plan"]["seq_from"] == 300 and next_one["plan"]["seq_to"] == 400
    assert next_one["promoted"] and find_parent(registry.root / "current").seq == 400
    logged = pd.read_parquet(Path(next_one["folder"]) / "events.parquet")
    assert len(logged) == 400  # every logged interaction so far, each once


def test_nothing_new_is_no_failure_and_mistakes_are_one_error_line(parent, tmp_path, capsys):
    """A file with no row newer than the parent's data: nothing done, exit status 0 (a
    scheduled run may find nothing); a config mistake: exit status 2, nothing registered."""
    registry = new_registry(tmp_path, parent)
    old = tmp_path / "old.csv"
    pd.DataFrame({"user_id": ["u1"], "item_id": ["x"], "timestamp": [5]}).to_csv(old, index=False)
    cfg = refresh_config(
        tmp_path, [f"run={registry.root / 'current'}", f"events={old}", f"registry={registry.root}"]
    )
    with pytest.raises(NothingNew, match="nothing new after the parent's watermark"):
        refresh(cfg)
    assert run(cfg) == 0 and "nothing to refresh" in capsys.readouterr().err
    both = refresh_config(
        tmp_path, [f"run={registry.root / 'current'}", f"events={old}", "window=2"]
    )
    assert run(both) == 2 and "`events`" in capsys.readouterr().err
    missing = refresh_config(tmp_path, [f"run={tmp_path / 'nowhere'}", f"events={old}"])
    assert run(missing) == 2 and "not a training run" in capsys.readouterr().err
    assert registry.names() == ["v0001"] and registry.current() == "v0001"


@pytest.mark.wandb
@pytest.mark.slow
def test_with_wandb_logging_the_refresh_logs_model_lineage(tmp_path, monkeypatch):
    """The refresh run uses the parent's model artifact and logs the new one (offline)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = train_run(tmp_path / "parent", [*PARENT, "logger=wandb", "trainer.max_steps=8"])
    events = tmp_path / "events.csv"
    frame = pd.DataFrame(predicted_events_of_run(run_dir, 60))
    frame.rename(columns={"user": "user_id", "item": "item_id", "time": "timestamp"}).to_csv(
        events, index=False
    )
    cfg = refresh_config(tmp_path, [f"run={run_dir}", f"events={events}", f"out={tmp_path / 'r'}"])
    record = refresh(cfg)
    # W&B's service process may still be writing the record after finish(): poll a while
    deadline, lineage = time.monotonic() + 30, []
    while not lineage and time.monotonic() < deadline:
        runs = [p for p in (tmp_path / "r" / "wandb").glob("offline-run-*") if p.is_dir()]
        files = [f.read_bytes() for p in runs for f in p.glob("run-*.wandb")]
        lineage = [f for f in files if b"refresh-" in f and b"parent_run" in f]
        time.sleep(0.2)
    assert lineage and record["plan"]["new_rows"] == 60
    logged = lineage[-1]  # the new model's artifact, its parent named in its metadata
    assert b"train-model" in logged and str(run_dir).encode() in logged
    assert record["gate"]["decision"].encode() in logged
