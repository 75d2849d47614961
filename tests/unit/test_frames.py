"""exporter.capture.frames: table-driven cases, garbage, and a cross-check against pypacker.

Frames are built with pypacker (plus raw bytes where pypacker cannot build a
header, such as IPv6 extension headers and VLAN tags), decoded by frames.py and
by pypacker's own parser; the fields must agree.
"""

from __future__ import annotations

import random
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
from pypacker import ppcap
from pypacker.layer3 import ip, ip6
from pypacker.layer4 import tcp
from pypacker.layer12 import ethernet, linuxcc

from exporter.capture import frames
from exporter.capture.frames import (
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
    decode_frame,
    decode_frame_reason,
    wanted,
)
from exporter.capture.pcap import read_capture
from exporter.core.model import ACK, FIN, PSH, RST, SYN, Segment
from exporter.errors import CaptureError

TS = 1_700_000_000_123_456_789
V4_SRC, V4_DST = "10.0.0.1", "10.0.0.2"
V6_SRC, V6_DST = "2001:db8::1", "2001:db8::2"
ETH_HDR = b"\x02" * 6 + b"\x04" * 6


def tcp_layer(
    payload: bytes,
    *,
    sport: int = 40000,
    dport: int = 8000,
    seq: int = 1000,
    flags: int = ACK | PSH,
    opts: bytes = b"",
) -> tcp.TCP:
    t = tcp.TCP(sport=sport, dport=dport, seq=seq, ack=1, flags=flags)
    if opts:
        # NOP NOP + timestamps (10 bytes): 12 bytes keeps the header 32-bit aligned.
        t.opts.extend(
            [
                tcp.TCPOptSingle(type=1),
                tcp.TCPOptSingle(type=1),
                tcp.TCPOptMulti(type=8, len=10, body_bytes=opts),
            ]
        )
    t.body_bytes = payload
    return t


def v4_packet(payload: bytes, *, opts: bytes = b"", **kw: int) -> bytes:
    pkt = ip.IP(src_s=V4_SRC, dst_s=V4_DST, p=6) + tcp_layer(payload, opts=opts, **kw)
    return bytes(pkt.bin())


def v6_packet(payload: bytes, *, opts: bytes = b"", **kw: int) -> bytes:
    pkt = ip6.IP6(src_s=V6_SRC, dst_s=V6_DST, nxt=6, hlim=64) + tcp_layer(payload, opts=opts, **kw)
    return bytes(pkt.bin())


def eth(l3: bytes, etype: int) -> bytes:
    return ETH_HDR + struct.pack("!H", etype) + l3


def vlan(l3: bytes, etype: int, tags: int = 1) -> bytes:
    tagbytes = b"".join(
        struct.pack("!HH", 0x88A8 if i == 0 and tags == 2 else 0x8100, 100 + i) for i in range(tags)
    )
    return ETH_HDR + tagbytes + struct.pack("!H", etype) + l3


def v6_with_ext(payload: bytes, chain: list[int]) -> bytes:
    """IPv6 + extension headers (raw bytes: pypacker parses but does not build them) + TCP."""
    t = bytes(tcp_layer(payload).bin())
    exts = b""
    for i, kind in enumerate(chain):
        nxt = chain[i + 1] if i + 1 < len(chain) else 6
        if kind == 44:  # fragment header, offset 0, M=0
            exts += struct.pack("!BBHI", nxt, 0, 0, 0x1234)
        elif kind == 51:  # AH: 24 bytes = (len + 2) * 4 with len 4
            exts += struct.pack("!BBH", nxt, 4, 0) + b"\x00" * 20
        else:  # hop-by-hop / routing / dest-opts: 8 bytes, PadN filler
            exts += struct.pack("!BB", nxt, 0) + b"\x01\x04\x00\x00\x00\x00"
    hdr = struct.pack("!IHBB", 0x60000000, len(exts) + len(t), chain[0], 64)
    hdr += socket.inet_pton(socket.AF_INET6, V6_SRC) + socket.inet_pton(socket.AF_INET6, V6_DST)
    return hdr + exts + t


