"""End to end: the real filter on lo, a real HTTP server with its own log, real clients.

Every count is compared with the server's own record, per (method, status, route).
"""

from __future__ import annotations

import collections
import http.client
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.integration.harness import (
    REPO,
    ExporterProcess,
    counts_by_key,
    free_port,
    logging_server,
    self_metric,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to attach a BPF filter")

ROUTES = ["--route", "/status/{code}", "--route", "/delay/{ms}", "--route", "/bytes/{n}",
          "--route", "/chunked/{n}", "--route", "/close/{n}"]
KNOWN = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}


def expected_route(path: str) -> str:
    if "://" in path:  # the server logs a proxy absolute-form target as sent
        path = "/" + path.split("://", 1)[1].split("/", 1)[1]
    parts = path.split("?", 1)[0].strip("/").split("/")
    if len(parts) == 2 and parts[0] in ("status", "delay", "bytes", "chunked", "close"):
        return "/" + parts[0] + "/{" + {"status": "code", "delay": "ms"}.get(parts[0], "n") + "}"
    return path.split("?", 1)[0]


def expected_counts(log: collections.Counter[tuple[str, str, str]]) -> collections.Counter[tuple[str, str, str]]:
    out: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for (method, status, path), count in log.items():
        out[(method if method in KNOWN else "_OTHER", status, expected_route(path))] += count
    return out


