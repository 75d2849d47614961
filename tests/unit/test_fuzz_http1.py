"""Property-based fuzzing of the HTTP/1 parsers and the flow tracker (hypothesis).

- Valid exchanges, cut into random segments, reordered within each message and with
  duplicated segments, round-trip exactly: method, path, status, body sizes, and the
  kernel timestamps of the first request byte and the last response byte.
- Random bytes and mutated valid streams never raise, in the parsers or in Tracker.feed,
  and per-flow buffered memory stays under `Limits.max_buffered_bytes`; flows and pending
  requests stay under their caps.

Example counts: tests/unit/fuzz_settings.py (EBPF_SLO_FUZZ=long for `make fuzz`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hypothesis import assume, given
from hypothesis import strategies as st

from exporter.core import http1
from exporter.core.flows import Limits, Tracker
from exporter.core.http1 import _TCHAR, PendingRequest, RequestParser, ResponseParser, _header_fields_ok
from exporter.core.model import ACK, FIN, PSH, RST, SYN, Exchange, Segment
from tests.unit.fuzz_settings import fuzz

PORT = 8080
CLIENT, SERVER = "10.1.0.1", "10.1.0.2"
DATA = ACK | PSH

# -- valid exchanges ----------------------------------------------------------------------

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "PURGE"]
STATUSES = [200, 201, 204, 301, 304, 400, 404, 500, 503]
segment_text = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~", min_size=1, max_size=12)


@dataclass(frozen=True)
class Spec:
    method: str
    path: str
    query: str
    request_body: bytes
    request_chunked: bool
    status: int
    interim: bool
    response_body: bytes
    response_chunked: bool
    extra_headers: tuple[tuple[str, str], ...]

    def request(self) -> bytes:
        target = self.path + (f"?{self.query}" if self.query else "")
        lines = [f"{self.method} {target} HTTP/1.1", "Host: svc.test"]
        lines += [f"{k}: {v}" for k, v in self.extra_headers]
        if self.request_chunked:
            lines.append("Transfer-Encoding: chunked")
            return ("\r\n".join(lines) + "\r\n\r\n").encode() + chunked(self.request_body)
        if self.request_body:
            lines.append(f"Content-Length: {len(self.request_body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.request_body

    def bodyless(self) -> bool:
        return self.method == "HEAD" or self.status in (204, 304)

    def response(self) -> bytes:
        interim = b"HTTP/1.1 100 Continue\r\n\r\n" if self.interim else b""
        lines = [f"HTTP/1.1 {self.status} X", "Server: fuzz"]
        body = b"" if self.bodyless() else self.response_body
        if self.response_chunked and not self.bodyless():
            lines.append("Transfer-Encoding: chunked")
            return interim + ("\r\n".join(lines) + "\r\n\r\n").encode() + chunked(body)
        lines.append(f"Content-Length: {len(self.response_body)}")  # HEAD: the length of what GET would send
        return interim + ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def expected_response_bytes(self) -> int:
        return 0 if self.bodyless() else len(self.response_body)


def chunked(body: bytes) -> bytes:
    out, step = b"", 7
    for start in range(0, len(body), step):
        piece = body[start:start + step]
        out += b"%x\r\n%s\r\n" % (len(piece), piece)
    return out + b"0\r\n\r\n"


specs = st.builds(
    Spec,
    method=st.sampled_from(METHODS),
    path=st.lists(segment_text, max_size=4).map(lambda parts: "/" + "/".join(parts)),
    query=st.one_of(st.just(""), st.text(alphabet="abc=&%20xyz0123", min_size=1, max_size=20)),
    request_body=st.binary(max_size=300),
    request_chunked=st.booleans(),
    status=st.sampled_from(STATUSES),
    interim=st.booleans(),
    response_body=st.binary(max_size=600),
    response_chunked=st.booleans(),
    extra_headers=st.lists(st.tuples(st.sampled_from(["X-A", "Cookie", "Authorization", "Accept"]),
                                     st.text(alphabet="abc xyz=;/", max_size=30).map(str.strip)), max_size=3)
    .map(tuple),
)


def cut(data: bytes, draw: st.DrawFn, max_pieces: int = 6) -> list[tuple[int, bytes]]:
    """(offset, bytes) pieces of data at random cut points."""
    if not data:
        return []
    points = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=max_pieces - 1))))
    bounds = [0, *[p for p in points if 0 < p < len(data)], len(data)]
    return [(bounds[i], data[bounds[i]:bounds[i + 1]]) for i in range(len(bounds) - 1)]


def disorder(pieces: list[tuple[int, bytes]], draw: st.DrawFn, anchored: bool) -> list[tuple[int, bytes, bool]]:
    """Reordered (a random permutation) with random exact duplicates; (offset, data, is_original).

    `anchored`: the first piece stays first. Without a SYN, the tracker takes the first
    segment it sees on a direction as the start of the stream (it may join a connection in
    the middle), so a stream whose very first segment arrives late cannot round-trip.
    """
    order = list(draw(st.permutations(range(len(pieces))))) if pieces else []
    if anchored and order:
        order.remove(0)
        order.insert(0, 0)
    out: list[tuple[int, bytes, bool]] = []
    for index in order:
        out.append((*pieces[index], True))
        if draw(st.integers(0, 4)) == 0:
            out.append((*pieces[index], False))
    return out


@st.composite
def conversations(draw: st.DrawFn) -> tuple[list[Spec], list[Segment], list[tuple[int, int]]]:
    """Segments of one keep-alive connection carrying the specs, and each exchange's (start, end) ns."""
    items = draw(st.lists(specs, min_size=1, max_size=4))
    client_isn = draw(st.integers(0, (1 << 32) - 1))
    server_isn = draw(st.integers(0, (1 << 32) - 1))
    segments: list[Segment] = []
    times: list[tuple[int, int]] = []
    offsets = {"c": 0, "s": 0}
    ts = 1_000_000_000
    handshake = draw(st.booleans())
    if handshake:  # as a pcap has it: SYN and SYN-ACK anchor both directions
        segments.append(Segment(ts, CLIENT, 40000, SERVER, PORT, (client_isn - 1) & 0xFFFFFFFF, SYN, b"", 0))
        segments.append(Segment(ts, SERVER, PORT, CLIENT, 40000, (server_isn - 1) & 0xFFFFFFFF, SYN | ACK, b"", 0))
    for spec in items:
        span = []
        for side, data in (("c", spec.request()), ("s", spec.response())):
            base = offsets[side]
            pieces = cut(data, draw)
            first_ts = last_ts = 0
            for offset, piece, original in disorder(pieces, draw, anchored=not handshake and base == 0):
                ts += 1000
                seq = ((client_isn if side == "c" else server_isn) + base + offset) & 0xFFFFFFFF
                if side == "c":
                    seg = Segment(ts, CLIENT, 40000, SERVER, PORT, seq, DATA, piece, len(piece))
                else:
                    seg = Segment(ts, SERVER, PORT, CLIENT, 40000, seq, DATA, piece, len(piece))
                segments.append(seg)
                if original and offset == 0:
                    first_ts = ts
                if original and offset + len(piece) == len(data):
                    last_ts = ts
            offsets[side] += len(data)
            span.append(first_ts if side == "c" else last_ts)
        times.append((span[0], span[1]))
    return items, segments, times


