"""Live capture: an AF_PACKET socket with bpf/http_filter.c attached, read in batches.

Two read paths give the same Segments:

- `ring=True` (default): a PACKET_RX_RING with TPACKET_V3. The kernel fills
  blocks of packets in a shared mmap and hands a block over when it is full or
  when its timeout (default 64 ms) expires, so one poll() returns hundreds of
  packets and a quiet link still returns within the timeout.
- `ring=False`: one recvmsg() per packet with SO_TIMESTAMPNS for the kernel
  timestamp and PACKET_AUXDATA for the wire length. Simple; the reference and
  the fallback.

The socket is created bound to no protocol, gets its filter and ring, and only
then is bound to the interface with ETH_P_ALL, so no packet from another
interface or an unfiltered packet can slip in before the filter is attached.

Node-wide capture (`node_patterns`: `any`, globs such as `veth*`, or several names): one
SOCK_DGRAM socket bound to every interface (ifindex 0), so an interface that appears later
is captured without a new socket, and every frame reaches the filter from its IP header
whatever the link type. `refresh_interfaces()` (called about once a second) matches the
patterns against the interfaces present and hands the filter their ifindexes; the filter
drops the copies of a packet seen on a second captured interface (NODE-WIDE CAPTURE in
bpf/http_filter.c).
"""

from __future__ import annotations

import ctypes
import fnmatch
import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from exporter.capture.bpf import DEFAULT_SNAPLEN, HttpFilter
from exporter.capture.frames import LINKTYPE_ETHERNET, LINKTYPE_RAW, decode_frame_reason
from exporter.config import ANY_INTERFACE
from exporter.core.model import Segment
from exporter.errors import CaptureError

__all__ = ["LiveCapture", "interface_names", "match_interfaces"]

# Constants Python's socket module does not name (linux/socket.h, linux/if_packet.h).
SO_ATTACH_BPF = 50
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_STATISTICS = 6
PACKET_RX_RING = 5
PACKET_VERSION = 10
PACKET_IGNORE_OUTGOING = 23
TPACKET_V3 = 2
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
ETH_P_ALL = 0x0003
IFF_LOOPBACK = 0x8

# Link types (ARPHRD_*) we can filter: with an Ethernet header, or bare IP.
_ARPHRD_ETHERNET_LIKE = {1: "ether", 772: "loopback"}
_ARPHRD_BARE_IP = {65534: "none", 519: "rawip", 768: "ipip", 769: "ip6tnl", 776: "sit"}

# struct tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1:
# block_status, num_pkts, offset_to_first_pkt.
_block_hdr = struct.Struct("<8xIII").unpack_from
_block_status_off = 8
# struct tpacket3_hdr: tp_next_offset, tp_sec, tp_nsec, tp_snaplen, tp_len, tp_status, tp_mac.
_pkt_hdr = struct.Struct("<IIIIIIH").unpack_from
# struct tpacket_auxdata: tp_status, tp_len, tp_snaplen, tp_mac, tp_net, vlan_tci, vlan_tpid.
_auxdata = struct.Struct("<III").unpack_from
_timespec = struct.Struct("<qq").unpack_from
_stats = struct.Struct("<II").unpack_from
_put_u32 = struct.Struct("<I").pack_into

_RECV_BATCH = 4096  # recvmsg path: at most this many packets per read()


_AF_PACKET = 17
# struct sockaddr_ll: family, protocol (network order), ifindex, hatype, pkttype, halen, addr[8].
_SOCKADDR_LL = struct.Struct("=HHiHBB8s")


def match_interfaces(
    patterns: Sequence[str], interfaces: Sequence[tuple[int, str]]
) -> tuple[dict[int, str], list[str]]:
    """({ifindex: name} of the interfaces some pattern matches, the patterns that match none yet)."""
    matched: dict[int, str] = {}
    unmatched: list[str] = []
    for pattern in patterns:
        hits = {index: name for index, name in interfaces
                if pattern == ANY_INTERFACE or fnmatch.fnmatchcase(name, pattern)}
        if not hits:
            unmatched.append(pattern)
        matched.update(hits)
    return matched, unmatched


def interface_names() -> list[str]:
    return [name for _, name in socket.if_nameindex()]


def _sysfs_int(interface: str, attr: str, base: int = 10) -> int:
    return int(Path("/sys/class/net", interface, attr).read_text().strip(), base)


