"""HTTP/2 and gRPC: bytes in (frames built with hyperframe + hpack), exchanges out."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from exporter.core.flows import Limits, Tracker
from exporter.core.http2 import (
    GRPC_STATUS_MISSING,
    GRPC_STATUS_RESET,
    PREFACE,
    RESET_STATUS,
    BlockCache,
    CachedDecoder,
    looks_like_frames,
)
from exporter.core.model import SYN, Exchange, RpcCall
from tests.unit.test_flows import PORT, Conn

Fields = Sequence[tuple[str, str]]


class Peer:
    """One side's HPACK encoder: header blocks in the order they go on the wire."""

    def __init__(self) -> None:
        self.encoder = Encoder()

    def headers(self, stream: int, fields: Fields, end_stream: bool = False, flags: Sequence[str] = (),
                **kw: int) -> HeadersFrame:
        frame = HeadersFrame(stream, self.encoder.encode(fields), **kw)
        frame.flags.add("END_HEADERS")
        if end_stream:
            frame.flags.add("END_STREAM")
        for flag in flags:
            frame.flags.add(flag)
        return frame


def wire(*frames: Frame) -> bytes:
    return b"".join(frame.serialize() for frame in frames)


def data(stream: int, body: bytes, end_stream: bool = False, pad: int = 0) -> DataFrame:
    frame = DataFrame(stream, body)
    if end_stream:
        frame.flags.add("END_STREAM")
    if pad:
        frame.flags.add("PADDED")
        frame.pad_length = pad
    return frame


def get(path: str, method: str = "GET", extra: Fields = ()) -> list[tuple[str, str]]:
    return [(":method", method), (":scheme", "http"), (":path", path), (":authority", "localhost"), *extra]


def grpc_call(service_method: str) -> list[tuple[str, str]]:
    return get(f"/{service_method}", "POST", (("content-type", "application/grpc"), ("te", "trailers")))


def settings() -> SettingsFrame:
    return SettingsFrame(0)


def run(steps: Sequence[tuple[str, bytes, int]], limits: Limits | None = None, conn: Conn | None = None,
        hint_skips: bool = False) -> tuple[list[Exchange], Tracker]:
    conn = conn or Conn()
    tracker = Tracker([PORT], limits or Limits(), hint_skips=hint_skips)
    out: list[Exchange] = []
    for side, payload, ts in steps:
        out += tracker.feed(conn.seg(side, payload, ts))
    out += tracker.flush()
    return out, tracker


def h2(method: str, target: str, status: int, start: int, end: int, req: int = 0, resp: int = 0,
       rpc: RpcCall | None = None) -> Exchange:
    return Exchange(method, target, status, start, end, req, resp, PORT, "http", "2", rpc, server_ip="10.0.0.2")


def test_prior_knowledge_get_one_exchange_timed_on_segments() -> None:
    client, server = Peer(), Peer()
    out, tracker = run([
        ("c", PREFACE + wire(settings()), 1),
        ("s", wire(settings(), SettingsFrame(0, flags=["ACK"])), 2),
        ("c", wire(client.headers(1, get("/a/b?x=1"), end_stream=True)), 10),
        ("s", wire(server.headers(1, [(":status", "200")]), data(1, b"0123456789")), 20),
        ("s", wire(data(1, b"abc", end_stream=True)), 25),
    ])
    assert out == [h2("GET", "/a/b", 200, 10, 25, 0, 13)]
    stats = tracker.stats.http2
    assert stats.connections == {"prior_knowledge": 1, "upgrade": 0, "mid_stream": 0}
    assert stats.frames[0] == 2 and stats.frames[1] == 2 and stats.frames[4] == 3
    assert sum(stats.parse_errors.values()) == 0
    assert sum(tracker.stats.parse_errors.values()) == 0


def test_preface_cut_by_segment_end() -> None:
    client, server = Peer(), Peer()
    first = PREFACE + wire(settings(), client.headers(1, get("/"), end_stream=True))
    out, _ = run([
        ("c", first[:10], 1),
        ("c", first[10:], 2),
        ("s", wire(settings(), server.headers(1, [(":status", "204")], end_stream=True)), 7),
    ])
    assert out == [h2("GET", "/", 204, 1, 7)]


