"""The bridge and `slo rules` give the same SLI on the same data in a real Prometheus.

Two scrape targets expose the same histogram and differ only in how they spell `le`:
one as this exporter and Prometheus 3 do (`0.15`, `1.0`), the other as Go clients and
Prometheus 2 keep it (`0.150`, `1`). Each scrape adds a fixed mix, so the true ratios are
known and do not depend on which samples a window holds or on rate()'s extrapolation
(good and total of one series share their samples):

    per scrape and target   status 200: 97 (87 within 0.15 s, 96 within 1 s)
                            status 500:  3 (all within 0.15 s)
    latency 150ms: 90 / 100     latency 1s: 99 / 100     availability (5xx bad): 97 / 100

A builder that missed one spelling would count one target's good events only and read
about half; one that disagreed with the rules on good versus bad classes would read
another number. The recording rules are the rendered file itself, loaded into Prometheus
and evaluated by its rule manager; the bridge's number is PromQLSource.evaluate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from exporter.slo.manifest import parse_manifest
from exporter.slo.promql import PrometheusClient, PromQLSource
from exporter.slo.rules import render_rules
from tests.integration.prom import PrometheusServer

H = "http_server_request_duration_seconds"
MANIFEST = """
kind: Objective
metadata: {labels: {name: fast, service: spellings}}
spec:
  indicatorSelector: {category: latency, path: /, latency_target: 150ms}
  objectivePercent: 95
  window: 30s
---
kind: Objective
metadata: {labels: {name: within a second, service: spellings}}
spec:
  indicatorSelector: {category: latency, path: /, latency_target: 1s}
  objectivePercent: 99.5
  window: 30s
---
kind: Objective
metadata: {labels: {name: available, service: spellings}}
spec:
  indicatorSelector: {category: availability, path: /}
  objectivePercent: 99
  window: 30s
"""
OBJECTIVES = parse_manifest(MANIFEST)
EXPECTED_SLI = {"fast": 0.90, "within a second": 0.99, "available": 0.97}
# Per scrape and target: status -> (within 0.15 s, within 1 s, all).
MIX = {"200": (87, 96, 97), "500": (3, 3, 3)}


class Target:
    """A scrape target writing its histogram by hand, with its own `le` spellings."""

    def __init__(self, le_fast: str, le_second: str) -> None:
        self.spellings = (le_fast, le_second)
        self.scrapes = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = owner.exposition().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def exposition(self) -> str:
        self.scrapes += 1
        n = self.scrapes
        lines = [f"# TYPE {H} histogram"]
        for status, (fast, second, total) in MIX.items():
            labels = f'http_route="/",http_response_status_code="{status}",server_port="8000"'
            for le, count in ((self.spellings[0], fast), (self.spellings[1], second), ("+Inf", total)):
                lines.append(f'{H}_bucket{{{labels},le="{le}"}} {count * n}')
            lines.append(f"{H}_sum{{{labels}}} {0.05 * total * n}")
            lines.append(f"{H}_count{{{labels}}} {total * n}")
        return "\n".join(lines) + "\n"

    def __enter__(self) -> Target:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def prom() -> Iterator[PrometheusServer]:
    rules = render_rules(OBJECTIVES)
    with (
        Target("0.15", "1.0") as ours,
        Target("0.150", "1") as theirs,
        PrometheusServer([ours.address, theirs.address], rules_text=rules) as server,
    ):
        # Both targets seen, and both spellings stored as they were written (Prometheus 2
        # keeps `le` as exposed; a Prometheus 3 would rewrite `1` to `1.0`).
        server.wait_for(f'count(count by (le) ({H}_bucket{{le=~"0.15|0.150|1|1.0"}}))', lambda v: v == 4)
        # A whole 30 s window of samples for rate() and a recording over it.
        server.wait_for(f"min(count_over_time({H}_count[30s]))", lambda v: v is not None and v >= 20, 60)
        server.wait_for("count(slo:sli_error:ratio_rate30s)", lambda v: v == 3, 30)
        yield server


def recording(prom: PrometheusServer, window: str, slug: str) -> tuple[float, float]:
    """(time of the rule evaluation, recorded error ratio) of the latest recording."""
    series = f'slo:sli_error:ratio_rate{window}{{slo="{slug}"}}'
    result = prom.query(series)["result"]
    stamps = prom.query(f"timestamp({series})")["result"]
    assert len(result) == 1 and len(stamps) == 1, (window, slug)
    return float(stamps[0]["value"][1]), float(result[0]["value"][1])


def test_bridge_sli_equals_the_recording_rule_sli_on_the_same_data(prom: PrometheusServer) -> None:
    with PrometheusClient(prom.url) as client:
        source = PromQLSource(client, attempts=1)
        for objective in OBJECTIVES:
            stamp, error_ratio = recording(prom, "30s", objective.slug)
            rule_sli = 1.0 - error_ratio
            bridge_sli = source.evaluate(objective, stamp, 30.0).sli
            assert bridge_sli is not None, objective.name
            assert bridge_sli == pytest.approx(EXPECTED_SLI[objective.name], rel=1e-9), objective.name
            assert rule_sli == pytest.approx(EXPECTED_SLI[objective.name], rel=1e-9), objective.name
            assert bridge_sli == pytest.approx(rule_sli, rel=1e-9), objective.name
        assert source.outcomes == {"ok": 3, "no_data": 0, "error": 0}


def test_the_recordings_follow_the_window_and_agree_at_every_standard_window(prom: PrometheusServer) -> None:
    """The rule file records every standard window too; where the data covers the window
    (5m holds less than 5m here, but rate() uses what there is) each gives the same ratio."""
    time.sleep(1.5)  # at least one more rule evaluation over fresh samples
    with PrometheusClient(prom.url) as client:
        source = PromQLSource(client, attempts=1)
        for objective in OBJECTIVES:
            for window, seconds in (("5m", 300.0), ("30m", 1800.0)):
                stamp, error_ratio = recording(prom, window, objective.slug)
                bridge_sli = source.evaluate(objective, stamp, seconds).sli
                assert bridge_sli == pytest.approx(1.0 - error_ratio, rel=1e-9), (objective.name, window)
                assert bridge_sli == pytest.approx(EXPECTED_SLI[objective.name], rel=1e-9)
