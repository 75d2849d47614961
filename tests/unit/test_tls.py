"""TLS capture without a kernel: the event decoders, events -> Segments -> Exchanges, and the
clear-text Tracker's handling of encrypted connections."""

from __future__ import annotations

import mmap
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from exporter.capture.ringbuf import DISCARD, DrainedRing, RingBuffer, records_of, span_of
from exporter.capture.tls import (
    COUNTER_NAMES,
    KIND_CLOSE,
    KIND_OPEN,
    KIND_READ,
    KIND_WRITE,
    Endpoints,
    TlsCapture,
    TlsEvent,
    decode_event,
    decode_open,
    find_libraries,
)
from exporter.core.flows import Limits, Tracker, is_tls_record
from exporter.core.model import ACK, FIN, PSH, RST, Exchange, Segment
from exporter.errors import CaptureError
from exporter.pipeline import combined_stats

HEADER = struct.Struct("=QQQIiIIBB6x")  # struct tls_event in bpf/tls_probes.c, written independently
OPEN = struct.Struct("=HHH2x16s16s")  # struct tls_open: family, local port, peer port (network order), ...


def test_decode_event_reads_the_c_layout() -> None:
    raw = HEADER.pack(123, 0xABC, 4096, 77, 9, 5, 0, KIND_WRITE, 1) + b"hello"
    assert HEADER.size == 48
    assert decode_event(raw) == TlsEvent(123, 0xABC, 4096, 77, 9, KIND_WRITE, b"hello", 0, True)
    assert decode_event(raw[:-1]) is None  # shorter than its length says
    assert decode_event(raw[:20]) is None


def open_data(local: str, local_port: int, peer: str, peer_port: int) -> bytes:
    """struct tls_open as the kernel fills it: IPv4 in the first 4 bytes, the peer port as skc_dport keeps it."""
    family = socket.AF_INET6 if ":" in local else socket.AF_INET
    return OPEN.pack(family, local_port, socket.htons(peer_port), socket.inet_pton(family, local),
                     socket.inet_pton(family, peer))


@pytest.mark.parametrize(("data", "expected"), [
    (open_data("127.0.0.1", 8443, "127.0.0.2", 54321), Endpoints("127.0.0.1", 8443, "127.0.0.2", 54321)),
    (open_data("::1", 443, "::1", 40000), Endpoints("::1", 443, "::1", 40000)),
    # a dual-stack listener's IPv4 client: v4-mapped, shown as IPv4
    (open_data("::ffff:127.0.0.1", 443, "::ffff:127.0.0.2", 40001), Endpoints("127.0.0.1", 443, "127.0.0.2", 40001)),
    (OPEN.pack(socket.AF_UNIX, 1, 2, b"", b""), None),
    (open_data("127.0.0.1", 8443, "127.0.0.2", 1)[:-1], None),
])
def test_decode_open_reads_the_socket_ends(data: bytes, expected: Endpoints | None) -> None:
    assert OPEN.size == 40
    assert decode_open(data) == expected


def test_find_libraries_probes_each_file_once(tmp_path: Path) -> None:
    lib = tmp_path / "usr" / "libssl.so.3"
    lib.parent.mkdir()
    lib.write_bytes(b"\x7fELF")
    (tmp_path / "lib").symlink_to(tmp_path / "usr")  # merged /usr: the same inode twice
    other = tmp_path / "opt" / "libssl.so.3"
    other.parent.mkdir()
    other.write_bytes(b"\x7fELF")
    found = find_libraries([str(other), str(lib)], globs=[str(tmp_path / "*" / "libssl.so.3")])
    assert found == [str(tmp_path / "lib" / "libssl.so.3"), str(other)]
    with pytest.raises(CaptureError, match=r"^--libssl /nowhere/libssl.so.3: No such file or directory$"):
        find_libraries(["/nowhere/libssl.so.3"], globs=[])


REQUEST = b"GET /items/1?x=2 HTTP/1.1\r\nHost: a\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def event(kind: int, offset: int, data: bytes = b"", *, ts: int = 1000, fd: int = 9, ssl: int = 0x10,
          skipped: int = 0, after_loss: bool = False) -> TlsEvent:
    return TlsEvent(ts, ssl, offset, 500, fd, kind, data, skipped, after_loss)


