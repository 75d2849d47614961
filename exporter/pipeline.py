"""Segments in, metrics out: the one path that live capture and pcap replay share.

It owns nothing of its own beyond wiring: the core tracks flows and parses HTTP, the route
mapper names routes, HttpMetrics aggregates, and the optional SLO runtime counts good/total.

A capture source with byte streams of its own (TLS plaintext, capture/tls.py) adds a Tracker
with `add_tracker` and feeds it with `feed(segments, tracker)`: its exchanges then go the
same way, and its core counters are added to the same self-metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from exporter.core.flows import CoreStats, FlowKey, Handover, Limits, Tracker
from exporter.core.model import Exchange, Segment
from exporter.core.routes import RouteMapper
from exporter.metrics import HttpMetrics, SelfSample


class ExchangeSink(Protocol):
    def observe(self, exchange: Exchange, route: str) -> None: ...


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
        self.trackers = [self.tracker]
        # Exchanges counted elsewhere (the kernel fast path), added to exchanges_total.
        self.other_exchanges: Callable[[], int] | None = None

    def add_tracker(self, tracker: Tracker) -> Tracker:
        """Another source's connections (see the module docstring); expired and flushed with the rest."""
        self.trackers.append(tracker)
        return tracker

    def feed(self, segments: Iterable[Segment], tracker: Tracker | None = None) -> None:
        feed = (tracker or self.tracker).feed
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
        for tracker in self.trackers:
            self._emit(tracker.expire(now_ns))

    def flush(self) -> None:
        for tracker in self.trackers:
            self._emit(tracker.flush())

    def _emit(self, exchanges: list[Exchange]) -> None:
        for exchange in exchanges:
            route = self.routes.route(exchange.server_port, exchange.target)
            self.http.observe(exchange, route)
            for sink in self.sinks:
                sink.observe(exchange, route)
        self.exchanges += len(exchanges)

    def self_samples(self) -> Iterator[SelfSample]:
        yield from core_samples(self.tracker.stats if len(self.trackers) == 1 else
                                combined_stats(t.stats for t in self.trackers))
        other = self.other_exchanges() if self.other_exchanges is not None else 0
        yield SelfSample("exchanges_total", "counter",
                         "HTTP exchanges rebuilt from the wire (in user space and, with the fast path, the kernel).",
                         self.exchanges + other)
        yield SelfSample("route_overflow_total", "counter",
                         "Exchanges whose route was replaced by the overflow route (route cap reached).",
                         self.routes.overflowed)
        yield SelfSample("http_series", "gauge", "Label sets in the HTTP histograms.", self.http.series_count())


def combined_stats(parts: Iterable[CoreStats]) -> CoreStats:
    """Several trackers' counters added up, for one set of self-metrics."""
    total = CoreStats()
    for stats in parts:
        for name in CoreStats.__slots__:
            value = getattr(stats, name)
            if isinstance(value, dict):
                mine = getattr(total, name)
                for key, count in value.items():
                    mine[key] = mine.get(key, 0) + count
            else:
                setattr(total, name, getattr(total, name) + value)
    return total


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
    yield SelfSample("encrypted_flows_total", "counter",
                     "Connections on a watched port that carried TLS records: not parsed, never a parse error "
                     "(their plaintext comes from the TLS probes).", stats.encrypted_flows)
    yield SelfSample("held_bytes", "gauge",
                     "Out-of-order data held for reordering, all connections together (bounded).",
                     stats.held_bytes)
