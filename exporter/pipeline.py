"""Segments in, metrics out: the one path that live capture and pcap replay share.

It owns nothing of its own beyond wiring: the core tracks flows and parses HTTP, the route
mapper names routes, HttpMetrics aggregates, and the optional SLO runtime counts good/total.

A capture source with byte streams of its own (TLS plaintext, capture/tls.py) adds a Tracker
with `add_tracker` and feeds it with `feed(segments, tracker)`: its exchanges then go the
same way, and its core counters are added to the same self-metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from exporter.core.flows import CoreStats, FlowKey, Handover, Limits, Tracker
from exporter.core.http2 import FRAME_TYPES, Http2Stats
from exporter.core.model import Exchange, Segment
from exporter.core.routes import RouteMapper
from exporter.identity.model import SERVICE_NAME_SLOT
from exporter.metrics import (
    NO_IDENTITY,
    SELF_ENCRYPTED_FLOWS_TOTAL,
    SELF_EXCHANGES_TOTAL,
    SELF_FLOWS_ACTIVE,
    SELF_FLOWS_CLOSED_TOTAL,
    SELF_FLOWS_EVICTED_TOTAL,
    SELF_HELD_BYTES,
    SELF_HTTP2_CAPS_HIT_TOTAL,
    SELF_HTTP2_CONNECTIONS_TOTAL,
    SELF_HTTP2_FRAMES_TOTAL,
    SELF_HTTP2_PARSE_ERRORS_TOTAL,
    SELF_HTTP2_PUSH_PROMISES_TOTAL,
    SELF_HTTP2_RESET_STREAMS_TOTAL,
    SELF_HTTP2_STREAMS_DROPPED_TOTAL,
    SELF_HTTP2_UNDECODABLE_STREAMS_TOTAL,
    SELF_HTTP_SERIES,
    SELF_OUT_OF_ORDER_SEGMENTS_TOTAL,
    SELF_PARSE_ERRORS_TOTAL,
    SELF_REQUESTS_WITHOUT_RESPONSE_TOTAL,
    SELF_RETRANSMITTED_SEGMENTS_TOTAL,
    SELF_ROUTE_OVERFLOW_TOTAL,
    SELF_SEGMENTS_TOTAL,
    SELF_UNMATCHED_RESPONSES_TOTAL,
    HttpMetrics,
    SelfSample,
)


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
        self.trackers = [self.tracker]
        # Exchanges counted elsewhere (the kernel fast path), added to exchanges_total.
        self.other_exchanges: Callable[[], int] | None = None
        # (server ip, server port) -> the server's identity labels (identity.Resolver), optional.
        self.identify: Callable[[str, int], tuple[str, ...]] | None = None

    def add_tracker(self, tracker: Tracker) -> Tracker:
        """Another source's connections (see the module docstring); expired and flushed with the rest."""
        self.trackers.append(tracker)
        return tracker

    def feed(self, segments: Iterable[Segment], tracker: Tracker | None = None) -> None:
        done = (tracker or self.tracker).feed_all(segments)
        if done:
            self._emit(done)  # once per batch: the servers are named once per batch too

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
        identify = self.identify
        # A batch's exchanges mostly share a server or two: ask the resolver (a lock, a clock read
        # and an LRU touch) once per server and batch, not once per exchange.
        identities: dict[tuple[str, int], tuple[str, ...]] = {}
        route_of = self.routes.route
        sinks = self.sinks
        observed = []  # to the histograms in one call, under one lock
        for exchange in exchanges:
            route = route_of(exchange.server_port, exchange.target)
            if identify is not None:
                server = (exchange.server_ip, exchange.server_port)
                identity = identities.get(server)
                if identity is None:
                    identity = identities[server] = identify(*server)
                service_name = identity[SERVICE_NAME_SLOT]
            else:
                identity = NO_IDENTITY
                service_name = ""
            observed.append((exchange, route, identity))
            for sink in sinks:
                sink.observe(exchange, route, service_name)
        self.http.observe_all(observed)
        self.exchanges += len(exchanges)

    def self_samples(self) -> Iterator[SelfSample]:
        yield from core_samples(self.tracker.stats if len(self.trackers) == 1 else
                                combined_stats(t.stats for t in self.trackers))
        other = self.other_exchanges() if self.other_exchanges is not None else 0
        yield SelfSample(SELF_EXCHANGES_TOTAL, "counter",
                         "HTTP exchanges rebuilt from the wire (in user space and, with the fast path, the kernel).",
                         self.exchanges + other)
        yield SelfSample(SELF_ROUTE_OVERFLOW_TOTAL, "counter",
                         "Exchanges whose route was replaced by the overflow route (route cap reached).",
                         self.routes.overflowed)
        yield SelfSample(SELF_HTTP_SERIES, "gauge", "Label sets in the HTTP histograms.", self.http.series_count())


def combined_stats(parts: Iterable[CoreStats]) -> CoreStats:
    """Several trackers' counters added up, for one set of self-metrics."""
    total = CoreStats()
    for stats in parts:
        _add_counters(total, stats)
    return total