def opened(*, ssl: int = 0x10, fd: int = 9, ts: int = 900, peer_port: int = 54321) -> TlsEvent:
    """The kernel's OPEN of a server socket on 127.0.0.1:8443."""
    return event(KIND_OPEN, 0, open_data("127.0.0.1", 8443, "127.0.0.2", peer_port), ts=ts, fd=fd, ssl=ssl)


def run(capture: TlsCapture, events: list[TlsEvent]) -> tuple[list[Segment], Tracker]:
    tracker = Tracker([8443], Limits(), scheme="https")
    segments = [seg for ev in events for seg in capture.segments_of(ev, 10**18)]
    for segment in segments:
        tracker.feed(segment)
    return segments, tracker


def test_events_become_https_exchanges_between_the_ends_the_open_names() -> None:
    capture = TlsCapture([8443], [])
    emitted: list[Exchange] = []
    tracker = Tracker([8443], Limits(), scheme="https")
    events = [
        opened(),
        event(KIND_READ, 0, REQUEST[:10], ts=1000),
        event(KIND_READ, 10, REQUEST[10:], ts=1100),
        event(KIND_WRITE, 0, RESPONSE[:20], ts=5000),
        event(KIND_WRITE, 20, RESPONSE[20:], ts=9000),
        event(KIND_CLOSE, 0, ts=9500),
    ]
    segments = []
    for ev in events:
        for segment in capture.segments_of(ev, 10**18):
            segments.append(segment)
            emitted.extend(tracker.feed(segment))
    [exchange] = emitted
    assert (exchange.method, exchange.target, exchange.status, exchange.scheme) == ("GET", "/items/1", 200, "https")
    assert (exchange.start_ns, exchange.end_ns, exchange.server_port) == (10**18 + 1000, 10**18 + 9000, 8443)
    assert [(s.src_ip, s.src_port, s.dst_ip, s.dst_port) for s in segments[:1]] == [("127.0.0.2", 54321,
                                                                                      "127.0.0.1", 8443)]
    assert [s.flags for s in segments[4:]] == [ACK | FIN, ACK | FIN]  # the close (SSL_free) ended it
    assert tracker.stats.flows_active == 0
    assert capture.connections_tracked() == 0


def test_data_of_no_open_connection_and_a_bad_open_count_nothing() -> None:
    """The kernel sends no data before an OPEN; what comes without one (its connection evicted)
    is dropped, and an OPEN whose data is not a socket's ends is a decode error."""
    capture = TlsCapture([8443], [])
    segments, _ = run(capture, [event(KIND_READ, 0, REQUEST), event(KIND_CLOSE, 0),
                                event(KIND_OPEN, 0, b"short", ssl=0x20), event(KIND_READ, 0, REQUEST, ssl=0x20)])
    assert segments == []
    assert capture.decode_errors == 1
    assert capture.connections_tracked() == 0


def test_lost_bytes_are_a_gap_of_known_length_and_skips_are_counted_bytes() -> None:
    capture = TlsCapture([8443], [])
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    segments, tracker = run(capture, [
        opened(),
        event(KIND_READ, 0, REQUEST),
        event(KIND_WRITE, 0, head + b"a" * 100),
        event(KIND_WRITE, len(head) + 100, skipped=40000),  # a body stretch sent by length
        # 30000 bytes lost in the ring, then the rest of the body
        event(KIND_WRITE, len(head) + 70100, b"b" * 29900, after_loss=True),
        event(KIND_READ, len(REQUEST), REQUEST),
    ])
    assert [(s.seq, len(s.payload), s.payload_len) for s in segments[2:4]] == [
        (len(head) + 100, 0, 40000), (len(head) + 40100, 0, 30000)]
    assert capture.loss_gaps == 1
    assert tracker.stats.parse_errors["gap"] == 0
    assert tracker.stats.flows_active == 1