@fuzz(500)
@given(conversations())
def test_valid_exchanges_round_trip_exactly(
    conversation: tuple[list[Spec], list[Segment], list[tuple[int, int]]],
) -> None:
    items, segments, times = conversation
    tracker = Tracker([PORT])
    out: list[Exchange] = []
    for segment in segments:
        out += tracker.feed(segment)
    out += tracker.flush()
    expected = [
        Exchange(s.method, s.path, s.status, start, end, len(s.request_body), s.expected_response_bytes(), PORT,
                 server_ip=SERVER)
        for s, (start, end) in zip(items, times, strict=True)
    ]
    assert out == expected
    errors = {k: v for k, v in tracker.stats.parse_errors.items() if v}
    assert errors == {}
    assert tracker.stats.unmatched_responses == 0
    assert tracker.stats.requests_without_response == 0


# -- garbage never raises, memory stays capped --------------------------------------------

class Sink:
    def __init__(self) -> None:
        self.requests: list[PendingRequest] = []
        self.methods: list[str] = []

    def on_request(self, request: PendingRequest) -> None:
        self.requests.append(request)
        del self.requests[:-8]

    def on_response_head(self, status: int, ts_ns: int) -> str | None:
        return "GET"

    def on_response_complete(self, status: int, end_ns: int, body_bytes: int) -> None:
        pass

    def on_response_lost(self) -> None:
        pass

    def on_upgrade(self, protocol: str) -> None:
        pass