def sll(l3: bytes, etype: int) -> bytes:
    return struct.pack("!HHH8sH", 0, 772, 6, b"\x00" * 8, etype) + l3


def sll2(l3: bytes, etype: int) -> bytes:
    return struct.pack("!HHIHBB8s", etype, 0, 1, 772, 0, 6, b"\x00" * 8) + l3


@dataclass(frozen=True)
class Case:
    name: str
    frame: bytes
    linktype: int
    expect: Segment | str  # a Segment, or the reason decode_frame_reason gives


BODY = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def seg(
    payload: bytes,
    v6: bool = False,
    *,
    flags: int = ACK | PSH,
    payload_len: int | None = None,
    seq: int = 1000,
) -> Segment:
    src, dst = (V6_SRC, V6_DST) if v6 else (V4_SRC, V4_DST)
    return Segment(
        TS, src, 40000, dst, 8000, seq, flags, payload, len(payload) if payload_len is None else payload_len
    )


V4 = v4_packet(BODY)
V6 = v6_packet(BODY)


def _fix_ihl6() -> bytes:
    """IPv4 with 4 bytes of options: rebuild tot_len so the header is consistent."""
    opts = b"\x01\x01\x01\x00"  # NOP NOP NOP EOL
    hdr = bytearray(V4[:20])
    hdr[0] = 0x46
    struct.pack_into("!H", hdr, 2, len(V4) + 4)
    return eth(bytes(hdr) + opts + V4[20:], 0x0800)


