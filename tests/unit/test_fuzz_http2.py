"""Property-based fuzzing of the HTTP/2 reader through the flow tracker (hypothesis).

- Valid conversations (real frames from the `h2` state machine on both sides: many streams,
  request bodies, responses with or without trailers, resets), cut into random segments, round
  trip exactly: one exchange per stream with method, path, status, body sizes and the kernel
  timestamps of the first request byte and the last response byte.
- Random bytes after a preface, and mutated valid streams, never raise; buffered bytes stay
  bounded and open streams stay under their cap.

Example counts: tests/unit/fuzz_settings.py (EBPF_SLO_FUZZ=long for `make fuzz`).
"""

from __future__ import annotations

from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
from hypothesis import given
from hypothesis import strategies as st

from exporter.core.flows import Limits, Tracker
from exporter.core.http2 import PREFACE, RESET_STATUS
from exporter.core.model import ACK, PSH, Exchange, Segment
from tests.unit.fuzz_settings import fuzz

PORT = 8443
CLIENT, SERVER = "10.2.0.1", "10.2.0.2"
DATA = ACK | PSH

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH"]
STATUSES = [200, 201, 204, 301, 400, 404, 500, 503]
word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~", min_size=1, max_size=10)


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    request_body: bytes
    status: int
    response_body: bytes
    trailers: bool
    reset: bool  # the client resets the stream instead of waiting for the response


calls = st.builds(
    Call,
    st.sampled_from(METHODS),
    st.lists(word, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts)),
    st.binary(max_size=300),
    st.sampled_from(STATUSES),
    st.binary(max_size=3000),
    st.booleans(),
    st.booleans(),
)


def conversation(spec: list[Call], order: list[int]) -> tuple[list[tuple[bool, bytes, int]], list[Exchange]]:
    """Chunks (to_server, bytes, call index) from real h2 endpoints, and the exchanges they must give.

    Requests go out in spec order; responses in `order`. Each chunk is one send.
    """
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, validate_inbound_headers=False))
    client.initiate_connection()
    server.initiate_connection()
    chunks: list[tuple[bool, bytes, int]] = [(True, client.data_to_send(), -1), (False, server.data_to_send(), -1)]
    server.receive_data(chunks[0][1])
    client.receive_data(chunks[1][1])
    chunks.append((False, server.data_to_send(), -1))
    chunks.append((True, client.data_to_send(), -1))
    streams = []
    for index, call in enumerate(spec):
        stream = client.get_next_available_stream_id()
        streams.append(stream)
        headers = [(":method", call.method), (":scheme", "http"), (":path", call.path + "?q=1"),
                   (":authority", "fuzz")]
        client.send_headers(stream, headers, end_stream=not call.request_body)
        if call.request_body:
            client.send_data(stream, call.request_body, end_stream=True)
        out = client.data_to_send()
        chunks.append((True, out, index))
        server.receive_data(out)
    server_bytes = server.data_to_send()
    if server_bytes:
        chunks.append((False, server_bytes, -1))
    for index in order:
        call = spec[index]
        stream = streams[index]
        if call.reset:
            client.reset_stream(stream, error_code=8)
            out = client.data_to_send()
            chunks.append((True, out, index))
            server.receive_data(out)
            continue
        server.send_headers(stream, [(":status", str(call.status))],
                            end_stream=not call.response_body and not call.trailers)
        if call.response_body:
            server.send_data(stream, call.response_body, end_stream=not call.trailers)
        if call.trailers:
            server.send_headers(stream, [("x-done", "1")], end_stream=True)
        chunks.append((False, server.data_to_send(), index))
    return chunks, []


def expected(spec: list[Call], starts: dict[int, int], ends: dict[int, int]) -> list[Exchange]:
    out = []
    for index, call in enumerate(spec):
        status = RESET_STATUS if call.reset else call.status
        response = 0 if call.reset else len(call.response_body)
        out.append(Exchange(call.method, call.path, status, starts[index], ends[index], len(call.request_body),
                            response, PORT, "http", "2", server_ip="10.2.0.2"))
    return out