def mutate(data: bytes, draw: st.DrawFn) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "dup"]))
        at = draw(st.integers(0, len(out)))
        if op == "flip" and at < len(out):
            out[at] = draw(st.integers(0, 255))
        elif op == "insert":
            out[at:at] = draw(st.sampled_from([b"\r\n", b"\n", b":", b" ", b"\x00", b"HTTP/1.1 200 OK\r\n",
                                               b"GET / HTTP/1.1\r\n", b"Content-Length: 99999999999\r\n",
                                               b"Transfer-Encoding: chunked\r\n", b"ffffffffffff\r\n"]))
        elif op == "delete":
            del out[at:at + draw(st.integers(1, 8))]
        elif op == "dup":
            out[at:at] = out[at:at + draw(st.integers(1, 40))]
    return bytes(out)


@st.composite
def hostile_streams(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "mutated", "mixed"]))
    if kind == "random":
        return draw(st.binary(max_size=3000))
    streams = draw(st.lists(specs, min_size=1, max_size=3))
    data = b"".join(s.request() + s.response() for s in streams)
    if kind == "mixed":
        data += draw(st.binary(max_size=500)) + b"x" * draw(st.integers(0, 5000))
    return mutate(data, draw)


SMALL = Limits(max_flows=8, max_buffered_bytes=2048, max_pending_requests=4, max_header_bytes=1024,
               idle_timeout_ns=10**9, max_held_bytes_total=6000)


@fuzz(700)
@given(hostile_streams(), st.lists(st.integers(1, 700), min_size=1, max_size=12), st.integers(0, 3000),
       st.sampled_from(["request", "response"]))
def test_parsers_never_raise_and_stay_under_their_buffer(data: bytes, sizes: list[int], missing: int,
                                                         direction: str) -> None:
    errors: dict[str, int] = {}
    sink = Sink()
    parser: RequestParser | ResponseParser
    if direction == "request":
        parser = RequestParser(sink, errors, SMALL.max_header_bytes, SMALL.max_buffered_bytes)
    else:
        parser = ResponseParser(sink, errors, SMALL.max_header_bytes, SMALL.max_buffered_bytes)
    pos, ts, i = 0, 1, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        i += 1
        parser.feed(data[pos:pos + size], ts, missing if i == 3 else 0)
        pos += size
        ts += 1
        assert parser.buffered_bytes <= SMALL.max_buffered_bytes
    if direction == "request":
        assert isinstance(parser, RequestParser)
        parser.finish()
    else:
        assert isinstance(parser, ResponseParser)
        parser.finish(graceful=True)
    assert all(count >= 0 for count in errors.values())