def test_a_new_open_of_a_known_ssl_ends_the_old_connection() -> None:
    """The same SSL* again (freed and reused by malloc with its CLOSE lost, or moved to another fd):
    the old flow ends before the new one begins."""
    capture = TlsCapture([8443], [])
    emitted: list[Exchange] = []
    tracker = Tracker([8443], Limits(), scheme="https")
    close_delimited = b"HTTP/1.1 200 OK\r\n\r\nclose-delimited"
    for ev in [opened(), event(KIND_READ, 0, REQUEST), event(KIND_WRITE, 0, close_delimited),
               opened(fd=11, peer_port=54322), event(KIND_READ, 0, REQUEST, fd=11),
               event(KIND_WRITE, 0, RESPONSE, fd=11)]:
        for segment in capture.segments_of(ev, 0):
            emitted.extend(tracker.feed(segment))
    assert [(e.status, e.response_body_bytes) for e in emitted] == [(200, 15), (200, 5)]
    assert capture.connections_tracked() == 1


def test_reap_resets_connections_closed_unseen() -> None:
    capture = TlsCapture([8443], [])
    _, tracker = run(capture, [opened(), event(KIND_READ, 0, REQUEST)])
    assert capture.reap(5, is_open=lambda tgid, fd: True) == []
    for segment in capture.reap(5, is_open=lambda tgid, fd: (tgid, fd) != (500, 9)):
        tracker.feed(segment)
    assert tracker.stats.requests_without_response == 1
    assert tracker.stats.flows_active == 0


@pytest.mark.parametrize(("payload", "tls"), [
    (b"\x16\x03\x01\x02\x00", True), (b"\x17\x03\x03\x00\x20", True), (b"\x15\x03\x03", True),
    (b"GET / HTTP/1.1\r\n", False), (b"\x16\x02\x01", False), (b"\x18\x03\x03", False), (b"\x16\x03", False),
])
def test_tls_record_headers(payload: bytes, tls: bool) -> None:
    assert is_tls_record(payload) is tls


def test_encrypted_flow_on_a_watched_port_is_neither_parsed_nor_an_error() -> None:
    tracker = Tracker([443], Limits(), hint_skips=True)
    hello = b"\x16\x03\x01\x00\xa0" + b"\x01" * 160
    segments = [
        Segment(1, "10.0.0.1", 5000, "10.0.0.2", 443, 100, ACK | PSH, hello, len(hello)),
        Segment(2, "10.0.0.2", 443, "10.0.0.1", 5000, 900, ACK | PSH, b"\x16\x03\x03" + b"\x02" * 90, 93),
        Segment(3, "10.0.0.1", 5000, "10.0.0.2", 443, 265, ACK | PSH, b"GARBAGE\r\n\r\n", 11),
        Segment(4, "10.0.0.1", 5000, "10.0.0.2", 443, 276, ACK | FIN, b"", 0),
        Segment(5, "10.0.0.2", 443, "10.0.0.1", 5000, 993, ACK | FIN, b"", 0),
    ]
    flow = ("10.0.0.1", 5000, "10.0.0.2", 443)
    for segment in segments[:3]:
        assert tracker.feed(segment) == []
    assert tracker.take_encrypted_hints() == {flow: True}  # the capture drops its payload from now on
    for segment in segments[3:]:
        assert tracker.feed(segment) == []
    assert tracker.stats.encrypted_flows == 1
    assert sum(tracker.stats.parse_errors.values()) == 0
    assert tracker.stats.flows_active == 0
    assert tracker.take_encrypted_hints() == {flow: False}  # and forgets it once it ended
    assert tracker.take_skip_hints() == {}


def test_combined_stats_add_up_every_counter() -> None:
    first, second = Tracker([80]), Tracker([443], scheme="https")
    first.stats.segments, second.stats.segments = 3, 4
    first.stats.parse_errors["gap"], second.stats.parse_errors["gap"] = 1, 2
    second.stats.flows_evicted["idle"] = 5
    total = combined_stats([first.stats, second.stats])
    assert (total.segments, total.parse_errors["gap"], total.flows_evicted["idle"]) == (7, 3, 5)


def test_close_before_data_ends_the_flow() -> None:
    capture = TlsCapture([8443], [])
    segments, _ = run(capture, [opened(), event(KIND_CLOSE, 0)])
    assert [s.flags for s in segments] == [ACK | FIN, ACK | FIN]


