"""Prometheus mode: the same objectives, evaluated by PromQL over /api/v1/query (httpx).

The queries are exporter/slo/query.py's, the same text `slo rules` records: the total, and
the good (latency, promql) or bad (availability) events from which the good are derived.
An empty *total* is "no data". An empty latency *good* while total has traffic means
the histogram has no bucket at the target, which is an error, not 0%.

Both queries of one evaluation run at the same `time`, so they see the same samples.
`rate()` extrapolates both the same way, so the ratio agrees with the embedded counts to
within that extrapolation's rounding.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from exporter.bridge.backoff import Backoff
from exporter.bridge.scheduler import Measured
from exporter.errors import QueryError
from exporter.metrics import SELF_SLO_EVALUATIONS_TOTAL, SELF_SLO_QUERY_RETRIES_TOTAL, SelfSample, format_bound
from exporter.slo.evaluate import Result
from exporter.slo.manifest import Objective, format_duration
from exporter.slo.query import le_regex, sli

__all__ = ["PromQLIntervals", "PromQLSource", "PrometheusClient", "le_regex", "queries"]

log = logging.getLogger("ebpf_slo_exporter.promql")

# A query is retried within one evaluation only for a brief blip (a restart of Prometheus);
# longer outages are the scheduler's to wait out, with its own backoff. Without jitter:
# one process, a handful of queries, and the retry must come within the grace period.
QUERY_RETRY_BACKOFF = Backoff(base_s=0.5, max_s=2.0, jitter=None)

def queries(objective: Objective, window: str | None = None) -> tuple[str, str]:
    """(stated, total) PromQL for an objective over `window` (default: its own window);
    `stated` is its good or its bad events, as exporter/slo/query.py states the SLI."""
    built = sli(objective, window)
    return built.stated, built.total


class PrometheusClient:
    """GET /api/v1/query. Every failure becomes a QueryError with one line."""

    def __init__(
        self, base_url: str, *, timeout_s: float = 5.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._http = httpx.Client(timeout=timeout_s, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PrometheusClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def query(self, expr: str, at: float | None = None) -> float | None:
        """One instant query expected to give at most one sample (a `sum`, a scalar).
        None when the result is empty."""
        params: dict[str, str] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = f"{self.base_url}/api/v1/query"
        try:
            response = self._http.get(url, params=params)
        except httpx.TimeoutException as exc:
            raise QueryError(
                f"Prometheus at {self.base_url} did not answer within {self.timeout_s:g}s"
            ) from exc
        except httpx.TransportError as exc:
            raise QueryError(
                f"cannot reach Prometheus at {self.base_url}: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            payload: Any = response.json()
        except ValueError as exc:
            raise QueryError(
                f"Prometheus at {self.base_url} answered {response.status_code} with a body that is not JSON"
            ) from exc
        if not isinstance(payload, dict):
            raise QueryError(f"Prometheus at {self.base_url} answered with an unexpected JSON shape")
        if payload.get("status") != "success":
            raise QueryError(
                f"Prometheus rejected the query ({payload.get('errorType', response.status_code)}): "
                f"{payload.get('error', 'no error text')}; query: {expr}"
            )
        return _single_value(payload.get("data"), expr)


def _single_value(data: Any, expr: str) -> float | None:
    if not isinstance(data, dict):
        raise QueryError(f"Prometheus answered without data for: {expr}")
    kind: Any = data.get("resultType")
    result: Any = data.get("result")
    try:
        if kind == "scalar":
            value = float(result[1])
        elif kind == "vector":
            if not result:
                return None
            if len(result) > 1:
                raise QueryError(f"query gave {len(result)} series, expected one (wrap it in sum()): {expr}")
            value = float(result[0]["value"][1])
        else:
            raise QueryError(f"query gave a {kind}, expected an instant vector or scalar: {expr}")
    except (TypeError, KeyError, IndexError, ValueError) as exc:
        raise QueryError(f"Prometheus answered a malformed {kind} for: {expr}") from exc
    return None if math.isnan(value) else value


class PromQLSource:
    """Evaluates objectives through Prometheus, with retries for transient failures and counters."""

    def __init__(
        self,
        client: PrometheusClient,
        *,
        attempts: int = 3,
        backoff: Backoff = QUERY_RETRY_BACKOFF,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self._sleep = sleep
        self.outcomes = {"ok": 0, "no_data": 0, "error": 0}
        self.retries = 0

    def _query(self, expr: str, at: float) -> float | None:
        for attempt in range(1, self.attempts + 1):
            try:
                return self.client.query(expr, at)
            except QueryError as exc:
                # A rejected query fails the same way every time; only transport errors are retried.
                if isinstance(exc.__cause__, httpx.TransportError) and attempt < self.attempts:
                    self.retries += 1
                    log.warning("%s; retry %d of %d", exc, attempt, self.attempts - 1)
                    self._sleep(self.backoff.delay(attempt))
                    continue
                raise
        raise AssertionError("unreachable")

    def evaluate(self, objective: Objective, at: float, window_s: float | None = None) -> Result:
        """The objective's ratio over [at - window, at). QueryError when Prometheus fails."""
        window_s = objective.window_seconds if window_s is None else window_s
        built = sli(objective, format_duration(window_s))
        try:
            total = self._query(built.total, at)
            stated = self._query(built.stated, at)
            if total is not None and total > 0 and stated is None:
                raise QueryError(
                    f"objective {objective.name!r}: no series for its good events although there is traffic; "
                    + (
                        "does the histogram have a bucket at "
                        f"le={format_bound(objective.latency_target_seconds)}?"
                        if objective.latency_target_seconds is not None
                        else f"query: {built.stated}"
                    )
                )
        except QueryError:
            self.outcomes["error"] += 1
            raise
        good = built.good_of(total or 0.0, stated or 0.0)
        result = Result(at - window_s, at, good, total or 0.0, objective.objective_ratio)
        self.outcomes["ok" if result.sli is not None else "no_data"] += 1
        return result

    def self_samples(self) -> Iterator[SelfSample]:
        for outcome, count in self.outcomes.items():
            yield SelfSample(
                SELF_SLO_EVALUATIONS_TOTAL,
                "counter",
                "Objective evaluations against Prometheus, by outcome.",
                float(count),
                (("outcome", outcome),),
            )
        yield SelfSample(
            SELF_SLO_QUERY_RETRIES_TOTAL,
            "counter",
            "Prometheus queries retried after a transport error.",
            float(self.retries),
        )


class PromQLIntervals:
    """PromQL as the interval scheduler's source (the `bridge` command): every objective over
    the closed interval, evaluated at `time=to` so an interval missed while Prometheus was
    down is evaluated later with the same answer. A failure raises QueryError, and the
    scheduler tries the same interval again after its backoff.

    `rate()` needs two samples inside the interval: keep the push interval at least twice
    the scrape interval, or intervals read as "no data" and send nothing."""

    def __init__(self, objectives: list[Objective], source: PromQLSource, interval_s: int) -> None:
        self.objectives = objectives
        self.source = source
        self.interval_s = interval_s

    def close_interval(self, to_s: int) -> list[tuple[Objective, Result]]:
        return [(o, self.source.evaluate(o, to_s, self.interval_s)) for o in self.objectives]

    def measured(self, item: tuple[Objective, Result]) -> Measured:
        objective, result = item
        return Measured.of(objective.slug, objective.selector, result.percent)
