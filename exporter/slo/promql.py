"""Prometheus mode: the same objectives, evaluated by PromQL over /api/v1/query (httpx).

The queries read the exporter's own histogram (`http_server_request_duration_seconds`):

    latency       good  = sum(rate(<h>_bucket{le=~"<target forms>", <narrowing>}[W]))
                  total = sum(rate(<h>_count{<narrowing>}[W]))
    availability  good  = sum(rate(<h>_count{<narrowing>, http_response_status_code=~"[1234].."}[W]))
                          or vector(0)
                  total = sum(rate(<h>_count{<narrowing>}[W]))
    promql        the manifest's good and total, with {{window}} replaced by W

`le` is matched by a regex of every spelling of the bound (`0.15`; `1.0|1` for whole
numbers) because Prometheus 3 rewrites `le="1"` to `le="1.0"` at ingestion, and the
exporter writes the float form: a rule must match both. The good query of availability
falls back to 0 (`or vector(0)`): with no matching series the ratio would be empty, not 0.
An empty *total* is "no data". An empty latency *good* while total has traffic means
the histogram has no bucket at the target, which is an error, not 0%.

Both queries of one evaluation run at the same `time`, so they see the same samples.
`rate()` extrapolates both the same way, so the ratio agrees with the embedded counts to
within that extrapolation's rounding.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from exporter.errors import QueryError
from exporter.metrics import HTTP_DURATION, SelfSample, format_bound
from exporter.slo.evaluate import Result
from exporter.slo.manifest import Objective, format_duration

log = logging.getLogger("ebpf_slo_exporter.promql")

STATUS_LABEL = "http_response_status_code"
ROUTE_LABEL = "http_route"
PORT_LABEL = "server_port"


def le_spellings(bound: float) -> list[str]:
    """Every way a bucket bound may be written in `le`: ours (format_bound: `0.15`, `1.0`),
    Prometheus 2 / other clients (`1`), Go's shortest form (`1e-05`)."""
    forms = [format_bound(bound)]
    if float(bound).is_integer():
        forms.append(str(int(bound)))
    go_form = f"{bound:g}"
    if go_form not in forms:
        forms.append(go_form)
    return forms


def le_regex(bound: float) -> str:
    return "|".join(re.escape(form) for form in le_spellings(bound))


def quote(value: str) -> str:
    """A PromQL double-quoted string literal (escapes backslash, quote, newline)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def narrowing(objective: Objective) -> list[str]:
    matchers = []
    if objective.route is not None:
        matchers.append(f"{ROUTE_LABEL}={quote(objective.route)}")
    if objective.port is not None:
        matchers.append(f"{PORT_LABEL}={quote(str(objective.port))}")
    if objective.service_name is not None:
        matchers.append(f"service_name={quote(objective.service_name)}")
    return matchers


def _selector(matchers: list[str]) -> str:
    return "{" + ",".join(matchers) + "}"


def queries(objective: Objective, window: str | None = None) -> tuple[str, str]:
    """(good, total) PromQL for an objective over `window` (default: its own window)."""
    window = window or format_duration(objective.window_seconds)
    if objective.promql is not None:
        return objective.promql.render(window)
    base = narrowing(objective)
    total = f"sum(rate({HTTP_DURATION}_count{_selector(base)}[{window}]))"
    if objective.category == "latency":
        assert objective.latency_target_seconds is not None
        le = f"le=~{quote(le_regex(objective.latency_target_seconds))}"
        good = f"sum(rate({HTTP_DURATION}_bucket{_selector([*base, le])}[{window}]))"
        return good, total
    classes = "".join(sorted(c[0] for c in objective.good_status_classes))
    status = f"{STATUS_LABEL}=~{quote(f'[{classes}]..')}"
    good = f"sum(rate({HTTP_DURATION}_count{_selector([*base, status])}[{window}])) or vector(0)"
    return good, total


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
        retry_delay_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.attempts = max(1, attempts)
        self.retry_delay_s = retry_delay_s
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
                    self._sleep(self.retry_delay_s * attempt)
                    continue
                raise
        raise AssertionError("unreachable")

    def evaluate(self, objective: Objective, at: float, window_s: float | None = None) -> Result:
        """The objective's ratio over [at - window, at). QueryError when Prometheus fails."""
        window_s = objective.window_seconds if window_s is None else window_s
        good_q, total_q = queries(objective, format_duration(window_s))
        try:
            total = self._query(total_q, at)
            good = self._query(good_q, at)
            if total is not None and total > 0 and good is None:
                raise QueryError(
                    f"objective {objective.name!r}: no series for its good events although there is traffic; "
                    + (
                        "does the histogram have a bucket at "
                        f"le={format_bound(objective.latency_target_seconds)}?"
                        if objective.latency_target_seconds is not None
                        else f"query: {good_q}"
                    )
                )
        except QueryError:
            self.outcomes["error"] += 1
            raise
        result = Result(at - window_s, at, good or 0.0, total or 0.0, objective.objective_ratio)
        self.outcomes["ok" if result.sli is not None else "no_data"] += 1
        return result

    def self_samples(self) -> Iterator[SelfSample]:
        for outcome, count in self.outcomes.items():
            yield SelfSample(
                "slo_evaluations_total",
                "counter",
                "Objective evaluations against Prometheus, by outcome.",
                float(count),
                (("outcome", outcome),),
            )
        yield SelfSample(
            "slo_query_retries_total",
            "counter",
            "Prometheus queries retried after a transport error.",
            float(self.retries),
        )
