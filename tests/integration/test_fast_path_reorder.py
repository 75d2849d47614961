"""A response body segment that overtakes the one before it, on the real filter.

On lo the segments of one response leave from two CPUs, and one sometimes reaches the
packet tap first. The fast path holds one such range and counts it when the gap fills;
when something else hands the flow over meanwhile, the handover record carries the held
range and user space counts it. Here the segments are written onto lo by a packet socket,
between two addresses that are not local (so no TCP stack answers), in exactly the order
the race produces.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from tests.integration.harness import counts_by_key, free_port, self_metric
from tests.integration.test_exporter_lo import both_paths

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF and writes raw frames: needs root")

CLIENT, SERVER = "10.250.0.1", "10.250.0.2"
ACK_PSH = 0x18


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def frame(src: str, sport: int, dst: str, dport: int, seq: int, payload: bytes, flags: int = ACK_PSH) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, 1, 5 << 4, flags, 65535, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp) + len(payload))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp + payload)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0x4000, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return b"\0" * 12 + b"\x08\x00" + ip + tcp + payload


class Wire:
    """Writes one connection's segments onto lo, each direction with its own sequence space."""

    def __init__(self, sock: socket.socket, server_port: int, client_port: int) -> None:
        self.sock, self.server_port, self.client_port = sock, server_port, client_port
        self.client_seq, self.server_seq = 1_000, 4_294_960_000  # the server's wraps mid-body

    def request(self, data: bytes) -> None:
        self.sock.send(frame(CLIENT, self.client_port, SERVER, self.server_port, self.client_seq, data))
        self.client_seq += len(data)
        time.sleep(0.002)

    def response(self, data: bytes, at: int = 0) -> None:
        """`at`: offset from the next expected byte (a segment sent ahead of its turn)."""
        self.sock.send(frame(SERVER, self.server_port, CLIENT, self.client_port, self.server_seq + at, data))
        time.sleep(0.002)

    def advance(self, n: int) -> None:
        self.server_seq += n


HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n"
BODY = bytes(range(48, 78))


def test_an_overtaking_body_segment_is_counted_in_the_kernel_and_after_a_handover() -> None:
    port = free_port()
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind(("lo", 0))
        with both_paths(port, "--route", "/held/{n}") as exporters:
            # Two segments overtake body[10:20]: the kernel holds body[20:30] as one range and
            # counts it when the gap fills.
            kept = Wire(sock, port, 40001)
            kept.request(b"GET /held/1 HTTP/1.1\r\nHost: x\r\n\r\n")
            kept.response(HEAD + BODY[:10])
            kept.advance(len(HEAD) + 10)
            kept.response(BODY[20:25], at=10)
            kept.response(BODY[25:], at=15)
            kept.response(BODY[10:20])
            kept.advance(20)
            kept.request(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection goes on in the kernel
            kept.response(b"HTTP/1.1 204 No Content\r\n\r\n")
            # Held, then a pipelined request hands the flow over: user space counts the held range.
            handed = Wire(sock, port, 40002)
            handed.request(b"GET /held/2 HTTP/1.1\r\nHost: x\r\n\r\n")
            handed.response(HEAD + BODY[:10])
            handed.advance(len(HEAD) + 10)
            handed.response(BODY[20:], at=10)
            handed.request(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            handed.response(BODY[10:20])
            handed.advance(20)
            handed.response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            scraped = {mode: proc.wait_for_exchanges(4) for mode, proc in exporters.items()}
    expected = {("GET", "200", "/held/{n}"): 2, ("GET", "204", "/after"): 1, ("GET", "404", "/next"): 1}
    for mode, samples in scraped.items():
        assert counts_by_key(samples, port) == expected, mode
        body_bytes = sum(value for (name, labels), value in samples.items()
                         if name == "http_server_response_body_size_bytes_sum"
                         and ("http_route", "/held/{n}") in labels)
        assert body_bytes == 60, mode
        assert self_metric(samples, "parse_errors_total", reason="gap") == 0, mode
    fast = scraped["fast"]
    assert self_metric(fast, "fast_path_overtaken_segments_total") == 3
    assert self_metric(fast, "fast_path_exchanges_total") == 2  # /held/1 and /after
    assert self_metric(fast, "fast_path_handovers_total", reason="pipelined") == 1
    assert self_metric(fast, "fast_path_handovers_total", reason="seq") == 0
