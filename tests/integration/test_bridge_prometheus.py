"""Prometheus mode against the real Prometheus, scraping a real exposition of our own histogram.

The traffic is stationary: every batch has the same mix (100 exchanges: 1 slower than
150 ms, 2 answered 500), added to the histogram atomically between scrapes, so any rate()
window sees good/total in exactly that proportion. The embedded runtime gets the same
exchanges; both modes must agree.
"""

from __future__ import annotations

import calendar
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from exporter.core.model import Exchange
from exporter.errors import QueryError
from exporter.metrics import ExporterCollector, HttpMetrics
from exporter.slo.commands import bridge, slo
from exporter.slo.manifest import parse_manifest
from exporter.slo.promql import PrometheusClient, PromQLSource, le_regex, queries
from exporter.slo.runtime import SloRuntime
from tests.integration.prom import ExpositionServer, PrometheusServer, free_port
from tests.integration.receiver import Receiver

MANIFEST = """
kind: Objective
metadata: {labels: {name: fast, service: demo}}
spec:
  indicatorSelector: {category: latency, path: /, latency_target: 150ms}
  objectivePercent: 99.5
  window: 10s
---
kind: Objective
metadata: {labels: {name: available, service: demo}}
spec:
  indicatorSelector: {category: availability, path: /}
  objectivePercent: 99
  window: 10s
---
kind: Objective
metadata: {labels: {name: only errors count as good, service: demo}}
spec:
  indicatorSelector: {category: availability, path: /}
  goodStatusClasses: [5xx]
  objectivePercent: 1
  window: 10s
---
kind: Objective
metadata: {labels: {name: never called, service: demo}}
spec:
  indicatorSelector: {category: availability, path: /nothing-here}
  objectivePercent: 99
  window: 10s
---
kind: Objective
metadata: {labels: {name: by promql, service: demo}}
spec:
  indicatorSelector: {category: custom}
  objectivePercent: 99
  window: 10s
  promql:
    good: sum(rate(http_server_request_duration_seconds_bucket{le="0.15"}[{{window}}]))
    total: sum(rate(http_server_request_duration_seconds_count[{{window}}]))
"""
OBJECTIVES = parse_manifest(MANIFEST)
FAST, AVAILABLE, ERRORS_GOOD, NEVER, BY_PROMQL = OBJECTIVES


def batch(now_ns: int, route: str = "/") -> list[Exchange]:
    out = []
    for i in range(100):
        ms = 400 if i == 0 else 20
        status = 500 if i in (1, 2) else 200
        out.append(Exchange("GET", route, status, now_ns - ms * 1_000_000, now_ns, 0, 0, 8000))
    return out


class Atomic(Collector):
    """Scrapes wait while a batch is being added: every scrape sees whole batches."""

    def __init__(self, inner: Collector, lock: threading.Lock) -> None:
        self.inner = inner
        self.lock = lock

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            metrics = list(self.inner.collect())
        yield from metrics


class Traffic:
    """Adds one batch every 0.25 s to both the histogram and the embedded runtime."""

    def __init__(self, http: HttpMetrics, runtime: SloRuntime, lock: threading.Lock) -> None:
        self.http = http
        self.runtime = runtime
        self.lock = lock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            exchanges = batch(time.time_ns())
            with self.lock:
                for exchange in exchanges:
                    self.http.observe(exchange, "/")
            for exchange in exchanges:
                self.runtime.observe(exchange, "/")
            self._stop.wait(0.25)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[PrometheusServer, SloRuntime]]:
    http = HttpMetrics()
    lock = threading.Lock()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Atomic(ExporterCollector(http), lock))
    runtime = SloRuntime(OBJECTIVES, push_interval_s=5)
    with (
        ExpositionServer(registry) as target,
        PrometheusServer([target.address]) as prom,
        Traffic(http, runtime, lock),
    ):
        prom.wait_for("up", lambda v: v == 1)
        # Enough history for a 10 s rate() window and a full embedded window.
        prom.wait_for(
            "count_over_time(http_server_request_duration_seconds_count[30s])",
            lambda v: v is not None and v >= 14,
        )
        yield prom, runtime


@pytest.fixture
def client(world: tuple[PrometheusServer, SloRuntime]) -> Iterator[PrometheusClient]:
    with PrometheusClient(world[0].url) as prom_client:
        yield prom_client


