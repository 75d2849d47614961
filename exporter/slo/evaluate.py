"""Which exchanges an objective counts, whether each is good, and the SLI arithmetic. Pure.

Formulas (ratios in 0..1; `objective` is `objectivePercent / 100`):

    SLI               = good / total                      None when total == 0 ("no data")
    burn rate         = (1 - SLI) / (1 - objective)       1.0 spends the budget exactly over the window
    budget remaining  = 1 - (1 - SLI) / (1 - objective)   = 1 - burn rate; negative once overspent
    met               = SLI >= objective                  (Reliably: remainingPercent >= 0)

With `objective == 1` (100%) there is no budget: burn rate is 0 while SLI is 1 and +Inf
otherwise, budget remaining is 1 or -Inf. Computed from counts (`bad / (total * allowed)`)
so 99 good of 100 against 99% gives exactly 1.0, not 0.9999999999999998.

Narrowing an objective to exchanges (all given ones must match):
- `route`: the selector's `path`, compared to the `http_route` the route mapper gave the
  exchange (so `/items/{id}` works when that pattern is configured);
- `port`: the selector's `port` or `server_port`, compared to the exchange's server port;
- `service_name`: the selector's `service_name`, compared to the `service_name` identity/
  gave the server that answered (its Kubernetes container or process name, or a `--service`
  override);
- `service` is only a label of the objective (Reliably's), it narrows nothing: use
  `service_name` or `port` to pick the server.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import threading
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from exporter.core.model import Exchange
from exporter.slo.manifest import Objective
from exporter.slo.windows import WindowCounts, choose_bucket_seconds

NOT_COUNTED = -1
BAD = 0
GOOD = 1


class Matcher:
    """An objective compiled for the capture thread: a few comparisons, no allocation."""

    __slots__ = ("good_classes", "grpc_bad", "latency_target_ns", "port", "route", "rpc_method", "rpc_service",
                 "selects_rpc", "service_name")

    def __init__(self, objective: Objective) -> None:
        self.route = objective.route
        self.port = objective.port
        self.rpc_service = objective.rpc_service
        self.rpc_method = objective.rpc_method
        self.selects_rpc = objective.rpc_service is not None or objective.rpc_method is not None
        self.grpc_bad = frozenset(objective.grpc_bad_codes)
        self.service_name = objective.service_name
        target = objective.latency_target_seconds
        # Integer nanoseconds: 150ms is exactly 150_000_000, the same edge the histogram's
        # le="0.15" bucket uses (ns / 1e9 <= 0.15 exactly when ns <= 150_000_000).
        self.latency_target_ns = round(target * 1e9) if target is not None else None
        self.good_classes = frozenset(int(c[0]) for c in objective.good_status_classes)

    def good_of(self, route: str, port: int, status: int, duration_counts: Sequence[int],
                bounds: Sequence[float], service_name: str = "") -> int | None:
        """Good events among aggregated ones (the kernel fast path), or None if not covered.

        `duration_counts[i]` counts durations in (bounds[i-1], bounds[i]], the last slot those
        above every bound. The latency target is always a bound (`run` adds it), so buckets at
        or under it are exactly the good ones."""
        if self.selects_rpc:
            return None  # the kernel aggregates HTTP/1.x only: never a gRPC call
        if self.route is not None and route != self.route:
            return None
        if self.port is not None and port != self.port:
            return None
        if self.service_name is not None and service_name != self.service_name:
            return None
        if self.latency_target_ns is not None:
            return sum(count for count, bound in zip(duration_counts, bounds, strict=False)
                       if round(bound * 1e9) <= self.latency_target_ns)
        return sum(duration_counts) if status // 100 in self.good_classes else 0

    def classify(self, exchange: Exchange, route: str, service_name: str = "") -> int:
        """GOOD, BAD, or NOT_COUNTED when the objective does not cover this exchange."""
        if self.route is not None and route != self.route:
            return NOT_COUNTED
        if self.port is not None and exchange.server_port != self.port:
            return NOT_COUNTED
        if self.service_name is not None and service_name != self.service_name:
            return NOT_COUNTED
        rpc = exchange.rpc
        if self.selects_rpc:
            if rpc is None or (self.rpc_service is not None and rpc.service != self.rpc_service) or (
                    self.rpc_method is not None and rpc.method != self.rpc_method):
                return NOT_COUNTED
            if self.latency_target_ns is None:
                return BAD if rpc.status_code in self.grpc_bad else GOOD
        if self.latency_target_ns is not None:
            return GOOD if exchange.end_ns - exchange.start_ns <= self.latency_target_ns else BAD
        return GOOD if exchange.status // 100 in self.good_classes else BAD


@dataclass(frozen=True, slots=True)
class Result:
    """One evaluation of one objective over [start_s, end_s). good/total are counts, or rates
    when Prometheus evaluated them; only their ratio matters.

    `covered_s`: how much of [start_s, end_s) the exporter was observing (None: not known,
    as with Prometheus). After a restart the downtime is not covered, so a window that
    holds 40 seconds of data is never read as a full 30 days."""

    start_s: float
    end_s: float
    good: float
    total: float
    objective_ratio: float
    covered_s: float | None = None

    @property
    def coverage(self) -> float | None:
        """Covered part of the window, 0..1; None when not known."""
        span = self.end_s - self.start_s
        if self.covered_s is None or span <= 0:
            return None
        return min(1.0, max(0.0, self.covered_s / span))

    @property
    def sli(self) -> float | None:
        if self.total <= 0:
            return None
        return min(1.0, max(0.0, self.good / self.total))

    @property
    def percent(self) -> float | None:
        sli = self.sli
        return None if sli is None else sli * 100.0

    @property
    def burn_rate(self) -> float | None:
        return burn_rate(self.good, self.total, self.objective_ratio)

    @property
    def budget_remaining(self) -> float | None:
        burn = self.burn_rate
        return None if burn is None else 1.0 - burn

    @property
    def met(self) -> bool | None:
        sli = self.sli
        return None if sli is None else sli >= self.objective_ratio - 1e-12


def burn_rate(good: float, total: float, objective_ratio: float) -> float | None:
    if total <= 0:
        return None
    bad = max(0.0, total - good)
    # 1 - 0.99 is 0.010000000000000009 in binary; rounding to 12 places (far finer than any
    # objective's precision) gives back the 0.01 the user wrote, so edges come out exact.
    allowed = round(1.0 - objective_ratio, 12)
    if allowed <= 0:
        return 0.0 if bad == 0 else math.inf
    return bad / (total * allowed)


def budget_remaining(good: float, total: float, objective_ratio: float) -> float | None:
    burn = burn_rate(good, total, objective_ratio)
    return None if burn is None else 1.0 - burn


def format_coverage(coverage: float | None) -> str:
    """The observed part of a window for people: `100%`, `12.50%`, `<0.01%` (a young window
    of 30 days), `—` (not known). Never rounds a partial window up to 100% or down to 0%."""
    if coverage is None:
        return "—"
    percent = coverage * 100
    if percent >= 100 or percent == 0:
        return f"{percent:.0f}%"
    if percent < 0.01:
        return "<0.01%"
    return f"{min(percent, 99.99):.2f}%"


def json_number(value: float | None) -> float | str | None:
    """JSON has no infinities: write them as Prometheus' API does, "+Inf" / "-Inf"."""
    if value is None or math.isfinite(value):
        return value
    return "+Inf" if value > 0 else "-Inf"