def _bind_every_interface(sock: socket.socket) -> None:
    """bind() to ifindex 0 (every interface): Python's AF_PACKET address only takes a name."""
    libc = ctypes.CDLL(None, use_errno=True)
    address = _SOCKADDR_LL.pack(_AF_PACKET, socket.htons(ETH_P_ALL), 0, 0, 0, 0, b"")
    if libc.bind(sock.fileno(), ctypes.c_char_p(address), len(address)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class LiveCapture:
    """Filtered TCP segments of `ports` on one interface, with kernel timestamps.

    `read()` is meant to be called from the caller's loop, or after its own
    select()/poll() on `fileno()`; it never blocks longer than its timeout.
    """

    def __init__(
        self,
        interface: str,
        ports: Sequence[int],
        *,
        ring: bool = True,
        snaplen: int = DEFAULT_SNAPLEN,
        block_size: int = 1 << 20,
        block_count: int = 32,
        block_timeout_ms: int = 64,
        rcvbuf: int = 32 << 20,
        bpf_filter: HttpFilter | None = None,
        fast_path: bool = False,
        histogram_bounds: tuple[Sequence[float], Sequence[float]] = ((), ()),
        node_patterns: Sequence[str] = (),
    ) -> None:
        self.interface = interface
        self.node_patterns = tuple(node_patterns)
        # Node-wide: what the patterns match now, and the patterns that match nothing yet.
        self.attached: dict[int, str] = {}
        self.unmatched: list[str] = []
        self.interfaces_over_cap = 0
        self.ports = tuple(ports)
        self.ring = ring
        self.snaplen = snaplen
        self.block_size = block_size
        self.block_count = block_count
        self.block_timeout_ms = block_timeout_ms
        self.rcvbuf = rcvbuf
        self._shared_filter = bpf_filter
        self.fast_path = fast_path
        self.histogram_bounds = histogram_bounds
        self._filter: HttpFilter | None = None
        self._loopback = False
        self._sock: socket.socket | None = None
        self._mm: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._block = 0
        self._linktype = LINKTYPE_ETHERNET
        self._packets = 0
        self._drops = 0
        self._decode_errors = 0
        self._decode_reasons: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------

    def open(self) -> LiveCapture:
        if self._sock is not None:
            return self
        if self.node_patterns:
            return self._open_node()
        try:
            socket.if_nametoindex(self.interface)
        except OSError:
            raise CaptureError(
                f"no interface {self.interface!r}; interfaces here: {', '.join(interface_names())}"
            ) from None
        arphrd = _sysfs_int(self.interface, "type")
        if arphrd in _ARPHRD_ETHERNET_LIKE:
            link_header_len, self._linktype = 14, LINKTYPE_ETHERNET
        elif arphrd in _ARPHRD_BARE_IP:
            link_header_len, self._linktype = 0, LINKTYPE_RAW
        else:
            raise CaptureError(
                f"interface {self.interface!r} has link type {arphrd} (ARPHRD_*), which the filter "
                "does not parse: capture on an Ethernet, loopback or IP tunnel interface"
            )
        loopback = bool(_sysfs_int(self.interface, "flags", 16) & IFF_LOOPBACK)
        self._loopback = loopback
        try:
            if self._shared_filter is not None:
                self._filter = self._shared_filter
                self._filter.configure(
                    loopback=loopback, snaplen=self.snaplen, link_header_len=link_header_len,
                )
                self._filter.set_ports(self.ports)
            else:
                self._filter = HttpFilter(
                    self.ports, loopback=loopback, snaplen=self.snaplen, link_header_len=link_header_len,
                    fast_path=self.fast_path, histogram_bounds=self.histogram_bounds,
                )
            self._open_socket()
        except BaseException:
            self.close()
            raise
        return self

    def _open_node(self) -> LiveCapture:
        self._linktype = LINKTYPE_RAW  # SOCK_DGRAM: every frame starts at its IP header
        every = ANY_INTERFACE in self.node_patterns
        try:
            if self._shared_filter is not None:
                self._filter = self._shared_filter
                self._filter.set_ports(self.ports)
            else:
                self._filter = HttpFilter(
                    self.ports, snaplen=self.snaplen, link_header_len=0,
                    fast_path=self.fast_path, histogram_bounds=self.histogram_bounds,
                )
            # The interface set first, so the filter never passes a packet of an unmatched one.
            self.refresh_interfaces()
            self._filter.configure(loopback=False, snaplen=self.snaplen, link_header_len=0,
                                   node=True, interface_set=not every)
            self._open_socket(node=True)
        except BaseException:
            self.close()
            raise
        return self

    def refresh_interfaces(self) -> tuple[list[str], list[str]]:
        """Match the patterns again (node-wide capture): (names added, names gone) since the last call."""
        if not self.node_patterns or self._filter is None:
            return [], []
        matched, self.unmatched = match_interfaces(self.node_patterns, socket.if_nameindex())
        before = self.attached
        added = [name for index, name in matched.items() if before.get(index) != name]
        gone = [name for index, name in before.items() if matched.get(index) != name]
        if ANY_INTERFACE not in self.node_patterns and (added or gone or not before):
            self.interfaces_over_cap = self._filter.set_interfaces(matched)
        self.attached = matched
        return sorted(added), sorted(gone)

    def _open_socket(self, node: bool = False) -> None:
        assert self._filter is not None
        try:
            # Protocol 0: receives nothing until bind() below, after the filter is in place.
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM if node else socket.SOCK_RAW, 0)
        except PermissionError as exc:
            raise CaptureError("packet capture needs root or CAP_NET_RAW: run with sudo") from exc
        self._sock = sock
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, self._filter.fd)
            if self._loopback:
                # On lo every packet passes the taps twice. Ignoring the outgoing pass here spares the
                # kernel an skb clone and a filter run per packet (the filter drops that copy anyway,
                # and still does on kernels before 4.20, which refuse the option).
                try:
                    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
                except OSError:
                    pass
            # Enables kernel receive timestamps (netstamp) for both paths; the ring reads
            # the same skb timestamp from tpacket3_hdr.
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            if self.ring:
                self._setup_ring(sock)
            else:
                sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
                try:  # beyond net.core.rmem_max: root or CAP_NET_ADMIN only
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
                except PermissionError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            if node:
                _bind_every_interface(sock)
            else:
                sock.bind((self.interface, ETH_P_ALL))
            sock.setblocking(False)
        except OSError as exc:
            raise CaptureError(f"cannot set up packet socket on {self.interface!r}: {exc.strerror}") from exc

    def _setup_ring(self, sock: socket.socket) -> None:
        page = mmap.PAGESIZE
        if self.block_size % page or self.block_size < self.snaplen + 128:
            raise CaptureError(
                f"ring block size {self.block_size} must be a multiple of {page} and exceed the snap "
                f"length {self.snaplen}"
            )
        frame_size = 2048  # unused by TPACKET_V3 beyond this consistency check of the kernel
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        req = struct.pack(
            "<7I",
            self.block_size,
            self.block_count,
            frame_size,
            self.block_size // frame_size * self.block_count,
            self.block_timeout_ms,
            0,  # tp_sizeof_priv
            0,  # tp_feature_req_word
        )
        sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        self._mm = mmap.mmap(
            sock.fileno(),
            self.block_size * self.block_count,
            mmap.MAP_SHARED,
            mmap.PROT_READ | mmap.PROT_WRITE,
        )
        self._view = memoryview(self._mm)
        self._block = 0

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._filter is not None and self._filter is not self._shared_filter:
            self._filter.close()
        self._filter = None

    def __enter__(self) -> LiveCapture:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def bpf_filter(self) -> HttpFilter:
        """The attached filter and its maps (fast path aggregates and handovers live there)."""
        if self._filter is None:
            raise CaptureError("capture is not open: call open() first")
        return self._filter

    def fileno(self) -> int:
        return self._socket().fileno()

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise CaptureError("capture is not open: call open() first")
        return self._sock

    # -- reading -----------------------------------------------------------

    def read(self, timeout_s: float) -> list[Segment]:
        """Segments that arrived, waiting at most timeout_s for the first; possibly empty."""
        sock = self._socket()
        if self._view is not None:
            return self._read_ring(sock, timeout_s)
        return self._read_recvmsg(sock, timeout_s)

    def _read_ring(self, sock: socket.socket, timeout_s: float) -> list[Segment]:
        view = self._view
        assert view is not None
        block_size = self.block_size
        blocks = self.block_count
        out: list[Segment] = []
        status_at = self._block * block_size + _block_status_off
        if not view[status_at] & TP_STATUS_USER:
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN | select.POLLERR)
            deadline = time.monotonic() + timeout_s
            while not view[self._block * block_size + _block_status_off] & TP_STATUS_USER:
                left = deadline - time.monotonic()
                if left <= 0:
                    return out
                poller.poll(max(1, int(left * 1000)))
        decode = decode_frame_reason
        linktype = self._linktype
        seg_type = Segment
        for _ in range(blocks):
            base = self._block * block_size
            status, num_pkts, first = _block_hdr(view, base)
            if not status & TP_STATUS_USER:
                break
            pos = base + first
            for _ in range(num_pkts):
                next_off, sec, nsec, snap, wire, _st, mac = _pkt_hdr(view, pos)
                start = pos + mac
                got = decode(view[start : start + snap], sec * 1_000_000_000 + nsec, wire, linktype)
                if type(got) is seg_type:
                    out.append(got)
                else:
                    self._decode_error(got)  # type: ignore[arg-type]
                pos += next_off
            # Hand the block back to the kernel. x86 is TSO; CPython's own locking
            # orders this store after the reads above on other architectures in practice.
            _put_u32(view, base + _block_status_off, TP_STATUS_KERNEL)
            self._block = (self._block + 1) % blocks
        return out

    def _read_recvmsg(self, sock: socket.socket, timeout_s: float) -> list[Segment]:
        out: list[Segment] = []
        ready, _, _ = select.select([sock], [], [], max(0.0, timeout_s))
        if not ready:
            return out
        decode = decode_frame_reason
        linktype = self._linktype
        bufsize = self.snaplen
        ancsize = socket.CMSG_SPACE(16) + socket.CMSG_SPACE(20)
        seg_type = Segment
        for _ in range(_RECV_BATCH):
            try:
                data, ancdata, _flags, _addr = sock.recvmsg(bufsize, ancsize)
            except BlockingIOError:
                break
            ts_ns = 0
            wire = len(data)
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = _timespec(cdata)
                    ts_ns = sec * 1_000_000_000 + nsec
                elif level == SOL_PACKET and kind == PACKET_AUXDATA:
                    wire = _auxdata(cdata)[1]
            got = decode(data, ts_ns, wire, linktype)
            if type(got) is seg_type:
                out.append(got)
            else:
                self._decode_error(got)  # type: ignore[arg-type]
        return out

    def _decode_error(self, reason: str) -> None:
        # The kernel only passes whole-headed TCP, so this should stay at 0.
        self._decode_errors += 1
        self._decode_reasons[reason] = self._decode_reasons.get(reason, 0) + 1

    # -- counters ----------------------------------------------------------

    def _poll_stats(self) -> None:
        if self._sock is None:
            return
        # tpacket_stats (V1/V2) or tpacket_stats_v3: tp_packets, tp_drops (+ freeze count).
        # The kernel resets them on every read, so they are accumulated here;
        # tp_packets already includes tp_drops.
        raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12)
        packets, drops = _stats(raw)
        self._packets += packets
        self._drops += drops

    def kernel_drops(self) -> int:
        """Packets that passed the filter but found the socket's queue or ring full."""
        self._poll_stats()
        return self._drops

    def packets_received(self) -> int:
        """Packets that passed the filter, including those then dropped for lack of room."""
        self._poll_stats()
        return self._packets

    def filter_counters(self) -> dict[str, int]:
        """The filter's own counters (shared by every socket using the same filter)."""
        if self._filter is None:
            raise CaptureError("capture is not open: call open() first")
        return self._filter.counters()

    def decode_errors(self) -> int:
        return self._decode_errors

    def decode_error_reasons(self) -> dict[str, int]:
        return dict(self._decode_reasons)

    # -- body skipping -----------------------------------------------------

    def skip_body(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int, seq_start: int,
                  seq_end: int) -> None:
        """Have the kernel cut to headers every segment of this direction lying in [seq_start, seq_end)."""
        if self._filter is None:
            raise CaptureError("capture is not open: call open() first")
        self._filter.skip_body(src_ip, src_port, dst_ip, dst_port, seq_start, seq_end)

    def forget_skip(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int) -> None:
        if self._filter is None:
            raise CaptureError("capture is not open: call open() first")
        self._filter.forget_skip(src_ip, src_port, dst_ip, dst_port)

    def drop_tls(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int, drop: bool = True) -> None:
        """Have the kernel drop (or pass again) the payload of this direction of a TLS connection."""
        if self._filter is None:
            raise CaptureError("capture is not open: call open() first")
        self._filter.drop_tls(src_ip, src_port, dst_ip, dst_port, drop)