CASES = [
    Case("ipv4", eth(V4, 0x0800), LINKTYPE_ETHERNET, seg(BODY)),
    Case("ipv6", eth(V6, 0x86DD), LINKTYPE_ETHERNET, seg(BODY, True)),
    Case("ipv4 tcp options", eth(v4_packet(BODY, opts=b"\x00" * 8), 0x0800), LINKTYPE_ETHERNET, seg(BODY)),
    Case("ipv4 options (ihl 6)", _fix_ihl6(), LINKTYPE_ETHERNET, seg(BODY)),
    Case("vlan", vlan(V4, 0x0800), LINKTYPE_ETHERNET, seg(BODY)),
    Case("qinq", vlan(V6, 0x86DD, tags=2), LINKTYPE_ETHERNET, seg(BODY, True)),
    Case("ethernet padding ignored", eth(v4_packet(b""), 0x0800) + b"\x00" * 6, LINKTYPE_ETHERNET, seg(b"")),
    Case(
        "truncated payload", eth(V4, 0x0800)[:-10], LINKTYPE_ETHERNET, seg(BODY[:-10], payload_len=len(BODY))
    ),
    Case("headers only", eth(V4, 0x0800)[: 14 + 40], LINKTYPE_ETHERNET, seg(b"", payload_len=len(BODY))),
    Case("fin", eth(v4_packet(b"", flags=FIN | ACK), 0x0800), LINKTYPE_ETHERNET, seg(b"", flags=FIN | ACK)),
    Case("rst", eth(v6_packet(b"", flags=RST), 0x86DD), LINKTYPE_ETHERNET, seg(b"", True, flags=RST)),
    Case(
        "seq near wrap",
        eth(v4_packet(BODY, seq=0xFFFFFFF0), 0x0800),
        LINKTYPE_ETHERNET,
        seg(BODY, seq=0xFFFFFFF0),
    ),
    Case("v6 hop-by-hop", eth(v6_with_ext(BODY, [0]), 0x86DD), LINKTYPE_ETHERNET, seg(BODY, True)),
    Case(
        "v6 hbh+routing+dstopts",
        eth(v6_with_ext(BODY, [0, 43, 60]), 0x86DD),
        LINKTYPE_ETHERNET,
        seg(BODY, True),
    ),
    Case("v6 first fragment", eth(v6_with_ext(BODY, [44]), 0x86DD), LINKTYPE_ETHERNET, seg(BODY, True)),
    Case("v6 ah", eth(v6_with_ext(BODY, [51]), 0x86DD), LINKTYPE_ETHERNET, seg(BODY, True)),
    Case("sll", sll(V4, 0x0800), LINKTYPE_LINUX_SLL, seg(BODY)),
    Case("sll2", sll2(V6, 0x86DD), LINKTYPE_LINUX_SLL2, seg(BODY, True)),
    Case("raw v4", V4, LINKTYPE_RAW, seg(BODY)),
    Case("raw v6", V6, LINKTYPE_RAW, seg(BODY, True)),
    Case("raw dlt 12", V4, 12, seg(BODY)),
    Case("raw dlt 14", V6, 14, seg(BODY, True)),
    Case("null v4", struct.pack("<I", 2) + V4, LINKTYPE_NULL, seg(BODY)),
    Case("null v6", struct.pack("<I", 30) + V6, LINKTYPE_NULL, seg(BODY, True)),
    # Why-not cases.
    Case("arp", eth(b"\x00" * 28, 0x0806), LINKTYPE_ETHERNET, frames.REASON_NOT_IP),
    Case("udp", eth(V4[:9] + b"\x11" + V4[10:], 0x0800), LINKTYPE_ETHERNET, frames.REASON_NOT_TCP),
    Case(
        "v4 later fragment",
        eth(V4[:6] + b"\x00\x10" + V4[8:], 0x0800),
        LINKTYPE_ETHERNET,
        frames.REASON_FRAGMENT,
    ),
    Case(
        "v6 later fragment",
        eth(v6_with_ext(BODY, [44])[:42] + b"\x00\x08" + v6_with_ext(BODY, [44])[44:], 0x86DD),
        LINKTYPE_ETHERNET,
        frames.REASON_FRAGMENT,
    ),
    Case("v6 icmp", eth(V6[:6] + b"\x3a" + V6[7:], 0x86DD), LINKTYPE_ETHERNET, frames.REASON_NOT_TCP),
    Case("short ethernet", b"\x00" * 10, LINKTYPE_ETHERNET, frames.REASON_TRUNCATED),
    Case("short ip", eth(V4[:12], 0x0800), LINKTYPE_ETHERNET, frames.REASON_TRUNCATED),
    Case("short tcp", eth(V4[:30], 0x0800), LINKTYPE_ETHERNET, frames.REASON_TRUNCATED),
    Case("ihl too small", eth(b"\x44" + V4[1:], 0x0800), LINKTYPE_ETHERNET, frames.REASON_MALFORMED),
    Case("version mismatch", eth(V6, 0x0800), LINKTYPE_ETHERNET, frames.REASON_MALFORMED),
    Case(
        "tcp doff past ip end",
        eth(V4[:32] + b"\xf0" + V4[33:], 0x0800),
        LINKTYPE_ETHERNET,
        frames.REASON_MALFORMED,
    ),
    Case("unknown linktype", V4, 9999, frames.REASON_UNKNOWN_LINKTYPE),
    Case("raw garbage", b"\x75" * 60, LINKTYPE_RAW, frames.REASON_NOT_IP),
    Case("empty", b"", LINKTYPE_ETHERNET, frames.REASON_TRUNCATED),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decode_table(case: Case) -> None:
    frame = case.frame
    got = decode_frame_reason(frame, TS, len(frame), case.linktype)
    assert got == case.expect
    # Same answer from a memoryview (the live ring hands memoryviews).
    assert decode_frame_reason(memoryview(frame), TS, len(frame), case.linktype) == case.expect
    plain = decode_frame(frame, TS, len(frame), case.linktype)
    assert plain == (case.expect if isinstance(case.expect, Segment) else None)


def test_zero_ip_length_uses_wire_length() -> None:
    """A GSO/BIG TCP super-packet has tot_len 0: the wire length bounds the payload."""
    frame = bytearray(eth(V4, 0x0800))
    struct.pack_into("!H", frame, 14 + 2, 0)
    got = decode_frame(bytes(frame[:60]), TS, len(frame))
    assert got is not None
    assert got.payload_len == len(BODY)
    assert got.payload == bytes(frame[54:60])


def test_wanted_mirrors_kernel_rule() -> None:
    assert wanted(seg(BODY), {8000})
    assert wanted(seg(b"", flags=FIN | ACK), {8000})
    assert wanted(seg(b"", flags=RST), {40000})
    assert not wanted(seg(b"", flags=ACK), {8000})
    assert not wanted(seg(b"", flags=SYN), {8000})
    assert not wanted(seg(BODY), {9000})


def test_garbage_never_raises() -> None:
    rng = random.Random(7)
    base = [c.frame for c in CASES if c.frame]
    for _ in range(20000):
        frame = bytearray(rng.choice(base))
        for _ in range(rng.randint(1, 6)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        cut = rng.randint(0, len(frame))
        for lt in (LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, LINKTYPE_NULL):
            got = decode_frame_reason(bytes(frame[:cut]), TS, rng.randint(0, 70000), lt)
            assert isinstance(got, (Segment, str))
            if isinstance(got, Segment):
                assert len(got.payload) <= got.payload_len


# Cross-check corpus: decode with frames.py and with pypacker, compare fields.
def corpus() -> list[tuple[str, bytes, int]]:
    rng = random.Random(42)
    out: list[tuple[str, bytes, int]] = []
    for i in range(60):
        payload = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 100, 1400])))
        flags = rng.choice([ACK | PSH, FIN | ACK, RST, ACK])
        kw = {
            "sport": rng.randrange(1, 65536),
            "dport": rng.randrange(1, 65536),
            "seq": rng.randrange(1 << 32),
            "flags": flags,
        }
        opts = b"\x00" * 8 if i % 3 == 0 else b""
        v4 = bytes(
            (ip.IP(src_s=f"192.168.{i}.1", dst_s="10.1.2.3", p=6) + tcp_layer(payload, opts=opts, **kw)).bin()
        )
        v6 = bytes(
            (
                ip6.IP6(src_s=f"fd00::{i + 1:x}", dst_s="::1", nxt=6, hlim=64)
                + tcp_layer(payload, opts=opts, **kw)
            ).bin()
        )
        out.append((f"eth-v4-{i}", eth(v4, 0x0800), LINKTYPE_ETHERNET))
        out.append((f"eth-v6-{i}", eth(v6, 0x86DD), LINKTYPE_ETHERNET))
        out.append((f"vlan-v4-{i}", vlan(v4, 0x0800), LINKTYPE_ETHERNET))
        out.append((f"sll-v4-{i}", sll(v4, 0x0800), LINKTYPE_LINUX_SLL))
        if payload:
            cut = rng.randint(1, len(payload))
            out.append((f"trunc-v4-{i}", eth(v4, 0x0800)[:-cut], LINKTYPE_ETHERNET))
    out.append(("v6-ext-hbh-dst", eth(v6_with_ext(BODY, [0, 60]), 0x86DD), LINKTYPE_ETHERNET))
    out.append(("v6-ext-routing", eth(v6_with_ext(BODY, [43]), 0x86DD), LINKTYPE_ETHERNET))
    return out