def test_interleaved_streams_answered_out_of_order_frames_split_anywhere() -> None:
    client, server = Peer(), Peer()
    request_frames = [
        wire(client.headers(1, get("/one"))),
        wire(client.headers(3, get("/two", "POST"))),
        wire(data(3, b"x" * 5)),
        wire(data(1, b"y" * 7, end_stream=True)),
        wire(data(3, b"z", end_stream=True)),
    ]
    response_frames = [
        wire(server.headers(3, [(":status", "201")])),
        wire(server.headers(1, [(":status", "404")])),
        wire(data(3, b"q" * 100, end_stream=True)),
        wire(data(1, b"r" * 50)),
        wire(data(1, b"", end_stream=True)),
    ]
    request, response = b"".join(request_frames), b"".join(response_frames)
    steps = [("c", PREFACE + wire(settings()), 1), ("s", wire(settings()), 2)]
    # Cut every 7 bytes: frame headers and header blocks straddle segments; ts = 10 + offset.
    for at in range(0, len(request), 7):
        steps.append(("c", request[at:at + 7], 10 + at))
    for at in range(0, len(response), 7):
        steps.append(("s", response[at:at + 7], 1000 + at))
    out, tracker = run(steps)

    def stamp(base: int, offset: int) -> int:
        return base + offset // 7 * 7  # the segment that carries byte `offset`

    stream3_start = stamp(10, len(request_frames[0]))
    stream3_end = stamp(1000, sum(map(len, response_frames[:3])) - 1)
    assert out == [
        h2("POST", "/two", 201, stream3_start, stream3_end, 6, 100),
        h2("GET", "/one", 404, 10, stamp(1000, len(response) - 1), 7, 50),
    ]
    assert sum(tracker.stats.http2.parse_errors.values()) == 0


def test_continuation_padding_and_priority() -> None:
    client, server = Peer(), Peer()
    block = client.encoder.encode(get("/cont", extra=(("x-long", "v" * 300),)))
    head = HeadersFrame(1, block[:40], pad_length=4, depends_on=0, stream_weight=16)
    head.flags.add("PADDED")
    head.flags.add("PRIORITY")
    tail = ContinuationFrame(1, block[40:])
    tail.flags.add("END_HEADERS")
    response_head = HeadersFrame(1, server.encoder.encode([(":status", "200")]), pad_length=3)
    response_head.flags.add("PADDED")
    response_head.flags.add("END_HEADERS")
    out, tracker = run([
        ("c", PREFACE + wire(settings(), head, tail, data(1, b"abcd", end_stream=True, pad=9)), 5),
        ("s", wire(settings(), response_head, data(1, b"12345678", pad=200), PingFrame(0, b"12345678"),
                   WindowUpdateFrame(1, 10), data(1, b"9", end_stream=True)), 9),
    ])
    assert out == [h2("GET", "/cont", 200, 5, 9, 4, 9)]
    assert sum(tracker.stats.http2.parse_errors.values()) == 0


def test_one_frame_headers_with_priority_and_padding_among_whole_frames() -> None:
    # Whole frames back to back in one segment, each flag combination of a one-frame HEADERS.
    client, server = Peer(), Peer()
    plain = client.headers(1, get("/plain"), end_stream=True)
    prioritised = client.headers(3, get("/priority"), end_stream=True, flags=["PRIORITY"],
                                 depends_on=1, stream_weight=200)
    both = client.headers(5, get("/both"), end_stream=True, flags=["PRIORITY", "PADDED"], depends_on=0,
                          stream_weight=1, pad_length=7)
    out, tracker = run([
        ("c", PREFACE + wire(settings(), plain, prioritised, both), 1),
        ("s", wire(settings(), server.headers(5, [(":status", "201")], flags=["PADDED"], pad_length=2),
                   data(5, b"abc", end_stream=True), server.headers(1, [(":status", "200")], end_stream=True),
                   server.headers(3, [(":status", "404")]), data(3, b"", end_stream=True)), 2),
    ])
    assert sorted(out, key=lambda e: e.target) == [
        h2("GET", "/both", 201, 1, 2, 0, 3), h2("GET", "/plain", 200, 1, 2), h2("GET", "/priority", 404, 1, 2)]
    assert sum(tracker.stats.http2.parse_errors.values()) == 0


def test_reset_stream_is_its_own_status_never_a_success() -> None:
    client, server = Peer(), Peer()
    out, tracker = run([
        ("c", PREFACE + wire(settings(), client.headers(1, get("/slow"), end_stream=True)), 1),
        ("s", wire(settings(), server.headers(1, [(":status", "200")]), data(1, b"part")), 2),
        ("c", wire(RstStreamFrame(1, error_code=8)), 30),
        # Frames on the stream after the reset are ignored.
        ("s", wire(data(1, b"late", end_stream=True)), 31),
    ])
    assert out == [h2("GET", "/slow", RESET_STATUS, 1, 30, 0, 4)]
    assert tracker.stats.http2.reset_streams == 1


