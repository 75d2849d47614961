"""Nothing the exporter emits carries what it saw inside the HTTP traffic.

Requests carry a secret in the query string, in Authorization, in a cookie, in another
header, in the body, and in a malformed request; responses carry one in Set-Cookie and
the body. The real exporter runs with --slo, pushes to a local Reliably stand-in (which
fails the first pushes, so the spool and the retry logs are exercised) and logs at debug.
Then every output is searched for the secret: /metrics, /api/v1/slo, the landing page,
/healthz, stdout and stderr, every file in the spool directory, and every pushed request.
The Reliably token must only ever appear in the Authorization header of the pushes.
"""

from __future__ import annotations

import http.client
import os
import socket
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.integration.harness import ExporterProcess, counts_by_key, logging_server, self_metric
from tests.integration.receiver import Receiver

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to attach a BPF filter")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "reliably.yaml"


def fetch(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as exc:  # /healthz may say 503
        return str(exc.read().decode())


def send_secrets(port: int, secret: str) -> list[tuple[str, str, bytes | None, dict[str, str]]]:
    """The secret in a query, Authorization, a cookie, another header, bodies; then a malformed request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    requests: list[tuple[str, str, bytes | None, dict[str, str]]] = [
        ("GET", f"/?token={secret}", None, {}),
        ("GET", "/", None, {"Authorization": f"Bearer {secret}"}),
        ("GET", "/", None, {"Cookie": f"session={secret}"}),
        ("GET", "/", None, {"X-Api-Key": secret}),
        ("POST", "/", f"password={secret}".encode(), {"Content-Type": "application/x-www-form-urlencoded"}),
        ("PUT", f"/?{secret}", secret.encode() * 100, {}),
        ("GET", f"/status/500?k={secret}", None, {}),
    ]
    for method, target, body, headers in requests:
        conn.request(method, target, body=body, headers=headers)
        conn.getresponse().read()
    conn.close()
    # A malformed request: the parser's error path sees the secret too.
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(f"GET /?a={secret} HTTP/1.1\r\nBroken header {secret}\r\n\r\n".encode())
        raw.settimeout(5)
        raw.recv(65536)
    return requests


EXPECTED = {("GET", "200", "/"): 4, ("POST", "200", "/"): 1, ("PUT", "200", "/"): 1, ("GET", "500", "/status/{id}"): 1}


def test_no_secret_reaches_any_output(tmp_path: Path) -> None:
    secret = f"s3cr3t{uuid.uuid4().hex}"
    token = f"tok{uuid.uuid4().hex}"
    spool = tmp_path / "spool"
    with Receiver() as rx, logging_server("127.0.0.1") as server:
        rx.script(500, 503)  # the first two pushes fail: retry logs, spool kept for a while
        exporter = ExporterProcess(
            "--interface", "lo", "--port", str(server.port), "--slo", str(EXAMPLE), "--reliably-url", rx.url,
            "--push-interval", "1s", "--spool-dir", str(spool), "--log-level", "debug",
            env={"RELIABLY_TOKEN": token, "RELIABLY_ORG": "leak-test"},
        )
        with exporter:
            requests = send_secrets(server.port, secret)
            samples = exporter.wait_for_exchanges(len(requests))
            # Wait for pushes: two failures, then the spooled indicators go through.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and sum(1 for r in rx.requests if r.body and "spec" in r.body) < 4:
                time.sleep(0.2)
            spooled_while_running = {p.name: p.read_bytes() for p in spool.iterdir() if p.is_file()}
            outputs = {
                "/metrics": fetch(exporter.base + "/metrics"),
                "/api/v1/slo": fetch(exporter.base + "/api/v1/slo"),
                "/": fetch(exporter.base + "/"),
                "/healthz": fetch(exporter.base + "/healthz"),
            }
        outputs["stdout+stderr"] = exporter.output
        for name, data in spooled_while_running.items():
            outputs[f"spool (running) {name}"] = data.decode(errors="replace")
        for path in spool.rglob("*"):
            if path.is_file():
                outputs[f"spool {path.name}"] = path.read_bytes().decode(errors="replace")
        pushes = list(rx.requests)
    # The run did what it should: every exchange counted, pushes made, failures logged.
    assert counts_by_key(samples, server.port) == EXPECTED
    assert self_metric(samples, "exchanges_total") == len(requests)
    # The malformed one is a parse error, and its 400 answer has no request to pair with.
    assert self_metric(samples, "parse_errors_total", reason="bad_header") == 1
    assert self_metric(samples, "unmatched_responses_total") == 1
    assert len(pushes) >= 4
    assert "answered 500" in outputs["stdout+stderr"]
    assert " DEBUG " in outputs["stdout+stderr"] or "INFO" in outputs["stdout+stderr"]
    assert any(name.startswith("spool ") for name in outputs)
    for push in pushes:
        outputs[f"push {push.method} {push.path}"] = f"{push.path} {push.body} " + " ".join(
            f"{k}: {v}" for k, v in push.headers.items() if k.lower() != "authorization")
        assert push.headers["Authorization"] == f"Bearer {token}"
    leaks = {name: text for name, text in outputs.items() if secret in text or token in text}
    assert leaks == {}


def test_no_secret_with_the_kernel_fast_path() -> None:
    """The in-kernel aggregation sees the same bytes: its labels must not carry them either."""
    secret = f"s3cr3t{uuid.uuid4().hex}"
    with logging_server("127.0.0.1") as server:
        with ExporterProcess("--interface", "lo", "--port", str(server.port), "--fast-path",
                             "--log-level", "debug") as exporter:
            send_secrets(server.port, secret)
            deadline = time.monotonic() + 10
            samples = exporter.scrape()
            while time.monotonic() < deadline and counts_by_key(samples, server.port) != EXPECTED:
                time.sleep(0.2)
                samples = exporter.scrape()
            outputs = {path: fetch(exporter.base + path) for path in ("/metrics", "/api/v1/slo", "/", "/healthz")}
        outputs["stdout+stderr"] = exporter.output
    assert counts_by_key(samples, server.port) == EXPECTED
    assert {name: text for name, text in outputs.items() if secret in text} == {}
