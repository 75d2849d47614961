"""Tracker.seed: a connection the kernel's fast path hands over mid-stream continues exactly.

Each case runs the same bytes twice: once entirely through the Tracker (the reference),
once with a prefix "consumed by the kernel" and replaced by the Handover the kernel would
write at that point. The exchanges must be the same.
"""

from __future__ import annotations

import dataclasses

import pytest

from exporter.capture.bpf import AGG_ENTRIES, FAST_COUNTER_NAMES, HANDOVER_REASONS, KernelAggregate, KernelHandover
from exporter.capture.kernel_agg import KernelDelta, KernelFastPath, to_handover
from exporter.core.flows import Handover, Limits, Tracker
from exporter.core.model import Exchange
from exporter.core.routes import RouteMapper
from exporter.metrics import HttpMetrics, http_key
from tests.unit.test_flows import PORT, Conn

KEY = ("10.0.0.1", 40000, "10.0.0.2", PORT)
REQ1 = b"GET /a?secret=1 HTTP/1.1\r\nHost: x\r\n\r\n"
REQ2 = b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
HEAD1 = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
HEAD2 = b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\n"
POST = b"POST /up HTTP/1.1\r\nContent-Length: 10\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"


def reference(steps: list[tuple[str, bytes, int]]) -> list[Exchange]:
    conn, tracker, out = Conn(), Tracker([PORT]), []
    for side, data, ts in steps:
        out += tracker.feed(conn.seg(side, data, ts))
    return out + tracker.flush()


def handed_over(steps: list[tuple[str, bytes, int]], kernel_steps: int, handover: Handover) -> list[Exchange]:
    """The first `kernel_steps` never reach the Tracker; the seed stands in for them."""
    conn, tracker, out = Conn(), Tracker([PORT]), []
    segments = [conn.seg(side, data, ts) for side, data, ts in steps]
    out += tracker.seed(KEY, handover)
    for seg in segments[kernel_steps:]:
        out += tracker.feed(seg)
    return out + tracker.flush()


C0, S0 = 1000, 900_000  # Conn's initial sequence numbers


@pytest.mark.parametrize(
    ("name", "steps", "kernel_steps", "handover"),
    [
        (
            "pipelined while the request waits",
            [("c", REQ1, 10), ("c", REQ2, 20), ("s", HEAD1 + b"0123456789", 30), ("s", HEAD2 + b"abc", 40)],
            1,
            Handover(C0 + len(REQ1), None, "GET", "/a", 10),
        ),
        (
            "pipelined while the body streams",
            [("c", REQ1, 10), ("s", HEAD1 + b"0123", 30), ("c", REQ2, 35), ("s", b"456789", 40),
             ("s", HEAD2 + b"abc", 50)],
            2,
            Handover(C0 + len(REQ1), S0 + len(HEAD1) + 4, "GET", "/a", 10, 200, 10, 4),
        ),
        (
            "response head the kernel cannot frame",
            [("c", REQ1, 10), ("s", CHUNKED, 30)],
            1,
            Handover(C0 + len(REQ1), None, "GET", "/a", 10),
        ),
        (
            "next request after a kernel exchange is not simple",
            [("c", REQ1, 10), ("s", HEAD1 + b"0123456789", 30), ("c", b"PURGE /x HTTP/1.1\r\n\r\n", 50),
             ("s", HEAD2 + b"abc", 60)],
            2,
            Handover(C0 + len(REQ1), S0 + len(HEAD1) + 10),
        ),
        (
            "an answer before the request body ends (the kernel counted 4 of its 10 bytes)",
            [("c", POST + b"0123", 10), ("s", CONTINUE, 20), ("c", b"456789", 30), ("s", HEAD2 + b"abc", 40)],
            1,
            Handover(C0 + len(POST) + 4, None, "POST", "/up", 10, request_length=10, request_seen=4),
        ),
        (
            # A TLS record header is only a TLS connection when it opens the connection: here
            # the kernel read HTTP first, so the record-like bytes are HTTP garbage to resync past.
            "garbage that looks like a TLS record after a kernel exchange",
            [("c", REQ1, 10), ("s", HEAD1 + b"0123456789", 30), ("c", b"\x16\x03\x01junk\r\n", 50),
             ("c", REQ2, 55), ("s", HEAD2 + b"abc", 60)],
            2,
            Handover(C0 + len(REQ1), S0 + len(HEAD1) + 10, http_seen=True),
        ),
        (
            "pipelined after a request body the kernel counted whole",
            [("c", POST + b"0123456789", 10), ("c", REQ2, 20), ("s", HEAD1 + b"0123456789", 30),
             ("s", HEAD2 + b"abc", 40)],
            1,
            Handover(C0 + len(POST) + 10, None, "POST", "/up", 10, request_length=10, request_seen=10),
        ),
    ],
)
def test_seeded_flow_continues_like_the_reference(
    name: str, steps: list[tuple[str, bytes, int]], kernel_steps: int, handover: Handover
) -> None:
    expected = reference(steps)
    # Exchanges that completed inside the kernel are counted there, not by the Tracker.
    kernel_done = len(reference(steps[:kernel_steps])) if kernel_steps else 0
    assert handed_over(steps, kernel_steps, handover) == expected[kernel_done:]