@st.composite
def hostile_segments(draw: st.DrawFn) -> list[Segment]:
    """Segments of a few flows: garbage or mutated HTTP, at random sequence numbers and flags."""
    out = []
    clients = draw(st.lists(st.integers(40000, 40011), min_size=1, max_size=12))
    next_seq: dict[tuple[int, str], int] = {}
    pool = draw(st.lists(hostile_streams(), min_size=1, max_size=3))
    for index in range(draw(st.integers(1, 40))):
        port = clients[index % len(clients)]
        side = draw(st.sampled_from("cs"))
        source = pool[draw(st.integers(0, len(pool) - 1))]
        start = draw(st.integers(0, len(source)))
        payload = source[start:start + draw(st.integers(0, 1600))]
        key = (port, side)
        seq = next_seq.get(key, draw(st.integers(0, (1 << 32) - 1)))
        jump = draw(st.sampled_from([0, 0, 0, 1, -5, 100, 4000, 1 << 31, -(1 << 20)]))
        seq = (seq + jump) & 0xFFFFFFFF
        next_seq[key] = (seq + len(payload)) & 0xFFFFFFFF
        flags = draw(st.sampled_from([DATA, DATA, DATA, ACK, SYN, SYN | ACK, FIN | ACK, RST, DATA | FIN]))
        length = len(payload) + draw(st.sampled_from([0, 0, 0, 10, 5000]))  # truncated by the kernel
        keep = payload
        ts = 1_000 + index * 1000
        if side == "c":
            out.append(Segment(ts, CLIENT, port, SERVER, PORT, seq, flags, keep, length))
        else:
            out.append(Segment(ts, SERVER, PORT, CLIENT, port, seq, flags, keep, length))
    return out


@fuzz(350)
@given(hostile_segments(), st.booleans())
def test_tracker_never_raises_and_respects_every_cap(segments: list[Segment], expire: bool) -> None:
    assume(segments)
    tracker = Tracker([PORT], SMALL)
    for segment in segments:
        for exchange in tracker.feed(segment):
            assert exchange.server_port == PORT
            assert exchange.request_body_bytes >= 0 and exchange.response_body_bytes >= 0
        flows = tracker._flows
        assert len(flows) <= SMALL.max_flows
        assert tracker.stats.flows_active == len(flows)
        for flow in flows.values():
            for side, parser in ((flow.client, flow.requests), (flow.server, flow.responses)):
                # One held segment is allowed whatever its size; more must fit the allowance.
                assert len(side.held) <= 1 or side.held_bytes + parser.buffered_bytes <= SMALL.max_buffered_bytes
            assert len(flow.pending) <= SMALL.max_pending_requests
            assert len(flow.skipped) <= SMALL.max_pending_requests
        held = sum(flow.client.held_bytes + flow.server.held_bytes for flow in flows.values())
        assert tracker.stats.held_bytes == held <= SMALL.max_held_bytes_total
    if expire:
        tracker.expire(10**15)
    tracker.flush()
    assert len(tracker._flows) == 0 and tracker.stats.flows_active == 0
    assert tracker.stats.held_bytes == 0


# -- the one-segment head scan against the general search ----------------------------------

# Header lines, well formed and not: a whole head in one segment is checked by one scan
# (`_REQUEST_HEAD` or `_STATUS_HEAD`, then `_HEADER_LINES` from its first framing header on) that finds its
# blank line, and parsed in place; a head fed byte by byte goes through the general search and
# is parsed from a copy. Lines end in CRLF here, where the two must agree exactly.
HEAD_LINES = st.sampled_from([
    b"Host: a", b"X-Id:1", b"cookie: c=1; d=2", b"Content-Length: 3", b"content-length: x",
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip", b"Upgrade: h2c", b"No colon here",
    b" folded: line", b"Bad Name: v", b"A: bare\rcr", b"B:\r", b":empty-name", b"C: \x00\x7f\xff", b"D:",
    b"cOnTeNt-LeNgTh: 0", b"TRANSFER-encoding: chunked", b"Content-Lengthy: 9", b"X-Transfer-Encoding: gzip",
])


class EventSink(Sink):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[object, ...]] = []

    def on_request(self, request: PendingRequest) -> None:
        self.events.append(("request", request.method, request.target, request.start_ns))

    def on_response_head(self, status: int, ts_ns: int) -> str | None:
        self.events.append(("head", status, ts_ns))
        return "GET"

    def on_response_complete(self, status: int, end_ns: int, body_bytes: int) -> None:
        self.events.append(("complete", status, end_ns, body_bytes))

    def on_upgrade(self, protocol: str) -> None:
        self.events.append(("upgrade", protocol))