class FakeProbes:
    """TlsProbes' read and skip side: raw ring records, as the kernel writes them."""

    def __init__(self, batches: list[list[bytes]], spans: list[list[bytes]] | None = None) -> None:
        # What each read gives: a batch of records as one span, or the spans given.
        self.spans = spans if spans is not None else [[span_of(batch)] for batch in batches]
        self.skips: list[tuple[int, int, int, int, tuple[int, int] | None]] = []
        self.forgotten: list[tuple[int, int]] = []

    def read(self, timeout_s: float) -> list[bytes]:
        return self.spans.pop(0) if self.spans else []

    def flush(self) -> None:
        pass  # its batches are all readable already

    def queued(self) -> bool:
        return bool(self.spans)

    def set_skip(self, tgid: int, ssl: int, conn: int, direction: int, stretch: tuple[int, int] | None) -> None:
        self.skips.append((tgid, ssl, conn, direction, stretch))

    def forget(self, tgid: int, ssl: int) -> None:
        self.forgotten.append((tgid, ssl))


def raw(ev: TlsEvent) -> bytes:
    return HEADER.pack(ev.ts_ns, ev.ssl, ev.stream_offset, ev.tgid, ev.fd, len(ev.data),
                       ev.skipped, ev.kind, int(ev.after_loss)) + ev.data


def test_read_gives_the_segments_that_segments_of_gives() -> None:
    """read() handles in-order data of known connections inline; every other event goes through
    segments_of. Both must agree, event for event, including opens and closes in the same batch."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 50000\r\n\r\n"
    events = [
        opened(),
        event(KIND_READ, 0, REQUEST),
        event(KIND_WRITE, 0, head + b"a" * 100),
        event(KIND_WRITE, len(head) + 100, skipped=40000),
        event(KIND_WRITE, len(head) + 70100, b"b" * 10, after_loss=True),
        event(KIND_READ, len(REQUEST), REQUEST, ts=2000),
        opened(fd=11, ssl=0x20, peer_port=2),
        event(KIND_READ, 0, REQUEST, fd=11, ssl=0x20),
        opened(ssl=0x10, fd=12, peer_port=3),  # the same SSL* on another fd: the old connection ended
        event(KIND_READ, 0, REQUEST, fd=12),
        event(KIND_CLOSE, 0, fd=11, ssl=0x20),
        event(KIND_READ, 0, REQUEST, fd=11, ssl=0x20),  # after its close: no connection
    ]
    reference = TlsCapture([8443], [])
    expected = [seg for ev in events for seg in reference.segments_of(ev, 7)]
    # Two reads, the second of two spans; a record the producer discarded is skipped unseen.
    discarded = struct.pack("=II", len(REQUEST) | DISCARD, 0) + REQUEST + bytes(-len(REQUEST) % 8)
    probes = FakeProbes([], spans=[[span_of([raw(ev) for ev in events[:4]])],
                                   [span_of([raw(ev) for ev in events[4:7]]) + discarded,
                                    span_of([raw(ev) for ev in events[7:]] + [b"short"])]])
    capture = TlsCapture([8443], [], realtime_offset_ns=lambda: 7,
                         probes_factory=lambda libraries, ports: probes)  # type: ignore[arg-type,return-value]
    capture.open()
    got = capture.read(0) + capture.read(0)
    assert got == expected
    assert len(got) == 12  # 7 data events, a loss gap, two FINs when the SSL* moved, two at the close
    assert capture.decode_errors == 1
    assert capture.loss_gaps == reference.loss_gaps == 1
    assert capture.connections_tracked() == reference.connections_tracked() == 1
    # Skip hints name the kernel's connection: (tgid, SSL*) and its OPEN's time.
    flow = ("127.0.0.2", 3, "127.0.0.1", 8443)
    capture.apply_skip_hints({(flow, False): (100, 200), (("127.0.0.2", 2, "127.0.0.1", 8443), True): None})
    assert probes.skips == [(500, 0x10, 900, KIND_WRITE, (100, 200))]


def test_ring_buffer_joins_a_record_that_wraps_around() -> None:
    """The kernel's ring layout in a memfd: consumer page, producer page, data area (mapped once)."""
    page, size = mmap.PAGESIZE, 4096
    fd = os.memfd_create("ring")
    try:
        os.ftruncate(fd, 2 * page + size)
        ring = RingBuffer(fd, size)
        records = [b"x" * 4000, b"first-" + bytes(range(200)), b"discarded", b"last"]
        position = 0
        with mmap.mmap(fd, 2 * page + size) as memory:
            for number, record in enumerate(records):
                header = len(record) | (1 << 30 if record == b"discarded" else 0)
                struct.pack_into("=II", memory, 2 * page + (position & (size - 1)), header, 0)
                for i, byte in enumerate(record):  # byte by byte, wrapping as the kernel's double map does
                    memory[2 * page + ((position + 8 + i) & (size - 1))] = byte
                position += (len(record) + 8 + 7) & ~7
                if number == 0:
                    struct.pack_into("=Q", memory, page, position)
                    assert records_of(ring.read(0)) == [records[0]]
            struct.pack_into("=Q", memory, page, position)
            assert 4008 + 8 + len(records[1]) > size  # the second record starts near the end and wraps
            assert records_of(ring.read(0)) == [records[1], records[3]]
            assert ring.consumer_position() == position
            assert struct.unpack_from("=Q", memory, 0)[0] == position
        ring.close()
    finally:
        os.close(fd)


