"""Online quality from the service's own traffic: is the served model still good?

Three signals, each a Prometheus metric (serving/telemetry.py), computed per worker:

- **Hit rate.** After `/recommend` for a stored user, the items shown are remembered (at
  most `max_users` users, the oldest forgotten first). That user's next event is judged:
  a hit when its item was among them. Only the next event counts, and only within
  `horizon_s` of the recommendation. A worker judges only what it showed: with several
  workers each reports its own share of the traffic.
- **New-item share.** The share of events on items the model was not exported with (added
  through `/items` since). A refresh is due when it grows (issue 10).
- **Score drift.** The population stability index (PSI) of the top-1 score served. The
  first `reference` scores after a model load fix ten quantile bins. Every
  `DRIFT_EVERY` scores, the last `window` scores are compared with them:
  PSI = sum((cur - ref) * ln(cur / ref)). The usual reading: below 0.1 stable, 0.1-0.25
  moderate, above 0.25 a shift.

Cost, measured in-process: about 5 us per `/recommend` and 15 us per `/events` post.
The event rate is `rate(recsys_lm_events_total[5m])`. Alerting rules on all of these are
in `deploy/prometheus/alerts.yml`.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from recsys_lm.serving.telemetry import Telemetry

BINS = 10
DRIFT_EVERY = 100  # scores between PSI updates: a few microseconds per request on average
EPSILON = 1e-4  # a bin's share floor: an empty bin would make the PSI infinite


@dataclass
class Shown:
    items: frozenset[str]
    at: float


class OnlineMonitor:
    """Hit rate, new-item share and score drift (module doc). Not thread-safe: the service
    calls it from its event loop only."""

    def __init__(
        self,
        telemetry: Telemetry,
        max_users: int = 100_000,
        horizon_s: float = 3600.0,
        reference: int = 1000,
        window: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if min(max_users, reference, window) < 1 or not horizon_s > 0:
            raise ValueError(
                "monitor: max_users, reference and window must be >= 1 and horizon_s > 0"
            )
        self.telemetry, self.clock = telemetry, clock
        self.max_users, self.horizon = int(max_users), float(horizon_s)
        self.reference_size, self.window = int(reference), int(window)
        self._shown: OrderedDict[str, Shown] = OrderedDict()
        self._judged: deque[bool] = deque(maxlen=window)  # the last judged events: hit?
        self._new: deque[bool] = deque(maxlen=window)  # the last events: on a new item?
        self._reference: list[float] = []
        self._edges: np.ndarray | None = None  # inner quantile edges, fixed once
        self._ref_share: np.ndarray | None = None
        self._scores: deque[float] = deque(maxlen=window)
        self._since_drift = 0

    def reset(self) -> None:
        """A new model: its scores get a new reference, and what the old one showed is not
        its to be judged on."""
        self._shown.clear()
        self._reference, self._edges, self._ref_share = [], None, None
        self._scores.clear()
        self._since_drift = 0
        self.telemetry.score_psi.set(math.nan)

    # -- what was shown --------------------------------------------------------------------
    def shown(self, user: str | None, items: Sequence[str], scores: Sequence[float]) -> None:
        """A recommendation answered: remember it for the user (stored users only) and
        feed its top score to the drift check."""
        if user is not None and items:
            self._shown[user] = Shown(frozenset(items), self.clock())
            self._shown.move_to_end(user)
            while len(self._shown) > self.max_users:
                self._shown.popitem(last=False)
        if scores:
            self._score(float(scores[0]))

    # -- what happened next ----------------------------------------------------------------
    def events(self, events: Sequence[tuple[str, str]], is_new: Callable[[str], bool]) -> None:
        """Acknowledged (user, item) events, in order: judge each user's next event, and
        count events on new items."""
        now = self.clock()
        t = self.telemetry
        for user, item in events:
            new = is_new(item)
            self._new.append(new)
            if new:
                t.new_item_events.inc()
            last = self._shown.pop(user, None)
            if last is None or now - last.at > self.horizon:
                continue
            hit = item in last.items
            self._judged.append(hit)
            t.judged_events.inc()
            if hit:
                t.hits.inc()
        if self._judged:
            t.hit_rate.set(sum(self._judged) / len(self._judged))
        if self._new:
            t.new_item_share.set(sum(self._new) / len(self._new))

    # -- drift -----------------------------------------------------------------------------
    def _score(self, score: float) -> None:
        if not math.isfinite(score):
            return
        if self._edges is None:
            self._reference.append(score)
            if len(self._reference) >= self.reference_size:
                self._fix_reference()
            return
        self._scores.append(score)
        self._since_drift += 1
        if len(self._scores) == self.window and self._since_drift >= DRIFT_EVERY:
            self._since_drift = 0
            self.telemetry.score_psi.set(self.psi())

    def _fix_reference(self) -> None:
        ref = np.asarray(self._reference)
        self._edges = np.unique(np.quantile(ref, np.linspace(0, 1, BINS + 1)[1:-1]))
        self._ref_share = _shares(ref, self._edges)
        self._reference = []

    def psi(self) -> float:
        """PSI of the last `window` scores against the reference (NaN before both exist)."""
        if self._edges is None or not self._scores:
            return math.nan
        current = _shares(np.asarray(self._scores), self._edges)
        return float(np.sum((current - self._ref_share) * np.log(current / self._ref_share)))


def _shares(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The share of `scores` in each bin cut at `edges` (floored at EPSILON)."""
    counts = np.bincount(np.searchsorted(edges, scores, side="right"), minlength=len(edges) + 1)
    return np.maximum(counts / max(len(scores), 1), EPSILON)