@fuzz(150)
@given(st.lists(calls, min_size=1, max_size=6), st.randoms(use_true_random=False), st.data())
def test_valid_conversations_round_trip_exactly(spec: list[Call], rng, draw) -> None:  # type: ignore[no-untyped-def]
    order = list(range(len(spec)))
    rng.shuffle(order)
    chunks, _ = conversation(spec, order)
    tracker = Tracker([PORT])
    seq = {True: 1000, False: 5000}
    ts = 0
    starts: dict[int, int] = {}
    ends: dict[int, int] = {}
    out: list[Exchange] = []
    for to_server, payload, index in chunks:
        # Cut each send into 1..4 segments anywhere.
        cuts = sorted(draw.draw(st.lists(st.integers(1, max(1, len(payload) - 1)), max_size=3)))
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True) if b > a]
        for number, piece in enumerate(pieces):
            ts += 1
            if index >= 0 and number == 0 and index not in starts and to_server:
                starts[index] = ts
            if index >= 0 and number == len(pieces) - 1 and (to_server == spec[index].reset or not to_server):
                ends[index] = ts
            if to_server:
                segment = Segment(ts, CLIENT, 40000, SERVER, PORT, seq[True], DATA, piece, len(piece))
            else:
                segment = Segment(ts, SERVER, PORT, CLIENT, 40000, seq[False], DATA, piece, len(piece))
            seq[to_server] += len(piece)
            out += tracker.feed(segment)
    out += tracker.flush()
    # A request sent with its body in one send: the start is the first byte of that send.
    assert sorted(out, key=lambda e: e.start_ns) == expected(spec, starts, ends)
    stats = tracker.stats.http2
    assert sum(stats.parse_errors.values()) == 0 and stats.undecodable_streams == 0


@fuzz(400)
@given(st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=12), st.booleans())
def test_random_bytes_after_a_preface_never_raise(pieces: list[bytes], both: bool) -> None:
    limits = Limits(max_h2_streams=4, max_header_bytes=512, max_buffered_bytes=4096)
    tracker = Tracker([PORT], limits)
    seq = {True: 1, False: 1}
    pieces = [PREFACE, *pieces]
    for number, piece in enumerate(pieces):
        to_server = number % 2 == 0 or not both
        if to_server:
            segment = Segment(number, CLIENT, 40000, SERVER, PORT, seq[True], DATA, piece, len(piece))
        else:
            segment = Segment(number, SERVER, PORT, CLIENT, 40000, seq[False], DATA, piece, len(piece))
        seq[to_server] += len(piece)
        tracker.feed(segment)
        for flow in tracker._flows.values():
            assert flow.requests.buffered_bytes <= 512 + 9 + 24
            assert flow.responses.buffered_bytes <= 512 + 9
            if flow.h2 is not None:
                assert len(flow.h2.streams) <= 4
    tracker.flush()


@fuzz(300)
@given(st.lists(calls, min_size=1, max_size=4), st.integers(0, 10_000), st.binary(min_size=1, max_size=8),
       st.booleans())
def test_mutated_conversations_never_raise(spec: list[Call], where: int, junk: bytes, replace: bool) -> None:
    chunks, _ = conversation(spec, list(range(len(spec))))
    stream = {True: b"".join(c[1] for c in chunks if c[0]), False: b"".join(c[1] for c in chunks if not c[0])}
    side = where % 2 == 0
    raw = stream[side]
    at = where % max(1, len(raw))
    stream[side] = raw[:at] + junk + raw[at + (len(junk) if replace else 0):]
    tracker = Tracker([PORT], Limits(max_h2_streams=8))
    for to_server in (True, False):
        data = stream[to_server]
        for offset in range(0, len(data), 97):
            piece = data[offset:offset + 97]
            if to_server:
                tracker.feed(Segment(offset, CLIENT, 40000, SERVER, PORT, 1 + offset, DATA, piece, len(piece)))
            else:
                tracker.feed(Segment(offset, SERVER, PORT, CLIENT, 40000, 1 + offset, DATA, piece, len(piece)))
    for exchange in tracker.flush():
        assert exchange.protocol_version == "2"
