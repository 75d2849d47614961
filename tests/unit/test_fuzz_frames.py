"""Property-based fuzzing of the frame decoder (exporter/capture/frames.py).

Random bytes and mutated valid frames, for every supported link type, never raise: the
decoder answers a Segment or one of its REASON_* strings. A Segment it returns is
self-consistent; valid frames built here decode to exactly what was put in.
"""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st

from exporter.capture import frames
from exporter.capture.frames import SUPPORTED_LINKTYPES, decode_frame, decode_frame_reason
from exporter.core.model import Segment
from tests.unit.fuzz_settings import fuzz

REASONS = {getattr(frames, name) for name in dir(frames) if name.startswith("REASON_")}
LINKTYPES = [*sorted(SUPPORTED_LINKTYPES), 2, 147, 65535]


def tcp(sport: int, dport: int, seq: int, flags: int, options: bytes, payload: bytes) -> bytes:
    offset = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, offset << 4, flags, 65535, 0, 0) + options + payload


def ipv4(src: str, dst: str, l4: bytes, proto: int = 6) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto, 0,
                       ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed) + l4


def ipv6(src: str, dst: str, l4: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), 6, 64, ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed) + l4


def ethernet(l3: bytes, v6: bool, vlan: bool) -> bytes:
    head = b"\x02" * 6 + b"\x04" * 6
    if vlan:
        head += struct.pack("!HH", 0x8100, 7)
    return head + struct.pack("!H", 0x86DD if v6 else 0x0800) + l3


@st.composite
def valid_frames(draw: st.DrawFn) -> tuple[bytes, int, Segment]:
    v6 = draw(st.booleans())
    src = str(ipaddress.IPv6Address(draw(st.integers(1, 2**128 - 1)))) if v6 else \
        str(ipaddress.IPv4Address(draw(st.integers(1, 2**32 - 1))))
    dst = str(ipaddress.IPv6Address(draw(st.integers(1, 2**128 - 1)))) if v6 else \
        str(ipaddress.IPv4Address(draw(st.integers(1, 2**32 - 1))))
    sport, dport = draw(st.integers(0, 65535)), draw(st.integers(0, 65535))
    seq, flags = draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 0x3F))
    options = b"\x01" * 4 * draw(st.integers(0, 10))
    payload = draw(st.binary(max_size=400))
    l4 = tcp(sport, dport, seq, flags, options, payload)
    l3 = ipv6(src, dst, l4) if v6 else ipv4(src, dst, l4)
    linktype = draw(st.sampled_from([frames.LINKTYPE_ETHERNET, frames.LINKTYPE_RAW]))
    frame = ethernet(l3, v6, draw(st.booleans())) if linktype == frames.LINKTYPE_ETHERNET else l3
    return frame, linktype, Segment(7, src, sport, dst, dport, seq, flags, payload, len(payload))


def check(result: Segment | str, frame_len: int) -> None:
    if isinstance(result, str):
        assert result in REASONS
        return
    assert type(result) is Segment
    assert 0 <= result.src_port <= 65535 and 0 <= result.dst_port <= 65535
    assert 0 <= result.seq < 2**32
    assert 0 <= len(result.payload) <= result.payload_len
    assert len(result.payload) <= frame_len
    ipaddress.ip_address(result.src_ip)
    ipaddress.ip_address(result.dst_ip)


@fuzz(500)
@given(valid_frames())
def test_valid_frames_decode_exactly(case: tuple[bytes, int, Segment]) -> None:
    frame, linktype, expected = case
    got = decode_frame(frame, 7, len(frame), linktype)
    assert got is not None
    # inet_ntop and ipaddress spell some IPv6 forms differently (::0.1.0.0 vs ::1:0): compare addresses.
    assert ipaddress.ip_address(got.src_ip) == ipaddress.ip_address(expected.src_ip)
    assert ipaddress.ip_address(got.dst_ip) == ipaddress.ip_address(expected.dst_ip)
    assert got == Segment(got.ts_ns, got.src_ip, expected.src_port, got.dst_ip, expected.dst_port, expected.seq,
                          expected.flags, expected.payload, expected.payload_len)
    assert got.ts_ns == 7
    # A frame cut anywhere (snap length) never raises; cut inside the payload it keeps the wire length.
    for cut in range(0, len(frame), max(1, len(frame) // 23)):
        check(decode_frame_reason(frame[:cut], 7, len(frame), linktype), cut)


@fuzz(1200)
@given(st.binary(max_size=200), st.sampled_from(LINKTYPES), st.integers(0, 70000))
def test_random_bytes_never_raise(frame: bytes, linktype: int, wire: int) -> None:
    check(decode_frame_reason(frame, 1, wire, linktype), len(frame))
    check(decode_frame_reason(memoryview(frame), 1, wire, linktype), len(frame))


@fuzz(800)
@given(valid_frames(), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, 30), st.sampled_from(LINKTYPES), st.integers(0, 70000))
def test_mutated_frames_never_raise(case: tuple[bytes, int, Segment], flips: list[tuple[int, int]],
                                    chop: int, linktype: int, wire: int) -> None:
    frame = bytearray(case[0])
    for at, value in flips:
        if at < len(frame):
            frame[at] = value
    mutated = bytes(frame[: len(frame) - chop] if chop < len(frame) else frame)
    check(decode_frame_reason(mutated, 1, wire, linktype), len(mutated))
    check(decode_frame_reason(mutated, 1, wire, case[1]), len(mutated))



@fuzz(500)
@given(valid_frames(), st.sampled_from([0x45, 0x45, 0x46, 0x44, 0x4F]), st.one_of(st.none(), st.integers(0, 120)),
       st.sampled_from([0, 0x4000, 0x2000, 1, 0x1FFF]), st.sampled_from([6, 6, 17]), st.integers(0, 255),
       st.integers(0, 100))
def test_ethernet_ipv4_frames_decode_as_raw_ip_does(case: tuple[bytes, int, Segment], ver_ihl: int,
                                                     tot_len: int | None, frag: int, proto: int, doff: int,
                                                     cut: int) -> None:
    """Untagged Ethernet IPv4 TCP frames take a one-unpack path; whatever their header fields say
    (options, a fragment, lengths too short or too long, another protocol, a cut frame), it answers as
    the general path does for the same IP packet given raw."""
    frame, linktype, _ = case
    data = bytearray(ethernet(frame, False, False) if linktype == frames.LINKTYPE_RAW else frame)
    if data[12:14] != b"\x08\x00":
        return  # IPv6 or VLAN: the general path's own
    data[14] = ver_ihl
    if tot_len is not None:
        struct.pack_into("!H", data, 16, tot_len)
    struct.pack_into("!HxB", data, 20, frag, proto)
    data[46] = doff
    data = data[: max(15, len(data) - cut)]
    wire = len(data) + cut
    assert decode_frame_reason(bytes(data), 7, wire) == decode_frame_reason(bytes(data[14:]), 7, wire - 14,
                                                                             frames.LINKTYPE_RAW)