def test_grpc_unary_server_streaming_trailers_only_and_reset() -> None:
    client, server = Peer(), Peer()
    message = b"\x00\x00\x00\x00\x03abc"
    ok_trailers = [("grpc-status", "0"), ("grpc-message", "")]
    out, _ = run([
        ("c", PREFACE + wire(settings(), client.headers(1, grpc_call("helloworld.Greeter/SayHello")),
                             data(1, message, end_stream=True)), 100),
        ("s", wire(settings(), server.headers(1, [(":status", "200"), ("content-type", "application/grpc")]),
                   data(1, message)), 110),
        ("s", wire(server.headers(1, ok_trailers, end_stream=True)), 120),
        # Server streaming: three messages, then trailers.
        ("c", wire(client.headers(3, grpc_call("pkg.sub.Stream/Many")), data(3, message, end_stream=True)), 200),
        ("s", wire(server.headers(3, [(":status", "200"), ("content-type", "application/grpc")]),
                   data(3, message), data(3, message)), 210),
        ("s", wire(data(3, message), server.headers(3, ok_trailers, end_stream=True)), 290),
        # Trailers-only error.
        ("c", wire(client.headers(5, grpc_call("helloworld.Greeter/Missing")), data(5, message, end_stream=True)),
         300),
        ("s", wire(server.headers(5, [(":status", "200"), ("content-type", "application/grpc"),
                                      ("grpc-status", "5"), ("grpc-message", "nope")], end_stream=True)), 305),
        # Cancelled by the client (deadline): RST_STREAM without grpc-status.
        ("c", wire(client.headers(7, grpc_call("helloworld.Greeter/Slow")), data(7, message, end_stream=True)), 400),
        ("c", wire(RstStreamFrame(7, error_code=8)), 450),
        # A response that ends with no grpc-status at all.
        ("c", wire(client.headers(9, grpc_call("helloworld.Greeter/Odd")), data(9, message, end_stream=True)), 500),
        ("s", wire(server.headers(9, [(":status", "503")], end_stream=True)), 501),
    ])
    grpc = "grpc"
    assert out == [
        h2("POST", "/helloworld.Greeter/SayHello", 200, 100, 120, 8, 8,
           RpcCall(grpc, "helloworld.Greeter", "SayHello", "0")),
        h2("POST", "/pkg.sub.Stream/Many", 200, 200, 290, 8, 24, RpcCall(grpc, "pkg.sub.Stream", "Many", "0")),
        h2("POST", "/helloworld.Greeter/Missing", 200, 300, 305, 8, 0,
           RpcCall(grpc, "helloworld.Greeter", "Missing", "5")),
        h2("POST", "/helloworld.Greeter/Slow", RESET_STATUS, 400, 450, 8, 0,
           RpcCall(grpc, "helloworld.Greeter", "Slow", GRPC_STATUS_RESET)),
        h2("POST", "/helloworld.Greeter/Odd", 503, 500, 501, 8, 0,
           RpcCall(grpc, "helloworld.Greeter", "Odd", GRPC_STATUS_MISSING)),
    ]


def test_grpc_status_before_reset_wins() -> None:
    client, server = Peer(), Peer()
    out, _ = run([
        ("c", PREFACE + wire(settings(), client.headers(1, grpc_call("a.B/C")), data(1, b"", end_stream=True)), 1),
        ("s", wire(settings(), server.headers(1, [(":status", "200"), ("grpc-status", "4")], end_stream=True),
                   RstStreamFrame(1, error_code=0)), 2),
    ])
    assert [e.rpc for e in out] == [RpcCall("grpc", "a.B", "C", "4")]
    assert out[0].status == 200


def test_goaway_drops_unprocessed_streams_exactly() -> None:
    client, server = Peer(), Peer()
    out, tracker = run([
        ("c", PREFACE + wire(settings(), client.headers(1, get("/kept"), end_stream=True),
                             client.headers(3, get("/refused"), end_stream=True)), 1),
        ("s", wire(settings(), GoAwayFrame(0, last_stream_id=1, error_code=0, additional_data=b"bye" * 20)), 2),
        ("s", wire(server.headers(1, [(":status", "200")], end_stream=True)), 3),
    ])
    assert out == [h2("GET", "/kept", 200, 1, 3)]
    assert tracker.stats.http2.streams_dropped["goaway"] == 1