def test_queries_as_built() -> None:
    """The bridge's queries are exporter/slo/query.py's: the rules' text, stated as good
    (latency) or bad (availability) events; `le` in every spelling of the bound."""
    good, total = queries(FAST)
    assert good == (
        "sum(rate(http_server_request_duration_seconds_bucket"
        '{http_route="/", le=~"0\\\\.15|0\\\\.150"}[10s]))'
    )
    assert total == 'sum(rate(http_server_request_duration_seconds_count{http_route="/"}[10s]))'
    bad, _ = queries(AVAILABLE, "5m")
    assert bad == (
        'sum(rate(http_server_request_duration_seconds_count{http_route="/", '
        'http_response_status_code=~"5.."}[5m])) or vector(0)'
    )
    assert le_regex(1.0) == "1|1\\.0|1\\.00|1\\.000"
    assert le_regex(0.15) == "0\\.15|0\\.150"
    assert queries(BY_PROMQL, "1h")[1] == "sum(sum(rate(http_server_request_duration_seconds_count[1h])))"


def test_promql_sli_matches_the_traffic_and_the_embedded_runtime(
    world: tuple[PrometheusServer, SloRuntime], client: PrometheusClient
) -> None:
    _, runtime = world
    source = PromQLSource(client)
    at = time.time() - 1
    fast = source.evaluate(FAST, at)
    available = source.evaluate(AVAILABLE, at)
    assert fast.sli == pytest.approx(0.99, rel=1e-9)
    assert available.sli == pytest.approx(0.98, rel=1e-9)
    assert 100 <= fast.total <= 410  # at most 100 per 0.25 s; a loaded machine adds fewer
    assert source.evaluate(BY_PROMQL, at).sli == pytest.approx(0.99, rel=1e-9)
    # Embedded: the same exchanges, counted exactly.
    runtime.tick()
    latest = dict(zip([o.name for o in OBJECTIVES], runtime.evaluator.latest(), strict=True))
    embedded_fast, embedded_available = latest["fast"], latest["available"]
    assert embedded_fast is not None and embedded_available is not None
    assert embedded_fast.sli == 0.99
    assert embedded_available.sli == 0.98
    assert fast.sli == pytest.approx(embedded_fast.sli, rel=1e-9)
    assert available.sli == pytest.approx(embedded_available.sli, rel=1e-9)


def test_missing_good_series_is_zero_and_missing_total_is_no_data(client: PrometheusClient) -> None:
    source = PromQLSource(client)
    at = time.time() - 1
    errors_good = source.evaluate(ERRORS_GOOD, at)
    assert errors_good.sli == pytest.approx(0.02, rel=1e-9)
    no_traffic = source.evaluate(NEVER, at)
    assert (no_traffic.sli, no_traffic.percent, no_traffic.burn_rate) == (None, None, None)
    only_4xx = parse_manifest(MANIFEST.replace("goodStatusClasses: [5xx]", "goodStatusClasses: [4xx]"))[2]
    assert source.evaluate(only_4xx, at).sli == 0.0  # `or vector(0)`: an empty good series is 0, not empty
    assert source.outcomes == {"ok": 2, "no_data": 1, "error": 0}


def test_latency_target_without_a_bucket_is_an_error(client: PrometheusClient) -> None:
    odd = parse_manifest(MANIFEST.replace("latency_target: 150ms", "latency_target: 200ms"))[0]
    with pytest.raises(QueryError, match=r"does the histogram have a bucket at le=0\.2\?"):
        PromQLSource(client).evaluate(odd, time.time() - 1)


def test_error_envelope_is_a_query_error_and_not_retried(client: PrometheusClient) -> None:
    broken = parse_manifest(
        MANIFEST.replace(
            "total: sum(rate(http_server_request_duration_seconds_count[{{window}}]))",
            "total: sum(rate(nope[{{window}}])",
        )
    )[4]
    sleeps: list[float] = []
    source = PromQLSource(client, sleep=sleeps.append)
    with pytest.raises(
        QueryError, match=r"^Prometheus rejected the query \(bad_data\): .*query: sum\(sum\(rate\(nope"
    ):
        source.evaluate(broken, time.time())
    assert sleeps == []
    assert source.outcomes["error"] == 1
    with pytest.raises(QueryError, match="expected one"):
        client.query("count by (http_response_status_code) (http_server_request_duration_seconds_count)")


