"""The one interval scheduler: closes clock-aligned push intervals and hands their indicators
to the pusher, whatever computes them (the embedded evaluator or PromQL, see exporter/slo/).

Intervals are `[k * interval, (k + 1) * interval)` of the realtime clock. Interval `to` is
closed once `now >= to + grace`: the grace lets late data reach the source (the capture
pipeline's backlog, or Prometheus' next scrape). This module owns, once:

- **the watermark** `closed_until_s`: the end of the last closed interval. It is written to
  the spool's state after that interval's indicators, so a restart never closes an interval
  again (it would have only part of the data: a different value under the same id) and
  sends what was left first. It starts at the current interval's start, so the interval
  already under way when the process starts is not closed with half its data missing.
- **the indicator shape**: one per objective per closed interval, holding that interval's
  percent. An interval without data for an objective sends nothing: Reliably would read a
  0 as "everything failed", and the absence of an indicator is what the Reliably CLI's own
  agent produces for no traffic too.
- **the backoff policy** (exporter/bridge/backoff.py): when the source fails, the same
  interval is tried again after a backoff; oldest first, so indicators keep their order.
  Intervals ending more than `max_catchup_s` before the newest due one are skipped and
  counted (the source cannot evaluate them any more: the embedded rings no longer hold
  them, or the outage was too long).

The dependency runs one way: exporter/slo/ knows this module, this module knows nothing of
objectives. A source is anything with `close_interval(to_s)` returning items and
`measured(item)` saying, per item, which objective and which percent (None: no data).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from exporter.bridge.backoff import Backoff
from exporter.bridge.indicator import Indicator, rfc3339
from exporter.bridge.pusher import Pusher
from exporter.errors import ExporterError
from exporter.metrics import (
    SELF_SLO_EVALUATIONS_TOTAL,
    SELF_SLO_INTERVALS_SKIPPED_TOTAL,
    SELF_SLO_LOOP_ERRORS_TOTAL,
    SelfSample,
)

log = logging.getLogger("ebpf_slo_exporter.bridge")

MAX_SLEEP_S = 1.0  # re-read the clock at least this often: it may jump (NTP, suspend)
EVALUATION_OUTCOMES = ("ok", "no_data", "error")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Measured:
    """One objective's value over one closed interval, as a source reports it."""

    objective: str  # the objective's slug
    selector: tuple[tuple[str, str], ...]  # its indicatorSelector, sorted
    percent: float | None  # None: no data in the interval, nothing is sent

    @classmethod
    def of(cls, objective: str, selector: Mapping[str, str], percent: float | None) -> Measured:
        return cls(objective, tuple(sorted(selector.items())), percent)


class IntervalSource(Protocol[T]):
    def close_interval(self, to_s: int) -> Sequence[T]:
        """Evaluate every objective over the interval ending at `to_s`. Raise to have the
        interval tried again later (a source that cannot answer now)."""
        ...

    def measured(self, item: T) -> Measured: ...


