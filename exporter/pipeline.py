"""Segments in, metrics out: the one path that live capture and pcap replay share.

It owns nothing of its own beyond wiring: the core tracks flows and parses HTTP, the route
mapper names routes, HttpMetrics aggregates, and the optional SLO runtime counts good/total.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from exporter.core.flows import CoreStats, FlowKey, Handover, Limits, Tracker
from exporter.core.model import Exchange, Segment
from exporter.core.routes import RouteMapper
from exporter.identity.model import SERVICE_NAME_SLOT
from exporter.metrics import HttpMetrics, SelfSample


class ExchangeSink(Protocol):
    def observe(self, exchange: Exchange, route: str, service_name: str = "") -> None: ...


class Pipeline:
    def __init__(
        self,
        ports: Iterable[int],
        routes: RouteMapper,
        http: HttpMetrics,
        limits: Limits | None = None,
        sinks: Iterable[ExchangeSink] = (),
        hint_skips: bool = False,
    ) -> None:
        self.tracker = Tracker(ports, limits or Limits(), hint_skips=hint_skips)
        self.routes = routes
        self.http = http
        self.sinks = list(sinks)
        self.exchanges = 0
        # Exchanges counted elsewhere (the kernel fast path), added to exchanges_total.
        self.other_exchanges: Callable[[], int] | None = None
        # (server ip, server port) -> the server's identity labels (identity.Resolver), optional.
        self.identify: Callable[[str, int], tuple[str, ...]] | None = None

    def feed(self, segments: Iterable[Segment]) -> None:
        feed = self.tracker.feed
        emit = self._emit
        for segment in segments:
            exchanges = feed(segment)
            if exchanges:
                emit(exchanges)

    def seed(self, handovers: Iterable[tuple[FlowKey, Handover]]) -> None:
        """Connections another parser (the kernel) hands over mid-stream; see Tracker.seed."""
        seed = self.tracker.seed
        for key, handover in handovers:
            self._emit(seed(key, handover))

    def expire(self, now_ns: int) -> None:
        self._emit(self.tracker.expire(now_ns))

    def flush(self) -> None:
        self._emit(self.tracker.flush())

    def _emit(self, exchanges: list[Exchange]) -> None:
        identify = self.identify
        for exchange in exchanges:
            route = self.routes.route(exchange.server_port, exchange.target)
            if identify is not None:
                identity = identify(exchange.server_ip, exchange.server_port)
                self.http.observe(exchange, route, identity)
                service_name = identity[SERVICE_NAME_SLOT]
            else:
                self.http.observe(exchange, route)
                service_name = ""
            for sink in self.sinks:
                sink.observe(exchange, route, service_name)
        self.exchanges += len(exchanges)

    def self_samples(self) -> Iterator[SelfSample]:
        yield from core_samples(self.tracker.stats)
        other = self.other_exchanges() if self.other_exchanges is not None else 0
        yield SelfSample("exchanges_total", "counter",
                         "HTTP exchanges rebuilt from the wire (in user space and, with the fast path, the kernel).",
                         self.exchanges + other)
        yield SelfSample("route_overflow_total", "counter",
                         "Exchanges whose route was replaced by the overflow route (route cap reached).",
                         self.routes.overflowed)
        yield SelfSample("http_series", "gauge", "Label sets in the HTTP histograms.", self.http.series_count())


def core_samples(stats: CoreStats) -> Iterator[SelfSample]:
    yield SelfSample("segments_total", "counter", "TCP segments handed to the HTTP parser.", stats.segments)
    for reason, count in sorted(stats.parse_errors.items()):
        yield SelfSample("parse_errors_total", "counter", "HTTP parse errors, by reason.", count,
                         (("reason", reason),))
    yield SelfSample("unmatched_responses_total", "counter",
                     "Responses seen with no pending request on their connection.", stats.unmatched_responses)
    yield SelfSample("requests_without_response_total", "counter",
                     "Requests whose connection ended or was evicted before a response.",
                     stats.requests_without_response)
    yield SelfSample("flows_active", "gauge", "TCP connections tracked now.", stats.flows_active)
    for reason, count in sorted(stats.flows_evicted.items()):
        yield SelfSample("flows_evicted_total", "counter", "Connections evicted before they closed, by reason.",
                         count, (("reason", reason),))
    yield SelfSample("flows_closed_total", "counter", "Connections that ended with FIN or RST.",
                     stats.flows_closed)
    yield SelfSample("retransmitted_segments_total", "counter",
                     "Segments whose data had already been seen (retransmits, duplicates).",
                     stats.retransmitted_segments)
    yield SelfSample("out_of_order_segments_total", "counter",
                     "Segments that arrived ahead of a gap and were held until it filled.",
                     stats.out_of_order_segments)
    yield SelfSample("held_bytes", "gauge",
                     "Out-of-order data held for reordering, all connections together (bounded).",
                     stats.held_bytes)
