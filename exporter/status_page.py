"""The status page at `/`: objectives, a history chart, the per-route RED summary and the
exporter's health, for people without Grafana. Server-rendered HTML with inline SVG, no
JavaScript; `<meta http-equiv="refresh">` reloads it.

Everything on it comes from what the exporter already serves: the SLO runtime's latest
results (the same as /api/v1/slo and the slo_* gauges) and the registry's own samples
(the same as /metrics), so the page can never disagree with either. Rendering is pure
(`render_page` takes plain data); `StatusPage` only gathers it.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from exporter.metrics import HTTP_DURATION, SELF
from exporter.server import Health
from exporter.slo.evaluate import format_coverage
from exporter.slo.manifest import format_duration

REFRESH_S = 10
CHART_W, CHART_H = 320, 64
MAX_ROUTES = 50  # rows of the RED table; the rest are summed into one line


@dataclass(frozen=True, slots=True)
class ObjectiveView:
    name: str
    service: str
    category: str
    objective_percent: float
    window: str
    sli_percent: float | None
    budget_remaining: float | None
    burn_interval: float | None  # over the last push interval
    burn_window: float | None
    coverage: float | None
    covered_s: float | None
    push_interval_s: int
    chart: Sequence[tuple[float, float | None]]  # (interval end, window SLI %) oldest first


@dataclass(frozen=True, slots=True)
class RouteView:
    route: str
    port: str
    requests: float
    errors: float  # 5xx
    mean_s: float | None
    p95_le_s: float | None  # the histogram bound at or above the 95th percentile


@dataclass(frozen=True, slots=True)
class HealthView:
    ready: bool
    reason: str
    kernel_drops: float | None
    parse_errors: float | None
    slo_dropped: float | None
    losing: str = ""  # the degraded reasons, as /healthz gives them; empty while nothing is lost


def _fmt_percent(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}%"


def _fmt_ratio(value: float | None) -> str:
    if value is None:
        return "—"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.2f}"


def _fmt_seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _fmt_count(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def chart_svg(view: ObjectiveView) -> str:
    """The window SLI over the last closed intervals as a polyline, the target as a dashed
    line; gaps (no data) break the line."""
    points = [(t, v) for t, v in view.chart]
    values = [v for _, v in points if v is not None]
    low = min([*values, view.objective_percent]) if values else view.objective_percent
    low = max(0.0, min(low, view.objective_percent) - max(0.05, (100 - low) * 0.2))
    span = max(1e-9, 100.0 - low)

    def y(value: float) -> float:
        return round(CHART_H - 2 - (value - low) / span * (CHART_H - 4), 1)

    segments: list[list[str]] = [[]]
    if len(points) > 1:
        t0, t1 = points[0][0], points[-1][0]
        for t, value in points:
            if value is None:
                segments.append([])
                continue
            x = round((t - t0) / max(1e-9, t1 - t0) * (CHART_W - 2) + 1, 1)
            segments[-1].append(f"{x},{y(value)}")
    lines = "".join(f'<polyline points="{" ".join(s)}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>'
                    for s in segments if len(s) > 1)
    target_y = y(view.objective_percent)
    title = html.escape(f"{view.name}: window SLI over the last {len(points)} intervals; target "
                        f"{view.objective_percent:g}%")
    return (
        f'<svg class="chart" width="{CHART_W}" height="{CHART_H}" viewBox="0 0 {CHART_W} {CHART_H}" '
        f'role="img" aria-label="{title}"><title>{title}</title>'
        f'<rect width="{CHART_W}" height="{CHART_H}" fill="#fafafa" stroke="#ddd"/>'
        f'<line x1="0" y1="{target_y}" x2="{CHART_W}" y2="{target_y}" stroke="#d62728" stroke-dasharray="4 3"/>'
        f"{lines}</svg>"
    )


def _objective_rows(objectives: Sequence[ObjectiveView]) -> str:
    if not objectives:
        return '<p class="muted">No objectives: start the exporter with <code>--slo FILE</code>.</p>'
    rows = []
    for view in objectives:
        met = None if view.sli_percent is None else view.sli_percent >= view.objective_percent - 1e-9
        state = {None: ("nodata", "no data"), True: ("met", "met"), False: ("notmet", "not met")}[met]
        coverage = format_coverage(view.coverage)
        if view.covered_s is not None:
            coverage += f" ({format_duration(max(1, round(view.covered_s)))} of {view.window})"
        partial = view.coverage is not None and view.coverage < 1.0
        rows.append(
            f'<tr class="{state[0]}"><td>{html.escape(view.service)}</td><td>{html.escape(view.name)}</td>'
            f"<td>{html.escape(view.category)}</td>"
            f'<td class="num">{_fmt_percent(view.sli_percent)}</td>'
            f'<td class="num">{view.objective_percent:g}% / {html.escape(view.window)}</td>'
            f'<td class="num">{_fmt_percent(None if view.budget_remaining is None else view.budget_remaining * 100, 1)}'
            f"</td>"
            f'<td class="num">{_fmt_ratio(view.burn_interval)} / {_fmt_ratio(view.burn_window)}</td>'
            f'<td class="num{" partial" if partial else ""}">'
            f'{html.escape(coverage)}{" (partial)" if partial else ""}</td>'
            f"<td>{state[1]}</td><td>{chart_svg(view)}</td></tr>"
        )
    interval = objectives[0].push_interval_s
    return (
        "<table><thead><tr><th>Service</th><th>Objective</th><th>Category</th><th>SLI</th>"
        f"<th>Target / window</th><th>Error budget left</th><th>Burn rate (last {interval}s / window)</th>"
        "<th>Window observed</th><th>State</th><th>Window SLI history</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _route_rows(routes: Sequence[RouteView], uptime_s: float) -> str:
    if not routes:
        return '<p class="muted">No HTTP exchanges seen yet.</p>'
    rows = []
    for route in routes:
        error_percent = route.errors / route.requests * 100 if route.requests else None
        rate = route.requests / uptime_s if uptime_s > 0 else None
        rows.append(
            f"<tr><td>{html.escape(route.route)}</td><td>{html.escape(route.port)}</td>"
            f'<td class="num">{_fmt_count(route.requests)}</td>'
            f'<td class="num">{"—" if rate is None else f"{rate:.2f}"}</td>'
            f'<td class="num">{_fmt_count(route.errors)} ({_fmt_percent(error_percent, 2)})</td>'
            f'<td class="num">{_fmt_seconds(route.mean_s)}</td>'
            f'<td class="num">{"—" if route.p95_le_s is None else "≤ " + _fmt_seconds(route.p95_le_s)}</td></tr>'
        )
    return (
        "<table><thead><tr><th>Route</th><th>Port</th><th>Requests</th><th>Per second (since start)</th>"
        "<th>Errors (5xx)</th><th>Mean duration</th><th>p95 duration</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _health(health: HealthView) -> str:
    attached = "attached" if health.ready else "not attached"
    losing = f'<li class="bad">Losing data: {html.escape(health.losing)}</li>' if health.losing else ""
    return (
        f'<ul class="health"><li class="{"ok" if health.ready else "bad"}">Filter: {attached} '
        f"({html.escape(health.reason)})</li>{losing}"
        f"<li>Kernel drops: {_fmt_count(health.kernel_drops)}</li>"
        f"<li>Parse errors: {_fmt_count(health.parse_errors)}</li>"
        f"<li>SLO events dropped: {_fmt_count(health.slo_dropped)}</li></ul>"
    )


STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse}
th,td{padding:.3em .6em;border-bottom:1px solid #e4e4e4;text-align:left;vertical-align:middle}
th{font-weight:600;background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
tr.met td:nth-child(9){color:#2ca02c}tr.notmet td:nth-child(9){color:#d62728;font-weight:600}
tr.nodata td:nth-child(9),.muted{color:#888}.partial{color:#b8860b}
.health li.ok{color:#2ca02c}.health li.bad{color:#d62728;font-weight:600}
"""


