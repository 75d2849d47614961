"""The embedded SLO runtime: counts exchanges as they are captured, evaluates the push
intervals the scheduler closes, and serves results to /metrics and /api/v1/slo.

Threads:
- the capture thread calls `observe` (a lock, one bucket index, a few comparisons per objective);
- the scheduler's thread (exporter/bridge/scheduler.py, `start`) wakes at each interval end
  plus the grace period, closes the interval here, spools its indicators and sends what
  the spool holds; the watermark, the indicator shape and the retries are its business;
- scrapes call `collect`, `snapshot` and `self_samples`, which only read.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.bridge.backoff import Backoff
from exporter.bridge.client import ReliablyClient
from exporter.bridge.indicator import rfc3339
from exporter.bridge.pusher import Pusher
from exporter.bridge.scheduler import IntervalScheduler, Measured
from exporter.bridge.settings import PushSettings, resolve_push_settings
from exporter.bridge.spool import DEFAULT_MAX_ITEMS, Spool, default_spool_dir
from exporter.config import DEFAULT_PUSH_INTERVAL_S
from exporter.core.model import Exchange
from exporter.metrics import (
    SELF_SLO_COVERAGE_PERIODS_DROPPED_TOTAL,
    SELF_SLO_EVENTS_DROPPED_TOTAL,
    SELF_SLO_EVENTS_LATE_TOTAL,
    SLO_BUDGET_REMAINING,
    SLO_BURN_RATE,
    SLO_GOOD,
    SLO_LABELS,
    SLO_OBJECTIVE,
    SLO_SLI,
    SLO_TOTAL,
    SLO_WINDOW_COVERAGE,
    SelfSample,
)
from exporter.slo.evaluate import Closed, Evaluator, Result, json_number
from exporter.slo.manifest import Objective, format_duration
from exporter.slo.state import StateStore, WindowPersistence

log = logging.getLogger("ebpf_slo_exporter.slo")

SNAPSHOT_VERSION = 1


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
        "covered_seconds": result.covered_s,
        "coverage": result.coverage,
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
    """The embedded source of indicators: exporter/bridge/scheduler.py closes the intervals
    and pushes; this class counts exchanges and evaluates what the scheduler closes."""

    def __init__(
        self,
        objectives: list[Objective],
        *,
        push: PushSettings | None = None,
        push_interval_s: float = DEFAULT_PUSH_INTERVAL_S,
        spool_dir: Path | None = None,
        wall_clock: Callable[[], float] = time.time,
        grace_s: float | None = None,
        spool_max_items: int = DEFAULT_MAX_ITEMS,
        backoff: Backoff | None = None,
        client: ReliablyClient | None = None,
        state_dir: Path | None = None,
        state_save_every_s: float = 60.0,
    ) -> None:
        if push_interval_s != int(push_interval_s) or push_interval_s < 1:
            raise ValueError("the push interval must be a whole number of seconds, at least 1s")
        self.objectives = list(objectives)
        self.push_settings = push
        self.push_interval_s = int(push_interval_s)
        self._clock = wall_clock
        pusher: Pusher | None = None
        if push is not None:
            pusher = Pusher(
                client or ReliablyClient(push),
                Spool(spool_dir or default_spool_dir(), spool_max_items),
                backoff=backoff,
            )
        # Default grace: 2 s for the pipeline's backlog, at most half an interval.
        grace = min(2.0, self.push_interval_s / 2) if grace_s is None else grace_s
        self.evaluator = Evaluator(self.objectives, self.push_interval_s, start_s=wall_clock(), grace_s=grace)
        self.scheduler: IntervalScheduler[Closed] = IntervalScheduler(
            self,
            pusher,
            interval_s=self.push_interval_s,
            grace_s=grace,
            # After a long stop of the clock (suspend), intervals no ring still holds are empty
            # and would send nothing anyway: skip them.
            max_catchup_s=self.evaluator.retention_s,
            wall_clock=wall_clock,
            backoff=backoff,
        )
        self.evaluator.closed_until_s = self.scheduler.closed_until_s
        self.persistence: WindowPersistence | None = None
        if state_dir is not None:
            self.persistence = WindowPersistence(StateStore(state_dir), self.evaluator, wall_clock,
                                                 state_save_every_s)
            self.scheduler.after_tick = self._save_state

    def __repr__(self) -> str:
        return f"SloRuntime({len(self.objectives)} objectives, push={self.push_settings!r})"

    @property
    def pusher(self) -> Pusher | None:
        return self.scheduler.pusher

    # -- capture thread ------------------------------------------------------------------

    def observe(self, exchange: Exchange, route: str, service_name: str = "") -> None:
        self.evaluator.observe(exchange, route, int(self._clock() * 1e9), service_name)

    def observe_counts(self, route: str, port: int, status: int, duration_counts: Sequence[int],
                       bounds: Sequence[float], service_name: str = "") -> None:
        """Kernel-aggregated exchanges (fast path), polled about once a second."""
        self.evaluator.observe_counts(route, port, status, duration_counts, bounds, int(self._clock() * 1e9),
                                      service_name)

    # -- the scheduler's source ------------------------------------------------------------

    def close_interval(self, to_s: int) -> list[Closed]:
        return self.evaluator.close(to_s)

    def measured(self, item: Closed) -> Measured:
        return Measured.of(item.objective.slug, item.objective.selector, item.interval.percent)

    # -- background thread ---------------------------------------------------------------

    def tick(self, *, final: bool = False) -> list[Closed]:
        """Close every interval that is due and spool its indicators. The scheduler's thread
        calls this; tests call it directly with a fake clock."""
        return self.scheduler.tick(final=final)

    def _save_state(self, final: bool) -> None:
        """After each tick on the scheduler's thread: save the windows when due, and always at stop."""
        assert self.persistence is not None
        if final:
            self.persistence.save()
        else:
            self.persistence.save_if_due()

    def start(self) -> None:
        self.scheduler.start()

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop the loop; intervals that ended but were in their grace are closed and spooled."""
        self.scheduler.stop(timeout_s)

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
        coverage = GaugeMetricFamily(
            SLO_WINDOW_COVERAGE,
            "Part of the objective's window the exporter observed (1: all of it; less after a start "
            "or a restart that lost time).",
            labels=SLO_LABELS,
        )
        for obj, result in zip(self.objectives, latest, strict=True):
            labels = objective_labels(obj)
            objective.add_metric(labels, obj.objective_ratio)
            if result is None:
                continue
            if result.coverage is not None:
                coverage.add_metric(labels, result.coverage)
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
        yield from (sli, objective, budget, burn, good, total, coverage)

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
            "state": self.persistence.json() if self.persistence is not None else {"saved": False},
            "objectives": objectives,
            "push": push,
        }

    def self_samples(self) -> Iterable[SelfSample]:
        ev = self.evaluator
        samples = list(self.scheduler.self_samples())
        samples += [
            SelfSample(
                SELF_SLO_EVENTS_DROPPED_TOTAL,
                "counter",
                "Exchanges the SLO windows could not count, by reason "
                "(too_old: older than any kept bucket; future: timestamp ahead of the clock).",
                float(ev.too_old),
                (("reason", "too_old"),),
            ),
            SelfSample(
                SELF_SLO_EVENTS_DROPPED_TOTAL,
                "counter",
                "Exchanges the SLO windows could not count, by reason "
                "(too_old: older than any kept bucket; future: timestamp ahead of the clock).",
                float(ev.future),
                (("reason", "future"),),
            ),
            SelfSample(
                SELF_SLO_EVENTS_LATE_TOTAL,
                "counter",
                "Exchanges counted after their push interval was closed (in windows, not indicators).",
                float(ev.late_after_close),
            ),
        ]
        samples.append(SelfSample(SELF_SLO_COVERAGE_PERIODS_DROPPED_TOTAL, "counter",
                                  "Oldest observed stretches forgotten past the cap (coverage is understated).",
                                  float(ev.coverage_periods_dropped())))
        if self.persistence is not None:
            samples += self.persistence.self_samples()
        return samples