# First lines, good and bad (a bad one fails the whole-head scan, which then leaves it to the
# general search). The bad ones show only at their line's end: one that a partial head already
# rejects resyncs at another byte when fed byte by byte, as on main.
FIRST_LINES = {
    "request": [b"GET /a?b HTTP/1.1", b"POST / HTTP/1.0", b"GET /a HTTP/1.1 x", b"GET  / HTTP/1.1", b"GET /a HTTP/2.0"],
    "response": [b"HTTP/1.1 200 OK", b"HTTP/1.0 204", b"HTTP/1.1 2000", b"HTTP/1.1 200 O\rK", b"HTTP/1.1 20x OK"],
}


@fuzz(300)
@given(st.lists(st.tuples(st.integers(0, 4), st.lists(HEAD_LINES, max_size=6)), min_size=1, max_size=4),
       st.sampled_from(["request", "response"]))
def test_a_head_whole_in_one_segment_parses_as_one_fed_byte_by_byte(messages: list[tuple[int, list[bytes]]],
                                                                    direction: str) -> None:
    firsts = FIRST_LINES[direction]
    stream = b"".join(firsts[first] + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
                      for first, lines in messages)
    outcomes = []
    for sizes in (len(stream), 1):
        errors: dict[str, int] = {}
        sink = EventSink()
        parser = (RequestParser(sink, errors) if direction == "request" else ResponseParser(sink, errors))
        for at in range(0, len(stream), sizes):
            parser.feed(stream[at:at + sizes], 7)
        outcomes.append((sink.events, {reason: n for reason, n in errors.items() if n}))
    assert outcomes[0] == outcomes[1]


@fuzz(300)
@given(st.lists(st.sampled_from([b"a", b"B", b":", b" ", b"\r", b"\n", b"\t", b"-", b"\x00", b"\x7f", b"\xff",
                                 b"\r\n", b"x:y\r\n", b"(", b"/"]), max_size=16))
def test_header_lines_check_accepts_exactly_the_one_pattern_it_replaces(parts: list[bytes]) -> None:
    one_pattern = re.compile(rb"(?:[" + _TCHAR + rb"]+:[^\r\n]*\r?\n)*")  # the grammar, slow in sre
    block = b"".join(parts)
    assert _header_fields_ok(block, 0) == (one_pattern.fullmatch(block) is not None)


def _framing_by_lowering(head: bytes) -> tuple[int, int]:
    """The framing rules as first written (a lowered copy searched per name): the oracle."""
    lower = head.lower()
    at = lower.rfind(b"\ntransfer-encoding:")
    if at < 0 and b"\ncontent-length:" not in lower:
        return http1._HEAD, 0
    if at >= 0:
        value = lower[at + 19 : lower.find(b"\n", at + 1)]
        return (http1._CHUNK_SIZE, 0) if value.rsplit(b",", 1)[-1].strip() == b"chunked" else (http1._CLOSE_BODY, 0)
    at = lower.find(b"\ncontent-length:")
    length = -1
    while at >= 0:
        value_end = lower.find(b"\n", at + 1)
        value = lower[at + 16 : value_end].strip()
        if not value.isdigit():
            values = {item.strip() for item in value.split(b",")}
            if len(values) != 1:
                return http1._BODY, -1
            value = values.pop()
            if not value.isdigit():
                return http1._BODY, -1
        if len(value) > 18:
            return http1._BODY, -1
        if length >= 0 and int(value) != length:
            return http1._BODY, -1
        length = int(value)
        at = lower.find(b"\ncontent-length:", value_end)
    return http1._BODY, length


FRAMING_LINES = st.sampled_from([
    b"Host: a", b"Content-Length: 12", b"content-length:12", b"CONTENT-LENGTH: 7", b"Content-Length: 12, 12",
    b"Content-Length: 1,2", b"Content-Length: x", b"Content-Length: 0012", b"Content-Length: 1234567890123456789",
    b"Content-Length:", b"Transfer-Encoding: chunked", b"transfer-encoding: gzip, CHUNKED", b"TRANSFER-ENCODING: gzip",
    b"X-Content-Length: 3", b"Content-Lengths: 4",
])


