"""The HTTP edge: /metrics, /healthz, /api/v1/slo and a landing page, on a threaded WSGI server.

/metrics goes through prometheus_client's own WSGI app, which does the content negotiation
(OpenMetrics when the scraper asks for it) and gzip. The server runs in a daemon thread so
the capture loop owns the main thread and its signals.
"""

from __future__ import annotations

import errno
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from exporter import __version__
from exporter.config import DEFAULT_DEGRADED_WINDOW_S, ListenAddress
from exporter.errors import ConfigError
from exporter.health import Loss

StartResponse = Callable[..., Any]
WSGIEnviron = dict[str, Any]


TLS_HANDSHAKE_TIMEOUT_S = 10.0


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    tls_context: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Runs in the connection's own thread (ThreadingMixIn), so a slow or stalled TLS
        # handshake never holds up accept(); the timeout bounds how long it can take.
        context = self.tls_context
        if context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(TLS_HANDSHAKE_TIMEOUT_S)
        try:
            tls = context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # a failed handshake (no client certificate, plain HTTP, scanner): nothing to serve
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


class _ThreadingServerV6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    # Scrapes every few seconds would drown the exporter's own log.
    def log_message(self, format: str, *args: Any) -> None:
        pass


class Health:
    """What /healthz reports.

    - 503 "not ready: ..." until the filter is attached, while the capture is detached from
      its interface, and while stopping: nothing is being captured.
    - 200 "degraded: ..." while capturing but losing data (exporter.health: a loss counter rose
      within the window). Still 200: a restart would not help an exporter that is behind, and
      a liveness probe must not restart it, nor a readiness probe stall a DaemonSet rollout under
      load. Alert on the ebpf_slo_exporter_degraded gauge instead.
    - 200 "ok: ..." otherwise.
    """

    def __init__(self, window_s: float = DEFAULT_DEGRADED_WINDOW_S) -> None:
        self._ready = False
        self._reason = "starting: the BPF filter is not attached yet"
        self.window_s = window_s
        self.losses: tuple[Loss, ...] = ()  # replaced whole by the capture thread; read here

    def set(self, ready: bool, reason: str) -> None:
        self._ready, self._reason = ready, reason

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def reason(self) -> str:
        return self._reason

    def text(self) -> str:
        """The /healthz body: its first word is the state (ok, degraded, not ready)."""
        if not self._ready:
            return f"not ready: {self._reason}\n"
        losses = self.losses
        if not losses:
            return f"ok: {self._reason}\n"
        lines = [f"degraded: {', '.join(loss.reason for loss in losses)}; {self._reason}"]
        lines += [f"{loss.reason}: {loss.count} in the last {self.window_s:g}s: {loss.what}" for loss in losses]
        return "\n".join(lines) + "\n"


LANDING = """<!doctype html>
<html><head><title>ebpf-slo-exporter</title></head>
<body>
<h1>ebpf-slo-exporter {version}</h1>
<p>HTTP RED metrics and SLOs from the wire: {what}.</p>
<ul>
<li><a href="/metrics">/metrics</a>: Prometheus exposition (OpenMetrics on request)</li>
<li><a href="/healthz">/healthz</a>: 200 once the filter is attached (ok, or degraded while losing data)</li>
<li><a href="/api/v1/slo">/api/v1/slo</a>: SLO results as JSON</li>
</ul>
</body></html>
"""


def build_app(
    registry: CollectorRegistry,
    health: Health,
    description: str,
    slo_snapshot: Callable[[], dict[str, Any]] | None = None,
    status_page: Callable[[], str] | None = None,
) -> Callable[[WSGIEnviron, StartResponse], Iterable[bytes]]:
    """The WSGI app. `status_page` renders `/` (exporter.status_page); without it `/` is the
    plain landing page with links."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            status = "200 OK" if health.ready else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")])
            return [health.text().encode()]
        if path == "/api/v1/slo":
            if slo_snapshot is None:
                payload: dict[str, Any] = {"status": "disabled", "objectives": [],
                                           "hint": "start the exporter with --slo FILE"}
            else:
                payload = slo_snapshot()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps(payload, indent=2).encode()]
        if path in ("/", "/index.html"):
            page = status_page() if status_page is not None else LANDING.format(version=__version__, what=description)
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store")])
            return [page.encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics\n"]

    return app


class MetricsServer:
    """A threaded WSGI server on `listen`, started and stopped by the caller; HTTPS with `tls`."""

    def __init__(
        self,
        listen: ListenAddress,
        app: Callable[[WSGIEnviron, StartResponse], Iterable[bytes]],
        tls: ssl.SSLContext | None = None,
    ):
        server_class = _ThreadingServerV6 if ":" in listen.host else _ThreadingServer
        try:
            self._server = make_server(listen.host, listen.port, app, server_class, _QuietHandler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"cannot listen on {listen}: the port is already in use; pick another with --listen"
                ) from exc
            raise ConfigError(f"cannot listen on {listen}: {exc.strerror}") from exc
        self._server.tls_context = tls
        self.scheme = "https" if tls is not None else "http"
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever, which may never have run
            self._server.shutdown()
        self._server.server_close()
