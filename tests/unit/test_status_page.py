"""The status page's content from a real runtime, real HTTP histograms and the real WSGI app,
on a fake clock: the numbers on the page are the ones /api/v1/slo and /metrics carry."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from exporter.core.model import Exchange
from exporter.health import Loss
from exporter.metrics import ExporterCollector, HttpMetrics, SelfSample
from exporter.server import Health, build_app
from exporter.slo.manifest import load_manifest
from exporter.slo.runtime import SloRuntime
from exporter.status_page import StatusPage, routes_from
from tests.fake_clock import Clock

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "openslo.yaml"
T0 = 1_700_000_000


def setup() -> tuple[StatusPage, SloRuntime, Health, CollectorRegistry]:
    clock = Clock(T0)
    runtime = SloRuntime(load_manifest(EXAMPLE), wall_clock=clock)
    http = HttpMetrics()
    for i in range(200):  # 20 s: one exchange every 0.1 s on / and on /items/{id}
        clock.now = T0 + i * 0.1
        end = round(clock.now * 1e9)
        for route, status, ms in (("/", 503 if i % 50 == 0 else 200, 400 if i % 40 == 0 else 20),
                                  ("/items/{id}", 200, 5)):
            exchange = Exchange("GET", route, status, end - ms * 1_000_000, end, 10, 20, 8080)
            http.observe(exchange, route)
            runtime.observe(exchange, route)
        runtime.tick()
    clock.now = T0 + 22.5
    runtime.tick()

    def own() -> Iterable[SelfSample]:
        yield SelfSample("kernel_drops_total", "counter", "drops", 3.0)
        yield SelfSample("parse_errors_total", "counter", "errors", 2.0, (("reason", "bad_request_line"),))
        yield SelfSample("parse_errors_total", "counter", "errors", 1.0, (("reason", "bad_status_line"),))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExporterCollector(http, [own, runtime.self_samples], runtime.collect))
    health = Health()
    health.set(True, "filter attached to lo")
    page = StatusPage(registry, health, "interface lo, ports 8080", "9.9", runtime, clock=clock)
    clock.now = T0 + 62.5  # 40 s after the page (the exporter) started: the rates' divisor
    return page, runtime, health, registry


def text_of(html_page: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html_page))


def test_page_shows_objectives_routes_and_health() -> None:
    page, runtime, _, _ = setup()
    html_page = page.render()
    text = text_of(html_page)
    assert '<meta http-equiv="refresh" content="10">' in html_page
    assert "Filter: attached (filter attached to lo) Kernel drops: 3 Parse errors: 3 SLO events dropped: 0" in text
    # search-availability: path / only, 4 of 200 are 503 → 98%; window [T0-30d+…, T0+20) observed 20 s.
    availability, latency = runtime.snapshot()["objectives"]
    assert availability["current"]["sli_percent"] == 98.0 and latency["current"]["sli_percent"] == 97.5
    # Burn rates: the last interval [T0+10, T0+20) had 2 errors and 2 slow of 100.
    assert ("web-shop search-availability availability 98.000% 99% / 30d -100.0% 2.00 / 2.00 "
            "&lt;0.01% (20s of 30d) (partial) not met") in text
    assert ("web-shop search-latency latency 97.500% 99.5% / 30d -400.0% 4.00 / 5.00 "
            "&lt;0.01% (20s of 30d) (partial) not met") in text
    assert "Burn rate (last 10s / window)" in text
    assert html_page.count('<svg class="chart"') == 2 and html_page.count("<polyline") == 2
    # RED: 200 each, 4 errors on /, 200 / 40 s = 5 per second; p95 bounds from the histogram.
    assert "/ 8080 200 5.00 4 (2.00%) 29.5 ms ≤ 25.0 ms" in text  # 5 at 400 ms, 195 at 20 ms
    assert "/items/{id} 8080 200 5.00 0 (0.00%) 5.0 ms ≤ 5.0 ms" in text


def test_page_escapes_what_it_shows() -> None:
    page, _, health, _ = setup()
    health.set(False, "interface <lo> is down")
    html_page = page.render()
    assert "Filter: not attached (interface &lt;lo&gt; is down)" in html_page
    assert "<lo>" not in html_page


def test_served_at_root_with_no_store() -> None:
    page, runtime, health, registry = setup()
    app = build_app(registry, health, "d", runtime.snapshot, page.render)
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen.update(status=status, headers=dict(headers))

    body = b"".join(app({"PATH_INFO": "/", "REQUEST_METHOD": "GET"}, start_response))
    assert seen["status"] == "200 OK"
    assert seen["headers"]["Cache-Control"] == "no-store"
    assert b"search-availability" in body


def test_routes_beyond_the_cap_are_summed() -> None:
    http = HttpMetrics()
    for n in range(60):
        for _ in range(60 - n):
            http.observe(Exchange("GET", f"/r{n}", 200, 0, 1_000_000, 0, 0, 80), f"/r{n}")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExporterCollector(http, []))
    views = routes_from(registry.collect())
    assert len(views) == 50
    assert views[0].route == "/r0" and views[0].requests == 60
    assert views[-1].route == "(11 more routes)" and views[-1].requests == sum(range(1, 12))


def test_page_says_when_data_is_being_lost() -> None:
    page, _, health, _ = setup()
    health.losses = (Loss("kernel_drops", 3, "frames the kernel dropped"),)
    text = text_of(page.render())
    assert ("Filter: attached (filter attached to lo) Losing data: kernel_drops: 3 in the last 60s "
            "Kernel drops: 3") in text