@fuzz(300)
@given(st.lists(FRAMING_LINES, max_size=6))
def test_framing_in_one_scan_equals_the_lowered_copy_searched_per_name(lines: list[bytes]) -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(line + b"\r\n" for line in lines)
    assert http1._framing(head, 0, len(head)) == _framing_by_lowering(head)


# -- the head memo (http1.HeadMemo) ---------------------------------------------------------

STATUS_LINES = [b"HTTP/1.1 200 OK", b"HTTP/1.1 204 No Content", b"HTTP/1.1 304", b"HTTP/1.1 100 Continue",
                b"HTTP/1.1 101 Switching", b"HTTP/1.0 200", b"HTTP/1.1 2000", b"HTTP/1.1 20x OK"]
REQUEST_LINES = [b"GET /a?b HTTP/1.1", b"POST / HTTP/1.0", b"HEAD /h HTTP/1.1", b"CONNECT h:443 HTTP/1.1",
                 b"GET /a HTTP/1.1 x", b"GET /a HTTP/2.0"]


class MemoSink(EventSink):
    """Every call recorded; final heads answer GET, HEAD and CONNECT in turn."""

    def __init__(self) -> None:
        super().__init__()
        self.answers = 0

    def on_response_head(self, status: int, ts_ns: int) -> str | None:
        super().on_response_head(status, ts_ns)
        self.answers += 1
        return ("GET", "HEAD", "CONNECT")[self.answers % 3]

    def on_response_lost(self) -> None:
        self.events.append(("lost",))


@st.composite
def repeated_heads(draw: st.DrawFn) -> tuple[str, list[bytes]]:
    """Segments of one direction: a few messages (heads from good and bad lines, CRLF or bare LF,
    a body of its Content-Length or not), sent again and again, a message or a random cut per segment."""
    direction = draw(st.sampled_from(["request", "response"]))
    firsts = REQUEST_LINES if direction == "request" else STATUS_LINES
    eols = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"])  # each line's own, the blank one's too
    pool = []
    for _ in range(draw(st.integers(1, 3))):
        lines = [draw(st.sampled_from(firsts)), *draw(st.lists(HEAD_LINES, max_size=4)), b""]
        pool.append(b"".join(line + draw(eols) for line in lines) + draw(st.sampled_from([b"", b"abc", b"0\r\n\r\n"])))
    messages = [pool[i] for i in draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=10))]
    if draw(st.booleans()):
        return direction, messages
    stream = b"".join(messages)
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=6)))
    return direction, [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True) if a < b]


@fuzz(400)
@given(repeated_heads(), st.sampled_from([32768, 40, 12]))
def test_the_head_memo_changes_no_outcome(segments: tuple[str, list[bytes]], max_header_bytes: int) -> None:
    """Parsers sharing a HeadMemo table, empty or filled by an earlier connection's same bytes (under
    the default head limit), report exactly what a parser without one reports: the same calls, in
    order, and the same errors."""
    direction, pieces = segments
    memo, filled = http1.HeadMemo(), http1.HeadMemo()
    outcomes = []
    # No table; a fresh one; the one the previous run filled; one filled under the default limit.
    for known, limit in ((None, max_header_bytes), (memo, max_header_bytes), (memo, max_header_bytes),
                         (filled, 32768), (filled, max_header_bytes)):
        errors: dict[str, int] = {}
        sink = MemoSink()
        parser: RequestParser | ResponseParser
        if direction == "request":
            parser = RequestParser(sink, errors, limit, 65536, known.requests if known else None)
        else:
            parser = ResponseParser(sink, errors, limit, 65536, known.responses if known else None)
        for ts, piece in enumerate(pieces):
            parser.feed(piece, ts)
        parser.finish()
        outcomes.append((sink.events, {reason: n for reason, n in errors.items() if n}))
    assert outcomes[1] == outcomes[0]
    assert outcomes[2] == outcomes[0]
    assert outcomes[4] == outcomes[0]


