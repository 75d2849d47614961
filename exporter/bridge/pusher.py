"""Sends spooled indicators, oldest first, backing off as exporter/bridge/backoff.py says.

The pusher never raises out of `pump`: every failure is logged, counted and retried later
(or dead-lettered for a 4xx), so the loop that calls it keeps running. Only the head of the
spool is attempted, which keeps the order of delivery the order of the intervals.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from exporter.bridge.backoff import Backoff
from exporter.bridge.client import PushRejected, PushRetryable, ReliablyClient
from exporter.bridge.indicator import Indicator
from exporter.bridge.spool import Spool
from exporter.metrics import (
    SELF_SLO_PUSH_ERRORS_TOTAL,
    SELF_SLO_PUSH_TOTAL,
    SELF_SLO_SPOOL_DROPPED_TOTAL,
    SELF_SLO_SPOOL_INDICATORS,
    SELF_SLO_SPOOL_QUARANTINED_TOTAL,
    SelfSample,
)

log = logging.getLogger("ebpf_slo_exporter.bridge")

OUTCOMES = ("ok", "retry", "rejected", "failed")


class Pusher:
    def __init__(
        self,
        client: ReliablyClient,
        spool: Spool,
        *,
        backoff: Backoff | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.spool = spool
        self.backoff = backoff or Backoff()
        self._monotonic = monotonic
        self._failures_in_a_row = 0
        self._next_attempt = 0.0
        self.outcomes: Counter[str] = Counter({o: 0 for o in OUTCOMES})
        self.reasons: Counter[str] = Counter()
        self.rejected = 0  # dead letters: indicators the endpoint refused, not re-sent
        self.last_error = ""

    def submit(self, indicators: Iterable[Indicator]) -> None:
        for indicator in indicators:
            self.spool.put(indicator)

    def pump(self, deadline: float, stop: threading.Event) -> None:
        """Send until the spool is empty, `deadline` (monotonic) passes or `stop` is set."""
        while not stop.is_set():
            now = self._monotonic()
            if now >= deadline:
                return
            if now < self._next_attempt:
                stop.wait(min(self._next_attempt, deadline) - now)
                continue
            if not self.send_one():
                return

    def send_one(self) -> bool:
        """Attempt the head of the spool once. False when there was nothing to send."""
        try:
            item = self.spool.peek()
        except Exception as exc:  # a disk error must not end the loop
            self._failed("spool", exc)
            return True
        if item is None:
            return False
        try:
            self.client.put("indicator", item.body())
        except PushRetryable as exc:
            self.outcomes["retry"] += 1
            self.reasons[exc.reason] += 1
            self._failures_in_a_row += 1
            delay = (
                exc.retry_after_s
                if exc.retry_after_s is not None
                else self.backoff.delay(self._failures_in_a_row)
            )
            self._next_attempt = self._monotonic() + delay
            self.last_error = str(exc)
            log.warning("%s; retrying in %.1fs (%d indicators waiting)", exc, delay, len(self.spool))
        except PushRejected as exc:
            self.outcomes["rejected"] += 1
            self.reasons[exc.reason] += 1
            self.rejected += 1
            self.last_error = str(exc)
            log.error("%s; indicator %s for %s dropped, not retried", exc, item.id, item.objective)
            self.spool.remove(item)
        except Exception as exc:
            self._failed("unexpected", exc)
        else:
            self.outcomes["ok"] += 1
            self._failures_in_a_row = 0
            self.spool.remove(item)
        return True

    def _failed(self, reason: str, exc: Exception) -> None:
        self.outcomes["failed"] += 1
        self.reasons[reason] += 1
        self._failures_in_a_row += 1
        delay = self.backoff.delay(self._failures_in_a_row)
        self._next_attempt = self._monotonic() + delay
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.exception("pushing failed unexpectedly; retrying in %.1fs", delay)

    def self_samples(self) -> Iterator[SelfSample]:
        for outcome in OUTCOMES:
            yield SelfSample(
                SELF_SLO_PUSH_TOTAL,
                "counter",
                "Indicator push attempts to Reliably, by outcome (retry: will be tried again; "
                "rejected: 4xx, dropped; failed: unexpected error).",
                float(self.outcomes[outcome]),
                (("outcome", outcome),),
            )
        for reason, count in sorted(self.reasons.items()):
            yield SelfSample(
                SELF_SLO_PUSH_ERRORS_TOTAL,
                "counter",
                "Failed indicator pushes, by reason.",
                float(count),
                (("reason", reason),),
            )
        yield SelfSample(
            SELF_SLO_SPOOL_INDICATORS, "gauge", "Indicators waiting in the spool.", float(len(self.spool))
        )
        yield SelfSample(
            SELF_SLO_SPOOL_DROPPED_TOTAL,
            "counter",
            "Indicators dropped because the spool was full.",
            float(self.spool.dropped),
        )
        yield SelfSample(
            SELF_SLO_SPOOL_QUARANTINED_TOTAL,
            "counter",
            "Unreadable spool files moved aside (*.corrupt).",
            float(self.spool.quarantined),
        )