def render_page(*, version: str, description: str, generated_at_s: float, uptime_s: float,
                objectives: Sequence[ObjectiveView], routes: Sequence[RouteView], health: HealthView) -> str:
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(generated_at_s))
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="refresh" content="{REFRESH_S}">'
        f"<title>ebpf-slo-exporter status</title><style>{STYLE}</style></head><body>"
        f"<h1>ebpf-slo-exporter {html.escape(version)}</h1>"
        f'<p class="muted">HTTP RED metrics and SLOs from the wire: {html.escape(description)}. '
        f"Generated {generated}; refreshes every {REFRESH_S}s. "
        '<a href="/metrics">/metrics</a> · <a href="/api/v1/slo">/api/v1/slo</a> · '
        '<a href="/healthz">/healthz</a></p>'
        f"<h2>Health</h2>{_health(health)}"
        f"<h2>Objectives</h2>{_objective_rows(objectives)}"
        f"<h2>Routes</h2>{_route_rows(routes, uptime_s)}"
        "</body></html>\n"
    )


# -- gathering -----------------------------------------------------------------------------


def routes_from(families: Iterable[Any]) -> list[RouteView]:
    """Per (route, port) RED figures from the duration histogram's samples."""
    counts: dict[tuple[str, str], float] = {}
    errors: dict[tuple[str, str], float] = {}
    sums: dict[tuple[str, str], float] = {}
    buckets: dict[tuple[str, str], dict[float, float]] = {}
    for family in families:
        if family.name != HTTP_DURATION:
            continue
        for sample in family.samples:
            labels = sample.labels
            key = (labels.get("http_route", ""), labels.get("server_port", ""))
            if sample.name.endswith("_count"):
                counts[key] = counts.get(key, 0.0) + sample.value
                if labels.get("http_response_status_code", "").startswith("5"):
                    errors[key] = errors.get(key, 0.0) + sample.value
            elif sample.name.endswith("_sum"):
                sums[key] = sums.get(key, 0.0) + sample.value
            elif sample.name.endswith("_bucket"):
                bound = float(labels["le"])
                per_bound = buckets.setdefault(key, {})
                per_bound[bound] = per_bound.get(bound, 0.0) + sample.value
    views = []
    for key, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        p95 = None
        for bound, cumulative in sorted(buckets.get(key, {}).items()):
            if count and cumulative >= 0.95 * count:
                p95 = bound if math.isfinite(bound) else None
                break
        views.append(RouteView(key[0], key[1], count, errors.get(key, 0.0),
                               sums.get(key, 0.0) / count if count else None, p95))
    if len(views) > MAX_ROUTES:
        rest = views[MAX_ROUTES - 1:]
        total = sum(v.requests for v in rest)
        views = [*views[:MAX_ROUTES - 1], RouteView(f"({len(rest)} more routes)", "", total,
                                                    sum(v.errors for v in rest), None, None)]
    return views