def raw_exchange(host: str, port: int, payload: bytes, pieces: int = 1, responses: int = 1,
                 pause: float = 0.0) -> bytes:
    """Send `payload` in `pieces` separate segments and read until `responses` heads came back."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect((host, port))
        step = max(1, len(payload) // pieces)
        for start in range(0, len(payload), step):
            sock.sendall(payload[start:start + step])
            if pause:
                time.sleep(pause)
        sock.settimeout(5)
        received = b""
        while received.count(b"HTTP/1.1 ") - received.count(b"HTTP/1.1 100") < responses:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        time.sleep(0.05)
        return received


def mixed_traffic(host: str, port: int) -> int:
    """Keep-alive, every method, bodies, statuses, chunked, large, close-delimited; returns requests sent."""
    sent = 0
    conn = http.client.HTTPConnection(host, port, timeout=10)
    plan = [
        ("GET", "/", None), ("GET", "/?secret=hunter2", None), ("POST", "/items", b"a" * 5000),
        ("PUT", "/items", b"b" * 10), ("DELETE", "/items", None), ("PATCH", "/items", b"{}"),
        ("OPTIONS", "/", None), ("HEAD", "/bytes/100", None), ("GET", "/status/404", None),
        ("GET", "/status/500", None), ("GET", "/status/503", None), ("GET", "/status/204", None),
        ("GET", "/status/304", None), ("GET", "/chunked/50000", None), ("HEAD", "/chunked/10", None),
        ("GET", "/bytes/3000000", None), ("PURGE", "/cache", None), ("GET", "/status/201", None),
    ]
    for method, path, body in plan:
        conn.request(method, path, body=body)
        conn.getresponse().read()
        sent += 1
    conn.close()
    for _ in range(3):
        closing = http.client.HTTPConnection(host, port, timeout=10)
        closing.request("GET", "/close/20000")
        closing.getresponse().read()
        closing.close()
        sent += 1
    return sent


@pytest.fixture(params=["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def host(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_counts_equal_server_log(host: str) -> None:
    with logging_server(host) as server, ExporterProcess("--interface", "lo", "--port", str(server.port),
                                                          *ROUTES) as exporter:
        sent = mixed_traffic(host, server.port)
        # Pipelining: five requests in one segment, answered in order.
        pipelined = b"".join(b"GET /status/%d HTTP/1.1\r\nHost: x\r\n\r\n" % code for code in (200, 404, 200, 500, 201))
        raw_exchange(host, server.port, pipelined, responses=5)
        # A head split over many segments.
        raw_exchange(host, server.port, b"GET /split/head HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 300 + b"\r\n\r\n",
                     pieces=12, pause=0.01)
        # 100 Continue before the final response.
        raw_exchange(host, server.port, b"POST /upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 4\r\n\r\nbody", responses=1)
        # Proxy absolute form: recorded by its path.
        raw_exchange(host, server.port, b"GET http://example.test:80/absolute/form?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        sent += 5 + 3
        samples = exporter.wait_for_exchanges(sent)
    expected = expected_counts(server.log)
    assert sum(server.log.values()) == sent
    assert counts_by_key(samples, server.port) == expected
    assert self_metric(samples, "kernel_drops_total") == 0
    assert self_metric(samples, "unmatched_responses_total") == 0
    assert not any("hunter2" in value for (_, labels), _v in samples.items() for _, value in labels)


def test_latency_lands_in_the_right_bucket_and_idle_time_is_not_counted(host: str) -> None:
    with logging_server(host) as server, ExporterProcess("--interface", "lo", "--port", str(server.port),
                                                          *ROUTES) as exporter:
        conn = http.client.HTTPConnection(host, server.port, timeout=10)
        for delay in (200, 600):
            conn.request("GET", f"/delay/{delay}")
            conn.getresponse().read()
        time.sleep(1.2)  # idle on a kept-alive connection: must not count as latency
        conn.request("GET", "/fast")
        conn.getresponse().read()
        conn.close()
        samples = exporter.wait_for_exchanges(3)

    def bucket(route: str, le: str) -> float:
        labels = (("http_request_method", "GET"), ("http_response_status_code", "200"),
                  ("http_route", route), ("le", le), ("server_port", str(server.port)))
        return samples[("http_server_request_duration_seconds_bucket", labels)]

    assert bucket("/delay/{ms}", "0.15") == 0
    assert bucket("/delay/{ms}", "0.25") == 1
    assert bucket("/delay/{ms}", "0.5") == 1
    assert bucket("/delay/{ms}", "0.75") == 2
    assert bucket("/fast", "0.1") == 1


def test_sigterm_and_sigint_stop_within_a_second_on_a_silent_link() -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        exporter = ExporterProcess("--interface", "lo", "--port", str(free_port())).start()
        time.sleep(0.5)
        took = exporter.stop(sig)
        assert exporter.proc is not None and exporter.proc.returncode == 0, exporter.output
        assert took < 1.0, f"{sig!r} took {took:.2f}s"
        assert "Traceback" not in exporter.output


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--interface", "nosuch0", "--port", "80", "--listen", "127.0.0.1:0"], "no interface 'nosuch0'"),
        (["run", "--port", "99999"], "not a TCP port"),
        (["run", "--interface", "lo"], "give at least one --port"),
        (["run", "--port", "80", "--listen", "nonsense"], "listen address"),
        (["run", "--port", "80", "--config", "/nonexistent/config.yaml"], "cannot read config file"),
        (["run", "--port", "80", "--duration-buckets", "a,b"], "duration buckets"),
    ],
)
def test_user_mistakes_get_one_clear_line(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_listen_port_in_use_is_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = run_cli("run", "--port", "80", "--listen", f"127.0.0.1:{busy.getsockname()[1]}")
    assert result.returncode == 1
    assert "already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_file_is_one_line(tmp_path: os.PathLike[str]) -> None:
    config = os.path.join(tmp_path, "bad.yaml")
    with open(config, "w") as handle:
        handle.write("port: 8080\nfrobnicate: yes\n")
    result = run_cli("run", "--config", config)
    assert result.returncode == 1
    assert "unknown key 'frobnicate'" in result.stderr
    assert "Traceback" not in result.stderr


def test_without_privileges_names_the_fix() -> None:
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
         sys.executable, "-m", "exporter", "run", "--port", "80", "--listen", "127.0.0.1:0"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 1, result.stderr
    assert "error:" in result.stderr and ("root" in result.stderr or "CAP_" in result.stderr)
    assert "Traceback" not in result.stderr
