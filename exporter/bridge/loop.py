"""`bridge`: evaluate objectives through Prometheus every push interval and push the indicators.

The same clock-aligned intervals `[k * interval, (k + 1) * interval)` as the embedded
runtime. Interval `to` is evaluated at `time=to` once `now >= to + grace`: the grace lets
Prometheus scrape the samples up to `to`. Because the query names its own time, an interval
missed while Prometheus was down is evaluated later with the same answer; the bridge keeps
trying the oldest pending interval (backing off) and skips intervals older than
`max_catchup_s`, counting them.

`rate()` needs two samples inside the interval: keep the push interval at least twice the
scrape interval, or intervals read as "no data" and send nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from exporter.bridge.indicator import Indicator, rfc3339
from exporter.bridge.pusher import Pusher
from exporter.errors import QueryError
from exporter.metrics import SelfSample
from exporter.slo.manifest import Objective
from exporter.slo.promql import PromQLSource

log = logging.getLogger("ebpf_slo_exporter.bridge")

MAX_SLEEP_S = 1.0


class PrometheusBridge:
    def __init__(
        self,
        objectives: list[Objective],
        source: PromQLSource,
        pusher: Pusher | None,
        *,
        interval_s: int = 10,
        grace_s: float = 5.0,
        max_catchup_s: float = 3600.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s < 1 or interval_s != int(interval_s):
            raise ValueError("the push interval must be a whole number of seconds, at least 1s")
        self.objectives = objectives
        self.source = source
        self.pusher = pusher
        self.interval_s = int(interval_s)
        self.grace_s = grace_s
        self.max_catchup_s = max_catchup_s
        self._clock = wall_clock
        start = int(wall_clock() // self.interval_s) * self.interval_s
        closed = None
        if pusher is not None:
            raw = pusher.spool.read_state().get("closed_until")
            closed = raw if isinstance(raw, int) else None
        self.closed_until_s = max(start, closed or 0)
        self.skipped = 0
        self.query_failures = 0
        self.last_error = ""
        self._retry_at = 0.0
        self._failures_in_a_row = 0

    def due(self, now_s: float) -> list[int]:
        last = int((now_s - self.grace_s) // self.interval_s) * self.interval_s
        return list(range(self.closed_until_s + self.interval_s, last + 1, self.interval_s))

    def tick(self) -> list[Indicator]:
        """Evaluate due intervals, oldest first, stopping at the first Prometheus failure."""
        now = self._clock()
        sent: list[Indicator] = []
        if now < self._retry_at:
            return sent
        for to_s in self.due(now):
            if to_s < now - self.max_catchup_s:
                self.skipped += 1
                self.closed_until_s = to_s
                continue
            try:
                batch = self._evaluate(to_s)
            except QueryError as exc:
                self.query_failures += 1
                self.last_error = str(exc)
                self._failures_in_a_row += 1
                delay = min(60.0, 2.0 ** min(self._failures_in_a_row, 6))
                self._retry_at = now + delay
                log.warning(
                    "interval ending %s not evaluated: %s; retrying in %.0fs", rfc3339(to_s), exc, delay
                )
                break
            self._failures_in_a_row = 0
            self.closed_until_s = to_s
            sent.extend(batch)
            if self.pusher is not None:
                self.pusher.submit(batch)
                self.pusher.spool.write_state({"closed_until": to_s})
        return sent

    def _evaluate(self, to_s: int) -> list[Indicator]:
        batch = []
        for objective in self.objectives:
            interval = self.source.evaluate(objective, to_s, self.interval_s)
            percent = interval.percent
            if percent is None:
                continue  # no traffic in the interval: send nothing, never 0%
            batch.append(
                Indicator(
                    objective.slug,
                    tuple(sorted(objective.selector.items())),
                    to_s - self.interval_s,
                    to_s,
                    round(percent, 6),
                )
            )
            log.info(
                "%s / %s: %.2f%% over %s..%s",
                objective.service,
                objective.name,
                percent,
                rfc3339(to_s - self.interval_s),
                rfc3339(to_s),
            )
        return batch

    def run(self, stop: threading.Event) -> None:
        """Until `stop` is set. Never raises: every failure is logged and counted."""
        while not stop.is_set():
            try:
                self.tick()
                next_due = self.closed_until_s + self.interval_s + self.grace_s
                wait_s = max(0.0, min(MAX_SLEEP_S, next_due - self._clock()))
                if self.pusher is not None:
                    self.pusher.pump(time.monotonic() + wait_s, stop)
                    wait_s = max(0.0, min(MAX_SLEEP_S, next_due - self._clock()))
                stop.wait(wait_s if wait_s > 0 else 0.05)
            except Exception:
                self.query_failures += 1
                log.exception("bridge loop iteration failed")
                stop.wait(MAX_SLEEP_S)

    def self_samples(self) -> Iterator[SelfSample]:
        yield from self.source.self_samples()
        yield SelfSample(
            "slo_intervals_skipped_total",
            "counter",
            "Push intervals older than the catch-up limit, never evaluated.",
            float(self.skipped),
        )
        if self.pusher is not None:
            yield from self.pusher.self_samples()