def test_a_retransmission_of_kernel_data_is_ignored_after_the_seed() -> None:
    conn, tracker = Conn(), Tracker([PORT])
    first = conn.seg("s", HEAD1 + b"0123456789", 30, seq=S0)
    tracker.seed(KEY, Handover(C0 + len(REQ1), S0 + len(first.payload), "GET", "/a", 10))
    assert tracker.feed(first) == []  # before the seeded server seq: a retransmission
    assert tracker.stats.retransmitted_segments == 1
    conn.next["s"] = S0 + len(first.payload)
    done = tracker.feed(conn.seg("s", HEAD2 + b"abc", 40))
    assert done == [Exchange("GET", "/a", 404, 10, 40, 0, 3, PORT, server_ip="10.0.0.2")]


def test_a_seeded_flow_idles_from_the_handover_not_from_its_last_request() -> None:
    tracker = Tracker([PORT], Limits(idle_timeout_ns=100))
    tracker.seed(KEY, Handover(C0, S0, start_ns=10, seen_ns=1_000))
    tracker.expire(1_050)
    assert tracker.stats.flows_active == 1
    tracker.expire(1_200)
    assert tracker.stats.flows_active == 0


def test_seed_replaces_an_older_connection_on_the_same_tuple() -> None:
    tracker = Tracker([PORT])
    conn = Conn()
    tracker.feed(conn.seg("c", REQ1, 1))
    tracker.seed(KEY, Handover(C0 + 5000, None, "GET", "/new", 10))
    assert tracker.stats.requests_without_response == 1  # the old connection's request
    assert tracker.stats.flows_active == 1


def test_kernel_record_becomes_a_seed_with_realtime_start() -> None:
    record = KernelHandover(KEY, "pipelined", 2, "GET", "/a", 1_000, 5, 7, 200, 10, 4)
    assert to_handover(record, 10**18) == Handover(5, 7, "GET", "/a", 10**18 + 1_000, 200, 10, 4)
    bodied = dataclasses.replace(record, phase=1, request_length=10, request_left=6)
    assert to_handover(bodied, 0) == Handover(5, 7, "GET", "/a", 1_000, request_length=10, request_seen=4)
    idle = KernelHandover(KEY, "request", 0, "", "", 0, 5, None, 0, 0, 0)
    assert to_handover(idle, 1) == Handover(5, None, start_ns=1)
    after_exchanges = dataclasses.replace(idle, http_seen=True)  # a FAST flow: the kernel read HTTP on it
    assert to_handover(after_exchanges, 1) == Handover(5, None, start_ns=1, http_seen=True)


