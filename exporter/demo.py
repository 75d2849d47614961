"""`make demo`: the seed demo's service and load, with the exporter and its live SLO report.

The service behaves like the 2021 demo's: 1% of requests sleep a uniform 0-1 s and 0.7%
answer 500. The load is keep-alive, so the report also shows that idle time between
requests on a connection is not counted as latency (the seed's first flaw).
"""

from __future__ import annotations

import http.client
import random
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from exporter.config import ListenAddress
from exporter.errors import ConfigError

if TYPE_CHECKING:  # imported lazily: the demo's child processes never load the SLO side
    from exporter.slo.runtime import SloRuntime


class DemoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    slow_fraction = 0.01
    error_fraction = 0.007

    def do_GET(self) -> None:
        draw = random.random()
        if draw < self.slow_fraction:
            time.sleep(random.uniform(0.0, 1.0))
        failed = self.slow_fraction <= draw < self.slow_fraction + self.error_fraction
        body = b"internal error\n" if failed else b"hello from the demo service\n"
        self.send_response(500 if failed else 200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_demo(host: str, port: int, slow_fraction: float, error_fraction: float) -> None:
    handler = type("Handler", (DemoHandler,), {"slow_fraction": slow_fraction, "error_fraction": error_fraction})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise ConfigError(f"demo service cannot listen on {host}:{port}: {exc.strerror}; pick --port") from exc
    server.daemon_threads = True
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def generate_load(url: str, rate: float, clients: int, duration: float | None) -> int:
    """Each client keeps one connection and sends on a fixed schedule; returns requests sent."""
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    interval = clients / rate
    deadline = None if duration is None else time.monotonic() + duration
    stop = threading.Event()
    sent = [0] * clients

    def client(index: int) -> None:
        connection: http.client.HTTPConnection | None = None
        next_at = time.monotonic() + interval * index / clients
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            delay = next_at - time.monotonic()
            if delay > 0 and stop.wait(delay):
                break
            next_at = max(next_at + interval, time.monotonic())
            try:
                if connection is None:
                    connection = http.client.HTTPConnection(host, port, timeout=5)
                connection.request("GET", path)
                connection.getresponse().read()
                sent[index] += 1
            except (OSError, http.client.HTTPException):
                if connection is not None:
                    connection.close()
                connection = None
        if connection is not None:
            connection.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
    except KeyboardInterrupt:
        stop.set()
        for thread in threads:
            thread.join(2)
    return sum(sent)


def _live_report(runtime: SloRuntime, stopping: threading.Event) -> None:
    """The `slo report --watch` table, fed straight from the in-process runtime."""
    from rich.console import Console

    from exporter.slo.report import lines_from_snapshot, render, watch

    def produce() -> Any:
        return render(lines_from_snapshot(runtime.snapshot()), "table", time.time())

    def pause(seconds: float) -> None:
        if stopping.wait(seconds):
            raise KeyboardInterrupt  # watch() ends quietly on it

    watch(Console(), produce, every_s=3.0, sleep=pause)


def demo_manifest_text() -> str:
    return resources.files("exporter").joinpath("demo/reliably.yaml").read_text(encoding="utf-8")


def run_demo(port: int, listen: ListenAddress, rate: float, reliably_url: str | None) -> None:
    """Start service and load as child processes, run the exporter here, show the live report."""
    from exporter.app import Exporter, RunSettings
    from exporter.metrics import DEFAULT_DURATION_BUCKETS
    from exporter.slo.manifest import latency_targets, parse_manifest
    from exporter.slo.runtime import SloRuntime, push_settings_from

    objectives = parse_manifest(demo_manifest_text(), source="demo reliably.yaml")
    runtime = SloRuntime(objectives, push=push_settings_from(reliably_url))
    settings = RunSettings(
        interface="lo",
        ports=(port,),
        listen=listen,
        duration_buckets=tuple(sorted(set(DEFAULT_DURATION_BUCKETS) | latency_targets(objectives))),
        slo_runtime=runtime,
        tls=False,  # the demo service speaks clear text: no uprobes, no extra compile at start
    )
    exporter = Exporter(settings)
    exporter.install_signal_handlers()
    python = sys.executable
    children: list[subprocess.Popen[bytes]] = []

    def start_children(_: Exporter) -> None:
        # The service starts after the filter is attached, so every connection is seen whole.
        children.append(subprocess.Popen([python, "-m", "exporter", "demo-service", "--port", str(port)]))
        time.sleep(0.5)
        if children[0].poll() is not None:
            exporter.request_stop()
            return
        children.append(subprocess.Popen(
            [python, "-m", "exporter", "demo-load", "--url", f"http://127.0.0.1:{port}/", "--rate", str(rate)],
            stderr=subprocess.DEVNULL,
        ))
        print(f"demo service on http://127.0.0.1:{port}/ at ~{rate:g} req/s; "
              f"metrics on http://{listen}/metrics, SLO JSON on http://{listen}/api/v1/slo; Ctrl-C stops",
              flush=True)
        threading.Thread(target=_live_report, args=(runtime, exporter.stopping), daemon=True).start()

    try:
        exporter.run(on_ready=start_children)
    finally:
        for child in reversed(children):
            child.terminate()
        for child in children:
            try:
                child.wait(3)
            except subprocess.TimeoutExpired:
                child.kill()
