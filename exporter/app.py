"""The live exporter: capture on an interface, the pipeline, the HTTP server, the SLO runtime.

The capture loop owns the main thread. It wakes at least every `POLL_S` so SIGINT and
SIGTERM stop it within a second even on a silent link, and runs idle-flow eviction about
once a second against the wall clock (packet timestamps are CLOCK_REALTIME too).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry

from exporter.config import ListenAddress
from exporter.core.flows import Limits
from exporter.core.routes import RouteMapper
from exporter.metrics import ExporterCollector, HttpMetrics, SelfSample
from exporter.pipeline import Pipeline
from exporter.server import Health, MetricsServer, build_app

log = logging.getLogger("ebpf_slo_exporter")

POLL_S = 0.2
EXPIRE_EVERY_S = 1.0


@dataclass
class RunSettings:
    interface: str
    ports: tuple[int, ...]
    listen: ListenAddress
    routes: tuple[str, ...] = ()
    duration_buckets: tuple[float, ...] = ()
    max_routes_per_port: int = 100
    limits: Limits = field(default_factory=Limits)
    slo_runtime: Any = None  # exporter.slo.runtime.SloRuntime, optional
    extra_self_sources: list[Any] = field(default_factory=list)


class Exporter:
    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings
        self.health = Health()
        self.http = HttpMetrics(settings.duration_buckets) if settings.duration_buckets else HttpMetrics()
        self.routes = RouteMapper(settings.routes, max_routes_per_port=settings.max_routes_per_port)
        sinks = [settings.slo_runtime] if settings.slo_runtime is not None else []
        self.pipeline = Pipeline(settings.ports, self.routes, self.http, settings.limits, sinks)
        self.capture: Any = None
        self._stop = threading.Event()
        self.registry = CollectorRegistry(auto_describe=False)
        slo = settings.slo_runtime
        sources = [self.pipeline.self_samples, self._capture_samples, *settings.extra_self_sources]
        if slo is not None:
            sources.append(slo.self_samples)
        self.registry.register(ExporterCollector(self.http, sources, slo.collect if slo is not None else None))
        app = build_app(
            self.registry,
            self.health,
            f"interface {settings.interface}, ports {', '.join(map(str, settings.ports))}",
            slo.snapshot if slo is not None else None,
        )
        self.server = MetricsServer(settings.listen, app)

    def _capture_samples(self) -> list[SelfSample]:
        capture = self.capture
        samples = [SelfSample("filter_attached", "gauge", "1 while the BPF filter is attached to the interface.",
                              1.0 if self.health.ready else 0.0)]
        if capture is None:
            return samples
        samples += [
            SelfSample("packets_received_total", "counter", "Frames the filter passed to user space.",
                       capture.packets_received()),
            SelfSample("kernel_drops_total", "counter",
                       "Frames the kernel dropped before user space read them (socket buffer full).",
                       capture.kernel_drops()),
            SelfSample("decode_errors_total", "counter", "Frames user space could not decode as TCP.",
                       capture.decode_errors()),
        ]
        for name, value in sorted(capture.filter_counters().items()):
            samples.append(SelfSample("filter_packets_total", "counter",
                                      "Packets the BPF filter looked at, by verdict.", value, (("verdict", name),)))
        return samples

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            self._stop.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def run(self, on_ready: Any = None) -> None:
        """Serve and capture until stopped. Errors from capture start are raised as CaptureError."""
        from exporter.capture.live import LiveCapture  # bcc is imported only when capturing

        self.server.start()
        slo = self.settings.slo_runtime
        try:
            self.capture = LiveCapture(self.settings.interface, self.settings.ports)
            self.capture.open()
            self.health.set(True, f"filter attached to {self.settings.interface}")
            log.info("capturing HTTP on %s ports %s; metrics on http://%s/metrics", self.settings.interface,
                     ",".join(map(str, self.settings.ports)), self.settings.listen)
            if slo is not None:
                slo.start()
            if on_ready is not None:
                on_ready(self)
            self._loop()
        finally:
            self.health.set(False, "stopping")
            if self.capture is not None:
                self.capture.close()
            self.pipeline.flush()
            if slo is not None:
                slo.stop(timeout_s=1.0)
            self.server.stop()

    def _loop(self) -> None:
        read = self.capture.read
        feed = self.pipeline.feed
        next_expire = time.monotonic() + EXPIRE_EVERY_S
        while not self._stop.is_set():
            segments = read(POLL_S)
            if segments:
                feed(segments)
            now = time.monotonic()
            if now >= next_expire:
                self.pipeline.expire(time.time_ns())
                next_expire = now + EXPIRE_EVERY_S


def spool_default() -> Path:
    import os

    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "ebpf-slo-exporter" / "spool"