def test_http_metrics_merges_an_external_source_by_label_set() -> None:
    http = HttpMetrics(duration_buckets=(0.1, 1.0), size_buckets=(0, 100))
    http.observe(Exchange("GET", "/a", 200, 0, 50_000_000, 0, 10, PORT), "/a")
    key = http_key("GET", 200, "/a", PORT)
    http.add_source(lambda: [(key, ([1, 1, 0], 0.6), ([2, 0, 0], 0.0), ([0, 2, 0], 20.0)),
                             (http_key("HEAD", 200, "/h", PORT), ([1, 0, 0], 0.01), ([1, 0, 0], 0.0),
                              ([1, 0, 0], 0.0))])
    families = {f.name: f for f in http.collect()}
    samples = {(s.name, s.labels.get("http_route"), s.labels.get("le")): s.value
               for s in families["http_server_request_duration_seconds"].samples}
    assert samples[("http_server_request_duration_seconds_count", "/a", None)] == 3
    assert samples[("http_server_request_duration_seconds_bucket", "/a", "0.1")] == 2
    assert samples[("http_server_request_duration_seconds_sum", "/a", None)] == pytest.approx(0.65)
    assert samples[("http_server_request_duration_seconds_count", "/h", None)] == 1


class FakeFilter:
    """Stands in for HttpFilter's map readers: what the kernel aggregated so far."""

    def __init__(self) -> None:
        self.aggregates: list[KernelAggregate] = []
        self.records: list[KernelHandover] = []

    def read_aggregates(self) -> list[KernelAggregate]:
        return list(self.aggregates)

    def drain_aggregates(self) -> list[KernelAggregate]:
        drained, self.aggregates = self.aggregates, []
        return drained

    def drain_handovers(self) -> list[KernelHandover]:
        records, self.records = self.records, []
        return records

    def fast_counters(self) -> dict[str, int]:
        return dict.fromkeys(FAST_COUNTER_NAMES, 0) | {"exchanges": sum(a.count for a in self.aggregates)}

    def handover_counters(self) -> dict[str, int]:
        return dict.fromkeys(HANDOVER_REASONS, 0)

    def flow_state_capacity(self) -> int:
        return 65536

    def set_route_ids(self, on: bool) -> None:
        self.route_ids = on


def agg(path: str, count: int, buckets: tuple[int, ...]) -> KernelAggregate:
    return KernelAggregate("10.0.0.1", PORT, "GET", 200, path, count, count * 1_000_000, 0, buckets, (count, 0, 0))


def test_kernel_series_and_poll_deltas_name_routes_like_the_user_space_path() -> None:
    http = HttpMetrics(duration_buckets=(0.1, 1.0), size_buckets=(0, 100))
    fake = FakeFilter()
    fast = KernelFastPath(RouteMapper(["/items/{id}"]), http, realtime_offset_ns=lambda: 0)
    fast.attach(fake)  # type: ignore[arg-type]
    assert fake.route_ids  # no pattern has an all-digit literal segment
    http.add_source(fast.series)
    fake.aggregates = [agg("/items/1", 2, (2, 0, 0)), agg("/items/2", 1, (0, 1, 0))]
    assert fast.poll_deltas() == {("/items/{id}", PORT, "GET", 200, "10.0.0.1"): KernelDelta(3, 0.003, (2, 1, 0))}
    fake.aggregates = [agg("/items/1", 3, (3, 0, 0)), agg("/items/2", 1, (0, 1, 0))]
    assert fast.poll_deltas() == {("/items/{id}", PORT, "GET", 200, "10.0.0.1"): KernelDelta(1, 0.001, (1, 0, 0))}
    assert fast.poll_deltas() == {}
    families = {f.name: f for f in http.collect()}
    counts = {s.labels["http_route"]: s.value for s in families["http_server_request_duration_seconds"].samples
              if s.name.endswith("_count")}
    assert counts == {"/items/{id}": 4}
    fast.detach()  # the filter closes: what it counted stays
    assert {s.value for s in next(iter(http.collect())).samples if s.name.endswith("_count")} == {4}
    assert fast.exchanges() == 4


