"""The live exporter: capture on an interface, the pipeline, the HTTP server, the SLO runtime.

The capture loop owns the main thread. It wakes at least every `POLL_S` so SIGINT and
SIGTERM stop it within a second even on a silent link, and runs idle-flow eviction about
once a second against the wall clock (packet timestamps are CLOCK_REALTIME too).

Interface loss: about once a second the loop checks that the interface still exists, is
the same one (same ifindex) and is up; a capture read error counts as loss too. On loss
the capture is closed, /healthz answers 503 with the reason, /metrics keeps serving, and
the loop tries to open the capture again every `REATTACH_EVERY_S` until the interface is
back. After `--user` dropped the privileges there is nothing to reattach with: it stays
detached (503) and says that a restart is needed.

Falling behind: about once a second the loop reads the self-metric counters that mean lost
data (exporter/health.py) into a LossWatch; while one rose within --degraded-window, /healthz
answers 200 "degraded: ..." with the reasons and the `degraded{reason}` gauge is 1.

`--user`: the capture is opened *before* the HTTP server thread starts, and privileges are
dropped right after, while this is the only thread (capabilities are per thread).

TLS (capture/tls.py, on unless --no-tls): uprobes on libssl feed a Tracker of their own in
the same pipeline. They are attached right after the packet capture, before --user drops
privileges. A thread of their own (capture/ringbuf.py DrainedRing, started at the loop's first
wait, after the drop) copies their events out of the ring; this loop parses them, waiting on
both descriptors. Without any libssl to probe the exporter warns and goes on with clear
text, unless --libssl named one.
"""

from __future__ import annotations

import fcntl
import logging
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from exporter import __version__
from exporter.config import (
    DEFAULT_DEGRADED_WINDOW_S,
    DEFAULT_FAST_PATH,
    DEFAULT_INSTANCE_GRACE_S,
    DEFAULT_MAX_ROUTES_PER_PORT,
    DEFAULT_MAX_SERVERS,
    DEFAULT_POD_LOGS,
    ListenAddress,
    is_node_wide,
)
from exporter.core.flows import Limits, Tracker
from exporter.core.routes import RouteMapper
from exporter.errors import CaptureError
from exporter.health import LOSS_SIGNALS, LossWatch, loss_totals
from exporter.identity.model import SERVICE_NAME_SLOT, ServiceOverride
from exporter.identity.resolver import REASONS, Resolver
from exporter.metrics import (
    SELF_CAPTURE_DETACHED_TOTAL,
    SELF_CAPTURE_REATTACHED_TOTAL,
    SELF_DECODE_ERRORS_TOTAL,
    SELF_DEGRADED,
    SELF_FILTER_ATTACHED,
    SELF_FILTER_PACKETS_TOTAL,
    SELF_KERNEL_DROPS_TOTAL,
    SELF_PACKETS_RECEIVED_TOTAL,
    TARGET_INFO,
    TARGET_INFO_LABELS,
    ExporterCollector,
    HttpMetrics,
    SelfSample,
)
from exporter.pipeline import Pipeline
from exporter.server import Health, MetricsServer, build_app
from exporter.status_page import StatusPage

if TYPE_CHECKING:  # imported lazily at run time: the capture modules load only when capturing
    from exporter.capture.kernel_agg import KernelFastPath
    from exporter.capture.live import LiveCapture
    from exporter.capture.tls import TlsCapture
    from exporter.core.model import Segment
    from exporter.slo.runtime import SloRuntime
    from exporter.webconfig import WebConfig

log = logging.getLogger("ebpf_slo_exporter")

POLL_S = 0.2
EXPIRE_EVERY_S = 1.0
IFACE_CHECK_EVERY_S = 1.0
REATTACH_EVERY_S = 1.0
_SIOCGIFFLAGS = 0x8913
_IFF_UP = 0x1


