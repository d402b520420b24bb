"""The service's Prometheus metrics (`GET /metrics`), through `prometheus_client`.

Each app gets its own `CollectorRegistry`: several apps in one process (tests, a benchmark
comparing batching settings) would otherwise register the same metric names twice.
Route labels are route templates (`/items/{item_id}`), never raw paths, so a client cannot
grow the label set without bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

PREFIX = "recsys_lm"
# Request latency buckets (seconds): a micro-batched CPU model answers in milliseconds to
# about a second; Prometheus' defaults start at 5 ms, too coarse for the fast end.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Event lag: from the event's own time to its acknowledgement (clients may send late events).
LAG_BUCKETS = (0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0, 86400.0)


@dataclass
class Telemetry:
    """Every metric the service exports, registered in one private registry."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            f"{PREFIX}_request_seconds",
            "Request latency by route (seconds, whole request)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Requests served per model call by operation (1 = not batched)",
            ["route"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            f"{PREFIX}_stage_seconds",
            "Model time per batch and pipeline stage (retrieve, rerank)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_errors = Counter(
            f"{PREFIX}_model_errors",
            "Model (or event log) calls that raised, answered 500",
            ["route"],
            registry=r,
        )
        self.index_items = Gauge(
            f"{PREFIX}_index_items", "Servable items in the model's catalogue", registry=r
        )
        self.model = Info(f"{PREFIX}_model", "The served model", registry=r)
        self.model_loaded = Gauge(
            f"{PREFIX}_model_loaded_timestamp_seconds",
            "When the served model was loaded (unix time)",
            registry=r,
        )
        self.reloads = Counter(
            f"{PREFIX}_reloads", "Model (re)loads by outcome", ["outcome"], registry=r
        )
        self.event_last_seq = Gauge(
            f"{PREFIX}_event_log_last_seq", "Sequence number of the newest logged event", registry=r
        )
        self.event_lag = Histogram(
            f"{PREFIX}_event_lag_seconds",
            "Seconds from an event's time to its durable acknowledgement",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.events = Counter(f"{PREFIX}_events", "Events durably logged", registry=r)
        # online quality (serving/monitor.py)
        self.judged_events = Counter(
            f"{PREFIX}_online_judged_events",
            "Users' next events after a recommendation shown to them (within the horizon)",
            registry=r,
        )
        self.hits = Counter(
            f"{PREFIX}_online_hits", "Judged events whose item was among those shown", registry=r
        )
        self.hit_rate = Gauge(
            f"{PREFIX}_online_hit_rate", "Hits / judged events over the last window", registry=r
        )
        self.new_item_events = Counter(
            f"{PREFIX}_events_new_item",
            "Events on items the served model was not exported with (added since)",
            registry=r,
        )
        self.new_item_share = Gauge(
            f"{PREFIX}_online_new_item_share",
            "Share of the last window's events on items added since the export",
            registry=r,
        )
        self.score_psi = Gauge(
            f"{PREFIX}_score_drift_psi",
            "Population stability index of the top-1 score: the last window against the "
            "first scores after the model loaded (NaN until both exist)",
            registry=r,
        )
        self.score_psi.set(float("nan"))

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def observe_model(self, version: str, flavour: str, task: str, items: int) -> None:
        self.model.info({"version": version, "flavour": flavour, "task": task})
        self.model_loaded.set(time.time())
        self.index_items.set(items)

    def observe_events(self, times: list[float], last_seq: int) -> None:
        now = time.time()
        for t in times:
            self.event_lag.observe(max(0.0, now - t))
        self.events.inc(len(times))
        self.event_last_seq.set(last_seq)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
