"""Tracker: segments in capture order → exchanges, with TCP ordering, gaps, pairing and eviction."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.core.flows import CoreStats, Limits, Tracker, _nearest_first, _seq_delta, _Side
from exporter.core.model import ACK, FIN, PSH, RST, SYN, Exchange, Segment

PORT = 8080
DATA = ACK | PSH


class Step(NamedTuple):
    side: str  # "c": client → server, "s": server → client
    data: bytes
    ts: int
    flags: int = DATA


class Conn:
    """Hands out segments of one connection with consistent sequence numbers."""

    def __init__(
        self,
        client: str = "10.0.0.1",
        server: str = "10.0.0.2",
        client_port: int = 40000,
        client_seq: int = 1000,
        server_seq: int = 900_000,
    ) -> None:
        self.client, self.server, self.client_port = client, server, client_port
        self.next = {"c": client_seq, "s": server_seq}

    def seg(
        self,
        side: str,
        data: bytes,
        ts: int,
        flags: int = DATA,
        seq: int | None = None,
        payload_len: int | None = None,
        keep: int | None = None,
    ) -> Segment:
        """A segment at the current sequence number (or `seq`); `keep` bytes survive truncation."""
        length = len(data) if payload_len is None else payload_len
        at = self.next[side] if seq is None else seq
        if seq is None:
            self.next[side] = (at + length + (1 if flags & (SYN | FIN) else 0)) % (1 << 32)
        payload = data if keep is None else data[:keep]
        if side == "c":
            return Segment(ts, self.client, self.client_port, self.server, PORT, at, flags, payload, length)
        return Segment(ts, self.server, PORT, self.client, self.client_port, at, flags, payload, length)


def cuts(steps: Sequence[Step], small: int = 120) -> Iterator[list[Step]]:
    """The steps as given, then each data step cut at every byte, then (if small) in single bytes."""
    yield list(steps)
    for index, step in enumerate(steps):
        for at in range(1, len(step.data)):
            yield [
                *steps[:index],
                step._replace(data=step.data[:at]),
                step._replace(data=step.data[at:]),
                *steps[index + 1 :],
            ]
    if sum(len(step.data) for step in steps) <= small * 4:
        yield [
            piece
            for step in steps
            for piece in (
                [step._replace(data=step.data[i : i + 1]) for i in range(len(step.data))]
                if step.data
                else [step]
            )
        ]


def play(
    steps: Sequence[Step], tracker: Tracker | None = None, conn: Conn | None = None
) -> tuple[list[Exchange], Tracker]:
    tracker = tracker or Tracker([PORT])
    conn = conn or Conn()
    out: list[Exchange] = []
    for step in steps:
        out += tracker.feed(conn.seg(step.side, step.data, step.ts, step.flags))
    return out, tracker


def ex(
    method: str, target: str, status: int, start: int, end: int, req_body: int = 0, resp_body: int = 0,
    server_ip: str = "10.0.0.2",
) -> Exchange:
    return Exchange(method, target, status, start, end, req_body, resp_body, PORT, server_ip=server_ip)


def errors(stats: CoreStats) -> dict[str, int]:
    return {reason: count for reason, count in stats.parse_errors.items() if count}


def get(path: str, extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: svc\r\n" + extra + b"\r\n"


def ok(body: bytes = b"hello", status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 " + status + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body


# -- table: conversations, cut every way ----------------------------------------------------

CASES: list[tuple[str, list[Step], list[Exchange], dict[str, int]]] = [
    (
        "keep-alive: idle time between requests never counts",
        [
            Step("c", get("/a?q=1"), 100),
            Step("s", ok(), 150),
            Step("c", get("/b"), 10_000),
            Step("s", ok(b""), 10_070),
        ],
        [ex("GET", "/a", 200, 100, 150, 0, 5), ex("GET", "/b", 200, 10_000, 10_070, 0, 0)],
        {},
    ),
    (
        "pipelined requests in one segment start at that segment",
        [
            Step("c", get("/1") + get("/2") + get("/3"), 100),
            Step("s", ok(b"a"), 200),
            Step("s", ok(b"bb") + ok(b"ccc"), 300),
        ],
        [
            ex("GET", "/1", 200, 100, 200, 0, 1),
            ex("GET", "/2", 200, 100, 300, 0, 2),
            ex("GET", "/3", 200, 100, 300, 0, 3),
        ],
        {},
    ),
    (
        "post body over several segments",
        [
            Step("c", b"POST /up HTTP/1.1\r\nContent-Length: 10\r\n\r\n01234", 100),
            Step("c", b"56789", 110),
            Step("s", ok(b"", b"201 Created"), 200),
        ],
        [ex("POST", "/up", 201, 100, 200, 10, 0)],
        {},
    ),
    (
        "chunked response ends with its last chunk",
        [
            Step("c", get("/c"), 100),
            Step("s", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", 200),
            Step("s", b"2\r\nde\r\n0\r\n\r\n", 250),
        ],
        [ex("GET", "/c", 200, 100, 250, 0, 5)],
        {},
    ),
    (
        "head response has no body; the next response is still framed",
        [
            Step("c", b"HEAD /h HTTP/1.1\r\n\r\n" + get("/g"), 100),
            Step("s", b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", 200),
            Step("s", ok(b"x"), 300),
        ],
        [ex("HEAD", "/h", 200, 100, 200, 0, 0), ex("GET", "/g", 200, 100, 300, 0, 1)],
        {},
    ),
    (
        "100-continue waits for the final response",
        [
            Step("c", b"PUT /p HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n", 100),
            Step("s", b"HTTP/1.1 100 Continue\r\n\r\n", 110),
            Step("c", b"abc", 120),
            Step("s", ok(b"", b"204 No"), 200),
        ],
        [ex("PUT", "/p", 204, 100, 200, 3, 0)],
        {},
    ),
    (
        "close-delimited response ends at the last data segment, not the fin",
        [
            Step("c", get("/stream"), 100),
            Step("s", b"HTTP/1.0 200 OK\r\n\r\nfirst", 200),
            Step("s", b"second", 300),
            Step("s", b"", 400, ACK | FIN),
        ],
        [ex("GET", "/stream", 200, 100, 300, 0, 11)],
        {},
    ),
    (
        "101 switches protocols: the rest is not parsed",
        [
            Step("c", get("/ws", b"Upgrade: websocket\r\nConnection: Upgrade\r\n"), 100),
            Step("s", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", 200),
            Step("c", b"\x81\x85garbage", 300),
            Step("s", b"\x81\x05hello", 400),
        ],
        [ex("GET", "/ws", 101, 100, 200)],
        {},
    ),
    (
        "absolute-form target and unknown method",
        [Step("c", b"PURGE http://cache:8080/x/y?z=1 HTTP/1.1\r\n\r\n", 100), Step("s", ok(b""), 200)],
        [ex("PURGE", "/x/y", 200, 100, 200)],
        {},
    ),
    (
        "unmatched response is counted, not paired",
        [Step("s", ok(), 100), Step("c", get("/late"), 200), Step("s", ok(b"1"), 300)],
        [ex("GET", "/late", 200, 200, 300, 0, 1)],
        {"unmatched_responses": 1},
    ),
    (
        "rst aborts the response in progress",
        [
            Step("c", get("/a"), 100),
            Step("s", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", 200),
            Step("c", b"", 300, RST),
        ],
        [],
        {"requests_without_response": 1, "flows_closed": 1, "flows_active": 0},
    ),
    (
        "both fins free the flow",
        [
            Step("c", get("/a"), 100),
            Step("s", ok(), 200),
            Step("c", b"", 300, ACK | FIN),
            Step("s", b"", 310, ACK | FIN),
        ],
        [ex("GET", "/a", 200, 100, 200, 0, 5)],
        {"flows_closed": 1, "flows_active": 0},
    ),
    (
        "server fin leaves pending requests unanswered",
        [Step("c", get("/a") + get("/b"), 100), Step("s", ok(), 200), Step("s", b"", 300, ACK | FIN)],
        [ex("GET", "/a", 200, 100, 200, 0, 5)],
        {"requests_without_response": 1, "flows_active": 1},
    ),
]


@pytest.mark.parametrize(
    ("steps", "expected", "stats"), [case[1:] for case in CASES], ids=[c[0] for c in CASES]
)
def test_conversations_whatever_the_cuts(
    steps: list[Step], expected: list[Exchange], stats: dict[str, int]
) -> None:
    for variant in cuts(steps):
        out, tracker = play(variant)
        assert out == expected, variant
        assert errors(tracker.stats) == {}, variant
        for name, value in stats.items():
            assert getattr(tracker.stats, name) == value, (name, variant)


# -- TCP ordering ---------------------------------------------------------------------------


def test_direction_and_key_work_for_ipv6() -> None:
    conn = Conn(client="::1", server="::1")
    out, _ = play([Step("c", get("/six"), 1), Step("s", ok(), 2)], conn=conn)
    assert out == [ex("GET", "/six", 200, 1, 2, 0, 5, server_ip=conn.server)]


def test_sequence_numbers_wrap_around() -> None:
    conn = Conn(client_seq=(1 << 32) - 10, server_seq=(1 << 32) - 3)
    steps = [Step("c", get("/w1"), 1), Step("s", ok(), 2), Step("c", get("/w2"), 3), Step("s", ok(), 4)]
    for variant in cuts(steps):
        out, tracker = play(variant, conn=Conn(client_seq=conn.next["c"], server_seq=conn.next["s"]))
        assert [e.target for e in out] == ["/w1", "/w2"], variant
        assert tracker.stats.retransmitted_segments == 0 and tracker.stats.out_of_order_segments == 0


def test_syn_takes_one_sequence_number() -> None:
    tracker = Tracker([PORT])
    conn = Conn()
    tracker.feed(conn.seg("c", b"", 1, SYN))
    tracker.feed(conn.seg("s", b"", 2, SYN | ACK))
    tracker.feed(conn.seg("c", get("/s"), 3))
    assert tracker.feed(conn.seg("s", ok(), 4)) == [ex("GET", "/s", 200, 3, 4, 0, 5)]
    assert errors(tracker.stats) == {}


def test_retransmissions_are_ignored_and_counted() -> None:
    tracker = Tracker([PORT])
    conn = Conn()
    request = conn.seg("c", get("/r"), 1)
    tracker.feed(request)
    tracker.feed(request)
    head, body = ok(b"0123456789")[:-4], b"6789"
    first = conn.seg("s", head, 2)
    tracker.feed(first)
    tracker.feed(first)
    assert tracker.feed(conn.seg("s", body, 3)) == [ex("GET", "/r", 200, 1, 3, 0, 10)]
    assert tracker.stats.retransmitted_segments == 2
    assert errors(tracker.stats) == {}


def test_partial_overlap_keeps_only_new_bytes() -> None:
    tracker = Tracker([PORT])
    conn = Conn()
    stream = get("/o")
    start = conn.next["c"]
    tracker.feed(conn.seg("c", stream[:10], 1))
    tracker.feed(conn.seg("c", stream[5:20], 2, seq=start + 5))  # 5 old bytes, 10 new
    tracker.feed(conn.seg("c", stream[20:], 3, seq=start + 20))
    conn.next["c"] = start + len(stream)
    assert tracker.feed(conn.seg("s", ok(), 4)) == [ex("GET", "/o", 200, 1, 4, 0, 5)]
    assert errors(tracker.stats) == {}


def test_out_of_order_segments_wait_for_the_gap() -> None:
    tracker = Tracker([PORT])
    conn = Conn()
    play([Step("c", get("/first"), 0), Step("s", ok(), 0)], tracker, conn)  # both directions known
    tracker.feed(conn.seg("c", get("/ooo"), 1))
    response = ok(b"abcdef")
    start = conn.next["s"]
    assert tracker.feed(conn.seg("s", response[20:], 3, seq=start + 20)) == []
    assert tracker.stats.out_of_order_segments == 1
    assert tracker.feed(conn.seg("s", response[:20], 2, seq=start)) == [ex("GET", "/ooo", 200, 1, 3, 0, 6)]
    assert errors(tracker.stats) == {}


def test_buffer_overflow_counts_one_gap_and_resyncs() -> None:
    tracker = Tracker([PORT], Limits(max_buffered_bytes=2000))
    conn = Conn()
    assert play([Step("c", get("/1"), 1), Step("s", ok(), 2)], tracker, conn)[0]
    lost = get("/lost")
    conn.next["c"] += len(lost)  # never captured
    later = [get(f"/after{i}") for i in range(40)]
    out: list[Exchange] = []
    for i, request in enumerate(later):
        out += tracker.feed(conn.seg("c", request, 10 + i))
    assert tracker.stats.parse_errors["gap"] == 1
    # The server answered everything, in order; what was held is now parsed.
    for i in range(41):
        out += tracker.feed(conn.seg("s", ok(b"r"), 100 + i))
    assert errors(tracker.stats) == {"gap": 1}
    # Never a wrong pair: every exchange's target matches the response it got.
    assert all(e.start_ns >= 10 for e in out)
    assert tracker.stats.unmatched_responses + len(out) == 41


def test_fin_with_a_gap_open_counts_a_gap() -> None:
    tracker = Tracker([PORT])
    conn = Conn()
    tracker.feed(conn.seg("c", get("/g"), 1))
    tracker.feed(conn.seg("s", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", 2))
    conn.next["s"] += 50
    tracker.feed(conn.seg("s", b"x" * 50, 3, ACK | FIN))
    assert tracker.stats.parse_errors["gap"] == 1
    assert tracker.stats.requests_without_response == 1


# -- truncation -----------------------------------------------------------------------------


def test_truncated_body_bytes_count_by_length() -> None:
    tracker = Tracker([PORT])
    conn = Conn()
    tracker.feed(conn.seg("c", get("/big"), 1))
    response = ok(b"z" * 5000)
    head_end = len(response) - 5000
    out = tracker.feed(conn.seg("s", response[:1400], 2, keep=head_end + 10))
    out += tracker.feed(conn.seg("s", response[1400:], 3, keep=0))
    assert out == [ex("GET", "/big", 200, 1, 3, 0, 5000)]
    assert errors(tracker.stats) == {}


def test_truncated_head_counts_and_resyncs() -> None:
    tracker = Tracker([PORT])
    conn = Conn()
    tracker.feed(conn.seg("c", get("/cut") + get("/cut2"), 1, keep=10))
    tracker.feed(conn.seg("c", get("/next"), 2))
    assert tracker.feed(conn.seg("s", ok(), 3)) == [ex("GET", "/next", 200, 2, 3, 0, 5)]
    assert errors(tracker.stats) == {"truncated": 1}


# -- pairing safety -------------------------------------------------------------------------


def test_response_resync_drops_rather_than_mispairs() -> None:
    tracker = Tracker([PORT])
    conn = Conn()
    tracker.feed(conn.seg("c", get("/a") + get("/b"), 1))
    tracker.feed(conn.seg("s", b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n", 2))
    out = tracker.feed(conn.seg("s", ok(b"for b"), 3))
    assert out == []
    assert tracker.stats.requests_without_response == 2
    assert tracker.stats.unmatched_responses == 1
    tracker.feed(conn.seg("c", get("/c"), 4))
    assert tracker.feed(conn.seg("s", ok(), 5)) == [ex("GET", "/c", 200, 4, 5, 0, 5)]


def test_requests_from_behind_a_gap_are_not_paired_with_later_responses() -> None:
    tracker = Tracker([PORT], Limits(max_buffered_bytes=300))
    conn = Conn()
    assert play([Step("c", get("/first"), 1), Step("s", ok(), 1)], tracker, conn)[0]
    lost = get("/lost")
    conn.next["c"] += len(lost)  # the capture missed it; the server did not
    out = tracker.feed(conn.seg("s", ok(b"lost"), 2))
    out += tracker.feed(conn.seg("c", get("/held"), 3))  # held behind the gap
    out += tracker.feed(conn.seg("s", ok(b"held"), 4))
    out += tracker.feed(conn.seg("c", get("/x" * 80), 5))  # overflows the buffer: gap, resync
    out += tracker.feed(conn.seg("s", ok(b"x"), 6))
    assert tracker.stats.parse_errors["gap"] == 1
    assert out == [ex("GET", "/x" * 80, 200, 5, 6, 0, 1)]


def test_pending_overflow_drops_oldest_but_keeps_step() -> None:
    tracker = Tracker([PORT], Limits(max_pending_requests=2))
    conn = Conn()
    tracker.feed(conn.seg("c", get("/1") + get("/2") + get("/3"), 1))
    out = tracker.feed(conn.seg("s", ok(b"1") + ok(b"22") + ok(b"333"), 2))
    assert [(e.target, e.response_body_bytes) for e in out] == [("/2", 2), ("/3", 3)]
    assert tracker.stats.requests_without_response == 1


# -- joining, eviction, end of input --------------------------------------------------------


def test_joining_mid_body_counts_once_then_finds_the_next_request() -> None:
    tracker = Tracker([PORT])
    conn = Conn()
    out = tracker.feed(conn.seg("c", b"tail of some body\r\nmore", 1))
    out += tracker.feed(conn.seg("c", b"still body", 2))
    out += tracker.feed(conn.seg("c", get("/fresh"), 3))
    out += tracker.feed(conn.seg("s", ok(), 4))
    assert out == [ex("GET", "/fresh", 200, 3, 4, 0, 5)]
    assert errors(tracker.stats) == {"not_http": 1}


def test_expire_evicts_idle_flows_and_finishes_close_delimited() -> None:
    tracker = Tracker([PORT], Limits(idle_timeout_ns=1000))
    a, b = Conn(client_port=1), Conn(client_port=2)
    tracker.feed(a.seg("c", get("/a"), 100))
    tracker.feed(a.seg("s", b"HTTP/1.0 200 OK\r\n\r\nstream", 200))
    tracker.feed(b.seg("c", get("/b"), 900))
    assert tracker.expire(1100) == []
    assert tracker.expire(1200) == [ex("GET", "/a", 200, 100, 200, 0, 6)]
    assert tracker.stats.flows_active == 1
    assert tracker.expire(1900) == []
    assert tracker.stats.flows_active == 0
    assert tracker.stats.flows_evicted == {"idle": 2, "capacity": 0}
    assert tracker.stats.requests_without_response == 1


def test_capacity_evicts_least_recently_active() -> None:
    tracker = Tracker([PORT], Limits(max_flows=2))
    conns = [Conn(client_port=port) for port in (1, 2, 3)]
    tracker.feed(conns[0].seg("c", get("/0"), 1))
    tracker.feed(conns[1].seg("c", get("/1"), 2))
    tracker.feed(conns[0].seg("c", get("/0b"), 3))  # 0 is now more recent than 1
    tracker.feed(conns[2].seg("c", get("/2"), 4))
    assert tracker.stats.flows_evicted["capacity"] == 1
    assert tracker.stats.requests_without_response == 1
    assert [e.target for e in tracker.feed(conns[0].seg("s", ok(), 5))] == ["/0"]


def test_flush_finishes_everything() -> None:
    tracker = Tracker([PORT])
    conn = Conn()
    tracker.feed(conn.seg("c", get("/f") + get("/g"), 1))
    tracker.feed(conn.seg("s", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody", 2))
    assert tracker.flush() == [ex("GET", "/f", 200, 1, 2, 0, 4)]
    assert tracker.stats.flows_active == 0
    assert tracker.stats.requests_without_response == 1


def test_reused_four_tuple_starts_a_new_flow() -> None:
    tracker = Tracker([PORT])
    conn = Conn()
    play([Step("c", get("/old"), 1), Step("s", ok(), 2), Step("s", b"", 3, ACK | FIN)], tracker, conn)
    fresh = Conn(client_seq=3_000_000_000, server_seq=123_456_789)
    out, _ = play([Step("c", get("/new"), 10), Step("s", ok(), 11)], tracker, fresh)
    assert out == [ex("GET", "/new", 200, 10, 11, 0, 5)]


def test_other_ports_and_stray_ends_are_ignored() -> None:
    tracker = Tracker([PORT])
    assert tracker.feed(Segment(1, "a", 1, "b", 2, 0, DATA, b"GET / HTTP/1.1\r\n\r\n", 18)) == []
    assert tracker.feed(Conn().seg("c", b"", 2, ACK | FIN)) == []
    assert tracker.feed(Conn().seg("s", b"", 3, RST)) == []
    assert tracker.stats.flows_active == 0 and tracker.stats.segments == 3


# -- garbage never raises, memory stays bounded ---------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from("cs"),
            st.binary(max_size=300),
            st.integers(0, 4000),
            st.sampled_from([DATA, DATA | FIN, RST, SYN, DATA | SYN]),
            st.integers(0, 40),
        ),
        max_size=40,
    )
)
def test_garbage_never_raises(steps: list[tuple[str, bytes, int, int, int]]) -> None:
    limits = Limits(max_buffered_bytes=1024, max_header_bytes=512, max_pending_requests=4, max_flows=3)
    tracker = Tracker([PORT], limits)
    conns = [Conn(client_port=p) for p in (1, 2, 3, 4)]
    for index, (side, data, seq_offset, flags, extra) in enumerate(steps):
        conn = conns[index % 4]
        seq = (conn.next[side] + seq_offset - 2000) % (1 << 32)
        segment = conn.seg(side, data, index, flags, seq=seq, payload_len=len(data) + extra)
        for exchange in tracker.feed(segment):
            assert exchange.end_ns >= exchange.start_ns
    for flow in tracker._flows.values():
        for side_state in (flow.client, flow.server):
            assert side_state.held_bytes <= limits.max_buffered_bytes + 400
        assert len(flow.pending) <= limits.max_pending_requests
    tracker.expire(10**12)
    assert tracker.stats.flows_active == 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                get("/a"),
                ok(),
                b"HTTP/1.1 ",
                b"\r\n",
                b"Content-Length: 3\r\n",
                b"xyz",
                b"0\r\n\r\n",
                b"Transfer-Encoding: chunked\r\n",
                b"GET /b HTTP/1.1",
            ]
        ),
        max_size=30,
    ),
    st.booleans(),
)
def test_http_looking_garbage_never_raises(pieces: list[bytes], client: bool) -> None:
    tracker = Tracker([PORT])
    conn = Conn()
    for index, piece in enumerate(pieces):
        tracker.feed(conn.seg("c" if client else "s", piece, index))
    tracker.flush()


# -- lo-sized segments out of order ---------------------------------------------------------

LO_MSS = 65483  # payload of one full-size segment on lo (MTU 65536), more than max_buffered_bytes


def test_full_size_body_segments_swapped_are_held_by_length_only() -> None:
    tracker = Tracker([PORT])
    conn = Conn()
    play([Step("c", get("/first"), 0), Step("s", ok(), 0)], tracker, conn)  # both directions known
    tracker.feed(conn.seg("c", get("/big"), 1))
    response = ok(b"y" * (3 * LO_MSS))
    first, second, third = response[:LO_MSS], response[LO_MSS : 2 * LO_MSS], response[2 * LO_MSS :]
    out = tracker.feed(conn.seg("s", first, 2))
    s2 = conn.seg("s", second, 3)
    s3 = conn.seg("s", third, 4)
    out += tracker.feed(s3)  # overtakes s2: pure body, so only its length is kept
    held = next(iter(tracker._flows.values())).server
    assert held.held_bytes < 1000
    out += tracker.feed(s2)
    assert out == [ex("GET", "/big", 200, 1, 4, 0, 3 * LO_MSS)]
    assert errors(tracker.stats) == {}


def test_a_head_segment_overtaken_by_a_full_size_one_is_a_swap_not_a_gap() -> None:
    tracker = Tracker([PORT])
    conn = Conn()
    play([Step("c", get("/first"), 0), Step("s", ok(), 0)], tracker, conn)  # both directions known
    tracker.feed(conn.seg("c", get("/big"), 1))
    response = ok(b"y" * (2 * LO_MSS))
    head_segment = conn.seg("s", response[:LO_MSS], 2)
    rest = conn.seg("s", response[LO_MSS:], 3)
    out = tracker.feed(rest)  # content kept (the head is not parsed yet), over the limit alone
    out += tracker.feed(head_segment)
    assert out == [ex("GET", "/big", 200, 1, 3, 0, 2 * LO_MSS)]
    assert errors(tracker.stats) == {}


def test_held_data_of_all_flows_together_is_bounded() -> None:
    """Past max_held_bytes_total the flow that asks to hold more gets a gap; the others keep theirs."""
    tracker = Tracker([PORT], Limits(max_held_bytes_total=3000))
    first, second = Conn(client_port=40001), Conn(client_port=40002)
    for conn, ts in ((first, 1), (second, 2)):
        assert play([Step("c", get("/warm"), ts), Step("s", ok(), ts)], tracker, conn)[0]
    # Each connection loses its next request on the wire; the one after it is held.
    for conn, ts in ((first, 10), (second, 20)):
        conn.next["c"] += len(get("/lost"))
        tracker.feed(conn.seg("c", get("/held") + b"p" * 1000, ts))
    assert tracker.stats.out_of_order_segments == 2
    assert tracker.stats.parse_errors["gap"] == 0
    assert tracker.stats.held_bytes == 2 * (len(get("/held")) + 1000 + 64)
    # A third held segment would pass the total: that flow gives up its hole at once.
    first.next["c"] += len(get("/lost"))
    tracker.feed(first.seg("c", get("/more") + b"q" * 1000, 30))
    assert tracker.stats.parse_errors["gap"] == 1
    assert tracker.stats.held_bytes == len(get("/held")) + 1000 + 64  # the second flow's, still held
    tracker.flush()
    assert tracker.stats.held_bytes == 0


def test_skip_hints_cover_each_long_body_once_and_are_forgotten_at_close() -> None:
    tracker = Tracker([PORT], hint_skips=True)
    conn = Conn()
    key = (conn.client, conn.client_port, conn.server, PORT)
    tracker.feed(conn.seg("c", get("/big"), 1))
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    tracker.feed(conn.seg("s", head + b"x" * 1000, 2))
    body_at = conn.next["s"]
    assert tracker.take_skip_hints() == {(key, False): (body_at, body_at + 99_000)}
    tracker.feed(conn.seg("s", b"", 3, payload_len=60_000))  # cut to headers by the kernel: counted by length
    assert tracker.take_skip_hints() == {}  # the first hint covers the whole body
    tracker.feed(conn.seg("s", b"", 4, payload_len=39_000))
    # A short body is not worth a hint; the next long one is.
    tracker.feed(conn.seg("c", get("/small"), 5))
    tracker.feed(conn.seg("s", ok(b"s" * 100), 6))
    assert tracker.take_skip_hints() == {}
    tracker.feed(conn.seg("c", get("/big2"), 7))
    tracker.feed(conn.seg("s", head, 8))
    assert tracker.take_skip_hints() == {(key, False): (conn.next["s"], conn.next["s"] + 100_000)}
    tracker.feed(conn.seg("s", b"", 9, payload_len=100_000))
    tracker.flush()
    assert tracker.take_skip_hints() == {(key, False): None}  # the connection ended: forget it


def test_skip_hints_renew_a_close_delimited_body_window_by_window() -> None:
    tracker = Tracker([PORT], hint_skips=True)
    conn = Conn()
    tracker.feed(conn.seg("c", get("/stream"), 1))
    tracker.feed(conn.seg("s", b"HTTP/1.0 200 OK\r\n\r\n", 2))
    start = conn.next["s"]
    (first,) = tracker.take_skip_hints().values()
    assert first == (start, (start + (1 << 30)) & 0xFFFFFFFF)
    tracker.feed(conn.seg("s", b"", 3, payload_len=(1 << 29) - 1))
    assert tracker.take_skip_hints() == {}
    tracker.feed(conn.seg("s", b"", 4, payload_len=2))  # past half the window: renewed from here
    (renewed,) = tracker.take_skip_hints().values()
    assert renewed == (conn.next["s"], (conn.next["s"] + (1 << 30)) & 0xFFFFFFFF)


def _after_gap(held: list[tuple[int, int, bytes, int]], start: int,
               take: Callable[[_Side], Iterator[tuple[int, int, bytes, int]]]) -> list[tuple[int, int]]:
    """The (seq, length) order in which a gap's held segments are fed, and where the stream then stands,
    moving the position as _skip_gap does."""
    side = _Side()
    side.next_seq = start
    side.held = list(held)
    fed = []
    for seq, _, _, plen in take(side):
        delta = _seq_delta(seq, side.next_seq)
        if delta > 0:
            side.next_seq, delta = seq, 0
        elif delta + plen <= 0:
            continue
        side.next_seq = (side.next_seq + plen + delta) & 0xFFFFFFFF
        fed.append((seq, plen))
    return [*fed, (side.next_seq, -1)]


def _nearest_each_time(side: _Side) -> Iterator[tuple[int, int, bytes, int]]:
    held = side.held
    while held:
        expected = side.next_seq
        yield held.pop(min(range(len(held)), key=lambda i: _seq_delta(held[i][0], expected)))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 0xFFFFFFFF),
       st.lists(st.tuples(st.sampled_from([-3000, -1, 0, 1, 500, 1448, 2896, 65536, 1 << 28, 1 << 30, 1 << 31]),
                          st.integers(1, 70000)), min_size=1, max_size=12))
def test_held_segments_after_a_gap_come_nearest_first_as_if_looked_for_after_each(
        start: int, offsets: list[tuple[int, int]]) -> None:
    held = [((start + offset) & 0xFFFFFFFF, i, b"", length) for i, (offset, length) in enumerate(offsets)]
    assert _after_gap(held, start, _nearest_first) == _after_gap(held, start, _nearest_each_time)