def test_ring_buffer_stops_at_a_record_still_being_written() -> None:
    """A record reserved but not committed (its header's busy bit) ends the span, and the ring's
    room is given back only up to it; once committed, the next read takes it."""
    page, size = mmap.PAGESIZE, 4096
    fd = os.memfd_create("ring")
    try:
        os.ftruncate(fd, 2 * page + size)
        ring = RingBuffer(fd, size)
        with mmap.mmap(fd, 2 * page + size) as memory:
            memory[2 * page:2 * page + 32] = span_of([b"one", b"two!"])
            struct.pack_into("=II", memory, 2 * page + 32, 5 | 1 << 31, 0)  # "three", still being written
            memory[2 * page + 40:2 * page + 45] = b"three"
            struct.pack_into("=Q", memory, page, 48)
            assert ring.read(0) == span_of([b"one", b"two!"])
            assert ring.consumer_position() == 32
            assert ring.read(0) == b""
            struct.pack_into("=I", memory, 2 * page + 32, 5)  # committed
            assert records_of(ring.read(0)) == [b"three"]
            assert ring.consumer_position() == 48
        ring.close()
    finally:
        os.close(fd)


def test_drained_ring_gives_the_ring_back_at_once_and_stops_taking_when_its_queue_is_full() -> None:
    """The thread copies records out and releases their room in the ring before the reader takes
    them; the position the probes judge their backlog by moves only when the reader takes them.
    Past its byte bound the thread stops taking, so the ring fills (and the kernel counts)."""
    page, size = mmap.PAGESIZE, 4096
    fd = os.memfd_create("ring")
    try:
        os.ftruncate(fd, 2 * page + size)
        with mmap.mmap(fd, 2 * page + size) as memory:
            produced = 0

            def produce(record: bytes) -> int:
                nonlocal produced
                struct.pack_into("=II", memory, 2 * page + (produced & (size - 1)), len(record), 0)
                for i, byte in enumerate(record):
                    memory[2 * page + ((produced + 8 + i) & (size - 1))] = byte
                produced += (len(record) + 8 + 7) & ~7
                struct.pack_into("=Q", memory, page, produced)
                return produced

            def released() -> int:
                value: int = struct.unpack_from("=Q", memory, 0)[0]
                return value

            def wait_until(condition: Callable[[], bool]) -> bool:
                deadline = time.monotonic() + 5
                while not condition() and time.monotonic() < deadline:
                    time.sleep(0.01)
                return condition()

            told: list[int] = []  # the ring's own consumer positions, as the probes' lost() reads them
            drained = DrainedRing(RingBuffer(fd, size), max_queued_bytes=1000, every_s=0.01, on_drained=told.append)
            try:
                produce(b"early")
                time.sleep(0.05)
                assert released() == 0  # no thread before the first use (a --user drop needs one thread)
                drained.start()
                assert drained.read(1.0) == [span_of([b"early"])]
                first = produce(b"a" * 3000)
                assert wait_until(lambda: released() == first)  # the ring's room is back, not yet read
                assert drained.processed_position == first - 3008
                produce(b"b" * 100)
                time.sleep(0.1)
                assert released() == first  # 3000 bytes queued, over the bound: the thread waits
                assert drained.read(1.0) == [span_of([b"a" * 3000])]
                assert drained.processed_position == first
                assert drained.read(1.0) == [span_of([b"b" * 100])]
                assert drained.processed_position == released() == produced
                assert drained.largest_queued_bytes == 3008  # the record and its ring header
                assert drained.read(0) == []
                assert told == [first - 3008, first, produced]  # after each batch the thread took
            finally:
                drained.close()
    finally:
        os.close(fd)