def test_unreachable_prometheus_is_retried_counted_and_raised() -> None:
    sleeps: list[float] = []
    with PrometheusClient(f"http://127.0.0.1:{free_port()}", timeout_s=1) as client:
        source = PromQLSource(client, attempts=3, sleep=sleeps.append)
        with pytest.raises(
            QueryError, match=r"^cannot reach Prometheus at http://127\.0\.0\.1:\d+: ConnectError"
        ):
            source.evaluate(FAST, time.time())
    assert sleeps == [0.5, 1.0]
    samples = {(s.name, s.labels): s.value for s in source.self_samples()}
    assert samples[("slo_query_retries_total", ())] == 2
    assert samples[("slo_evaluations_total", (("outcome", "error"),))] == 1


def test_hanging_prometheus_times_out() -> None:
    with Receiver() as rx, PrometheusClient(rx.url, timeout_s=0.3) as client:
        rx.hang_next()
        started = time.monotonic()
        with pytest.raises(QueryError, match=r"did not answer within 0\.3s"):
            client.query("up")
        assert time.monotonic() - started < 2
        rx.release()


def test_report_command_through_prometheus(
    world: tuple[PrometheusServer, SloRuntime], tmp_path: Path
) -> None:
    prom, _ = world
    manifest = tmp_path / "slo.yaml"
    manifest.write_text(MANIFEST)
    result = CliRunner().invoke(
        slo,
        [
            "report",
            "--prometheus",
            prom.url,
            "--slo",
            str(manifest),
            "--format",
            "json",
            "--trend-step",
            "1s",
        ],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    levels = {level["name"]: level for level in document["services"][0]["service_levels"]}
    assert levels["fast"]["result"]["actual"] == pytest.approx(99.0, rel=1e-9)
    assert levels["fast"]["result"]["slo_is_met"] is False
    assert levels["available"]["result"]["slo_is_met"] is False
    assert levels["never called"]["result"] == {"actual": None, "delta": None, "slo_is_met": None}
    assert levels["fast"]["period"] == "10s"


def test_bridge_once_pushes_the_last_interval(
    world: tuple[PrometheusServer, SloRuntime], tmp_path: Path
) -> None:
    prom, _ = world
    manifest = tmp_path / "slo.yaml"
    manifest.write_text(MANIFEST)
    with Receiver() as rx:
        result = CliRunner().invoke(
            bridge,
            [
                "--slo",
                str(manifest),
                "--prometheus",
                prom.url,
                "--reliably-url",
                rx.url,
                "--push-interval",
                "5s",
                "--grace",
                "1s",
                "--spool-dir",
                str(tmp_path / "spool"),
                "--once",
            ],
            env={"RELIABLY_TOKEN": "t0k3n", "RELIABLY_ORG": "org", "RELIABLY_CONFIG": str(tmp_path / "none")},
        )
        assert result.exit_code == 0, result.output
        specs = []
        for request in rx.requests:
            assert request.path == "/entities/org/reliably.com/v1/indicator"
            assert request.body["metadata"]["labels"]["to"] == request.body["spec"]["to"]
            specs.append(request.body["spec"])
    # fast, available, errors-as-good, by-promql; "never called" had no traffic and sends nothing.
    assert sorted(round(spec["percent"], 6) for spec in specs) == [2.0, 98.0, 99.0, 99.0]
    assert len({(spec["from"], spec["to"]) for spec in specs}) == 1
    spec = specs[0]
    assert calendar.timegm(time.strptime(spec["to"], "%Y-%m-%dT%H:%M:%SZ")) % 5 == 0


def test_bridge_dry_run_prints_indicators(world: tuple[PrometheusServer, SloRuntime], tmp_path: Path) -> None:
    prom, _ = world
    manifest = tmp_path / "slo.yaml"
    manifest.write_text(MANIFEST)
    result = CliRunner().invoke(
        bridge,
        [
            "--slo",
            str(manifest),
            "--prometheus",
            prom.url,
            "--dry-run",
            "--once",
            "--push-interval",
            "5s",
            "--grace",
            "1s",
        ],
    )
    assert result.exit_code == 0, result.output
    bodies = [json.loads(line) for line in result.output.splitlines()]
    assert sorted(b["metadata"]["labels"]["category"] for b in bodies) == [
        "availability",
        "availability",
        "custom",
        "latency",
    ]