def _self_value(families: Iterable[Any], name: str) -> float | None:
    """The sum of one self-metric's samples (over its labels), None when it is not exported."""
    full = f"{SELF}_{name}"
    total: float | None = None
    for family in families:
        for sample in family.samples:
            if sample.name in (full, f"{full}_total"):
                total = (total or 0.0) + sample.value
    return total


class StatusPage:
    """Gathers the page's data from the registry, the health and the SLO runtime."""

    def __init__(self, registry: CollectorRegistry, health: Health, description: str, version: str,
                 slo_runtime: Any = None, clock: Callable[[], float] = time.time) -> None:
        self._registry = registry
        self._health = health
        self._description = description
        self._version = version
        self._slo = slo_runtime
        self._clock = clock
        self._started = clock()

    def objectives(self) -> list[ObjectiveView]:
        runtime = self._slo
        if runtime is None:
            return []
        views = []
        evaluator = runtime.evaluator
        for objective, points, interval, window in zip(runtime.objectives, evaluator.chart(),
                                                       evaluator.last_intervals(), evaluator.latest(), strict=True):
            views.append(ObjectiveView(
                name=objective.name,
                service=objective.service,
                category=objective.category,
                objective_percent=objective.objective_percent,
                window=format_duration(objective.window_seconds),
                sli_percent=window.percent if window else None,
                budget_remaining=window.budget_remaining if window else None,
                burn_interval=interval.burn_rate if interval else None,
                burn_window=window.burn_rate if window else None,
                coverage=window.coverage if window else None,
                covered_s=window.covered_s if window else None,
                push_interval_s=runtime.push_interval_s,
                chart=points,
            ))
        return views

    def render(self) -> str:
        families = list(self._registry.collect())
        health = HealthView(
            ready=self._health.ready,
            reason=self._health.reason,
            kernel_drops=_self_value(families, "kernel_drops"),
            parse_errors=_self_value(families, "parse_errors"),
            slo_dropped=_self_value(families, "slo_events_dropped"),
            losing="; ".join(f"{loss.reason}: {loss.count} in the last {self._health.window_s:g}s"
                             for loss in self._health.losses),
        )
        now = self._clock()
        return render_page(version=self._version, description=self._description, generated_at_s=now,
                           uptime_s=now - self._started, objectives=self.objectives(),
                           routes=routes_from(families), health=health)
