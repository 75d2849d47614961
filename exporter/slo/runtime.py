"""The embedded SLO runtime: counts exchanges as they are captured, closes push intervals,
pushes Reliably indicators, and serves results to /metrics and /api/v1/slo.

Threads:
- the capture thread calls `observe` (a lock, one bucket index, a few comparisons per objective);
- one background thread (`start`) wakes at each interval end plus the grace period,
  closes the interval, spools its indicators and sends what the spool holds;
- scrapes call `collect`, `snapshot` and `self_samples`, which only read.

Indicators: one per objective per closed interval `[from, to)`, holding that interval's
percent. An interval without traffic for an objective sends nothing for it: Reliably
would read a 0 as "everything failed", and the absence of an indicator is what the
Reliably CLI's own agent produces for no traffic too.

Restarts: the end of the last closed interval is written to the spool directory with the
spooled indicators, so a new runtime never closes that interval again (it would have only
part of the traffic, a different value under the same id) and sends what was left first.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.bridge.client import ReliablyClient
from exporter.bridge.indicator import Indicator, rfc3339
from exporter.bridge.pusher import Pusher
from exporter.bridge.settings import PushSettings, resolve_push_settings
from exporter.bridge.spool import DEFAULT_MAX_ITEMS, Spool, default_spool_dir
from exporter.core.model import Exchange
from exporter.metrics import (
    SLO_BUDGET_REMAINING,
    SLO_BURN_RATE,
    SLO_GOOD,
    SLO_LABELS,
    SLO_OBJECTIVE,
    SLO_SLI,
    SLO_TOTAL,
    SelfSample,
)
from exporter.slo.evaluate import Closed, Evaluator, Result, json_number
from exporter.slo.manifest import Objective, format_duration

log = logging.getLogger("ebpf_slo_exporter.slo")

SNAPSHOT_VERSION = 1
MAX_SLEEP_S = 1.0  # re-read the clock at least this often: it may jump (NTP, suspend)


def result_json(result: Result | None) -> dict[str, Any] | None:
    """One result as /api/v1/slo carries it; `None` percents mean "no data", never 0."""
    if result is None:
        return None
    return {
        "from": rfc3339(result.start_s),
        "to": rfc3339(result.end_s),
        "good": result.good,
        "total": result.total,
        "sli_percent": result.percent,
        "burn_rate": json_number(result.burn_rate),
        "budget_remaining": json_number(result.budget_remaining),
        "met": result.met,
    }


def objective_json(objective: Objective) -> dict[str, Any]:
    return {
        "name": objective.name,
        "service": objective.service,
        "slug": objective.slug,
        "category": objective.category,
        "objective_percent": objective.objective_percent,
        "window": format_duration(objective.window_seconds),
        "window_seconds": objective.window_seconds,
        "selector": dict(objective.selector),
    }


def objective_labels(objective: Objective) -> list[str]:
    """Values for SLO_LABELS: (slo, service, category, window). `slo` is the slug: stable,
    no spaces, unique per service, the same name the generated rules use."""
    return [objective.slug, objective.service, objective.category, format_duration(objective.window_seconds)]


def push_settings_from(
    url: str | None,
    org: str | None = None,
    token: str | None = None,
    *,
    config_path: Path | None = None,
) -> PushSettings | None:
    """For `run`: PushSettings from --reliably-url plus RELIABLY_ORG / RELIABLY_TOKEN / the
    Reliably CLI config; None when pushing is off. ConfigError when on but incomplete."""
    env = os.environ
    return resolve_push_settings(
        url,
        org or env.get("RELIABLY_ORG") or None,
        token or env.get("RELIABLY_TOKEN") or None,
        config_path=config_path,
    )


class SloRuntime:
    def __init__(
        self,
        objectives: list[Objective],
        *,
        push: PushSettings | None = None,
        push_interval_s: float = 10.0,
        spool_dir: Path | None = None,
        wall_clock: Callable[[], float] = time.time,
        grace_s: float | None = None,
        spool_max_items: int = DEFAULT_MAX_ITEMS,
        base_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        client: ReliablyClient | None = None,
    ) -> None:
        if push_interval_s != int(push_interval_s) or push_interval_s < 1:
            raise ValueError("the push interval must be a whole number of seconds, at least 1s")
        self.objectives = list(objectives)
        self.push_settings = push
        self.push_interval_s = int(push_interval_s)
        self._clock = wall_clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_lock = threading.Lock()
        self.evaluation_errors = 0
        self.evaluations = {"ok": 0, "no_data": 0, "error": 0}
        self.pusher: Pusher | None = None
        closed_until: int | None = None
        if push is not None:
            spool = Spool(spool_dir or default_spool_dir(), spool_max_items)
            state = spool.read_state()
            raw = state.get("closed_until")
            closed_until = raw if isinstance(raw, int) else None
            self.pusher = Pusher(
                client or ReliablyClient(push),
                spool,
                base_backoff_s=base_backoff_s,
                max_backoff_s=max_backoff_s,
            )
        # Default grace: 2 s for the pipeline's backlog, at most half an interval.
        grace = min(2.0, self.push_interval_s / 2) if grace_s is None else grace_s
        self.evaluator = Evaluator(
            self.objectives,
            self.push_interval_s,
            start_s=wall_clock(),
            grace_s=grace,
            closed_until_s=closed_until,
        )

    def __repr__(self) -> str:
        return f"SloRuntime({len(self.objectives)} objectives, push={self.push_settings!r})"

    # -- capture thread ------------------------------------------------------------------

    def observe(self, exchange: Exchange, route: str, service_name: str = "") -> None:
        self.evaluator.observe(exchange, route, int(self._clock() * 1e9), service_name)

    def observe_counts(self, route: str, port: int, status: int, duration_counts: Sequence[int],
                       bounds: Sequence[float], service_name: str = "") -> None:
        """Kernel-aggregated exchanges (fast path), polled about once a second."""
        self.evaluator.observe_counts(route, port, status, duration_counts, bounds, int(self._clock() * 1e9),
                                      service_name)

    # -- background thread ---------------------------------------------------------------

    def tick(self, *, final: bool = False) -> list[Closed]:
        """Close every interval that is due and spool its indicators. The thread calls this;
        tests call it directly with a fake clock. `final` (at stop) closes intervals that
        have ended without waiting for their grace: the pipeline was flushed before."""
        with self._tick_lock:
            return self._tick(final)

    def _tick(self, final: bool) -> list[Closed]:
        closed: list[Closed] = []
        now = self._clock() + (self.evaluator.grace_s if final else 0.0)
        for to_s in self.evaluator.due(now):
            try:
                batch = self.evaluator.close(to_s)
            except Exception:  # a bug here must not stop the next intervals
                self.evaluations["error"] += len(self.objectives)
                log.exception("evaluating the interval ending %s failed", rfc3339(to_s))
                continue
            for item in batch:
                self.evaluations["ok" if item.window.total > 0 else "no_data"] += 1
            closed.extend(batch)
            if self.pusher is not None:
                self._spool(batch, to_s)
        return closed

    def _spool(self, batch: list[Closed], to_s: int) -> None:
        assert self.pusher is not None
        indicators = [
            Indicator(
                c.objective.slug,
                tuple(sorted(c.objective.selector.items())),
                int(c.interval.start_s),
                int(c.interval.end_s),
                round(percent, 6),
            )
            for c in batch
            if (percent := c.interval.percent) is not None
        ]
        try:
            self.pusher.submit(indicators)
            # Written after the indicators: a crash in between resends nothing twice, since
            # the spool refuses an id it holds and the values are identical.
            self.pusher.spool.write_state({"closed_until": to_s})
        except OSError as exc:
            self.evaluations["error"] += len(batch)
            log.error(
                "cannot write the spool in %s: %s; indicators of %s are lost",
                self.pusher.spool.directory,
                exc.strerror,
                rfc3339(to_s),
            )

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
                wait_s = max(0.0, min(MAX_SLEEP_S, self.evaluator.next_due_s() - self._clock()))
                if self.pusher is not None:
                    self.pusher.pump(time.monotonic() + wait_s, self._stop)
                    wait_s = max(0.0, min(MAX_SLEEP_S, self.evaluator.next_due_s() - self._clock()))
                self._stop.wait(wait_s if wait_s > 0 else 0.05)
            except Exception:  # the loop never dies: log, count, carry on
                self.evaluation_errors += 1
                log.exception("SLO loop iteration failed")
                self._stop.wait(MAX_SLEEP_S)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="slo-push", daemon=True)
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
                log.warning(
                    "SLO push thread still busy after %.1fs; unsent indicators stay spooled", timeout_s
                )
        if self._tick_lock.acquire(timeout=max(0.0, timeout_s / 2)):
            try:
                self._tick(final=True)
            except Exception:
                log.exception("closing the last intervals at stop failed")
            finally:
                self._tick_lock.release()

    # -- readers -------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        latest = self.evaluator.latest()
        sli = GaugeMetricFamily(
            SLO_SLI, "Good / total events over the objective's window (absent: no data).", labels=SLO_LABELS
        )
        objective = GaugeMetricFamily(SLO_OBJECTIVE, "The objective as a ratio.", labels=SLO_LABELS)
        budget = GaugeMetricFamily(
            SLO_BUDGET_REMAINING,
            "1 - (1 - SLI) / (1 - objective) over the window; negative when overspent.",
            labels=SLO_LABELS,
        )
        burn = GaugeMetricFamily(
            SLO_BURN_RATE, "(1 - SLI) / (1 - objective) over the window.", labels=SLO_LABELS
        )
        good = GaugeMetricFamily(SLO_GOOD, "Good events in the objective's window.", labels=SLO_LABELS)
        total = GaugeMetricFamily(SLO_TOTAL, "Events in the objective's window.", labels=SLO_LABELS)
        for obj, result in zip(self.objectives, latest, strict=True):
            labels = objective_labels(obj)
            objective.add_metric(labels, obj.objective_ratio)
            if result is None:
                continue
            good.add_metric(labels, result.good)
            total.add_metric(labels, result.total)
            ratio = result.sli
            if ratio is None:
                continue
            sli.add_metric(labels, ratio)
            burn_value, budget_value = result.burn_rate, result.budget_remaining
            assert burn_value is not None and budget_value is not None
            burn.add_metric(labels, burn_value)
            budget.add_metric(labels, budget_value)
        yield from (sli, objective, budget, burn, good, total)

    def snapshot(self) -> dict[str, Any]:
        trends = self.evaluator.trends()
        objectives = []
        for obj, history in zip(self.objectives, trends, strict=True):
            entry = objective_json(obj)
            entry["current"] = result_json(history[-1] if history else None)
            entry["history"] = [result_json(r) for r in history]
            objectives.append(entry)
        push: dict[str, Any] = {"enabled": self.pusher is not None}
        if self.pusher is not None and self.push_settings is not None:
            push.update(
                url=self.push_settings.base_url,
                org=self.push_settings.org,
                spool_indicators=len(self.pusher.spool),
                outcomes=dict(self.pusher.outcomes),
                last_error=self.pusher.last_error or None,
            )
        return {
            "version": SNAPSHOT_VERSION,
            "source": "exporter",
            "generated_at": rfc3339(self._clock()),
            "push_interval_seconds": self.push_interval_s,
            "bucket_seconds": self.evaluator.bucket_s,
            "objectives": objectives,
            "push": push,
        }

    def self_samples(self) -> Iterable[SelfSample]:
        samples = [
            SelfSample(
                "slo_evaluations_total",
                "counter",
                "Objective evaluations at interval close, by outcome (no_data: empty window).",
                float(count),
                (("outcome", outcome),),
            )
            for outcome, count in self.evaluations.items()
        ]
        ev = self.evaluator
        samples += [
            SelfSample(
                "slo_loop_errors_total",
                "counter",
                "SLO loop iterations that failed (logged).",
                float(self.evaluation_errors),
            ),
            SelfSample(
                "slo_events_dropped_total",
                "counter",
                "Exchanges the SLO windows could not count, by reason "
                "(too_old: older than any kept bucket; future: timestamp ahead of the clock).",
                float(ev.too_old),
                (("reason", "too_old"),),
            ),
            SelfSample(
                "slo_events_dropped_total",
                "counter",
                "Exchanges the SLO windows could not count, by reason "
                "(too_old: older than any kept bucket; future: timestamp ahead of the clock).",
                float(ev.future),
                (("reason", "future"),),
            ),
            SelfSample(
                "slo_events_late_total",
                "counter",
                "Exchanges counted after their push interval was closed (in windows, not indicators).",
                float(ev.late_after_close),
            ),
        ]
        if self.pusher is not None:
            samples += list(self.pusher.self_samples())
        return samples