@dataclass
class RunSettings:
    interface: str
    ports: tuple[int, ...]
    listen: ListenAddress
    routes: tuple[str, ...] = ()
    duration_buckets: tuple[float, ...] = ()
    max_routes_per_port: int = DEFAULT_MAX_ROUTES_PER_PORT
    limits: Limits = field(default_factory=Limits)
    slo_runtime: SloRuntime | None = None
    extra_self_sources: list[Callable[[], Iterable[SelfSample]]] = field(default_factory=list)
    user: str | None = None  # drop every privilege and become this user once capturing
    web_config: WebConfig | None = None  # TLS and basic auth, optional
    fast_path: bool = DEFAULT_FAST_PATH  # simple exchanges aggregated in the kernel (capture/kernel_agg.py)
    # Every --interface given: several, `any` or a glob make the capture node-wide (one socket on
    # every interface, duplicates dropped in the kernel). Empty: just `interface`.
    interfaces: tuple[str, ...] = ()
    # Identity (exporter/identity/): how servers are named.
    services: tuple[ServiceOverride, ...] = ()  # --service NAME=KIND:VALUE
    pod_logs: str = DEFAULT_POD_LOGS
    instance_grace_s: float = DEFAULT_INSTANCE_GRACE_S
    max_servers: int = DEFAULT_MAX_SERVERS
    tls: bool = True  # uprobes on libssl: HTTPS plaintext (capture/tls.py)
    libssl: tuple[str, ...] = ()  # more libssl copies to probe, besides the system's
    degraded_window_s: float = DEFAULT_DEGRADED_WINDOW_S  # /healthz: how long a loss keeps it degraded


def interface_state(interface: str) -> tuple[int, bool] | None:
    """(ifindex, up) of an interface in this network namespace; None when it does not exist."""
    try:
        index = socket.if_nametoindex(interface)
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            raw = fcntl.ioctl(sock, _SIOCGIFFLAGS, struct.pack("16sH14x", interface.encode()[:15], 0))
        except OSError:
            return None
    return index, bool(struct.unpack_from("16sH", raw)[1] & _IFF_UP)