def test_reap_reads_the_ring_before_it_resets_a_gone_socket() -> None:
    """The process wrote its last response and exited; the response still waits in the ring when
    reap finds the fd gone, in two reads' worth (a read stops at its size limit). All of it is
    read first, so the exchange is counted before the RST."""
    probes = FakeProbes([[raw(opened()), raw(event(KIND_READ, 0, REQUEST))],
                         [raw(event(KIND_WRITE, 0, RESPONSE[:20], ts=4000))],
                         [raw(event(KIND_WRITE, 20, RESPONSE[20:], ts=5000))]])
    capture = TlsCapture([8443], [], realtime_offset_ns=lambda: 0,
                         probes_factory=lambda libraries, ports: probes)  # type: ignore[arg-type,return-value]
    capture.open()
    tracker = Tracker([8443], Limits(), scheme="https")
    segments = capture.read(0) + capture.reap(9000, is_open=lambda tgid, fd: False)
    emitted = [exchange for segment in segments for exchange in tracker.feed(segment)]
    assert [(e.status, e.end_ns) for e in emitted] == [(200, 5000)]
    assert segments[-1].flags == RST
    assert tracker.stats.requests_without_response == 0
    assert capture.connections_tracked() == 0
    assert probes.forgotten == [(500, 0x10)]  # the kernel's state of it goes too


class ScriptedRing:
    """A ring's reader side whose reads return, in turn, what the producers had committed by then;
    `reserved`: its producer position (records committed or still being written)."""

    def __init__(self, spans: list[bytes], reserved: int = 0) -> None:
        self.spans = spans
        self.position = 0
        self.reserved = reserved
        self._never_r, self._never_w = os.pipe()  # what the thread polls: never readable

    def read(self, timeout_s: float) -> bytes:
        span = self.spans.pop(0) if self.spans else b""
        self.position += len(span)
        return span

    def consumer_position(self) -> int:
        return self.position

    def producer_position(self) -> int:
        return max(self.reserved, self.position)

    def fileno(self) -> int:
        return self._never_r

    def close(self) -> None:
        os.close(self._never_r)
        os.close(self._never_w)