def test_push_promise_is_ignored_but_keeps_hpack_in_step() -> None:
    client, server = Peer(), Peer()
    promise = PushPromiseFrame(1, promised_stream_id=2, data=server.encoder.encode(get("/pushed.css")))
    promise.flags.add("END_HEADERS")
    out, tracker = run([
        ("c", PREFACE + wire(settings(), client.headers(1, get("/page"), end_stream=True)), 1),
        ("s", wire(settings(), promise, server.headers(1, [(":status", "200")]),
                   server.headers(2, [(":status", "200"), (":path", "/pushed.css")]), data(2, b"css", end_stream=True),
                   data(1, b"html", end_stream=True)), 2),
        # The server's encoder indexed /pushed.css in the promise: this block refers to it.
        ("c", wire(client.headers(3, get("/next"), end_stream=True)), 3),
        ("s", wire(server.headers(3, [(":status", "200"), (":path", "/pushed.css")], end_stream=True)), 4),
    ])
    assert out == [h2("GET", "/page", 200, 1, 2, 0, 4), h2("GET", "/next", 200, 3, 4)]
    assert tracker.stats.http2.push_promises == 1
    assert tracker.stats.http2.undecodable_streams == 0


def test_h2c_upgrade_request_becomes_stream_one() -> None:
    client, server = Peer(), Peer()
    upgrade = (b"GET /up?q=1 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
               b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
    switching = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    out, tracker = run([
        ("c", upgrade, 1),
        ("s", switching + wire(settings(), server.headers(1, [(":status", "200")])), 2),
        ("c", PREFACE + wire(settings(), client.headers(3, get("/second"), end_stream=True)), 3),
        ("s", wire(data(1, b"first", end_stream=True)), 4),
        ("s", wire(server.headers(3, [(":status", "302")], end_stream=True)), 5),
    ])
    assert out == [h2("GET", "/up", 200, 1, 4, 0, 5), h2("GET", "/second", 302, 3, 5)]
    assert tracker.stats.http2.connections["upgrade"] == 1
    assert sum(tracker.stats.parse_errors.values()) == 0


def test_websocket_upgrade_still_an_http1_101() -> None:
    out, _ = run([
        ("c", b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 1),
        ("s", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello", 2),
    ])
    assert [(e.target, e.status, e.protocol_version) for e in out] == [("/ws", 101, "1.1")]


def test_joined_mid_stream_decodes_only_what_is_exact() -> None:
    client, server = Peer(), Peer()
    # Before we joined: one exchange each way indexed entries we never see.
    client.encoder.encode(get("/before", extra=(("user-agent", "grpc-test"),)))
    server.encoder.encode([(":status", "200"), ("server", "nginx")])
    out, tracker = run([
        # A response to a request sent before we joined: its route is unknown.
        ("s", wire(server.headers(1, [(":status", "200")]), data(1, b"tail", end_stream=True)), 1),
        # New names and values only: literals and static entries, decodable exactly.
        ("c", wire(client.headers(3, [(":method", "GET"), (":scheme", "http"), (":path", "/fresh")],
                                  end_stream=True)), 2),
        ("s", wire(server.headers(3, [(":status", "404")], end_stream=True)), 3),
        # Refers to user-agent indexed before we joined: undecodable, never guessed.
        ("c", wire(client.headers(5, get("/again", extra=(("user-agent", "grpc-test"),)), end_stream=True)), 4),
        ("s", wire(server.headers(5, [(":status", "200"), ("server", "nginx")], end_stream=True)), 5),
        # The decoder restarted empty after that block; literals still decode.
        ("c", wire(client.headers(7, [(":method", "DELETE"), (":path", "/third")], end_stream=True)), 6),
        ("s", wire(server.headers(7, [(":status", "500")], end_stream=True)), 7),
    ], conn=Conn())
    assert out == [h2("GET", "/fresh", 404, 2, 3), h2("DELETE", "/third", 500, 6, 7)]
    stats = tracker.stats.http2
    assert stats.undecodable_streams == 2
    assert stats.connections["mid_stream"] == 1
    assert stats.parse_errors["bad_header_block"] == 0
    assert sum(tracker.stats.parse_errors.values()) == 0


def test_joined_in_the_middle_of_a_frame_waits_for_a_boundary() -> None:
    client, server = Peer(), Peer()
    big = wire(data(1, b"x" * 3000, end_stream=True))
    out, _ = run([
        ("c", big[1000:2000], 1),  # the middle of a DATA frame: not a frame boundary
        ("c", big[2000:], 2),
        ("c", wire(client.headers(3, [(":method", "PUT"), (":path", "/p")]), data(3, b"12", end_stream=True)), 3),
        ("s", wire(server.headers(3, [(":status", "200")], end_stream=True)), 4),
    ])
    assert out == [h2("PUT", "/p", 200, 3, 4, 2, 0)]


def test_stream_cap_drops_oldest_counted() -> None:
    client, server = Peer(), Peer()
    requests = wire(*(client.headers(s, get(f"/{s}"), end_stream=True) for s in (1, 3, 5)))
    out, tracker = run([
        ("c", PREFACE + wire(settings()) + requests, 1),
        ("s", wire(settings(), *(server.headers(s, [(":status", "200")], end_stream=True) for s in (1, 3, 5))), 2),
    ], limits=Limits(max_h2_streams=2))
    assert [e.target for e in out] == ["/3", "/5"]
    stats = tracker.stats.http2
    assert stats.caps["streams"] == 1 and stats.streams_dropped["cap"] == 1


def test_header_table_setting_over_cap_is_counted_and_capped() -> None:
    client, server = Peer(), Peer()
    server.encoder.header_table_size = 100_000  # the encoder takes the client's offer in full
    out, tracker = run([
        ("c", PREFACE + wire(SettingsFrame(0, settings={SettingsFrame.HEADER_TABLE_SIZE: 100_000}),
                             client.headers(1, get("/"), end_stream=True)), 1),
        ("s", wire(settings(), server.headers(1, [(":status", "200")], end_stream=True)), 2),
    ], limits=Limits(max_h2_header_table=8192))
    stats = tracker.stats.http2
    assert stats.caps["header_table"] == 1
    assert out == [] and stats.undecodable_streams == 1 and stats.parse_errors["bad_header_block"] == 1


def test_header_block_cap() -> None:
    client, server = Peer(), Peer()
    out, tracker = run([
        ("c", PREFACE + wire(settings(), client.headers(1, get("/big", extra=(("x", "v" * 5000),)), end_stream=True),
                             client.headers(3, get("/small"), end_stream=True)), 1),
        ("s", wire(settings(), server.headers(1, [(":status", "200")], end_stream=True),
                   server.headers(3, [(":status", "200")], end_stream=True)), 2),
    ], limits=Limits(max_header_bytes=1024, max_buffered_bytes=65536))
    stats = tracker.stats.http2
    assert stats.caps["header_block"] == 1
    assert stats.undecodable_streams >= 1
    assert all(e.target != "/big" for e in out)


@pytest.mark.parametrize("bad", [
    wire(ContinuationFrame(1, b"\x82")),  # CONTINUATION with no HEADERS before it
    b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + b"\x00" * 5,  # SETTINGS of a length not a multiple of 6
    b"\x00\x00\x04\x03\x00\x00\x00\x00\x00" + b"\x00" * 4,  # RST_STREAM on stream 0
    b"\x00\x00\x03\x00\x08\x00\x00\x00\x01\x05ab",  # DATA whose padding is longer than the frame
    b"\x00\x00\x02\x01\x0c\x00\x00\x00\x05\x05\x82",  # one-frame HEADERS, padding longer than the frame
    b"\x00\x00\x01\x01\x25\x00\x00\x00\x05\x82",  # one-frame HEADERS too short for its PRIORITY fields
])
def test_malformed_frames_are_counted_then_resync(bad: bytes) -> None:
    client, server = Peer(), Peer()
    out, tracker = run([
        ("c", PREFACE + wire(settings(), client.headers(1, get("/lost"))), 1),
        ("c", bad, 2),
        ("c", wire(client.headers(3, [(":method", "GET"), (":path", "/after")], end_stream=True)), 3),
        ("s", wire(settings(), server.headers(3, [(":status", "200")], end_stream=True)), 4),
    ])
    stats = tracker.stats.http2
    assert stats.parse_errors["bad_frame"] == 1
    assert stats.streams_dropped["lost"] == 1
    assert out == [h2("GET", "/after", 200, 3, 4)]


def test_truncated_data_counts_by_length_truncated_header_is_an_error() -> None:
    client, server = Peer(), Peer()
    conn = Conn()
    tracker = Tracker([PORT])
    out: list[Exchange] = []
    out += tracker.feed(conn.seg("c", PREFACE + wire(settings(), client.headers(1, get("/t"), end_stream=True)), 1))
    body = wire(server.headers(1, [(":status", "200")]), data(1, b"b" * 1000, end_stream=True))
    out += tracker.feed(conn.seg("s", wire(settings()) + body, 2, keep=len(wire(settings())) + len(body) - 500))
    assert out == [h2("GET", "/t", 200, 1, 2, 0, 1000)]
    out = tracker.feed(conn.seg("c", wire(client.headers(3, get("/u"), end_stream=True)), 3, keep=5))
    assert tracker.stats.http2.parse_errors["truncated"] == 1


def test_h2_flows_never_get_body_skip_hints() -> None:
    client, server = Peer(), Peer()
    out, tracker = run([
        ("c", PREFACE + wire(settings(), client.headers(1, get("/big"), end_stream=True)), 1),
        ("s", wire(settings(), server.headers(1, [(":status", "200")]),
                   *(data(1, b"z" * 16384) for _ in range(8)), data(1, b"", end_stream=True)), 2),
    ], hint_skips=True)
    assert out == [h2("GET", "/big", 200, 1, 2, 0, 8 * 16384)]
    assert tracker.take_skip_hints() == {}


def test_https_scheme_from_the_tracker() -> None:
    client, server = Peer(), Peer()
    conn = Conn()
    tracker = Tracker([PORT], scheme="https")
    tracker.feed(conn.seg("c", PREFACE + wire(settings(), client.headers(1, get("/s"), end_stream=True)), 1))
    out = tracker.feed(conn.seg("s", wire(settings(), server.headers(1, [(":status", "200")], end_stream=True)), 2))
    assert [(e.scheme, e.protocol_version) for e in out] == [("https", "2")]


def test_connection_closed_with_open_streams() -> None:
    client = Peer()
    conn = Conn()
    tracker = Tracker([PORT])
    tracker.feed(conn.seg("c", PREFACE + wire(settings(), client.headers(1, get("/x"), end_stream=True)), 1,
                          flags=SYN | 0x18))
    assert tracker.flush() == []
    assert tracker.stats.http2.streams_dropped["closed"] == 1


@pytest.mark.parametrize(("payload", "expected"), [
    (wire(settings()), True),
    (wire(settings(), data(1, b"x" * 100))[:-10], True),  # the last frame may run on
    (b"GET / HTTP/1.1\r\n\r\n", False),
    (b"HTTP/1.1 200 OK\r\n", False),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", False),  # a TLS ClientHello
    (b"\x00\x00\x04\x03\x00\x00\x00\x00\x00\x00\x00\x00\x08", False),  # RST_STREAM on stream 0
    (b"\x00\x00", False),
])
def test_looks_like_frames(payload: bytes, expected: bool) -> None:
    assert looks_like_frames(payload) is expected


def test_decoded_block_cache_follows_the_dynamic_table() -> None:
    decoder = CachedDecoder(65536, 4096, BlockCache())
    encoder = Encoder()
    first = encoder.encode([(":path", "/a")])  # a literal that inserts (:path, /a) at index 62
    again = encoder.encode([(":path", "/a")])  # index 62
    assert decoder.decode(first) == [(b":path", b"/a")]
    assert decoder.decode(again) == [(b":path", b"/a")]
    assert decoder.decode(again) == [(b":path", b"/a")]  # from the cache
    assert decoder.decode(encoder.encode([(":path", "/b")])) == [(b":path", b"/b")]  # now index 62
    assert decoder.decode(again) == [(b":path", b"/b")]


def test_http1_joined_mid_body_is_still_picked_up_at_the_next_head() -> None:
    out, _ = run([
        ("c", b"tail of a body we joined in the middle of\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n", 1),
        ("s", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 2),
    ])
    assert [(e.method, e.target, e.status, e.protocol_version) for e in out] == [("GET", "/next", 200, "1.1")]


def test_bad_preface_after_an_upgrade_is_counted() -> None:
    upgrade = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n"
    switching = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    out, tracker = run([
        ("c", upgrade, 1),
        ("s", switching, 2),
        ("c", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + wire(settings()), 3),
    ])
    assert out == []
    assert tracker.stats.http2.parse_errors["bad_preface"] == 1
    assert tracker.stats.http2.streams_dropped["closed"] == 1  # the upgraded request never got its answer
