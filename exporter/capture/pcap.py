"""Replay capture files: pcap (µs and ns, either byte order) and pcapng.

Packets are decoded by frames.py, the same decoder as live capture, so a replay
yields exactly the Segments the live path would have produced. pypacker is the
edge for classic pcap framing (`pypacker.ppcap.Reader` handles all four magic
numbers and returns nanosecond timestamps).

pcapng is framed here with struct, not with `pypacker.pcapng`: that reader (5.4)
assumes microsecond timestamps and returns them as floats (no if_tsresol), reads
only one section, and stops at the first block that is not an Enhanced Packet
Block (a Name Resolution or Decryption Secrets block mid-file ends the replay
silently). The block framing is small, and getting timestamps exact matters
more here than reuse.

With `ports`, only what the kernel filter would keep is yielded (watched port,
payload or FIN/RST), so replay and live feed the core the same stream. `read_frames`
yields the undecoded frames, for a bench that prices decoding as the live reader does it.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import BinaryIO

import pypacker.pypacker  # noqa: F401 - imported first for its side effect, see below

from exporter.capture.frames import SUPPORTED_LINKTYPES, decode_frame, wanted
from exporter.core.model import Segment
from exporter.errors import CaptureError

# pypacker logs a warning to its own stderr handler when the optional netifaces is
# missing (replay never needs it). Its logger level is set by pypacker.pypacker, so
# raise it after that import and before ppcap pulls in the module that warns.
logging.getLogger("pypacker").setLevel(logging.ERROR)
from pypacker import ppcap  # noqa: E402

__all__ = ["read_capture", "read_frames"]

_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": "<",  # µs, little endian
    b"\xa1\xb2\xc3\xd4": ">",  # µs, big endian
    b"\x4d\x3c\xb2\xa1": "<",  # ns, little endian
    b"\xa1\xb2\x3c\x4d": ">",  # ns, big endian
}
_PCAPNG_SHB = 0x0A0D0D0A
_PCAPNG_IDB = 1
_PCAPNG_PB = 2  # obsolete Packet Block, still written by old tools
_PCAPNG_SPB = 3
_PCAPNG_EPB = 6
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_OPT_IF_TSRESOL = 9
_OPT_IF_TSOFFSET = 14

Frame = tuple[int, bytes, int, int]  # ts_ns, frame, wire length, link type


def read_capture(path: str | Path, ports: Collection[int] | None = None) -> Iterator[Segment]:
    """Yield the TCP Segments of a pcap or pcapng file, in file order.

    Raises CaptureError for a file that cannot be opened, is not a capture file,
    uses a link type frames.py does not decode, or ends in the middle of a record.
    """
    for ts_ns, frame, wire_len, linktype in read_frames(path):
        seg = decode_frame(frame, ts_ns, wire_len, linktype)
        if seg is not None and (ports is None or wanted(seg, ports)):
            yield seg


def read_frames(path: str | Path) -> Iterator[Frame]:
    """Yield (ts_ns, frame bytes, wire length, link type) of each packet, in file order.

    Raises CaptureError as read_capture does.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(24)
    except OSError as exc:
        raise CaptureError(f"cannot read capture file {path}: {exc.strerror}") from exc
    if head[:4] in _PCAP_MAGICS and len(head) == 24:
        yield from _read_pcap(path, head)
    elif len(head) >= 12 and struct.unpack_from("<I", head)[0] == _PCAPNG_SHB:
        yield from _read_pcapng(path)
    else:
        raise CaptureError(f"not a pcap or pcapng file: {path}")


def _check_linktype(path: Path, linktype: int) -> None:
    if linktype not in SUPPORTED_LINKTYPES:
        raise CaptureError(
            f"{path}: link type {linktype} is not supported (Ethernet, Linux SLL/SLL2, raw IP, BSD loopback)"
        )


def _read_pcap(path: Path, head: bytes) -> Iterator[Frame]:
    order = _PCAP_MAGICS[head[:4]]
    linktype = struct.unpack_from(order + "I", head, 20)[0] & 0x0FFFFFFF  # high bits: FCS info
    _check_linktype(path, linktype)
    reader = ppcap.Reader(filename=str(path))
    try:
        # ppcap yields (ts_ns, frame bytes); it does not expose the original length,
        # so the captured length stands in (it only matters when IP length is 0).
        for ts_ns, frame in reader:
            yield int(ts_ns), bytes(frame), len(frame), linktype
    except struct.error as exc:  # a record header cut short at the end of the file
        raise CaptureError(f"{path}: pcap file ends in the middle of a record") from exc
    finally:
        reader.close()