@dataclass(frozen=True, slots=True)
class Closed:
    """What closing one push interval yields for one objective."""

    objective: Objective
    interval: Result  # [from, to): the Reliably indicator
    window: Result  # [to - window, to): the SLI, burn rate and budget


HISTORY = 5  # results kept per objective: the report's trend
CHART_POINTS = 360  # window SLIs kept per objective for the status page's chart (an hour at 10 s)
STATE_VERSION = 1


def state_key(objective: Objective, layout: dict[str, int]) -> str:
    """What saved counts are filed under: a hash of everything that decides which exchanges
    count and whether each is good, and of the ring layout. Changing any of it starts the
    objective afresh rather than inheriting counts made under other rules. The target
    (objectivePercent) is left out on purpose: the counts do not depend on it, so tightening
    99% to 99.9% keeps the 30 days already observed."""
    counted = {
        "service": objective.service,
        "name": objective.name,
        "category": objective.category,
        "window_seconds": objective.window_seconds,
        "latency_target_seconds": objective.latency_target_seconds,
        "route": objective.route,
        "port": objective.port,
        "good_status_classes": list(objective.good_status_classes),
        "layout": layout,
    }
    return hashlib.sha256(json.dumps(counted, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Restored:
    """What `Evaluator.restore` did with a saved state."""

    saved_at_s: float | None  # None: the state held nothing usable
    restored: int  # objectives that took their saved counts
    discarded: int  # saved objectives not taken (definition or layout changed, unreadable, gone)


class Evaluator:
    """Bucketed counts for every objective, and the evaluation of push intervals. No clock:
    the caller passes `now`, so tests drive it with plain numbers.

    Push intervals are `[k * push, (k + 1) * push)` of the realtime clock; when to close
    them is exporter/bridge/scheduler.py's decision (it waits `grace_s` after each so that
    exchanges still in the pipeline count in their own interval). `closed_until_s` follows
    the scheduler's watermark only to count an exchange that arrives after its interval
    was closed (`late_after_close`): it still counts in the windows that cover it, but the
    indicator already sent is never changed.
    """

    def __init__(
        self,
        objectives: list[Objective],
        push_interval_s: int,
        *,
        start_s: float,
        grace_s: float = 2.0,
        closed_until_s: int | None = None,
    ) -> None:
        if grace_s < 0 or grace_s >= push_interval_s:
            raise ValueError("the grace period must be at least 0 and shorter than the push interval")
        self.objectives = list(objectives)
        self.push_s = int(push_interval_s)
        self.grace_s = grace_s
        self.bucket_s = choose_bucket_seconds(self.push_s, (o.window_seconds for o in self.objectives))
        self.bucket_ns = self.bucket_s * 1_000_000_000
        self._matchers = [Matcher(o) for o in self.objectives]
        self._rings = [
            WindowCounts(o.window_seconds, self.push_s, grace_s, self.bucket_s) for o in self.objectives
        ]
        for ring in self._rings:
            ring.begin(start_s)
        self._retention = max((r.retention for r in self._rings), default=1)
        self.start_s = start_s
        start_boundary = int(start_s // self.push_s) * self.push_s
        # A watermark from a previous run wins: intervals it closed are never closed again.
        self.closed_until_s = max(start_boundary, closed_until_s or 0)
        self.history: list[deque[Result]] = [deque(maxlen=HISTORY) for _ in self.objectives]
        # (interval end, window SLI percent or None): small tuples, not Results, so an hour of
        # points costs tens of kB per objective.
        self._chart: list[deque[tuple[float, float | None]]] = [deque(maxlen=CHART_POINTS) for _ in self.objectives]
        self._last_interval: list[Result | None] = [None for _ in self.objectives]
        self._lock = threading.Lock()
        self.observed = 0
        self.too_old = 0  # older than any bucket still kept
        self.future = 0  # more than one bucket ahead of the clock: a bad timestamp
        self.late_after_close = 0

    def observe(self, exchange: Exchange, route: str, now_ns: int, service_name: str = "") -> None:
        index = exchange.end_ns // self.bucket_ns
        now_index = now_ns // self.bucket_ns
        with self._lock:
            self.observed += 1
            if index > now_index + 1:
                self.future += 1
                return
            if index <= now_index - self._retention:
                self.too_old += 1
                return
            if index * self.bucket_s < self.closed_until_s:
                self.late_after_close += 1
            for matcher, ring in zip(self._matchers, self._rings, strict=True):
                verdict = matcher.classify(exchange, route, service_name)
                if verdict != NOT_COUNTED and not ring.add(index, verdict == GOOD):
                    self.too_old += 1

    def observe_counts(self, route: str, port: int, status: int, duration_counts: Sequence[int],
                       bounds: Sequence[float], now_ns: int, service_name: str = "") -> None:
        """Exchanges the kernel aggregated since the last poll, counted in the current bucket.

        The kernel keeps no per-exchange time, so they land in the bucket of the poll (about
        once a second): an exchange near a bucket edge may count one bucket late."""
        index = now_ns // self.bucket_ns
        total = sum(duration_counts)
        with self._lock:
            self.observed += total
            for matcher, ring in zip(self._matchers, self._rings, strict=True):
                good = matcher.good_of(route, port, status, duration_counts, bounds, service_name)
                if good is not None and not ring.add_many(index, good, total):
                    self.too_old += total

    @property
    def retention_s(self) -> int:
        """How far back the rings hold buckets: older intervals can no longer be closed."""
        return self._retention * self.bucket_s

    def close(self, to_s: int) -> list[Closed]:
        """Evaluate every objective for the interval ending at `to_s` and its window."""
        end = to_s // self.bucket_s
        interval_first = (to_s - self.push_s) // self.bucket_s
        closed: list[Closed] = []
        with self._lock:
            for i, objective in enumerate(self.objectives):
                ring = self._rings[i]
                ring.observed_until(to_s)
                good, total = ring.interval_sum(interval_first, end)
                interval = Result(to_s - self.push_s, to_s, good, total, objective.objective_ratio,
                                  ring.covered_seconds(to_s - self.push_s, to_s))
                first, good, total = ring.window_sum(end)
                start = first * self.bucket_s
                window = Result(start, to_s, good, total, objective.objective_ratio,
                                ring.covered_seconds(start, to_s))
                self.history[i].append(window)
                self._chart[i].append((float(to_s), window.percent))
                self._last_interval[i] = interval
                closed.append(Closed(objective, interval, window))
            self.closed_until_s = max(self.closed_until_s, to_s)
        return closed

    def export_state(self, now_s: float) -> dict[str, Any]:
        """Every objective's counts and observed stretches, up to `now_s`, as JSON-safe data."""
        with self._lock:  # held only to copy: the capture thread waits microseconds, not the encoding
            copies = []
            for objective, ring in zip(self.objectives, self._rings, strict=True):
                ring.observed_until(now_s)
                copies.append((state_key(objective, ring.layout()), ring.copy()))
        saved = {key: ring.to_dict() for key, ring in copies}
        return {"version": STATE_VERSION, "saved_at": now_s, "byteorder": sys.byteorder, "objectives": saved}

    def restore(self, state: Any) -> Restored:
        """Take the counts of a saved state for each objective whose key matches; the time
        between the save and `start_s` is left uncovered. Never raises on odd content: what
        does not fit is discarded and counted."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            return Restored(None, 0, 0)
        saved_at = state.get("saved_at")
        saved = state.get("objectives")
        byteorder = state.get("byteorder")
        if not isinstance(saved_at, (int, float)) or not isinstance(saved, dict) or byteorder not in ("little", "big"):
            return Restored(None, 0, 0)
        restored = 0
        with self._lock:
            for objective, ring in zip(self.objectives, self._rings, strict=True):
                raw = saved.get(state_key(objective, ring.layout()))
                if raw is None:
                    continue
                try:
                    ring.load(raw, byteorder)
                except (ValueError, TypeError, zlib.error):
                    continue
                ring.begin(self.start_s)
                restored += 1
        return Restored(float(saved_at), restored, len(saved) - restored)

    def coverage_periods_dropped(self) -> int:
        return sum(r.periods_dropped for r in self._rings)

    def edge_seconds(self) -> list[int]:
        return [r.edge_seconds for r in self._rings]

    def latest(self) -> list[Result | None]:
        with self._lock:
            return [h[-1] if h else None for h in self.history]

    def chart(self) -> list[list[tuple[float, float | None]]]:
        """(interval end, window SLI percent) of the last closed intervals, oldest first, per objective."""
        with self._lock:
            return [list(points) for points in self._chart]

    def last_intervals(self) -> list[Result | None]:
        """The last closed push interval's result per objective."""
        with self._lock:
            return list(self._last_interval)

    def trends(self) -> list[list[Result]]:
        with self._lock:
            return [list(h) for h in self.history]