def _add_counters(total: Any, part: Any) -> None:
    """Add every counter of `part` into `total` (same class): ints, dicts and lists of ints,
    and nested counter objects (CoreStats.http2)."""
    for name in type(part).__slots__:
        value = getattr(part, name)
        mine = getattr(total, name)
        if isinstance(value, dict):
            for key, count in value.items():
                mine[key] = mine.get(key, 0) + count
        elif isinstance(value, list):
            setattr(total, name, [a + b for a, b in zip(mine, value, strict=True)])
        elif isinstance(value, int | float):
            setattr(total, name, mine + value)
        else:
            _add_counters(mine, value)


def core_samples(stats: CoreStats) -> Iterator[SelfSample]:
    yield SelfSample(SELF_SEGMENTS_TOTAL, "counter", "TCP segments handed to the HTTP parser.", stats.segments)
    for reason, count in sorted(stats.parse_errors.items()):
        yield SelfSample(SELF_PARSE_ERRORS_TOTAL, "counter", "HTTP parse errors, by reason.", count,
                         (("reason", reason),))
    yield SelfSample(SELF_UNMATCHED_RESPONSES_TOTAL, "counter",
                     "Responses seen with no pending request on their connection.", stats.unmatched_responses)
    yield SelfSample(SELF_REQUESTS_WITHOUT_RESPONSE_TOTAL, "counter",
                     "Requests whose connection ended or was evicted before a response.",
                     stats.requests_without_response)
    yield SelfSample(SELF_FLOWS_ACTIVE, "gauge", "TCP connections tracked now.", stats.flows_active)
    for reason, count in sorted(stats.flows_evicted.items()):
        yield SelfSample(SELF_FLOWS_EVICTED_TOTAL, "counter", "Connections evicted before they closed, by reason.",
                         count, (("reason", reason),))
    yield SelfSample(SELF_FLOWS_CLOSED_TOTAL, "counter", "Connections that ended with FIN or RST.",
                     stats.flows_closed)
    yield SelfSample(SELF_RETRANSMITTED_SEGMENTS_TOTAL, "counter",
                     "Segments whose data had already been seen (retransmits, duplicates).",
                     stats.retransmitted_segments)
    yield SelfSample(SELF_OUT_OF_ORDER_SEGMENTS_TOTAL, "counter",
                     "Segments that arrived ahead of a gap and were held until it filled.",
                     stats.out_of_order_segments)
    yield SelfSample(SELF_ENCRYPTED_FLOWS_TOTAL, "counter",
                     "Connections on a watched port that carried TLS records: not parsed, never a parse error "
                     "(their plaintext comes from the TLS probes).", stats.encrypted_flows)
    yield SelfSample(SELF_HELD_BYTES, "gauge",
                     "Out-of-order data held for reordering, all connections together (bounded).",
                     stats.held_bytes)
    yield from http2_samples(stats.http2)


def http2_samples(stats: Http2Stats) -> Iterator[SelfSample]:
    for how, count in sorted(stats.connections.items()):
        yield SelfSample(SELF_HTTP2_CONNECTIONS_TOTAL, "counter",
                         "HTTP/2 connections decoded, by how they were recognised.", count, (("how", how),))
    for kind, count in zip(FRAME_TYPES, stats.frames, strict=True):
        yield SelfSample(SELF_HTTP2_FRAMES_TOTAL, "counter", "HTTP/2 frames read, by type.", count, (("type", kind),))
    for reason, count in sorted(stats.parse_errors.items()):
        yield SelfSample(SELF_HTTP2_PARSE_ERRORS_TOTAL, "counter",
                         "HTTP/2 framing or HPACK errors, by reason; the direction resyncs after each.", count,
                         (("reason", reason),))
    for cap, count in sorted(stats.caps.items()):
        yield SelfSample(SELF_HTTP2_CAPS_HIT_TOTAL, "counter",
                         "Times a per-connection HTTP/2 cap was hit (streams, header_block, header_table).",
                         count, (("cap", cap),))
    yield SelfSample(SELF_HTTP2_UNDECODABLE_STREAMS_TOTAL, "counter",
                     "HTTP/2 streams not counted because their request or status could not be decoded exactly "
                     "(connections joined mid-stream, HPACK entries never seen).", stats.undecodable_streams)
    for reason, count in sorted(stats.streams_dropped.items()):
        yield SelfSample(SELF_HTTP2_STREAMS_DROPPED_TOTAL, "counter",
                         "Decoded HTTP/2 streams that left without an exchange, by reason.", count,
                         (("reason", reason),))
    yield SelfSample(SELF_HTTP2_RESET_STREAMS_TOTAL, "counter",
                     "HTTP/2 streams reset (RST_STREAM) before their response ended; counted with status 0.",
                     stats.reset_streams)
    yield SelfSample(SELF_HTTP2_PUSH_PROMISES_TOTAL, "counter",
                     "HTTP/2 server pushes seen; pushed responses are not counted as exchanges.",
                     stats.push_promises)
