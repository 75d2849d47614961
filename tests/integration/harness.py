"""Real parts for end-to-end tests: the exporter as a child process, an HTTP server that keeps
its own access log, and a scrape parser.

The server is the source of truth: the exporter's counts per (method, status, route) must
equal what the server itself logged.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]


def free_port(family: int = socket.AF_INET) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LoggingHandler(BaseHTTPRequestHandler):
    """Paths: /status/<code>, /delay/<ms>, /bytes/<n>, /chunked/<n>, /close/<n>, anything else → 200."""

    protocol_version = "HTTP/1.1"
    server: LoggingServer

    def _respond(self) -> None:
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        status, body, mode = 200, b"ok\n", "length"
        if parts[0] == "status" and len(parts) > 1:
            status = int(parts[1])
            body = b"" if status in (204, 304) else f"status {status}\n".encode()
        elif parts[0] == "delay" and len(parts) > 1:
            time.sleep(int(parts[1]) / 1000)
        elif parts[0] == "bytes" and len(parts) > 1:
            body = b"x" * int(parts[1])
        elif parts[0] == "chunked" and len(parts) > 1:
            body, mode = b"y" * int(parts[1]), "chunked"
        elif parts[0] == "close" and len(parts) > 1:
            body, mode = b"z" * int(parts[1]), "close"
        self.server.record(self.command, status, self.path.split("?", 1)[0])
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        if mode == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if self.command != "HEAD":
                for start in range(0, len(body), 7000):
                    piece = body[start:start + 7000]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
        elif mode == "close":
            self.send_header("Connection", "close")
            self.close_connection = True
            self.end_headers()
            self.wfile.write(body)
        else:
            if status not in (204, 304):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD" and status not in (204, 304):
                self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _respond

    def handle_expect_100(self) -> bool:
        self.server.record_interim()
        return super().handle_expect_100()

    def handle_one_request(self) -> None:
        # Any method token reaches _respond, the way a permissive origin server would accept it.
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except ConnectionResetError:
            self.raw_requestline = b""
        if not self.raw_requestline:
            self.close_connection = True
            return
        if not self.parse_request():
            return
        handler = getattr(self, "do_" + self.command, self._respond)
        handler()
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class LoggingServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int = 0) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), LoggingHandler)
        self.log: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.interim = 0
        self._lock = threading.Lock()

    def record(self, method: str, status: int, path: str) -> None:
        with self._lock:
            self.log[(method, str(status), path)] += 1

    def record_interim(self) -> None:
        with self._lock:
            self.interim += 1

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@contextmanager
def logging_server(host: str, port: int = 0) -> Iterator[LoggingServer]:
    server = LoggingServer(host, port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """All samples of an exposition, keyed by (sample name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def counts_by_key(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float],
                  port: int | None = None) -> collections.Counter[tuple[str, str, str]]:
    """(method, status, route) → request count from http_server_request_duration_seconds_count."""
    counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for (name, labels), value in samples.items():
        if name != "http_server_request_duration_seconds_count":
            continue
        label = dict(labels)
        if port is not None and label["server_port"] != str(port):
            continue
        counts[(label["http_request_method"], label["http_response_status_code"], label["http_route"])] += int(value)
    return counts


def self_metric(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    key = (f"ebpf_slo_exporter_{name}", tuple(sorted(labels.items())))
    return samples.get(key, 0.0)


class ExporterProcess:
    """`python -m exporter run ...` as a child, ready once /healthz says 200."""

    def __init__(self, *args: str, listen_port: int | None = None, env: dict[str, str] | None = None,
                 prefix: Sequence[str] = (), preexec: Callable[[], None] | None = None) -> None:
        self.prefix = list(prefix)  # e.g. setpriv, to start with fewer privileges
        self.preexec = preexec
        self.listen_port = listen_port or free_port()
        self.args = ["--listen", f"127.0.0.1:{self.listen_port}", *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.output = ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def start(self, timeout: float = 45.0) -> ExporterProcess:
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "exporter", "run", *self.args],
            cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=self.preexec,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.output = self.proc.stdout.read() if self.proc.stdout else ""
                raise RuntimeError(f"exporter exited with {self.proc.returncode}: {self.output}")
            try:
                with urllib.request.urlopen(self.base + "/healthz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"exporter not ready within {timeout}s: {self.output}")

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return scrape(self.base + "/metrics")

    def wait_for_exchanges(self, expected: int, timeout: float = 10.0) -> dict[Any, float]:
        """Scrape until the exporter has rebuilt `expected` exchanges (or time runs out)."""
        deadline = time.monotonic() + timeout
        samples = self.scrape()
        while time.monotonic() < deadline:
            if self_metric(samples, "exchanges_total") >= expected:
                break
            time.sleep(0.1)
            samples = self.scrape()
        # One more short settle: anything beyond `expected` would be a double count.
        time.sleep(0.3)
        return self.scrape()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> float:
        """Stop it; returns how long it took to exit."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        started = time.monotonic()
        self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.output = out or ""
        return time.monotonic() - started

    def __enter__(self) -> ExporterProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