def pypacker_decode(frame: bytes, linktype: int) -> tuple[object, ...] | None:
    pkt = ethernet.Ethernet(frame) if linktype == LINKTYPE_ETHERNET else linuxcc.LinuxCC(frame)
    t = pkt[tcp.TCP]
    if t is None:
        return None
    l3 = pkt[ip.IP] or pkt[ip6.IP6]
    if isinstance(l3, ip.IP):
        payload_len = l3.len - l3.hl * 4 - t.off * 4
    else:
        payload_len = l3.dlen - (len(l3.header_bytes) - 40) - t.off * 4
    return (l3.src_s, t.sport, l3.dst_s, t.dport, t.seq, t.flags, bytes(t.body_bytes), payload_len)


@pytest.mark.parametrize("name,frame,linktype", corpus())
def test_cross_check_with_pypacker(name: str, frame: bytes, linktype: int) -> None:
    ours = decode_frame(frame, TS, len(frame), linktype)
    theirs = pypacker_decode(frame, linktype)
    assert ours is not None and theirs is not None, name
    assert (
        ours.src_ip,
        ours.src_port,
        ours.dst_ip,
        ours.dst_port,
        ours.seq,
        ours.flags,
        ours.payload,
        ours.payload_len,
    ) == theirs


# pcap / pcapng replay (exporter.capture.pcap): same decoder, file framing only.


