"""End to end: real exporter on lo -> real Prometheus with the generated rules -> every dashboard query.

A small HTTP service on lo answers `/` (the route of examples/reliably.yaml) and fails one
request in ten with a 503, so the availability objective (99 % over 1m) burns its budget at
about 10x: its SLOErrorBudgetBurn alerts fire (factor 1 on a 1m period), and the alert
panels have something to show. Other routes add variety for the top-routes table.

Prometheus scrapes every second and evaluates the rules every second. The test then sends
every panel query of every dashboard, variables substituted the way Grafana would
(tests/dashboards_queries.py), to /api/v1/query and asserts status success and a non-empty
result. Queries flagged `may_be_empty` (the firing-alerts table of slo.json, which is empty
whenever nothing fires) are only required to succeed; this test's traffic is built to make
them non-empty too, which is checked separately.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.slo.manifest import load_manifest
from exporter.slo.rules import ALERT_NAME, render_rules
from tests.dashboards_queries import PanelQuery, all_dashboard_queries
from tests.integration.harness import REPO, ExporterProcess, free_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to attach a BPF filter")

PROMETHEUS = shutil.which("prometheus")


class PrometheusServer:
    """A throwaway Prometheus: its own config, rules and TSDB in a temporary directory."""

    def __init__(self, workdir: Path, scrape_targets: list[str], rules_text: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        (workdir / "slo.rules.yml").write_text(rules_text)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": ["slo.rules.yml"],
            "scrape_configs": [
                {"job_name": "ebpf-slo-exporter", "static_configs": [{"targets": scrape_targets}]}
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "prometheus.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        assert PROMETHEUS is not None
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={self.workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.base + "/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus not ready within {timeout}s: {self.log.read_text()[-2000:]}")

    def query(self, expr: str) -> dict[str, Any]:
        """The JSON answer of /api/v1/query; an HTTP error (bad query) is returned, not raised."""
        url = self.base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read() or b'{"status": "error"}')

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class _Service(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    counter = 0
    lock = threading.Lock()

    def do_GET(self) -> None:
        with _Service.lock:
            _Service.counter += 1
            count = _Service.counter
        path = self.path.split("?", 1)[0]
        status = 503 if path == "/" and count % 10 == 0 else 200
        if path.startswith("/slow"):
            time.sleep(0.2)
        body = b"ok\n" if status == 200 else b"unavailable\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _load(port: int, stop: threading.Event) -> None:
    """About 40 requests a second over one keep-alive connection, reconnecting if it drops."""
    paths = ["/", "/", "/", "/", "/api/items", "/slow", "/", "/health"]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    index = 0
    while not stop.is_set():
        try:
            connection.request("GET", paths[index % len(paths)])
            connection.getresponse().read()
        except (OSError, http.client.HTTPException):
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        index += 1
        stop.wait(0.025)
    connection.close()


@pytest.fixture
def service() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Service)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def _has_data(answer: dict[str, Any]) -> bool:
    return answer.get("status") == "success" and bool(answer["data"]["result"])


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (`make setup` installs it)")
def test_every_dashboard_query_returns_data_from_a_real_prometheus(service, tmp_path):
    rules_text = render_rules(load_manifest(REPO / "examples" / "reliably.yaml"))
    queries: list[PanelQuery] = all_dashboard_queries(rate_interval="15s", interval="2s", range_seconds=60)
    stop = threading.Event()
    loader = threading.Thread(target=_load, args=(service, stop), daemon=True)
    with ExporterProcess("--interface", "lo", "--port", str(service)) as exporter:
        prometheus = PrometheusServer(tmp_path, [f"127.0.0.1:{exporter.listen_port}"], rules_text).start()
        try:
            loader.start()
            # Wait until every query that must have data has it (rates need two scrapes,
            # recording rules an evaluation after that), and the availability alert fires.
            deadline = time.monotonic() + 90
            missing: list[PanelQuery] = list(queries)
            alerts: dict[str, Any] = {}
            while time.monotonic() < deadline:
                missing = [
                    q for q in queries if not q.may_be_empty and not _has_data(prometheus.query(q.expr))
                ]
                alerts = prometheus.query(f'ALERTS{{alertname="{ALERT_NAME}", alertstate="firing"}}')
                if not missing and _has_data(alerts):
                    break
                time.sleep(1)

            answers = {q.name: prometheus.query(q.expr) for q in queries}
            failed = {name: a for name, a in answers.items() if a.get("status") != "success"}
            assert not failed, f"queries Prometheus rejected: {json.dumps(failed, indent=1)[:3000]}"
            empty = [
                q.name + "\n    " + q.expr
                for q in queries
                if not q.may_be_empty and not _has_data(answers[q.name])
            ]
            assert not empty, "queries with no data:\n" + "\n".join(empty)

            # Recorded SLO series are numbers, never NaN or Inf.
            for q in queries:
                for series in answers[q.name]["data"]["result"]:
                    assert series["value"][1] not in ("NaN", "+Inf", "-Inf"), (q.name, series)

            # The firing-alerts panel: may be empty in general; here the 10% 503s on / fire it.
            fired = {(a["metric"]["slo"], a["metric"]["long_window"]) for a in alerts["data"]["result"]}
            availability = "ebpf_2021_demo_99_of_the_responses_to_our_users_are_in_the_2xx_class"
            assert (availability, "1h") in fired, alerts
            alert_panels = [q for q in queries if q.may_be_empty]
            assert alert_panels and all(_has_data(answers[q.name]) for q in alert_panels)
        finally:
            stop.set()
            loader.join(timeout=5)
            prometheus.stop()