# -- the line memo (http1.LineTable) ----------------------------------------------------------

BARE_LF_LINES = [b"E: f\nG: h", b"E: f\n folded", b"E: f\nContent-Length: 2", b"E: f\n"]


@fuzz(400)
@given(st.lists(HEAD_LINES | st.sampled_from(BARE_LF_LINES), min_size=1, max_size=5),
       st.lists(st.tuples(st.integers(0, 4), HEAD_LINES | st.sampled_from(BARE_LF_LINES)), max_size=8),
       st.sampled_from(REQUEST_LINES))
def test_the_line_memo_changes_no_outcome(lines: list[bytes], swaps: list[tuple[int, bytes]], first: bytes) -> None:
    """A run of request heads, each the last with one line replaced (a new id, a new traceparent),
    through parsers sharing a HeadMemo (its LineTable remembers lines and the last head's) on two
    connections in turn, reports exactly what parsers without one report."""
    heads = []
    for at, line in [(0, lines[0]), *swaps]:
        lines = [*lines]
        lines[at % len(lines)] = line
        heads.append(first + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n")
    outcomes = []
    for memo in (None, http1.HeadMemo()):
        errors: dict[str, int] = {}
        sinks = [MemoSink(), MemoSink()]
        parsers = [RequestParser(sink, errors, 32768, 65536, memo.requests if memo else None) for sink in sinks]
        for ts, head in enumerate(heads * 2):
            parsers[ts % 2].feed(head, ts)
        outcomes.append(([sink.events for sink in sinks], {reason: n for reason, n in errors.items() if n}))
    assert outcomes[1] == outcomes[0]


# What changes in the same place from head to head: mostly a plain line of a new value, sometimes not plain.
VARYING_LINES = st.sampled_from([b"traceparent: 00-1", b"traceparent: 00-22", b"X-Id:3", b"A: bare\rcr", b"B:\r",
                                 b"E: f\nG: h", b" folded: line", b"Content-Length: 3", b"tRaNsFeR-eNcOdInG: x"])
ODD_LINES = HEAD_LINES | st.sampled_from(BARE_LF_LINES)


@fuzz(400)
@given(st.lists(st.sampled_from([b"Host: a", b"X-Id:1", b"cookie: c=1; d=2", b"Upgrade: h2c", b"D:"]),
                min_size=2, max_size=6),
       st.integers(0, 5), st.integers(1, 2),
       st.lists(st.tuples(st.lists(VARYING_LINES, min_size=2, max_size=2),
                          st.none() | st.none() | st.tuples(st.integers(0, 5), ODD_LINES)),
                min_size=2, max_size=12))
def test_heads_that_change_in_the_same_lines_parse_as_without_the_line_memo(
        lines: list[bytes], at: int, width: int, steps: list[tuple[list[bytes], tuple[int, bytes] | None]]) -> None:
    """Heads whose lines change in the same place each time (a traceparent, an id: what LineTable
    compares around, and only checks), now and then elsewhere too, with any line in that place:
    the parser's calls and errors are those of a parser without the memo."""
    at %= len(lines)
    heads = []
    for varying, elsewhere in steps:
        lines = [*lines]
        lines[at : at + width] = varying[:width]
        if elsewhere is not None:
            lines[elsewhere[0] % len(lines)] = elsewhere[1]
        heads.append(b"GET /a HTTP/1.1\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n")
    outcomes = []
    for memo in (None, http1.HeadMemo()):
        errors: dict[str, int] = {}
        sink = MemoSink()
        parser = RequestParser(sink, errors, 32768, 65536, memo.requests if memo else None)
        for ts, head in enumerate(heads):
            parser.feed(head, ts)
        outcomes.append((sink.events, {reason: n for reason, n in errors.items() if n}))
    assert outcomes[1] == outcomes[0]