def _pcapng(frames_: list[tuple[int, bytes]], *, tsresol: int | None, order: str = "<") -> bytes:
    def block(btype: int, body: bytes) -> bytes:
        body += b"\x00" * (-len(body) % 4)
        n = len(body) + 12
        return struct.pack(order + "II", btype, n) + body + struct.pack(order + "I", n)

    out = block(0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1))
    opts = b""
    if tsresol is not None:
        opts = (
            struct.pack(order + "HH", 9, 1) + bytes([tsresol]) + b"\x00" * 3 + struct.pack(order + "HH", 0, 0)
        )
    out += block(1, struct.pack(order + "HHI", LINKTYPE_ETHERNET, 0, 262144) + opts)
    for i, (ticks, frame) in enumerate(frames_):
        out += block(
            6, struct.pack(order + "5I", 0, ticks >> 32, ticks & 0xFFFFFFFF, len(frame), len(frame)) + frame
        )
        if i == 0:  # a name resolution block mid-file must not end the replay
            out += block(4, struct.pack(order + "HH", 0, 0))
    return out


def test_pcap_nano_and_micro(tmp_path: Path) -> None:
    base = tmp_path
    frame = eth(V4, 0x0800)
    ack = eth(v4_packet(b"", flags=ACK), 0x0800)
    for magic, ts in ((ppcap.TCPDUMP_MAGIC_NANO, TS), (ppcap.TCPDUMP_MAGIC_MICRO, TS // 1000 * 1000)):
        path = base / f"{magic:x}.pcap"
        w = ppcap.Writer(filename=str(path), linktype=LINKTYPE_ETHERNET, magic=magic)
        w.write(frame, ts=TS)
        w.write(ack, ts=TS + 1000)
        w.write(eth(b"\x00" * 28, 0x0806), ts=TS + 2000)
        w.close()
        assert list(read_capture(path)) == [
            Segment(ts, V4_SRC, 40000, V4_DST, 8000, 1000, ACK | PSH, BODY, len(BODY)),
            Segment(ts + 1000, V4_SRC, 40000, V4_DST, 8000, 1000, ACK, b"", 0),
        ]
        assert [s.payload for s in read_capture(path, ports={8000})] == [BODY]


@pytest.mark.parametrize(
    "tsresol,ticks,ns", [(None, 5_000_001, 5_000_001_000), (9, 7, 7), (0x80 | 30, 1 << 30, 10**9)]
)
@pytest.mark.parametrize("order", ["<", ">"])
def test_pcapng(tmp_path: Path, tsresol: int | None, ticks: int, ns: int, order: str) -> None:

    path = tmp_path / "x.pcapng"
    path.write_bytes(
        _pcapng([(ticks, eth(V4, 0x0800)), (ticks, eth(V6, 0x86DD))], tsresol=tsresol, order=order)
    )
    got = list(read_capture(path))
    assert [s.ts_ns for s in got] == [ns, ns]
    assert [s.src_ip for s in got] == [V4_SRC, V6_SRC]
    assert all(s.payload == BODY for s in got)


@pytest.mark.parametrize("content", [b"", b"hello world, not a capture", b"\x0a\x0d\x0d\x0a" + b"\x00" * 30])
def test_garbage_file_is_a_capture_error(tmp_path: Path, content: bytes) -> None:

    path = tmp_path / "junk.bin"
    path.write_bytes(content)
    with pytest.raises(CaptureError, match=r"not a pcap or pcapng file|corrupt|ends in the middle"):
        list(read_capture(path))


def test_truncated_pcapng_is_a_capture_error(tmp_path: Path) -> None:

    path = tmp_path / "cut.pcapng"
    path.write_bytes(_pcapng([(1, eth(V4, 0x0800))], tsresol=None)[:-10])
    with pytest.raises(CaptureError, match="ends in the middle of a block"):
        list(read_capture(path))