class IntervalScheduler(Generic[T]):
    def __init__(
        self,
        source: IntervalSource[T],
        pusher: Pusher | None,
        *,
        interval_s: int,
        grace_s: float,
        max_catchup_s: float,
        wall_clock: Callable[[], float] = time.time,
        backoff: Backoff | None = None,
        on_indicators: Callable[[list[Indicator]], None] | None = None,
        after_tick: Callable[[bool], None] | None = None,
        thread_name: str = "slo-push",
    ) -> None:
        if interval_s < 1 or interval_s != int(interval_s):
            raise ValueError("the push interval must be a whole number of seconds, at least 1s")
        self.source = source
        self.pusher = pusher
        self.interval_s = int(interval_s)
        self.grace_s = grace_s
        self.max_catchup_s = max_catchup_s
        self.backoff = backoff or Backoff()
        self.on_indicators = on_indicators
        # The source's own housekeeping on the loop's thread (saving state), after every tick;
        # its argument says whether this is the last one, at stop.
        self.after_tick = after_tick
        self._clock = wall_clock
        self._thread_name = thread_name
        saved = None
        if pusher is not None:
            raw = pusher.spool.read_state().get("closed_until")
            saved = raw if isinstance(raw, int) else None
        start = int(wall_clock() // self.interval_s) * self.interval_s
        # A watermark from a previous run wins: intervals it closed are never closed again.
        self.closed_until_s = max(start, saved or 0)
        self.evaluations: Counter[str] = Counter({o: 0 for o in EVALUATION_OUTCOMES})
        self.skipped = 0
        self.loop_errors = 0
        self.last_error = ""
        self._failures_in_a_row = 0
        self._retry_at = 0.0  # wall clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_lock = threading.Lock()

    # -- when ------------------------------------------------------------------------------

    def due(self, now_s: float) -> list[int]:
        """Ends of the intervals to close at `now_s`, oldest first."""
        last = int((now_s - self.grace_s) // self.interval_s) * self.interval_s
        return list(range(self.closed_until_s + self.interval_s, last + 1, self.interval_s))

    def next_due_s(self) -> float:
        """Wall-clock second at which the next interval can be closed (or retried)."""
        return max(self.closed_until_s + self.interval_s + self.grace_s, self._retry_at)

    # -- closing -----------------------------------------------------------------------------

    def tick(self, *, final: bool = False) -> list[T]:
        """Close every due interval, oldest first, and hand its indicators on; stop at the
        first source failure (retried after the backoff). `final` (at stop) closes intervals
        that ended without waiting for their grace: the caller flushed its pipeline first."""
        with self._tick_lock:
            return self._tick(final)

    def _tick(self, final: bool) -> list[T]:
        now = self._clock()
        closed: list[T] = []
        if now < self._retry_at and not final:
            return closed
        due = self.due(now + (self.grace_s if final else 0.0))
        for to_s in due:
            if to_s < due[-1] - self.max_catchup_s:
                self.skipped += 1
                self.closed_until_s = to_s
                continue
            try:
                batch = self.source.close_interval(to_s)
            except Exception as exc:  # a failing source, or a bug in it, must not stop the loop
                self._failed(to_s, now, exc)
                break
            self._failures_in_a_row = 0
            self._retry_at = 0.0
            closed.extend(batch)
            self._deliver(to_s, [self.source.measured(item) for item in batch])
        return closed

    def _failed(self, to_s: int, now: float, exc: Exception) -> None:
        self.evaluations["error"] += 1
        self._failures_in_a_row += 1
        delay = self.backoff.delay(self._failures_in_a_row)
        self._retry_at = now + delay
        self.last_error = str(exc) or type(exc).__name__
        if isinstance(exc, ExporterError):  # QueryError...: a complete one-line message
            log.warning("interval ending %s not evaluated: %s; retrying in %.1fs", rfc3339(to_s), exc, delay)
        else:  # a bug: keep the traceback
            log.exception("closing the interval ending %s failed; retrying in %.1fs", rfc3339(to_s), delay)

    def _deliver(self, to_s: int, measured: list[Measured]) -> None:
        from_s = to_s - self.interval_s
        indicators = []
        for item in measured:
            if item.percent is None:
                self.evaluations["no_data"] += 1
                continue
            self.evaluations["ok"] += 1
            indicators.append(Indicator(item.objective, item.selector, from_s, to_s, round(item.percent, 6)))
            log.info("%s: %.2f%% over %s..%s", item.objective, item.percent, rfc3339(from_s), rfc3339(to_s))
        self.closed_until_s = to_s
        if self.on_indicators is not None:
            self.on_indicators(indicators)
        if self.pusher is None:
            return
        try:
            self.pusher.submit(indicators)
            # Written after the indicators: a crash in between resends nothing twice, since
            # the spool refuses an id it holds and the values are identical.
            self.pusher.spool.write_state({"closed_until": to_s})
        except OSError as exc:
            self.evaluations["error"] += len(indicators)
            log.error(
                "cannot write the spool in %s: %s; indicators of %s are lost",
                self.pusher.spool.directory,
                exc.strerror,
                rfc3339(to_s),
            )

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Close and push until `stop` is set. Never raises: failures are logged and counted."""
        while not stop.is_set():
            try:
                self.tick()
                if self.after_tick is not None:
                    self.after_tick(False)
                wait_s = max(0.0, min(MAX_SLEEP_S, self.next_due_s() - self._clock()))
                if self.pusher is not None:
                    self.pusher.pump(time.monotonic() + wait_s, stop)
                    wait_s = max(0.0, min(MAX_SLEEP_S, self.next_due_s() - self._clock()))
                stop.wait(wait_s if wait_s > 0 else 0.05)
            except Exception:  # the loop never dies: log, count, carry on
                self.loop_errors += 1
                log.exception("SLO loop iteration failed")
                stop.wait(MAX_SLEEP_S)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, args=(self._stop,), name=self._thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop the loop. A push stuck on a hanging endpoint is abandoned (daemon thread);
        its indicator stays in the spool and is sent by the next run.

        Intervals that ended but were still in their grace period are closed and spooled
        now: the next run would not close them (the watermark), so they would be lost."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("SLO push thread still busy after %.1fs; unsent indicators stay spooled", timeout_s)
        if self._tick_lock.acquire(timeout=max(0.0, timeout_s / 2)):
            try:
                self._tick(final=True)
            except Exception:
                log.exception("closing the last intervals at stop failed")
            finally:
                self._tick_lock.release()
        if self.after_tick is not None:
            try:
                self.after_tick(True)
            except Exception:  # must not keep the exporter from stopping
                log.exception("the last housekeeping at stop failed")

    # -- self-metrics ------------------------------------------------------------------------

    def self_samples(self) -> Iterator[SelfSample]:
        for outcome in EVALUATION_OUTCOMES:
            yield SelfSample(
                SELF_SLO_EVALUATIONS_TOTAL,
                "counter",
                "Objective evaluations at interval close, by outcome (no_data: nothing in the interval; "
                "error: the interval could not be evaluated or spooled).",
                float(self.evaluations[outcome]),
                (("outcome", outcome),),
            )
        yield SelfSample(
            SELF_SLO_LOOP_ERRORS_TOTAL, "counter", "SLO loop iterations that failed (logged).", float(self.loop_errors)
        )
        yield SelfSample(
            SELF_SLO_INTERVALS_SKIPPED_TOTAL,
            "counter",
            "Push intervals older than the catch-up limit, never evaluated.",
            float(self.skipped),
        )
        if self.pusher is not None:
            yield from self.pusher.self_samples()
