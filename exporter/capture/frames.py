"""Decode one captured frame into a `Segment`: the user-space half of bpf/http_filter.c.

Pure and allocation-light: struct.unpack_from on the buffer as given, no copies
except the payload bytes the Segment keeps. Live capture and pcap replay both go
through `decode_frame`, so a replayed file yields exactly what the live path would.

`payload_len` comes from the IP header, not from the captured bytes, so a frame
the kernel cut short (snap length, body_skip) shows `len(payload) < payload_len`.

Never raises on garbage: `decode_frame_reason` returns a short reason string
instead of a Segment, for a counter; `decode_frame` returns None.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Collection

from exporter.core.model import FIN, RST, Segment

__all__ = [
    "LINKTYPE_ETHERNET",
    "LINKTYPE_IPV4",
    "LINKTYPE_IPV6",
    "LINKTYPE_LINUX_SLL",
    "LINKTYPE_LINUX_SLL2",
    "LINKTYPE_NULL",
    "LINKTYPE_RAW",
    "REASON_FRAGMENT",
    "REASON_MALFORMED",
    "REASON_NOT_IP",
    "REASON_NOT_TCP",
    "REASON_TRUNCATED",
    "REASON_UNKNOWN_LINKTYPE",
    "SUPPORTED_LINKTYPES",
    "decode_frame",
    "decode_frame_reason",
    "wanted",
]

LINKTYPE_NULL = 0  # BSD loopback: 4-byte address family in host byte order
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_DLT_RAW_12 = 12  # DLT_RAW on most BSDs
LINKTYPE_DLT_RAW_14 = 14  # DLT_RAW on OpenBSD
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

REASON_UNKNOWN_LINKTYPE = "unknown_linktype"
REASON_NOT_IP = "not_ip"
REASON_NOT_TCP = "not_tcp"
REASON_FRAGMENT = "fragment"
REASON_TRUNCATED = "truncated"  # headers cut short by the capture
REASON_MALFORMED = "malformed"  # header fields that contradict each other

_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD
_VLAN_TPIDS = frozenset((0x8100, 0x88A8, 0x9100))
_MAX_VLAN_TAGS = 2
_MAX_V6_EXT = 8
_IPPROTO_TCP = 6
# IPv6 extension headers walked: hop-by-hop, routing, fragment, AH, dest-opts.
_V6_HOPOPTS, _V6_ROUTING, _V6_FRAGMENT, _V6_AH, _V6_DSTOPTS = 0, 43, 44, 51, 60
_V6_EXT = frozenset((_V6_HOPOPTS, _V6_ROUTING, _V6_FRAGMENT, _V6_AH, _V6_DSTOPTS))
# BSD address families used by LINKTYPE_NULL for IPv6 (they differ per OS).
_NULL_AF_INET6 = frozenset((10, 24, 28, 30))

SUPPORTED_LINKTYPES = frozenset(
    (
        LINKTYPE_NULL,
        LINKTYPE_ETHERNET,
        LINKTYPE_RAW,
        LINKTYPE_DLT_RAW_12,
        LINKTYPE_DLT_RAW_14,
        LINKTYPE_LINUX_SLL,
        LINKTYPE_IPV4,
        LINKTYPE_IPV6,
        LINKTYPE_LINUX_SLL2,
    )
)

_u16 = struct.Struct("!H").unpack_from
_ipv4 = struct.Struct("!BxHxxHxBxxII").unpack_from  # ver_ihl, tot_len, frag_off, proto, src, dst
_ipv6_plen_nh = struct.Struct("!HB").unpack_from  # payload_len, next header (at +4)
_tcp = struct.Struct("!HHI4xBB").unpack_from  # sport, dport, seq, (ack), data offset byte, flags
# An Ethernet frame's ethertype, then _ipv4's fields, then _tcp's, read at once (see decode_frame_reason).
_eth_ipv4_tcp = struct.Struct("!12xHBxHxxHxBxxIIHHI4xBB").unpack_from
_ETH_IPV4_TCP_BYTES = 14 + 20 + 20
_inet_ntop = socket.inet_ntop
_new_tuple = tuple.__new__
_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6
# IPv4 addresses as text, by their 32-bit value: a capture sees the same few addresses over and
# over, and a dict hit costs a fifth of inet_ntop plus the slice it needs. Bounded: cleared when full.
_V4_TEXT: dict[int, str] = {}
_V4_TEXT_MAX = 65536


def _v4_text(address: int) -> str:
    text = _V4_TEXT.get(address)
    if text is None:
        if len(_V4_TEXT) >= _V4_TEXT_MAX:
            _V4_TEXT.clear()
        text = _V4_TEXT[address] = _inet_ntop(_AF_INET, address.to_bytes(4, "big"))
    return text


def _l3_offset(buf: bytes | memoryview, linktype: int) -> tuple[int, int] | str:
    """(offset of the IP header, ethertype or 0 for 'read the version nibble') or a reason."""
    n = len(buf)
    if linktype == LINKTYPE_ETHERNET:
        if n < 14:
            return REASON_TRUNCATED
        (etype,) = _u16(buf, 12)
        off = 14
        for _ in range(_MAX_VLAN_TAGS):
            if etype not in _VLAN_TPIDS:
                break
            if n < off + 4:
                return REASON_TRUNCATED
            (etype,) = _u16(buf, off + 2)
            off += 4
        return off, etype
    if linktype in (LINKTYPE_RAW, LINKTYPE_DLT_RAW_12, LINKTYPE_DLT_RAW_14, LINKTYPE_IPV4, LINKTYPE_IPV6):
        return 0, 0
    if linktype == LINKTYPE_LINUX_SLL:
        if n < 16:
            return REASON_TRUNCATED
        return 16, _u16(buf, 14)[0]
    if linktype == LINKTYPE_LINUX_SLL2:
        if n < 20:
            return REASON_TRUNCATED
        return 20, _u16(buf, 0)[0]
    if linktype == LINKTYPE_NULL:
        if n < 4:
            return REASON_TRUNCATED
        # Host byte order of the capturing machine: accept either.
        family = buf[0] | buf[3]
        if family == 2:
            return 4, _ETH_P_IP
        if family in _NULL_AF_INET6:
            return 4, _ETH_P_IPV6
        return REASON_NOT_IP
    return REASON_UNKNOWN_LINKTYPE


def decode_frame_reason(
    frame: bytes | memoryview, ts_ns: int, wire_len: int, linktype: int = LINKTYPE_ETHERNET
) -> Segment | str:
    """Decode a frame; on failure return why (one of the REASON_* strings) instead of raising."""
    n = len(frame)
    # The live capture's usual frame: untagged Ethernet (lo too), IPv4 without options, not a
    # fragment, TCP. Its headers are read with one unpack (0.2 us of ~1 us a frame); any other frame,
    # and any field that needs a verdict, takes the general path below.
    if linktype == LINKTYPE_ETHERNET and n >= _ETH_IPV4_TCP_BYTES:
        etype, ver_ihl, tot_len, frag, proto, src_v4, dst_v4, sport, dport, seq, doff, flags = _eth_ipv4_tcp(frame)
        if etype == _ETH_P_IP and ver_ihl == 0x45 and proto == _IPPROTO_TCP and not frag & 0x1FFF:
            l3_end = 14 + tot_len if tot_len else wire_len
            payload_start = 34 + (doff >> 4) * 4
            if _ETH_IPV4_TCP_BYTES <= payload_start <= l3_end:
                captured_end = l3_end if l3_end < n else n
                return _new_tuple(Segment, (
                    ts_ns, _V4_TEXT.get(src_v4) or _v4_text(src_v4), sport, _V4_TEXT.get(dst_v4) or _v4_text(dst_v4),
                    dport, seq, flags,
                    bytes(frame[payload_start:captured_end]) if captured_end > payload_start else b"",
                    l3_end - payload_start))
    if linktype == LINKTYPE_ETHERNET and n >= 14 and frame[12] == 8 and frame[13] == 0:
        off, etype = 14, _ETH_P_IP
    else:
        where = _l3_offset(frame, linktype)
        if isinstance(where, str):
            return where
        off, etype = where
    if etype == 0:  # raw IP: the version nibble decides
        if n <= off:
            return REASON_TRUNCATED
        version = frame[off] >> 4
        etype = _ETH_P_IP if version == 4 else _ETH_P_IPV6 if version == 6 else -1
    # Bytes of the frame before the IP header, to find the wire end of the packet
    # when the IP length field is 0 (GSO/BIG TCP super-packets).
    if etype == _ETH_P_IP:
        if n < off + 20:
            return REASON_TRUNCATED
        ver_ihl, tot_len, frag, proto, src_v4, dst_v4 = _ipv4(frame, off)
        if ver_ihl >> 4 != 4:
            return REASON_MALFORMED
        if proto != _IPPROTO_TCP:
            return REASON_NOT_TCP
        if frag & 0x1FFF:
            return REASON_FRAGMENT
        ihl = (ver_ihl & 0x0F) * 4
        if ihl < 20:
            return REASON_MALFORMED
        l3_end = off + tot_len if tot_len else wire_len
        l4 = off + ihl
        src_text = _V4_TEXT.get(src_v4) or _v4_text(src_v4)
        dst_text = _V4_TEXT.get(dst_v4) or _v4_text(dst_v4)
    elif etype == _ETH_P_IPV6:
        if n < off + 40:
            return REASON_TRUNCATED
        if frame[off] >> 4 != 6:
            return REASON_MALFORMED
        plen, nh = _ipv6_plen_nh(frame, off + 4)
        l3_end = off + 40 + plen if plen else wire_len
        l4 = off + 40
        for _ in range(_MAX_V6_EXT):
            if nh not in _V6_EXT:
                break
            if n < l4 + 8:
                return REASON_TRUNCATED
            if nh == _V6_FRAGMENT:
                if _u16(frame, l4 + 2)[0] & 0xFFF8:
                    return REASON_FRAGMENT
                step = 8
            elif nh == _V6_AH:
                step = (frame[l4 + 1] + 2) * 4
            else:
                step = (frame[l4 + 1] + 1) * 8
            nh = frame[l4]
            l4 += step
        else:
            if nh in _V6_EXT:
                return REASON_MALFORMED
        if nh != _IPPROTO_TCP:
            return REASON_NOT_TCP
        src_text = _inet_ntop(_AF_INET6, frame[off + 8 : off + 24])
        dst_text = _inet_ntop(_AF_INET6, frame[off + 24 : off + 40])
    else:
        return REASON_NOT_IP
    if n < l4 + 20:
        return REASON_TRUNCATED
    sport, dport, seq, doff, flags = _tcp(frame, l4)
    payload_start = l4 + (doff >> 4) * 4
    if payload_start < l4 + 20 or payload_start > l3_end:
        return REASON_MALFORMED
    payload_len = l3_end - payload_start
    captured_end = l3_end if l3_end < n else n
    payload = bytes(frame[payload_start:captured_end]) if captured_end > payload_start else b""
    # Built as a tuple: Segment's own __new__ is a Python function, a third of this call's cost.
    return _new_tuple(Segment, (ts_ns, src_text, sport, dst_text, dport, seq, flags, payload, payload_len))


def decode_frame(
    frame: bytes | memoryview, ts_ns: int, wire_len: int, linktype: int = LINKTYPE_ETHERNET
) -> Segment | None:
    """Decode a frame into a Segment, or None when it is not a whole-headed TCP segment."""
    result = decode_frame_reason(frame, ts_ns, wire_len, linktype)
    return result if type(result) is Segment else None


def wanted(segment: Segment, ports: Collection[int]) -> bool:
    """The kernel filter's keep rule, for sources without the filter (pcap replay)."""
    if segment.src_port not in ports and segment.dst_port not in ports:
        return False
    return segment.payload_len > 0 or bool(segment.flags & (FIN | RST))