def test_fallback_records_reach_the_reader_in_the_order_they_were_written() -> None:
    """The kernel's rule (tls_probes.c, output()): an event the ring refuses goes to the fallback
    ring, and so does every event after it until the thread has reported taking the fallback.
    Connection A's response is refused; B's request was written to the ring just before, after the
    thread's first read of it, behind a record another CPU was still writing; B's response, A's
    close, a new connection on A's SSL* (another fd) and its request follow A's response into the
    fallback; once reported, the ring again. The thread reads the ring again up to where it was
    reserved, past the record being written, which puts B's OPEN and request before the fallback's
    records, and the report comes once they are all queued: every exchange is counted, none late."""
    a_open, b_open = opened(ts=1), opened(ssl=0x20, fd=11, ts=3, peer_port=2)
    a2_open = opened(fd=12, ts=8, peer_port=3)
    main_first = [a_open, event(KIND_READ, 0, REQUEST, ts=2)]
    main_before_refusal = [b_open, event(KIND_READ, 0, REQUEST, ssl=0x20, fd=11, ts=4)]
    fallback = [event(KIND_WRITE, 0, RESPONSE, ts=5), event(KIND_WRITE, 0, RESPONSE, ssl=0x20, fd=11, ts=6),
                event(KIND_CLOSE, 0, ts=7), a2_open, event(KIND_READ, 0, REQUEST, fd=12, ts=9)]
    main_after_report = [event(KIND_WRITE, 0, RESPONSE, fd=12, ts=10), event(KIND_CLOSE, 0, ssl=0x20, fd=11, ts=11)]
    spans = [span_of([raw(ev) for ev in batch]) for batch in (main_first, main_before_refusal, fallback,
                                                              main_after_report)]
    # The second read finds the record in progress (nothing), the third B's two.
    ring = ScriptedRing([spans[0], b"", spans[1], spans[3]], reserved=len(spans[0]) + len(spans[1]))
    late = ScriptedRing([spans[2]])
    taken: list[bytes] = []  # what the reader could take when each report was made
    reports: list[int] = []

    def report(position: int) -> None:
        taken.extend(drained.read(0))
        reports.append(position)

    drained = DrainedRing(ring, max_queued_bytes=1 << 20, every_s=10.0,  # type: ignore[arg-type]
                          fallback=late, on_fallback_drained=report)  # type: ignore[arg-type]
    try:
        drained.flush()
        assert taken == spans  # the ring's records written before the fallback's are queued before them
        assert reports[0] == len(spans[2])  # reported with them queued: producers go back to the ring
    finally:
        drained.close()
    probes = FakeProbes([], spans=[taken])
    capture = TlsCapture([8443], [], realtime_offset_ns=lambda: 0,
                         probes_factory=lambda libraries, ports: probes)  # type: ignore[arg-type,return-value]
    capture.open()
    tracker = Tracker([8443], Limits(), scheme="https")
    emitted = tracker.feed_all(capture.read(0))
    assert [(e.method, e.status, e.start_ns, e.end_ns) for e in emitted] == [
        ("GET", 200, 2, 5), ("GET", 200, 4, 6), ("GET", 200, 9, 10)]
    assert tracker.stats.unmatched_responses == 0
    assert tracker.stats.flows_active == capture.connections_tracked() == 1  # the new one on A's SSL*


class CountingProbes(FakeProbes):
    """FakeProbes with the kernel's counters, and the filter map it was anchored to."""

    def __init__(self, counters: dict[str, int]) -> None:
        super().__init__([])
        self.kernel = counters
        self.libraries = ["/usr/lib/x86_64-linux-gnu/libssl.so.3"]
        self.anchored: list[int] = []

    def counters(self) -> dict[str, int]:
        return self.kernel

    def anchor_to(self, tls_flows_fd: int) -> None:
        self.anchored.append(tls_flows_fd)


def test_exchange_ends_are_counted_by_how_they_were_timed() -> None:
    kernel = dict.fromkeys(COUNTER_NAMES, 0)
    kernel.update(start_wire=36, start_no_match=1, start_no_wire=4, end_wire=38, end_no_match=2, end_no_wire=0)
    probes = CountingProbes(kernel)
    capture = TlsCapture([8443], [], probes_factory=lambda libraries, ports: probes)  # type: ignore[arg-type,return-value]
    capture.anchor_to(7)  # not open yet: nothing to anchor
    capture.open()
    capture.anchor_to(9)
    assert probes.anchored == [9]
    samples = {(s.name, s.labels): s.value for s in capture.self_samples()}
    assert samples[("tls_exchange_ends_wire_timed_total", (("end", "start"),))] == 36
    assert samples[("tls_exchange_ends_wire_timed_total", (("end", "end"),))] == 38
    probe_timed = {labels: value for (name, labels), value in samples.items()
                   if name == "tls_exchange_ends_probe_timed_total"}
    assert probe_timed == {(("end", "start"), ("reason", "no_match")): 1, (("end", "start"), ("reason", "no_wire")): 4,
                           (("end", "end"), ("reason", "no_match")): 2, (("end", "end"), ("reason", "no_wire")): 0}