class Exporter:
    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings
        self.patterns = settings.interfaces or (settings.interface,)
        self.node_wide = is_node_wide(self.patterns)
        self.health = Health(settings.degraded_window_s)
        self.loss_watch = LossWatch(settings.degraded_window_s, time.monotonic())
        self.http = HttpMetrics(settings.duration_buckets) if settings.duration_buckets else HttpMetrics()
        self.routes = RouteMapper(settings.routes, max_routes_per_port=settings.max_routes_per_port)
        sinks = [settings.slo_runtime] if settings.slo_runtime is not None else []
        self.pipeline = Pipeline(settings.ports, self.routes, self.http, settings.limits, sinks, hint_skips=True)
        self.fast: KernelFastPath | None = None  # with --fast-path
        if settings.fast_path:
            from exporter.capture.kernel_agg import KernelFastPath  # the capture modules load only when capturing

            self.fast = KernelFastPath(self.routes, self.http)
            self.http.add_source(self.fast.series)
            self.pipeline.other_exchanges = self.fast.exchanges
        self.instances_forgotten = 0
        pod_logs = Path(settings.pod_logs)
        self.resolver = Resolver(pod_logs=pod_logs, container_logs=pod_logs.parent / "containers",
                                 overrides=settings.services, max_entries=settings.max_servers)
        resolver = self.resolver
        self.pipeline.identify = lambda ip, port: resolver.identify(ip, port).labels()
        if self.fast is not None:
            self.fast.identify = self.pipeline.identify
        self.tls: TlsCapture | None = None  # once attached
        self.tls_tracker: Tracker | None = None
        self._tls_flows_looked_up = False  # the filter looks up tls_flows (HttpFilter.use_tls_flows)
        if settings.tls:
            self.tls_tracker = self.pipeline.add_tracker(
                Tracker(settings.ports, settings.limits, hint_skips=True, scheme="https"))
        self.capture: LiveCapture | None = None
        self._capture_lock = threading.Lock()
        self._ifindex = 0
        # Counters of captures closed after an interface loss, so the exported ones never go back.
        self._closed_counts: dict[str, int] = {"packets": 0, "drops": 0, "decode_errors": 0}
        self._closed_filter: dict[str, int] = {}
        self.detached_total = 0
        self.reattached_total = 0
        self._privileges_dropped = False
        self._stop = threading.Event()
        self.registry = CollectorRegistry(auto_describe=False)
        slo = settings.slo_runtime
        sources = [self.pipeline.self_samples, self._capture_samples, self._identity_samples,
                   *settings.extra_self_sources]
        if self.fast is not None:
            sources.append(self.fast.self_samples)
        if settings.tls:
            sources.append(self._tls_samples)
        if slo is not None:
            sources.append(slo.self_samples)
        # The sources holding health.LOSS_SIGNALS' counters, read once a second: not the identity
        # or SLO ones, which may be long and hold none.
        self._loss_sources = [self.pipeline.self_samples, self._capture_samples,
                              *([self.fast.self_samples] if self.fast is not None else []),
                              *([self._tls_samples] if settings.tls else [])]
        sources.append(self._health_samples)
        self.registry.register(ExporterCollector(self.http, sources, slo.collect if slo is not None else None))
        description = f"interface {', '.join(self.patterns)}, ports {', '.join(map(str, settings.ports))}"
        self.status_page = StatusPage(self.registry, self.health, description, __version__, slo)
        app = build_app(
            self.registry,
            self.health,
            description,
            slo.snapshot if slo is not None else None,
            self.status_page.render,
        )
        web = settings.web_config
        if web is not None:
            from exporter.webconfig import protect

            app = protect(app, web)
        self.server = MetricsServer(settings.listen, app, web.tls if web is not None else None)

    def _tls_samples(self) -> list[SelfSample]:
        tls = self.tls
        return list(tls.self_samples()) if tls is not None else []

    def _open_tls(self) -> None:
        from exporter.capture.tls import TlsCapture, find_libraries

        settings = self.settings
        try:
            libraries = find_libraries(settings.libssl)
            tls = TlsCapture(settings.ports, libraries, max_connections=settings.limits.max_flows).open()
        except CaptureError as exc:
            if settings.libssl:
                raise
            log.warning("TLS capture off: %s", exc)
            return
        assert tls.probes is not None
        for reason in tls.probes.unprobed:
            log.warning("%s", reason)
        for library, symbol, message in tls.probes.failed:
            log.debug("uprobe on %s %s not attached: %s", library, symbol, message)
        log.info("TLS probes on %s (compiled in %.1f s by the helper process)",
                 ", ".join(tls.probes.libraries), tls.probes.compile_s)
        self.tls = tls

    def _watch_losses(self, now_s: float) -> None:
        """About once a second: the loss counters into the window; /healthz reads the result."""
        try:
            totals = loss_totals(sample for source in self._loss_sources for sample in source())
        except (OSError, CaptureError) as exc:  # a capture breaking now is the interface check's to report
            log.debug("reading the loss counters failed: %s", exc)
            return
        self.health.losses = self.loss_watch.observe(now_s, totals)

    def _health_samples(self) -> list[SelfSample]:
        degraded = {loss.reason for loss in self.health.losses}
        help_text = (f"1 while this reason lost data within the last {self.health.window_s:g}s "
                     "(--degraded-window); /healthz then says degraded with the same reasons.")
        return [SelfSample(SELF_DEGRADED, "gauge", help_text, 1.0 if signal.reason in degraded else 0.0,
                           (("reason", signal.reason),))
                for signal in LOSS_SIGNALS]

    def _capture_samples(self) -> list[SelfSample]:
        samples = [
            SelfSample(SELF_FILTER_ATTACHED, "gauge", "1 while the BPF filter is attached to the interface.",
                       1.0 if self.health.ready else 0.0),
            SelfSample(SELF_CAPTURE_DETACHED_TOTAL, "counter",
                       "Times the capture lost its interface (down, deleted or a read error).",
                       self.detached_total),
            SelfSample(SELF_CAPTURE_REATTACHED_TOTAL, "counter",
                       "Times the capture was opened again after losing its interface.", self.reattached_total),
        ]
        with self._capture_lock:
            counts = dict(self._closed_counts)
            filter_counts = dict(self._closed_filter)
            capture = self.capture
            attached = dict(capture.attached) if capture is not None and self.node_wide else {}
            if capture is not None and not self.node_wide:
                attached = {self._ifindex: self.settings.interface}
            samples += [
                SelfSample("interface_attached", "gauge",
                           "1 for each interface the capture is attached to now (node-wide: matched by "
                           "an --interface pattern).", 1.0, (("interface", name),))
                for name in sorted(attached.values())
            ]
            if self.node_wide:
                samples.append(SelfSample(
                    "capture_interfaces_over_cap", "gauge",
                    "Interfaces an --interface pattern matches beyond the filter's capacity (not captured).",
                    capture.interfaces_over_cap if capture is not None else 0))
            if capture is None and not filter_counts:
                return samples
            if capture is not None:
                counts["packets"] += capture.packets_received()
                counts["drops"] += capture.kernel_drops()
                counts["decode_errors"] += capture.decode_errors()
                for name, value in capture.filter_counters().items():
                    filter_counts[name] = filter_counts.get(name, 0) + value
        samples += [
            SelfSample(SELF_PACKETS_RECEIVED_TOTAL, "counter", "Frames the filter passed to user space.",
                       counts["packets"]),
            SelfSample(SELF_KERNEL_DROPS_TOTAL, "counter",
                       "Frames the kernel dropped before user space read them (socket buffer full).",
                       counts["drops"]),
            SelfSample(SELF_DECODE_ERRORS_TOTAL, "counter", "Frames user space could not decode as TCP.",
                       counts["decode_errors"]),
        ]
        for name, value in sorted(filter_counts.items()):
            samples.append(SelfSample(SELF_FILTER_PACKETS_TOTAL, "counter",
                                      "Packets the BPF filter looked at, by verdict.", value, (("verdict", name),)))
        return samples

    def _identity_samples(self) -> list[SelfSample]:
        resolver = self.resolver

        samples = [
            SelfSample("identity_resolutions_total", "counter",
                       "Servers looked up in /proc (cache misses).", resolver.resolutions),
            SelfSample("identity_instances_forgotten_total", "counter",
                       "Series dropped because their server's process was gone for the grace period.",
                       self.instances_forgotten),
        ]
        samples += [
            SelfSample("identity_failures_total", "counter",
                       "Servers left with empty identity labels (or evicted from the bounded cache), by reason.",
                       resolver.failures[reason], (("reason", reason),))
            for reason in REASONS
        ]
        for server in resolver.servers():
            labels = tuple(zip(TARGET_INFO_LABELS, (*server.identity.labels(), server.identity.k8s_pod_uid),
                               strict=True))
            samples.append(SelfSample(TARGET_INFO, "gauge",
                                      "One per server identified: its identity labels; join with "
                                      "kube_pod_info on uid.", 1.0, labels))
        return samples

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    @property
    def stopping(self) -> threading.Event:
        return self._stop

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            self._stop.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def _open_capture(self) -> None:
        from exporter.capture.live import LiveCapture  # the capture modules load only when capturing

        capture = LiveCapture(",".join(self.patterns), self.settings.ports, fast_path=self.settings.fast_path,
                              histogram_bounds=(self.http.duration_buckets, self.http.size_buckets),
                              node_patterns=self.patterns if self.node_wide else ())
        capture.open()
        report = capture.bpf_filter.load_report
        log.info("BPF filter compiled and loaded in %.1f s by a helper process (peak RSS %d MB, exited)",
                 report.compile_s, report.helper_peak_rss_kb // 1024)
        if self.fast is not None:
            self.fast.attach(capture.bpf_filter)
        state = interface_state(self.settings.interface)
        with self._capture_lock:
            self.capture = capture
            self._ifindex = state[0] if state is not None else 0

    def _anchor_tls(self) -> None:
        """The TLS probes read the wire times of the filter's TLS connections (a new filter's after a
        reattach): an HTTPS exchange on a captured interface is then timed by its encrypted segments."""
        if self.tls is not None and self.capture is not None:
            self.tls.anchor_to(self.capture.bpf_filter.share_tls_flows())
            self._tls_flows_looked_up = False

    def _drop_privileges(self, user: str) -> None:
        from exporter.security import drop_privileges

        slo = self.settings.slo_runtime
        pusher = getattr(slo, "pusher", None)
        hand_over = [pusher.spool.directory] if pusher is not None else []
        persistence = getattr(slo, "persistence", None)
        if persistence is not None:
            hand_over.append(persistence.directory)  # the SLO windows are saved there after the drop
        who = drop_privileges(user, hand_over)
        self._privileges_dropped = True
        log.info("dropped every capability; now running as %s (uid %d, gid %d)", who.user, who.uid, who.gid)

    def run(self, on_ready: Callable[[Exporter], None] | None = None) -> None:
        """Serve and capture until stopped. Errors from capture start are raised as CaptureError."""
        user = self.settings.user
        if user is None:
            self.server.start()
        slo = self.settings.slo_runtime
        try:
            self._open_capture()
            if self.settings.tls:
                self._open_tls()
                self._anchor_tls()
            if user is not None:
                self._drop_privileges(user)
                self.server.start()
            self.health.set(True, self._attached_text())
            log.info("capturing HTTP on %s ports %s; metrics on http://%s/metrics", ", ".join(self.patterns),
                     ",".join(map(str, self.settings.ports)), self.settings.listen)
            if slo is not None:
                slo.start()
            if on_ready is not None:
                on_ready(self)
            self._loop()
        finally:
            self.health.set(False, "stopping")
            with self._capture_lock:
                if self.capture is not None:
                    if self.fast is not None:
                        self._kernel_exchanges_to_slo()
                        self.fast.detach()
                    self.capture.close()
            if self.tls is not None:
                self.tls.close()
            self.pipeline.flush()
            if slo is not None:
                slo.stop(timeout_s=1.0)
            self.server.stop()

    def _loop(self) -> None:
        feed = self.pipeline.feed
        fast = self.fast
        tls = self.tls
        next_expire = next_check = time.monotonic() + EXPIRE_EVERY_S
        next_reattach = 0.0
        while not self._stop.is_set():
            capture = self.capture
            if capture is None:
                if time.monotonic() >= next_reattach:
                    self._reattach()
                    next_reattach = time.monotonic() + REATTACH_EVERY_S
                elif tls is not None:
                    self._feed_tls(tls.read(POLL_S))
                else:
                    self._stop.wait(POLL_S)
            else:
                wait = POLL_S
                if tls is not None:
                    # Wait on both; then neither read blocks (a ring capture still waits up to 1 ms).
                    select.select([capture.fileno(), tls.fileno()], [], [], POLL_S)
                    self._feed_tls(tls.read(0))
                    wait = 0
                try:
                    segments = capture.read(wait)
                except (OSError, CaptureError) as exc:
                    self._detach(f"reading the capture failed: {exc}")
                    next_reattach = time.monotonic() + REATTACH_EVERY_S
                    continue
                if fast is not None:
                    # Before parsing: a handover record always precedes its flow's segments.
                    self.pipeline.seed(fast.take_handovers())
                if segments:
                    feed(segments)
                    self._apply_skip_hints(capture)
            now = time.monotonic()
            if self.capture is not None and now >= next_check and self.node_wide:
                self._refresh_interfaces()
                next_check = now + IFACE_CHECK_EVERY_S
            elif self.capture is not None and now >= next_check:
                lost = self._interface_lost()
                if lost:
                    self._detach(lost)
                    next_reattach = now + REATTACH_EVERY_S
                next_check = now + IFACE_CHECK_EVERY_S
            if now >= next_expire:
                self._watch_losses(now)
                if tls is not None:
                    self._feed_tls(tls.reap(time.time_ns()))
                self.pipeline.expire(time.time_ns())
                gone = self.resolver.sweep(self.settings.instance_grace_s)
                if gone:
                    self.instances_forgotten += self.http.forget_instances(gone)
                if fast is not None and self.capture is not None:
                    self._kernel_exchanges_to_slo()
                next_expire = now + EXPIRE_EVERY_S

    def _attached_text(self) -> str:
        """The /healthz text: what is captured, and the patterns still waiting for an interface."""
        if not self.node_wide:
            return f"filter attached to {self.settings.interface}"
        capture = self.capture
        names = sorted(capture.attached.values()) if capture is not None else []
        text = f"filter attached to {len(names)} interface(s) matching {', '.join(self.patterns)}"
        if names and "any" not in self.patterns:
            text += f": {', '.join(names)}"
        if capture is not None and capture.unmatched:
            text += f"; waiting for {', '.join(capture.unmatched)} (no interface matches yet)"
        return text

    def _refresh_interfaces(self) -> None:
        """Node-wide: pick up interfaces that appeared and drop the ones gone, without a restart."""
        capture = self.capture
        if capture is None:
            return
        try:
            added, gone = capture.refresh_interfaces()
        except (OSError, CaptureError) as exc:
            log.warning("matching the --interface patterns again failed: %s", exc)
            return
        if added:
            log.info("capturing on new interface(s) %s", ", ".join(added))
        if gone:
            log.info("interface(s) %s gone; no longer captured", ", ".join(gone))
        self.health.set(True, self._attached_text())

    def _feed_tls(self, segments: list[Segment]) -> None:
        tracker = self.tls_tracker
        if segments and not self._tls_flows_looked_up and self.capture is not None:
            # A watched TLS connection exists, whose tls_flows entries the probes made: the filter
            # must look them up from now on (until then its clear-text segments are spared that).
            self.capture.bpf_filter.use_tls_flows()
            self._tls_flows_looked_up = True
        if segments and tracker is not None and self.tls is not None:
            self.pipeline.feed(segments, tracker)
            self.tls.apply_skip_hints(tracker.take_skip_hints())

    def _apply_skip_hints(self, capture: LiveCapture) -> None:
        """Body bytes the parser only counts: have the filter cut them to headers from now on."""
        for (key, to_server), stretch in self.pipeline.tracker.take_skip_hints().items():
            client_ip, client_port, server_ip, server_port = key
            ends = ((client_ip, client_port, server_ip, server_port) if to_server
                    else (server_ip, server_port, client_ip, client_port))
            try:
                if stretch is None:
                    capture.forget_skip(*ends)
                else:
                    capture.skip_body(*ends, *stretch)
            except CaptureError:
                pass  # an address the filter cannot key (not IP): the bytes just come up whole
        for key, encrypted in self.pipeline.tracker.take_encrypted_hints().items():
            client_ip, client_port, server_ip, server_port = key
            try:
                capture.drop_tls(client_ip, client_port, server_ip, server_port, encrypted)
                capture.drop_tls(server_ip, server_port, client_ip, client_port, encrypted)
            except CaptureError:
                pass  # not IP: its ciphertext keeps coming up, and keeps being ignored

    def _kernel_exchanges_to_slo(self) -> None:
        """Feed the SLO windows what the kernel aggregated since the last call (fast path)."""
        slo = self.settings.slo_runtime
        if slo is None or self.fast is None:
            return
        bounds = self.http.duration_buckets
        identify = self.pipeline.identify
        for (route, port, _method, status, server_ip), delta in self.fast.poll_deltas().items():
            # The server named by its address, as kernel_agg.py names the kernel's series.
            service_name = identify(server_ip, port)[SERVICE_NAME_SLOT] if identify is not None else ""
            slo.observe_counts(route, port, status, delta.duration_counts, bounds, service_name)

    def _interface_lost(self) -> str:
        """Why the capture's interface is gone, or '' while it is fine."""
        name = self.settings.interface
        state = interface_state(name)
        if state is None:
            return f"interface {name} was deleted"
        index, up = state
        if index != self._ifindex:
            return f"interface {name} was deleted and created again"
        if not up:
            return f"interface {name} is down"
        return ""

    def _detach(self, reason: str) -> None:
        with self._capture_lock:
            capture, self.capture = self.capture, None
            if capture is None:
                return
            try:
                self._closed_counts["packets"] += capture.packets_received()
                self._closed_counts["drops"] += capture.kernel_drops()
                self._closed_counts["decode_errors"] += capture.decode_errors()
                for name, value in capture.filter_counters().items():
                    self._closed_filter[name] = self._closed_filter.get(name, 0) + value
            except (OSError, CaptureError):
                pass  # the last counts of a broken socket are lost; the next capture counts anew
            if self.fast is not None:
                self._kernel_exchanges_to_slo()
                self.fast.detach()
            capture.close()
        self.detached_total += 1
        self.health.set(False, f"capture detached: {reason}; retrying every {REATTACH_EVERY_S:g}s")
        log.warning("capture detached: %s; /metrics keeps serving, reattaching when it is back", reason)
        if self._privileges_dropped:
            log.error("privileges were dropped (--user): the capture cannot be reopened; restart the exporter")

    def _reattach(self) -> None:
        name = self.settings.interface
        if self._privileges_dropped:
            self.health.set(False, f"capture detached from {name}; privileges were dropped (--user), "
                                   "so only a restart can reattach")
            return
        state = interface_state(name)
        if not self.node_wide and (state is None or not state[1]):
            return
        try:
            self._open_capture()
        except CaptureError as exc:
            log.debug("reattaching to %s failed: %s", name, exc)
            return
        self._anchor_tls()
        self.reattached_total += 1
        self.health.set(True, f"filter attached to {name} again")
        log.info("capture reattached to %s", name)