def test_a_half_full_kernel_map_is_drained_and_every_total_stays_whole() -> None:
    """Past AGG_ENTRIES keys the kernel hands new ones over: a read that finds the map half full
    takes it out whole, and the series and the SLO deltas go on from the same totals."""
    http = HttpMetrics(duration_buckets=(0.1, 1.0), size_buckets=(0, 100))
    fake = FakeFilter()
    fast = KernelFastPath(RouteMapper(["/w/{word}"]), http, realtime_offset_ns=lambda: 0)
    fast.attach(fake)  # type: ignore[arg-type]
    http.add_source(fast.series)
    fake.aggregates = [agg(f"/w/k{i}", 1, (1, 0, 0)) for i in range(AGG_ENTRIES // 2 - 1)]
    assert fast.poll_deltas() == {("/w/{word}", PORT, "GET", 200, "10.0.0.1"):
                                  KernelDelta(AGG_ENTRIES // 2 - 1, (AGG_ENTRIES // 2 - 1) * 1_000_000 / 1e9,
                                              (AGG_ENTRIES // 2 - 1, 0, 0))}
    assert fast.drains == 0 and len(fake.aggregates) == AGG_ENTRIES // 2 - 1
    fake.aggregates += [agg("/w/new", 2, (0, 2, 0))]
    assert fast.poll_deltas() == {("/w/{word}", PORT, "GET", 200, "10.0.0.1"): KernelDelta(2, 0.002, (0, 2, 0))}
    assert fast.drains == 1 and fake.aggregates == []
    fake.aggregates = [agg("/w/new", 1, (1, 0, 0))]  # the same key again, in the emptied map
    assert fast.poll_deltas() == {("/w/{word}", PORT, "GET", 200, "10.0.0.1"): KernelDelta(1, 0.001, (1, 0, 0))}
    counts = {s.labels["http_route"]: s.value for s in next(iter(http.collect())).samples if s.name.endswith("_count")}
    assert counts == {"/w/{word}": AGG_ENTRIES // 2 + 2}


def test_a_head_the_kernel_gave_up_mid_way_is_parsed_from_its_first_byte() -> None:
    """The record's head bytes (the segments the kernel consumed) come first, timed at the head's start."""
    head = REQ1[:10]
    record = KernelHandover(("10.0.0.1", 40000, "10.0.0.2", PORT), "seq", 0, "", "", 50, C0, S0, 0, 0, 0,
                            http_seen=True, head_length=len(head), head=head)
    tracker = Tracker([PORT])
    conn = Conn()
    assert tracker.seed(KEY, to_handover(record, 1000)) == []
    conn.next["c"] = C0 + len(head)
    conn.next["s"] = S0
    out = tracker.feed(conn.seg("c", REQ1[10:], 2000)) + tracker.feed(conn.seg("s", HEAD1 + b"0123456789", 3000))
    assert [(ex.method, ex.target, ex.start_ns, ex.end_ns) for ex in out] == [("GET", "/a", 1050, 3000)]
    lost = dataclasses.replace(record, head=None)  # the kept bytes were gone: parsing resumes after them
    assert to_handover(lost, 1000).client_next_seq == C0 + len(head)
    assert to_handover(lost, 1000).client_prefix == b""


LO_MSS = 65483  # payload of one full-size segment on lo (MTU 65536)


def test_a_handed_over_body_survives_two_cpus_swapping_full_size_segments() -> None:
    """The bench's 1 MB case: segment k+1 of a body reaches the tap before segment k.

    The kernel hands the flow over (reason seq) with the body partly seen; user space must
    hold k+1 until k arrives microseconds later, although k+1 alone is larger than
    max_buffered_bytes. It used to declare a gap at once and lose the exchange.
    """
    body = 1 << 20
    seen = 7 * LO_MSS - 246  # the head took 246 bytes of the first segment
    tracker = Tracker([PORT])
    conn = Conn()
    start = S0 + 246 + seen
    conn.next["c"] = C0 + len(REQ1)
    conn.next["s"] = start
    assert tracker.seed(KEY, Handover(C0 + len(REQ1), start, "GET", "/1m", 10, 200, body, seen)) == []
    left = body - seen
    segments = []
    ts = 100
    while left:
        n = min(LO_MSS, left)
        segments.append(conn.seg("s", b"x" * n, ts))
        left -= n
        ts += 1
    segments[0], segments[1] = segments[1], segments[0]
    out = []
    for seg in segments:
        out += tracker.feed(seg)
    assert out == [Exchange("GET", "/1m", 200, 10, ts - 1, 0, body, PORT, server_ip="10.0.0.2")]
    assert tracker.stats.parse_errors["gap"] == 0
    assert tracker.stats.requests_without_response == 0


def test_a_body_range_the_kernel_held_counts_when_the_gap_before_it_fills() -> None:
    """The kernel held "6789" (it overtook "45") and then handed over: user space counts it by length."""
    body_start = S0 + len(HEAD1)
    handover = Handover(C0 + len(REQ1), body_start + 4, "GET", "/a", 10, 200, 10, 4, seen_ns=36,
                        held=(body_start + 6, 4, 35))
    tracker = Tracker([PORT])
    assert tracker.seed(KEY, handover) == []
    assert tracker.stats.held_bytes > 0
    conn = Conn()
    # Ends when its last byte arrived (35), as the Tracker times any reordered response.
    assert tracker.feed(conn.seg("s", b"45", 40, seq=body_start + 4)) == [
        Exchange("GET", "/a", 200, 10, 35, 0, 10, PORT, server_ip="10.0.0.2")]
    assert tracker.stats.held_bytes == 0
    assert tracker.stats.parse_errors["gap"] == 0
    # The next exchange on the connection starts after the held range.
    tracker.feed(conn.seg("c", REQ2, 50, seq=C0 + len(REQ1)))
    assert tracker.feed(conn.seg("s", HEAD2 + b"abc", 60, seq=body_start + 10)) == [
        Exchange("GET", "/b", 404, 50, 60, 0, 3, PORT, server_ip="10.0.0.2")]


def test_a_held_range_in_the_kernel_record_reaches_the_seed() -> None:
    record = KernelHandover(KEY, "seq", 2, "GET", "/a", 1_000, 5, 7, 200, 10, 4,
                            held_ns=2_000, held_seq=9, held_length=4)
    assert to_handover(record, 10**18).held == (9, 4, 10**18 + 2_000)
    assert to_handover(dataclasses.replace(record, held_length=0), 10**18).held is None


def test_kernel_request_bodies_reach_the_request_size_histogram() -> None:
    http = HttpMetrics(duration_buckets=(0.1, 1.0), size_buckets=(0, 100))
    fake = FakeFilter()
    fast = KernelFastPath(RouteMapper(), http, realtime_offset_ns=lambda: 0)
    fast.attach(fake)  # type: ignore[arg-type]
    http.add_source(fast.series)
    bodied = dataclasses.replace(agg("/up", 3, (3, 0, 0)), request_sum=150, request_counts=(1, 1, 1))
    fake.aggregates = [bodied, agg("/plain", 2, (2, 0, 0))]  # a reader without request buckets
    families = {f.name: f for f in http.collect()}
    buckets = {(s.labels["http_route"], s.labels["le"]): s.value
               for s in families["http_server_request_body_size_bytes"].samples if s.name.endswith("_bucket")}
    sums = {s.labels["http_route"]: s.value
            for s in families["http_server_request_body_size_bytes"].samples if s.name.endswith("_sum")}
    assert [buckets[("/up", le)] for le in ("0.0", "100.0", "+Inf")] == [1, 2, 3]
    assert [buckets[("/plain", le)] for le in ("0.0", "100.0", "+Inf")] == [2, 2, 2]
    assert sums == {"/up": 150, "/plain": 0}