class _Iface:
    __slots__ = ("linktype", "offset_ns", "tsresol")

    def __init__(self, linktype: int) -> None:
        self.linktype = linktype
        self.tsresol = 6  # default: microseconds
        self.offset_ns = 0

    def ts_ns(self, ticks: int) -> int:
        res = self.tsresol
        if res & 0x80:  # power of two
            ns = (ticks * 1_000_000_000) >> (res & 0x7F)
        elif res <= 9:
            ns = ticks * 10 ** (9 - res)
        else:
            ns = ticks // 10 ** (res - 9)
        return ns + self.offset_ns


def _options(body: bytes, start: int, order: str) -> Iterator[tuple[int, bytes]]:
    pos = start
    end = len(body)
    while pos + 4 <= end:
        code, length = struct.unpack_from(order + "HH", body, pos)
        if code == 0:
            return
        yield code, body[pos + 4 : pos + 4 + length]
        pos += 4 + ((length + 3) & ~3)


def _read_exact(fh: BinaryIO, n: int, path: Path, offset: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise CaptureError(f"{path}: pcapng file ends in the middle of a block at byte {offset}")
    return data


def _read_pcapng(path: Path) -> Iterator[Frame]:
    order = "<"
    ifaces: list[_Iface] = []
    with path.open("rb") as fh:
        offset = 0
        while True:
            hdr = fh.read(8)
            if not hdr:
                return
            if len(hdr) < 8:
                raise CaptureError(f"{path}: pcapng file ends in the middle of a block at byte {offset}")
            btype = struct.unpack_from(order + "I", hdr)[0]
            if btype == _PCAPNG_SHB:
                bom = _read_exact(fh, 4, path, offset)
                if struct.unpack("<I", bom)[0] == _BYTE_ORDER_MAGIC:
                    order = "<"
                elif struct.unpack(">I", bom)[0] == _BYTE_ORDER_MAGIC:
                    order = ">"
                else:
                    raise CaptureError(f"not a pcap or pcapng file: {path} (bad byte-order magic)")
                blen = struct.unpack_from(order + "I", hdr, 4)[0]
                if blen < 28 or blen % 4:
                    raise CaptureError(f"{path}: corrupt pcapng section header at byte {offset}")
                _read_exact(fh, blen - 12, path, offset)
                ifaces = []  # interface ids are per section
                offset += blen
                continue
            blen = struct.unpack_from(order + "I", hdr, 4)[0]
            if blen < 12 or blen % 4:
                raise CaptureError(f"{path}: corrupt pcapng block of length {blen} at byte {offset}")
            body = _read_exact(fh, blen - 8, path, offset)[:-4]  # drop trailing length
            if btype == _PCAPNG_IDB:
                if len(body) < 8:
                    raise CaptureError(f"{path}: corrupt interface block at byte {offset}")
                linktype = struct.unpack_from(order + "H", body)[0]
                _check_linktype(path, linktype)
                iface = _Iface(linktype)
                for code, value in _options(body, 8, order):
                    if code == _OPT_IF_TSRESOL and value:
                        iface.tsresol = value[0]
                    elif code == _OPT_IF_TSOFFSET and len(value) >= 8:
                        iface.offset_ns = struct.unpack_from(order + "q", value)[0] * 1_000_000_000
                ifaces.append(iface)
            elif btype in (_PCAPNG_EPB, _PCAPNG_PB, _PCAPNG_SPB):
                yield _packet_block(btype, body, order, ifaces, path, offset)
            # Other blocks (name resolution, statistics, secrets, custom) carry no packets.
            offset += blen


def _packet_block(btype: int, body: bytes, order: str, ifaces: list[_Iface], path: Path, offset: int) -> Frame:
    if btype == _PCAPNG_SPB:
        if len(body) < 4 or not ifaces:
            raise CaptureError(f"{path}: corrupt simple packet block at byte {offset}")
        wire = struct.unpack_from(order + "I", body)[0]
        iface = ifaces[0]
        frame = body[4 : 4 + wire]
        return 0, frame, wire, iface.linktype  # SPB has no timestamp
    if len(body) < 20:
        raise CaptureError(f"{path}: corrupt packet block at byte {offset}")
    if btype == _PCAPNG_EPB:
        if_id, ts_hi, ts_lo, caplen, wire = struct.unpack_from(order + "5I", body)
    else:
        if_id, _drops, ts_hi, ts_lo, caplen, wire = struct.unpack_from(order + "HH4I", body)
    if if_id >= len(ifaces):
        raise CaptureError(f"{path}: packet block at byte {offset} names unknown interface {if_id}")
    iface = ifaces[if_id]
    frame = body[20 : 20 + caplen]
    return iface.ts_ns((ts_hi << 32) | ts_lo), frame, wire, iface.linktype
