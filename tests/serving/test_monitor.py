"""Online quality (serving/monitor.py): hit rate of what users were shown, new-item share,
score drift, their metrics on a live service, and the alert rules that read them."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import yaml

from recsys_lm.serving.model import catalogue_frame
from recsys_lm.serving.monitor import OnlineMonitor
from recsys_lm.serving.telemetry import Telemetry
from tests.conftest import ROOT
from tests.serving.service import build_untrained, metric, served, serving

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gauge(telemetry: Telemetry, name: str) -> float:
    return telemetry.registry.get_sample_value(name)


def test_only_a_users_next_event_within_the_horizon_is_judged():
    telemetry, clock = Telemetry(), Clock()
    monitor = OnlineMonitor(telemetry, horizon_s=60, max_users=2, clock=clock)
    never = lambda item: False  # noqa: E731
    monitor.shown("u", ["a", "b"], [0.9, 0.8])
    monitor.events([("u", "a"), ("u", "b")], never)  # the second: nothing shown since
    assert gauge(telemetry, "recsys_lm_online_judged_events_total") == 1
    assert gauge(telemetry, "recsys_lm_online_hits_total") == 1
    monitor.shown("v", ["c"], [0.5])
    monitor.events([("v", "d")], never)  # a miss
    assert gauge(telemetry, "recsys_lm_online_hit_rate") == 0.5
    monitor.shown("w", ["e"], [0.5])
    clock.now += 61  # past the horizon: not judged
    monitor.events([("w", "e")], never)
    for user in ("x", "y", "z"):  # max_users=2: x is forgotten
        monitor.shown(user, ["f"], [0.5])
    monitor.events([("x", "f"), ("z", "f")], never)
    assert gauge(telemetry, "recsys_lm_online_judged_events_total") == 3
    assert gauge(telemetry, "recsys_lm_online_hits_total") == 2
    monitor.shown(None, ["g"], [0.5])  # an explicit history, no user: nothing to judge
    monitor.reset()  # a new model is not judged on what the old one showed
    monitor.events([("y", "f")], never)
    assert gauge(telemetry, "recsys_lm_online_judged_events_total") == 3


def test_the_new_item_share_covers_the_last_window_of_events():
    telemetry = Telemetry()
    monitor = OnlineMonitor(telemetry, window=4)
    is_new = lambda item: item.startswith("new")  # noqa: E731
    monitor.events([("u", "new-1"), ("u", "old-1")], is_new)
    assert gauge(telemetry, "recsys_lm_online_new_item_share") == 0.5
    monitor.events([("u", "old-2"), ("u", "old-3"), ("u", "old-4"), ("u", "old-5")], is_new)
    assert gauge(telemetry, "recsys_lm_online_new_item_share") == 0.0  # new-1 left the window
    assert gauge(telemetry, "recsys_lm_events_new_item_total") == 1


def test_the_drift_index_stays_low_for_the_same_scores_and_rises_for_shifted_ones():
    telemetry, rng = Telemetry(), np.random.default_rng(0)
    monitor = OnlineMonitor(telemetry, reference=2000, window=1000)
    assert math.isnan(gauge(telemetry, "recsys_lm_score_drift_psi"))
    for score in rng.normal(0, 1, 2000):  # the reference
        monitor.shown("u", ["a"], [score])
    assert math.isnan(monitor.psi())  # no current window yet
    for score in rng.normal(0, 1, 1000):
        monitor.shown("u", ["a"], [score])
    same = gauge(telemetry, "recsys_lm_score_drift_psi")
    assert 0 <= same < 0.05, same
    for score in rng.normal(1, 1, 1000):  # a shift of one standard deviation
        monitor.shown("u", ["a"], [score])
    shifted = gauge(telemetry, "recsys_lm_score_drift_psi")
    assert shifted > 0.25, shifted
    monitor.reset()
    assert math.isnan(gauge(telemetry, "recsys_lm_score_drift_psi"))


@pytest.mark.parametrize("options", [{"window": 0}, {"horizon_s": 0}, {"max_user": 5}])
def test_bad_options_are_refused(options):
    with pytest.raises((TypeError, ValueError)):
        OnlineMonitor(Telemetry(), **options)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return {"retrieval": build_untrained(tmp_path_factory.mktemp("retrieval"), "retrieval")}


@pytest.mark.anyio
async def test_the_service_reports_hits_and_new_item_events_on_metrics(built, tmp_path):
    model = served(built, "retrieval")
    frame = catalogue_frame(built["retrieval"][1])
    async with serving(lambda: model, tmp_path) as (client, _):
        user = "watcher"
        await client.post("/events", json={"user": user, "item": frame.iloc[0]["item_id"]})
        shown = (await client.post("/recommend", json={"user": user, "k": 5})).json()["items"]
        await client.post("/events", json={"user": user, "item": shown[2]})  # a hit
        added = await client.post("/items", json={"items": [{"id": "fresh", "text": "tent"}]})
        assert added.status_code == 200, added.text
        await client.post("/events", json={"user": "other", "item": "fresh"})
        text = (await client.get("/metrics")).text
    assert metric(text, "recsys_lm_online_judged_events_total") == 1
    assert metric(text, "recsys_lm_online_hits_total") == 1
    assert metric(text, "recsys_lm_events_new_item_total") == 1
    assert metric(text, "recsys_lm_online_new_item_share") == pytest.approx(1 / 3)


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_every_metric_an_alert_reads_is_one_the_service_exports():
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    exported = Telemetry().render()[0].decode()
    names = set(re.findall(r"^# TYPE (\w+) (\w+)", exported, re.M))
    known = set()
    for name, kind in names:
        known |= {name, f"{name}_total"} if kind == "counter" else {name, f"{name}_bucket"}
    for rule in rules:
        used = set(re.findall(r"recsys_lm_\w+", rule["expr"]))
        assert used and used <= known, (rule["alert"], used - known)
