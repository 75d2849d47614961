"""TCP connections to HTTP exchanges: ordering, gaps, pairing, eviction.

`Tracker.feed` takes segments in capture order. Each connection (client ip, client port,
server ip, server port) gets two directions, each with its expected sequence number and a
bounded buffer of segments that arrived ahead of a gap, and an HTTP/1 parser
(`http1.RequestParser` for client → server, `http1.ResponseParser` back). Requests wait in
a FIFO until the final response that answers them completes (pipelining), and then leave
as one `Exchange`.

Sequence numbers: the first segment seen on a direction sets the expected number (we may
join a connection in the middle; capture usually drops bare SYNs). Data already consumed
is a retransmission and is ignored; data ahead is held until the gap fills. Held data that
falls inside a body the parser only counts is held by length, without its content. When the
held bytes exceed `Limits.max_buffered_bytes` (a first held segment always fits), or the
direction ends with a gap still open, the data is lost for good: "gap" is counted once and
the parser resyncs.

Pairing stays conservative, because a wrong pair is worse than a missing one:

- when the response parser loses its place, every request waiting on that connection is
  dropped (counted in `requests_without_response`), since we cannot know which of them
  the lost bytes answered;
- a response with nothing waiting is counted in `unmatched_responses`, and a request that
  began before such a response (it arrived late, from behind a gap) is dropped too: that
  response was probably its answer;
- past `max_pending_requests` the oldest request is dropped but its place in the queue is
  kept, so the response that answers it is skipped rather than given to the next one.

Known limits: with pipelining *and* a response-side gap, a response to a dropped request
can still be paired with a request sent after the resync. A data segment retransmitted
after both sides closed opens a new flow (it usually ends up as an unmatched response).

Parse error reasons are listed in `http1`; "gap" is counted here.

TLS on a watched port: a connection whose first data (either way) starts with a TLS record
header is encrypted. Its bytes are not HTTP and not a parse error: the flow is marked, its
segments are ignored until it ends (with `hint_skips`, `encrypted_hints` tells the capture,
which then drops its payload in the kernel), and it is counted in `CoreStats.encrypted_flows`. Its
plaintext, when the TLS library is probed, reaches a Tracker of its own (capture/tls.py),
whose exchanges carry `scheme="https"`.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from exporter.core.http1 import (
    PARSE_ERROR_REASONS,
    HeadMemo,
    PendingRequest,
    RequestParser,
    ResponseParser,
    normalise_target,
)
from exporter.core.http2 import (
    DEFAULT_MAX_HEADER_TABLE,
    DEFAULT_MAX_STREAMS,
    PREFACE,
    Http2Connection,
    Http2Limits,
    Http2Stats,
    looks_like_frames,
)
from exporter.core.model import ACK, FIN, PSH, RST, SYN, Exchange, Segment

__all__ = ["CoreStats", "Handover", "Limits", "Tracker"]

_new_tuple = tuple.__new__  # builds a NamedTuple from all its fields without its Python __new__
_SEQ_SPACE = 1 << 32
_SEQ_MASK = _SEQ_SPACE - 1
_SEQ_HALF = 1 << 31
_REUSE_DISTANCE = 1 << 20  # random ISNs land this close to the old numbers with odds ~1/2000
_HELD_OVERHEAD = 64  # a held segment costs its tuple too, even when its payload was cut
# Body stretches worth a map update (below, the bytes cost less than the syscall), and the
# most one skip hint covers (well inside the 2**31 that 32-bit sequence comparisons allow).
_SKIP_MIN = 32 * 1024
_SKIP_WINDOW = 1 << 30

FlowKey = tuple[str, int, str, int]


@dataclass(frozen=True, slots=True)
class Limits:
    max_flows: int = 65536  # tracked connections; beyond → evict least-recently-active, counted
    # Per direction: out-of-order data + unparsed head bytes, beyond a first held segment.
    max_buffered_bytes: int = 65536
    # All flows together: what held out-of-order data may cost at most (the per-direction
    # allowance times max_flows would be gigabytes). Past it, the flow that asks gets a gap.
    max_held_bytes_total: int = 64 << 20
    max_pending_requests: int = 128  # per connection, requests awaiting a response
    max_header_bytes: int = 32768  # a larger head is a parse error ("header_too_large")
    idle_timeout_ns: int = 300 * 10**9  # flows idle this long are evicted by expire()
    # HTTP/2, per connection: open streams (beyond → the oldest is dropped, counted), and the
    # HPACK table a peer may ask for (SETTINGS_HEADER_TABLE_SIZE; beyond → capped, counted).
    # A header block is bounded by max_header_bytes, like an HTTP/1 head.
    max_h2_streams: int = DEFAULT_MAX_STREAMS
    max_h2_header_table: int = DEFAULT_MAX_HEADER_TABLE

    def __post_init__(self) -> None:
        for name in (
            "max_h2_streams",
            "max_h2_header_table",
            "max_flows",
            "max_buffered_bytes",
            "max_held_bytes_total",
            "max_pending_requests",
            "max_header_bytes",
            "idle_timeout_ns",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be positive, got {getattr(self, name)}.")


class CoreStats:
    """Counters the metrics layer reads at scrape time. Plain ints; never reset."""

    __slots__ = (
        "encrypted_flows",
        "flows_active",
        "flows_closed",
        "flows_evicted",
        "held_bytes",
        "http2",
        "out_of_order_segments",
        "parse_errors",
        "requests_without_response",
        "retransmitted_segments",
        "segments",
        "unmatched_responses",
    )

    def __init__(self) -> None:
        self.segments = 0
        # Every reason is present from the start so that each one is exported, even at 0.
        self.parse_errors: dict[str, int] = dict.fromkeys(PARSE_ERROR_REASONS, 0)
        self.unmatched_responses = 0
        self.requests_without_response = 0
        self.flows_active = 0
        self.flows_evicted: dict[str, int] = {"idle": 0, "capacity": 0}
        self.flows_closed = 0
        self.retransmitted_segments = 0
        self.out_of_order_segments = 0
        self.held_bytes = 0  # gauge: out-of-order data held for every flow together
        self.http2 = Http2Stats()
        self.encrypted_flows = 0  # connections that turned out to carry TLS records: not parsed


@dataclass(frozen=True, slots=True)
class Handover:
    """Where a connection stands when another parser (the kernel's fast path) hands it over.

    `Tracker.seed` makes the flow continue from here exactly as if the Tracker had parsed
    everything before: the next sequence number of each direction (None: not known yet,
    the first segment sets it), and the exchange in progress, if any. An exchange whose
    response head was already consumed carries its status, Content-Length and the body
    bytes already seen; the rest of the body then arrives as ordinary segments.
    """

    client_next_seq: int | None
    server_next_seq: int | None
    method: str | None = None  # None: no request waiting
    target: str = "/"
    start_ns: int = 0
    response_status: int = 0  # 0: no response byte consumed yet
    response_length: int = 0
    response_seen: int = 0
    seen_ns: int = 0  # when the handover happened: the flow's idle clock starts here
    # Response body bytes that arrived ahead of a gap and were consumed unread: (seq, length,
    # arrival time). They count, by length, once the stream reaches seq.
    held: tuple[int, int, int] | None = None
    # The waiting request's body, announced by Content-Length: its length and the bytes already
    # seen (by length only); the rest arrives as ordinary segments. 0: no body.
    request_length: int = 0
    request_seen: int = 0
    # The other parser read HTTP on this connection already: bytes that look like a TLS record
    # later are not a TLS connection (only a connection's first bytes decide that).
    http_seen: bool = False
    # The first bytes of a request head the other parser had begun (from client_next_seq on,
    # received at start_ns): parsed first, as if captured. b"": none.
    client_prefix: bytes = b""


def is_tls_record(payload: bytes) -> bool:
    """A TLS record header: content type 20..23 (change_cipher_spec, alert, handshake,
    application_data), then version 3.0..3.4. No HTTP/1.x message starts with these bytes."""
    return len(payload) >= 3 and 20 <= payload[0] <= 23 and payload[1] == 3 and payload[2] <= 4


def _seq_delta(seq: int, reference: int) -> int:
    """`seq - reference` in 32-bit sequence space, as a signed distance."""
    delta = (seq - reference) & _SEQ_MASK
    return delta - _SEQ_SPACE if delta >= _SEQ_HALF else delta


# Held segments this close to a side's position keep their order of distance from it while the
# position moves forward through them (it moves less than this plus one segment, so no distance
# changes sign): one sort gives the order of taking the nearest again after each.
_STABLE_SPAN = 1 << 29


def _nearest_first(side: _Side) -> Iterator[tuple[int, int, bytes, int]]:
    """Take every held segment of `side`, each time the nearest to where its stream stands.

    Sorted once when they all lie within _STABLE_SPAN (a stable sort, so equals come in list
    order, as min() takes them); otherwise the nearest is looked for again after each step.
    """
    held = side.held
    distances = [_seq_delta(item[0], side.next_seq) for item in held]
    if distances and max(distances) < _STABLE_SPAN and min(distances) > -_STABLE_SPAN:
        ordered = [held[i] for i in sorted(range(len(held)), key=distances.__getitem__)]
        held.clear()
        yield from ordered
        return
    while held:
        expected = side.next_seq
        yield held.pop(min(range(len(held)), key=lambda i: _seq_delta(held[i][0], expected)))


class _Side:
    """One direction of a connection: where its byte stream stands."""

    __slots__ = ("fin", "held", "held_bytes", "next_seq", "skip_end")

    def __init__(self) -> None:
        self.next_seq = -1  # unknown until the first segment
        # Segments ahead of a gap: (seq, ts_ns, payload, payload_len).
        self.held: list[tuple[int, int, bytes, int]] = []
        self.held_bytes = 0
        self.fin = False
        self.skip_end = -1  # end of the last skip range hinted for this side; -1: none


class _ByteParser(Protocol):
    """What a flow drives per direction: an HTTP/1 parser, an HTTP/2 reader, or the sniffer."""

    @property
    def alive(self) -> bool: ...
    @property
    def opaque_bytes(self) -> int: ...
    @property
    def buffered_bytes(self) -> int: ...
    def feed(self, data: bytes, ts_ns: int, missing: int = 0) -> None: ...
    def lose(self) -> None: ...
    def stop(self) -> None: ...
    def finish(self, graceful: bool = True) -> None: ...


# Segments a connection's first data may be neither HTTP/1 text nor whole HTTP/2 frames (joined
# in the middle of a frame) before it is handed to the HTTP/1 parser anyway.
_SNIFF_TRIES = 8
# How an HTTP/1 message (or a prefix of one cut by the segment end) begins.
_REQUEST_START = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,20}(?: |\Z)|[\r\n]")
_RESPONSE_START = re.compile(rb"HTTP/|H(?:T(?:T(?:P)?)?)?\Z|[\r\n]")


class _Sniffer:
    """Stands in for a direction's parser until a connection's first bytes say HTTP/1 or HTTP/2.

    Nothing here looks at TCP itself, so any ordered byte source (the TLS capture's plaintext)
    gets the same detection: the client preface means HTTP/2 from the start; whole plausible
    frames on a connection joined mid-stream mean HTTP/2 with unknown HPACK state; text means
    HTTP/1 (an `Upgrade: h2c` + 101 switches later, in `_Flow.on_upgrade`).
    """

    __slots__ = ("flow", "to_server")

    def __init__(self, flow: _Flow, to_server: bool) -> None:
        self.flow = flow
        self.to_server = to_server

    @property
    def alive(self) -> bool:
        return True

    @property
    def opaque_bytes(self) -> int:
        return 0

    @property
    def buffered_bytes(self) -> int:
        return len(self.flow.sniffed)

    def feed(self, data: bytes, ts_ns: int, missing: int = 0) -> None:
        self.flow.sniff(self.to_server, data, ts_ns, missing)

    def lose(self) -> None:
        self.flow.sniffed = b""

    def stop(self) -> None:
        pass

    def finish(self, graceful: bool = True) -> None:
        pass


class _Flow:
    """One TCP connection, and the pairing of its requests with responses."""

    __slots__ = (
        "answering",
        "client",
        "emitted",
        "encrypted",
        "h2",
        "heads",
        "key",
        "last_ns",
        "last_unmatched_ns",
        "limits",
        "max_pending",
        "pending",
        "requests",
        "responses",
        "scheme",
        "seen_data",
        "server",
        "server_ip",
        "server_port",
        "skipped",
        "sniff_tries",
        "sniffed",
        "sniffed_ns",
        "stats",
    )

    def __init__(self, key: FlowKey, stats: CoreStats, emitted: list[Exchange], limits: Limits,
                 scheme: str = "http", heads: HeadMemo | None = None) -> None:
        self.key = key
        self.heads = heads  # its Tracker's, shared by all its connections' HTTP/1 parsers
        self.scheme = scheme
        self.seen_data = False  # until the first payload byte: then TLS or not is decided
        self.encrypted = False
        self.server_port = key[3]
        self.server_ip = key[2]
        self.stats = stats
        self.emitted = emitted
        self.limits = limits
        self.max_pending = limits.max_pending_requests
        self.last_ns = 0
        self.client = _Side()
        self.server = _Side()
        # Until the first bytes decide (see _Sniffer): then HTTP/1 parsers or an HTTP/2 connection.
        self.requests: _ByteParser = _Sniffer(self, True)
        self.responses: _ByteParser = _Sniffer(self, False)
        self.h2: Http2Connection | None = None
        self.sniffed = b""  # the start of a client preface cut by the segment end
        self.sniffed_ns = 0
        self.sniff_tries = 0
        self.pending: list[PendingRequest] = []
        self.answering: PendingRequest | None = None
        # Methods of requests dropped from a full queue whose responses are still due.
        self.skipped: list[str] = []
        self.last_unmatched_ns = -1

    # -- protocol detection --------------------------------------------------------------

    def sniff(self, to_server: bool, data: bytes, ts_ns: int, missing: int) -> None:
        if to_server and self.sniffed:
            data = self.sniffed + data
            ts_ns = self.sniffed_ns
            self.sniffed = b""
        if to_server and len(data) < len(PREFACE) and not missing and PREFACE.startswith(data):
            self.sniffed = data
            self.sniffed_ns = ts_ns
            return
        if (to_server and data.startswith(PREFACE)) or looks_like_frames(data):
            self.use_http2()
        elif ((_REQUEST_START if to_server else _RESPONSE_START).match(data) or b"HTTP/1." in data
              or self.sniff_tries >= _SNIFF_TRIES):
            # An HTTP/1 start, or one further in (joined mid-body): the HTTP/1 parser resyncs there.
            self.use_http1()
        else:
            # Neither an HTTP/1 message start nor a frame boundary: joined in the middle of
            # something. Wait (a few segments at most) for a start that says which.
            self.sniff_tries += 1
            return
        (self.requests if to_server else self.responses).feed(data, ts_ns, missing)

    def use_http1(self) -> None:
        errors = self.stats.parse_errors
        limits = self.limits
        heads = self.heads
        self.requests = RequestParser(self, errors, limits.max_header_bytes, limits.max_buffered_bytes,
                                      heads.requests if heads is not None else None)
        self.responses = ResponseParser(self, errors, limits.max_header_bytes, limits.max_buffered_bytes,
                                        heads.responses if heads is not None else None)

    def use_http2(self, upgraded: PendingRequest | None = None, upgraded_body: int = 0) -> Http2Connection:
        limits = self.limits
        conn = self.h2 = Http2Connection(
            self.server_port, self.emitted, self.stats.http2,
            Http2Limits(limits.max_h2_streams, limits.max_header_bytes, limits.max_h2_header_table),
            self.scheme, upgraded, upgraded_body, server_ip=self.server_ip,
        )
        self.requests = conn.client
        self.responses = conn.server
        return conn

    # -- RequestSink ---------------------------------------------------------------------

    def on_request(self, request: PendingRequest) -> None:
        if request.start_ns < self.last_unmatched_ns:
            self.stats.requests_without_response += 1
            return
        pending = self.pending
        if len(pending) >= self.max_pending:
            self.stats.requests_without_response += 1
            self.skipped.append(pending.pop(0).method)
            if len(self.skipped) > self.max_pending:
                del self.skipped[0]  # beyond hope of staying in step; bounded all the same
        pending.append(request)

    # -- ResponseSink --------------------------------------------------------------------

    def on_response_head(self, status: int, ts_ns: int) -> str | None:
        if self.skipped:
            self.answering = None
            return self.skipped.pop(0)
        if self.pending:
            request = self.answering = self.pending.pop(0)
            return request.method
        self.answering = None
        self.stats.unmatched_responses += 1
        self.last_unmatched_ns = ts_ns
        return None

    def on_response_complete(self, status: int, end_ns: int, body_bytes: int) -> None:
        request = self.answering
        if request is None:
            return
        self.answering = None
        # Every field in order, built as a tuple: Exchange's own __new__ is a Python function.
        self.emitted.append(_new_tuple(Exchange, (
            request.method, normalise_target(request.target), status, request.start_ns, end_ns,
            self._request_body(request), body_bytes, self.server_port, self.scheme, "1.1", None, self.server_ip,
        )))

    def _request_body(self, request: PendingRequest) -> int:
        requests = self.requests
        if isinstance(requests, RequestParser) and request is requests.current:
            return requests.body_so_far
        return request.body_bytes

    def on_response_lost(self) -> None:
        self.drop_waiting()

    def on_upgrade(self, protocol: str) -> None:
        answering = self.answering
        self.requests.stop()
        if protocol == "h2c" and answering is not None:
            # The request that switched is stream 1 of the HTTP/2 connection that follows;
            # bytes after the 101 head go straight to the HTTP/2 reader.
            self.answering = None
            body = self._request_body(answering)
            self.drop_waiting()
            old_responses = self.responses
            conn = self.use_http2(answering, body)
            if isinstance(old_responses, ResponseParser):
                old_responses.successor = conn.server
            return
        self.drop_waiting()

    def drop_waiting(self) -> None:
        """Nothing waiting can be answered any more: count it and forget it."""
        dropped = len(self.pending) + (self.answering is not None)
        if dropped:
            self.stats.requests_without_response += dropped
            self.pending.clear()
            self.answering = None
        self.skipped.clear()


class Tracker:
    """Segments in, exchanges out, for every connection to `server_ports`."""

    __slots__ = ("_emitted", "_flows", "_heads", "_limits", "_scheme", "_server_ports", "encrypted_hints",
                 "skip_hints", "stats")

    def __init__(
        self, server_ports: Iterable[int], limits: Limits = Limits(), stats: CoreStats | None = None,
        hint_skips: bool = False, scheme: str = "http",
    ) -> None:
        """`hint_skips`: collect `skip_hints` for a capture that can drop body bytes unread.

        `scheme`: the url.scheme of every exchange: "https" for plaintext from the TLS capture.
        """
        self._server_ports = frozenset(server_ports)
        self._scheme = scheme
        # (connection, towards the server) -> (first, end) of a stretch of that direction's byte
        # stream the parser will only count, or None: forget the last one (the connection ended).
        # The capture applies and clears them (take_skip_hints); None when nobody asked.
        self.skip_hints: dict[tuple[FlowKey, bool], tuple[int, int] | None] | None = {} if hint_skips else None
        # Connections found to carry TLS (True), and those of them that ended (False): the capture
        # drops their payload in the kernel meanwhile. Also only when asked (hint_skips).
        self.encrypted_hints: dict[FlowKey, bool] | None = {} if hint_skips else None
        self._limits = limits
        self.stats = stats if stats is not None else CoreStats()
        # Least recently active first, so that expire() only looks at the front.
        self._flows: OrderedDict[FlowKey, _Flow] = OrderedDict()
        self._emitted: list[Exchange] = []
        self._heads = HeadMemo()  # heads its HTTP/1 connections parsed, by their bytes (bounded)

    def feed(self, seg: Segment) -> list[Exchange]:
        """Take one captured segment; return the exchanges it completed (usually 0 or 1)."""
        return self.feed_all((seg,))

    def feed_all(self, segments: Iterable[Segment]) -> list[Exchange]:
        """Take captured segments in order; return the exchanges they completed, in order.

        One call per batch rather than per segment: the loop's lookups are made once, and the
        exchanges are handed back once.
        """
        stats = self.stats
        ports = self._server_ports
        flows = self._flows
        skip_hints = self.skip_hints
        http_only = self._scheme == "http"
        for seg in segments:
            stats.segments += 1
            # One unpack instead of a field lookup per use: this runs for every segment.
            ts_ns, src_ip, src_port, dst_ip, dst_port, seq, flags, payload, plen = seg
            if dst_port in ports:
                key = (src_ip, src_port, dst_ip, dst_port)
                to_server = True
            elif src_port in ports:
                key = (dst_ip, dst_port, src_ip, src_port)
                to_server = False
            else:
                continue
            flow = flows.get(key)
            if flow is None:
                if flags & RST or not (plen or flags & SYN):
                    continue  # an end, or a bare ACK, of something we never saw
                flow = self._open(key)
            else:
                flows.move_to_end(key)
            if not flow.seen_data and plen:
                flow.seen_data = True
                if http_only and is_tls_record(payload):
                    flow.encrypted = True
                    stats.encrypted_flows += 1
                    if self.encrypted_hints is not None:
                        self.encrypted_hints[key] = True
            if flow.encrypted:
                flow.last_ns = ts_ns
                if flags & RST:
                    self._close(flow, graceful=True)
                elif flags & FIN:
                    (flow.client if to_server else flow.server).fin = True
                    if flow.client.fin and flow.server.fin:
                        self._close(flow, graceful=True)
                continue
            side = flow.client if to_server else flow.server
            if plen and (flow.client.fin or flow.server.fin) and side.next_seq >= 0:
                distance = _seq_delta(seq, side.next_seq)
                if distance > _REUSE_DISTANCE or distance < -_REUSE_DISTANCE:
                    # Data far from a closing connection's numbers: a new connection reusing the 4-tuple.
                    self._close(flow, graceful=True)
                    flow = self._open(key)
                    side = flow.client if to_server else flow.server
            flow.last_ns = ts_ns

            if flags & RST:
                stats.flows_closed += 1
                self._close(flow, graceful=False)
                continue
            if flags & SYN:
                seq = (seq + 1) & _SEQ_MASK  # SYN takes one sequence number
                if side.next_seq >= 0 and seq != side.next_seq:
                    self._close(flow, graceful=True)
                    flow = self._open(key)
                    flow.last_ns = ts_ns
                    side = flow.client if to_server else flow.server
            if side.next_seq < 0:
                side.next_seq = seq
            if plen:
                if seq == side.next_seq and not side.held:
                    side.next_seq = (seq + plen) & _SEQ_MASK
                    parser = flow.requests if to_server else flow.responses
                    parser.feed(payload, ts_ns, plen - len(payload))
                else:
                    self._reorder(flow, side, seq, seg, to_server)
                # Most segments leave no long body ahead: the hint is not worth a call then.
                if (skip_hints is not None and not side.held
                        and (flow.requests if to_server else flow.responses).opaque_bytes >= _SKIP_MIN):
                    self._hint_skip(flow, side, to_server)
            if flags & FIN:
                self._fin(flow, side, (seq + plen) & _SEQ_MASK, to_server)
        return self._take_emitted()

    def seed(self, key: FlowKey, handover: Handover) -> list[Exchange]:
        """Start tracking connection `key` (client ip, client port, server ip, server port) mid-stream.

        Any flow already tracked under `key` is an older connection on the same 4-tuple
        and is closed first (its close-delimited response may complete: returned).
        """
        old = self._flows.get(key)
        if old is not None:
            self._close(old, graceful=True)
        flow = self._open(key)
        flow.last_ns = max(handover.start_ns, handover.seen_ns)
        flow.seen_data = handover.http_seen or handover.method is not None
        if handover.client_next_seq is not None:
            flow.client.next_seq = handover.client_next_seq & _SEQ_MASK
        if handover.server_next_seq is not None:
            flow.server.next_seq = handover.server_next_seq & _SEQ_MASK
        if handover.method is not None:
            flow.use_http1()  # the kernel parsed an HTTP/1 request on it
            if handover.request_length:
                # As for the response below: a minimal head with the same framing, then the body
                # bytes already seen as bytes of known length but unknown content.
                head = b"%s %s HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (
                    handover.method.encode("latin-1"), handover.target.encode("latin-1"), handover.request_length)
                flow.requests.feed(head, handover.start_ns, handover.request_seen)
            else:
                flow.on_request(PendingRequest(handover.method, handover.target, handover.start_ns))
            if handover.response_status:
                # The parser takes the consumed head as a minimal one with the same framing, and
                # the body bytes already seen as bytes of known length but unknown content.
                head = b"HTTP/1.1 %d \r\nContent-Length: %d\r\n\r\n" % (
                    handover.response_status, handover.response_length)
                flow.responses.feed(head, handover.start_ns, handover.response_seen)
                if handover.held is not None:
                    held_seq, held_length, held_ns = handover.held
                    flow.server.held.append((held_seq & _SEQ_MASK, held_ns, b"", held_length))
                    flow.server.held_bytes += _HELD_OVERHEAD
                    self.stats.held_bytes += _HELD_OVERHEAD
                    self.stats.out_of_order_segments += 1
        prefix = handover.client_prefix
        if prefix and handover.client_next_seq is not None:
            done = self._take_emitted()
            client_ip, client_port, server_ip, server_port = key
            return done + self.feed(Segment(handover.start_ns, client_ip, client_port, server_ip, server_port,
                                            handover.client_next_seq & _SEQ_MASK, ACK | PSH, prefix, len(prefix)))
        return self._take_emitted()

    def take_encrypted_hints(self) -> dict[FlowKey, bool]:
        hints = self.encrypted_hints
        if not hints:
            return {}
        self.encrypted_hints = {}
        return hints

    def take_skip_hints(self) -> dict[tuple[FlowKey, bool], tuple[int, int] | None]:
        hints = self.skip_hints
        if not hints:
            return {}
        self.skip_hints = {}
        return hints

    def expire(self, now_ns: int) -> list[Exchange]:
        """Evict flows idle for `idle_timeout_ns`; their close-delimited responses end here."""
        oldest_kept = now_ns - self._limits.idle_timeout_ns
        flows = self._flows
        evicted = self.stats.flows_evicted
        while flows:
            flow = next(iter(flows.values()))
            if flow.last_ns > oldest_kept:
                break
            evicted["idle"] += 1
            self._close(flow, graceful=True)
        return self._take_emitted()

    def flush(self) -> list[Exchange]:
        """End of input: finish every flow as if it had closed, and forget them all."""
        for flow in list(self._flows.values()):
            self._close(flow, graceful=True)
        return self._take_emitted()

    # -- internals -----------------------------------------------------------------------

    def _take_emitted(self) -> list[Exchange]:
        done = self._emitted.copy()
        self._emitted.clear()
        return done

    def _open(self, key: FlowKey) -> _Flow:
        flows = self._flows
        if len(flows) >= self._limits.max_flows:
            self.stats.flows_evicted["capacity"] += 1
            self._close(next(iter(flows.values())), graceful=False)
        flow = flows[key] = _Flow(key, self.stats, self._emitted, self._limits, self._scheme, self._heads)
        self.stats.flows_active += 1
        return flow

    def _hint_skip(self, flow: _Flow, side: _Side, to_server: bool) -> None:
        """Ask for the body bytes ahead to be dropped unread, once per body (see skip_hints)."""
        parser = flow.requests if to_server else flow.responses
        wanted = min(parser.opaque_bytes, _SKIP_WINDOW)
        if wanted < _SKIP_MIN:
            return
        covered = _seq_delta(side.skip_end, side.next_seq) if side.skip_end >= 0 else 0
        # A Content-Length body is covered whole by its first hint; a body that ends with the
        # connection is covered a window at a time, renewed when half of it is used.
        if covered >= wanted // 2:
            return
        side.skip_end = (side.next_seq + wanted) & _SEQ_MASK
        assert self.skip_hints is not None
        self.skip_hints[(flow.key, to_server)] = (side.next_seq, side.skip_end)

    def _close(self, flow: _Flow, graceful: bool) -> None:
        """Forget a flow. Graceful (FIN, idle, end of input) finishes close-delimited bodies."""
        if flow.encrypted and self.encrypted_hints is not None:
            self.encrypted_hints[flow.key] = False
        if self.skip_hints is not None:
            for side, to_server in ((flow.client, True), (flow.server, False)):
                if side.skip_end >= 0:
                    self.skip_hints[(flow.key, to_server)] = None
        for side, to_server in ((flow.client, True), (flow.server, False)):
            if side.held:
                if graceful:
                    self._skip_gap(flow, side, to_server)
                else:
                    self.stats.parse_errors["gap"] += 1
                    side.held.clear()
                    self.stats.held_bytes -= side.held_bytes
                    side.held_bytes = 0
        flow.responses.finish(graceful)
        flow.requests.stop()
        flow.drop_waiting()
        if flow.h2 is not None:
            flow.h2.close()
        if self._flows.pop(flow.key, None) is not None:
            self.stats.flows_active -= 1

    def _reorder(self, flow: _Flow, side: _Side, seq: int, seg: Segment, to_server: bool) -> None:
        """The slow path: a segment that is not simply the next one expected."""
        stats = self.stats
        plen = seg.payload_len
        delta = _seq_delta(seq, side.next_seq)
        if delta > 0:
            parser = flow.requests if to_server else flow.responses
            if not parser.alive:
                return  # no longer parsed: nothing worth holding
            held = side.held
            for held_seq, _, _, held_len in held:
                if held_seq == seq and held_len >= plen:
                    stats.retransmitted_segments += 1
                    return
            payload = seg.payload
            if payload and delta + plen <= parser.opaque_bytes:
                # Body bytes the parser will only count: hold their length, not their content.
                # One lo segment is ~64 KiB, and two CPUs swap adjacent ones under load.
                payload = b""
            held.append((seq, seg.ts_ns, payload, plen))
            side.held_bytes += len(payload) + _HELD_OVERHEAD
            stats.held_bytes += len(payload) + _HELD_OVERHEAD
            stats.out_of_order_segments += 1
            # One segment is always held, whatever its size (the snap length bounds it): a
            # head segment overtaken by the next one is a swap, not loss, even when that one
            # alone is larger than the limit.
            limits = self._limits
            if ((len(held) > 1 and side.held_bytes + parser.buffered_bytes > limits.max_buffered_bytes)
                    or stats.held_bytes > limits.max_held_bytes_total):
                self._skip_gap(flow, side, to_server)
            return
        if delta + plen <= 0:
            stats.retransmitted_segments += 1
            return
        self._deliver(flow, side, to_server, seg.payload, plen, -delta, seg.ts_ns)
        self._drain(flow, side, to_server)

    def _deliver(
        self, flow: _Flow, side: _Side, to_server: bool, payload: bytes, plen: int, skip: int, ts_ns: int
    ) -> None:
        """Feed the part of a segment past `skip` bytes already consumed."""
        side.next_seq = (side.next_seq + plen - skip) & _SEQ_MASK
        parser = flow.requests if to_server else flow.responses
        if skip:
            parser.feed(payload[skip:], ts_ns, plen - max(skip, len(payload)))
        else:
            parser.feed(payload, ts_ns, plen - len(payload))

    def _drain(self, flow: _Flow, side: _Side, to_server: bool) -> None:
        """Feed held segments that the stream has now reached."""
        held = side.held
        while held:
            expected = side.next_seq
            ready = next((i for i, item in enumerate(held) if _seq_delta(item[0], expected) <= 0), -1)
            if ready < 0:
                return
            seq, ts_ns, payload, plen = held.pop(ready)
            side.held_bytes -= len(payload) + _HELD_OVERHEAD
            self.stats.held_bytes -= len(payload) + _HELD_OVERHEAD
            delta = _seq_delta(seq, expected)
            if delta + plen <= 0:
                self.stats.retransmitted_segments += 1
                continue
            self._deliver(flow, side, to_server, payload, plen, -delta, ts_ns)

    def _skip_gap(self, flow: _Flow, side: _Side, to_server: bool) -> None:
        """Give up on missing data: count it once, resync the parser, feed what was held."""
        self.stats.parse_errors["gap"] += 1
        parser = flow.requests if to_server else flow.responses
        parser.lose()
        resumed = False
        for seq, ts_ns, payload, plen in _nearest_first(side):
            delta = _seq_delta(seq, side.next_seq)
            if delta > 0:
                if resumed:
                    parser.lose()  # a further hole: same resync, no second count
                side.next_seq = seq
                delta = 0
            elif delta + plen <= 0:
                self.stats.retransmitted_segments += 1
                continue
            resumed = True
            self._deliver(flow, side, to_server, payload, plen, -delta, ts_ns)
        self.stats.held_bytes -= side.held_bytes
        side.held_bytes = 0

    def _fin(self, flow: _Flow, side: _Side, fin_seq: int, to_server: bool) -> None:
        if side.fin:
            return
        parser = flow.requests if to_server else flow.responses
        if parser.alive and (side.held or _seq_delta(fin_seq, side.next_seq) > 0):
            self._skip_gap(flow, side, to_server)
        side.fin = True
        if to_server:
            flow.requests.finish()
        else:
            flow.responses.finish()
            flow.drop_waiting()  # the server has stopped talking: nothing more gets answered
        if flow.client.fin and flow.server.fin:
            self.stats.flows_closed += 1
            self._close(flow, graceful=True)
