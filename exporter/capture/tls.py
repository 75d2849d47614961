"""HTTPS: the plaintext of OpenSSL's SSL_read/SSL_write, as the same Segments the wire gives.

    find_libraries     the system's libssl copies (+ --libssl), one per inode
    TlsProbes          bpf/tls_probes.c loaded and attached by the BPF loader helper process, with
                       each library's struct offsets and the kernel's; its maps over bpf(2) and its
                       ring buffer over mmap
    decode_event       the one decoder of `struct tls_event` (and decode_open of an OPEN's data)
    TlsCapture         events -> Segments for a Tracker of its own (scheme "https")

How a byte becomes a Segment: the kernel judges each SSL* once (its BIO's fd, that socket's
local port against the watched ports) and sends, for a watched one, an OPEN event with the
socket's two ends, then data events: the process (tgid), the SSL*, a direction (SSL_read:
client -> server; SSL_write: server -> client), the offset of its data in that direction's
byte stream (kept by the kernel per SSL*), and the kernel's CLOCK_MONOTONIC time at the
call's return, made CLOCK_REALTIME here as kernel_agg does. The offset becomes the Segment's
sequence number, so bytes the kernel could not hand over are a gap of known length, as on the
wire. SSL_free of a watched SSL* sends CLOSE, which becomes a FIN each way.

Which connections count: those whose socket's local port is a watched port, i.e. the
server's accepted sockets, decided in the kernel: nothing else ever reaches user space, and
an unwatched SSL* costs a hash lookup per call from its first (`tls_calls_ignored_total`).

The ring is emptied in batches by a thread of its own (TLS_DRAIN_EVERY_S, TLS_WAKE_BYTES) into a
bounded queue the exporter's loop reads (TLS_QUEUE_BYTES, ringbuf.DrainedRing). An event the ring
refuses (its lock gave up, or it was full) goes to a second, small ring, with the events after it
until the thread has taken them; the thread queues both rings' records in the order they were
written (see tls_probes.c's output()), so nothing here puts events back in order.

Failures leave as CaptureError (a library whose layout cannot be measured is left out and
said in TlsProbes.unprobed); a socket the kernel could not walk is counted
(`tls_unresolved_sockets_total`) and ignored, never raised.
"""

from __future__ import annotations

import glob
import mmap
import os
import shutil
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.capture.bpf import ask_loader, find_source, include_flags
from exporter.capture.bpfsys import BpfMap, map_info, possible_cpus
from exporter.capture.kernel_layout import socket_walk_offsets
from exporter.capture.openssl_layout import EntryPoint, SslLayout, SslLayoutError, calibrate
from exporter.capture.ringbuf import DISCARD, HEADER, LENGTH, DrainedRing, RingBuffer
from exporter.core.model import ACK, FIN, PSH, RST, Segment
from exporter.errors import CaptureError
from exporter.metrics import (
    SELF_TLS_CALLS_IGNORED_TOTAL,
    SELF_TLS_CALLS_SKIPPED_TOTAL,
    SELF_TLS_CALLS_TOTAL,
    SELF_TLS_CALLS_TRIMMED_TOTAL,
    SELF_TLS_CALLS_TRUNCATED_TOTAL,
    SELF_TLS_CALLS_UNTRACKED_TOTAL,
    SELF_TLS_CALLS_WITHOUT_SOCKET_TOTAL,
    SELF_TLS_CONNECTIONS_EVICTED_TOTAL,
    SELF_TLS_CONNECTIONS_TRACKED,
    SELF_TLS_DECODE_ERRORS_TOTAL,
    SELF_TLS_EVENTS_FALLBACK_FOLLOWING_TOTAL,
    SELF_TLS_EVENTS_FALLBACK_TOTAL,
    SELF_TLS_EVENTS_LOST_TOTAL,
    SELF_TLS_EVENTS_LOST_WITH_ROOM_TOTAL,
    SELF_TLS_EVENTS_RETRIED_TOTAL,
    SELF_TLS_EVENTS_TOTAL,
    SELF_TLS_EXCHANGE_ENDS_PROBE_TIMED_TOTAL,
    SELF_TLS_EXCHANGE_ENDS_WIRE_TIMED_TOTAL,
    SELF_TLS_LIBRARIES_PROBED,
    SELF_TLS_LOSS_GAPS_TOTAL,
    SELF_TLS_READ_ERRORS_TOTAL,
    SELF_TLS_UNRESOLVED_SOCKETS_TOTAL,
    SelfSample,
)

__all__ = [
    "COUNTER_NAMES",
    "SYMBOLS",
    "Endpoints",
    "TlsCapture",
    "TlsEvent",
    "TlsProbes",
    "decode_event",
    "decode_open",
    "find_libraries",
    "probe_requests",
]

# Slots of the per-CPU `tls_counters` array, in index order (handed to the C file as -D).
COUNTER_NAMES: tuple[str, ...] = (
    "calls",  # SSL calls on watched connections that returned data
    "events",  # events written to the ring buffer (opens, data chunks and closes)
    "lost",  # events the ring buffer had no room for: their bytes are a gap in user space
    "truncated",  # calls longer than TLS_CHUNK * TLS_MAX_CHUNKS: the rest is a gap
    "no_fd",  # calls with data on an SSL* whose read BIO has no fd (a memory BIO)
    "ignored_calls",  # calls with data on connections whose local port is not watched (clients, other services)
    "read_errors",  # bpf_probe_read_user failures (the buffer was not readable)
    "skipped",  # calls (or their head) inside a body stretch user space only counts: length only
    "trimmed",  # calls cut to their first TLS_PREFIX bytes (the ring, or the fallback, filling): the rest a gap
    "unresolved",  # SSL*s whose fd the kernel walk did not find a TCP socket behind: ignored
    "lost_with_room",  # of `lost`, those refused while the ring had room (not a full ring)
    "retried",  # events refused while the ring had room and taken at a later try (not lost)
    "untracked",  # calls whose arguments could not be kept for their return (task storage not made): missed
    "fallback",  # events the ring refused (with room: at every try), taken by the fallback ring (not lost)
    "fallback_following",  # events sent to the fallback ring behind one of those, to stay in order
    "refused_for_test",  # test builds only (TLS_TEST_REFUSE_EVERY): events the ring refused on purpose
    # How the ends of exchanges were timed (tls_probes.c, "Timing"), per client turn (its first
    # read: a request's start) and per server turn (its last write: a response's end). In this order.
    "start_wire",  # from the wire: the first encrypted segment of the turn
    "start_no_match",  # from the probe: the turn's segments did not match the call exactly
    "start_no_wire",  # from the probe: the socket filter has no wire times for the connection
    "end_wire",  # from the wire: the last encrypted segment of the call's bytes
    "end_no_match",
    "end_no_wire",
)

# Per direction: the entry program for OpenSSL's internal function (arguments as the _ex form),
# and the (symbol, entry program) pairs probed instead where that function was not found. The
# program is suffixed with the library's slot (its own struct offsets); every return goes to
# tls_return.
SYMBOLS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "read": ("tls_read_ex_entry", (("SSL_read", "tls_read_entry"), ("SSL_read_ex", "tls_read_ex_entry"))),
    "write": ("tls_write_ex_entry", (("SSL_write", "tls_write_entry"), ("SSL_write_ex", "tls_write_ex_entry"))),
}
# Entry only, once per connection: its end.
FREE_SYMBOL = ("SSL_free", "tls_free")
# LIBRARY_PROBES(i) instances in tls_probes.c.
MAX_LIBRARIES = 8

# The data of one event, and how many events one call may take (16 x 8 KiB = 128 KiB per
# call; the rest is a gap). A per-CPU scratch value holds 2 * TLS_CHUNK (the verifier bounds
# lengths by a mask) and per-CPU values are limited to 32 KiB.
TLS_CHUNK = 8192
TLS_MAX_CHUNKS = 16
# 16 MiB with 4 KiB pages: what the ring adds to the exporter's RSS (the kernel maps all of it at
# mmap time; ringbuf.py maps it once). Body bytes cross to user space until the parser has framed
# the body and its skip hint reached the kernel, and a fast server writes a large body in a burst
# before that. So once TLS_TRIM_BYTES are unread, each call copies its first TLS_PREFIX bytes only
# (a message's head, when one starts there) and sends the rest by length: large bodies cannot fill
# the ring, and the heads still fit. Overflow is still counted, and becomes a gap of known length.
# Trimmed calls still take TLS_PREFIX each: nginx writes a 1 MB body in 16 KiB calls, so eight
# bodies in flight put 8 MiB in the ring while the reader waits for a core; a 4 MiB ring lost an
# event that way in a CI run on 2 busy cores, 16 MiB costs 12 MB more RSS.
RING_PAGES = 4096
# The fallback ring (tls_probes.c, output()): events the ring refused (with room: about 1 in 100,000
# with two busy producers, bench/tls_ring_contention.py), and all events after one until the ring's
# thread has taken it, which the kernel wakes it for at once (about 2 ms under load). 2 MiB (2 MB
# more RSS); past half of it unread, calls copy their first TLS_PREFIX bytes only, as past
# TLS_TRIM_BYTES of the ring, so bodies written meanwhile cannot fill it. What it cannot hold is
# lost and counted, as for a full ring.
FALLBACK_PAGES = 512
FALLBACK_TRIM_BYTES = FALLBACK_PAGES * mmap.PAGESIZE // 2
TLS_TRIM_BYTES = 2 * 1024 * 1024
TLS_PREFIX = 4096
# The kernel wakes the reader once this much is unread; otherwise it reads the ring every
# TLS_DRAIN_EVERY_S. A wakeup per event cost more than the probe itself (see tls_probes.c) and
# made the exporter handle one or two events per read.
TLS_WAKE_BYTES = 256 * 1024
# The ring is emptied by a thread of its own (ringbuf.DrainedRing) into a queue that holds at most
# this much: bursts the parser is slower than go there, and cost memory only while they last. The
# thread reads at least every TLS_DRAIN_EVERY_S, and when TLS_WAKE_BYTES wait.
TLS_QUEUE_BYTES = 48 * 1024 * 1024
TLS_DRAIN_EVERY_S = 0.1

# Where distributions keep the shared libssl; --libssl adds more.
LIBRARY_GLOBS: tuple[str, ...] = (
    "/usr/lib/*-linux-gnu/libssl.so.3",
    "/usr/lib/*-linux-gnu/libssl.so.1.1",
    "/lib/*-linux-gnu/libssl.so.3",
    "/lib/*-linux-gnu/libssl.so.1.1",
    "/usr/lib64/libssl.so.3",
    "/usr/lib64/libssl.so.1.1",
    "/usr/lib/libssl.so.3",
    "/usr/lib/libssl.so.1.1",
)

KIND_READ = 0
KIND_WRITE = 1
KIND_CLOSE = 2
KIND_OPEN = 3

# struct tls_event's header: ts_ns, ssl, stream_off, tgid, fd, len, skipped, kind, flags, pad[6].
_EVENT = struct.Struct("=QQQIiIIBB6x")
# The same after its ring record's header (ringbuf.py): the record's length and flags first.
_RECORD = struct.Struct("=I4xQQQIiIIBB6x")
_FLAG_AFTER_LOSS = 1
# struct tls_open, an OPEN's data: family, local port (host order), peer port (network order), pad,
# local and peer address (IPv4 in the first 4 bytes).
_OPEN = struct.Struct("=HH2s2x16s16s")
_SKIP_KEY = struct.Struct("=QII")  # struct tls_skip_key: ssl, tgid, dir
_SKIP = struct.Struct("=IIQ")  # struct tls_skip: start, end (exclusive), conn
_STATE_KEY = struct.Struct("=QI4x")  # struct tls_state_key: ssl, tgid
_STATE_SIZE = 88  # struct tls_state: stream[2], conn, rbio, fd, watched, announced, lost[2], sk, client, last,
# end_timing, pad[2]
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_SEQ_MASK = 0xFFFFFFFF
# Builds a Segment from all its fields without the NamedTuple's Python __new__ (see core/model.py):
# one per event on the HTTPS path.
_new_tuple = tuple.__new__

_MAPS: dict[str, tuple[int, int]] = {  # name -> (key size, value size), checked after load
    "tls_counters": (4, 8),
    "tls_events": (0, 0),
    "tls_fallback": (0, 0),
    "tls_skips": (_SKIP_KEY.size, _SKIP.size),
    "tls_ring_pos": (4, 8),
    "tls_state": (_STATE_KEY.size, _STATE_SIZE),
    "tls_wire_maps": (4, 4),  # array of maps: slot 0 is the socket filter's tls_flows (anchor_to)
}
_RING_CONSUMED_AT = 8  # tls_ring_pos[1], our consumer position, in the map's mmap (8-byte values from 0)
_RING_DRAINED_AT = 16  # tls_ring_pos[2], the ring's own consumer position (the draining thread's)
_FALLBACK_DRAINED_AT = 32  # tls_ring_pos[4], tls_fallback's consumer position, once its records are queued


@dataclass(frozen=True, slots=True)
class TlsEvent:
    ts_ns: int  # CLOCK_MONOTONIC
    ssl: int
    stream_offset: int
    tgid: int
    fd: int
    kind: int
    data: bytes
    skipped: int = 0  # bytes past `data` the kernel did not copy (a body stretch, or over the chunk budget)
    after_loss: bool = False  # bytes of this direction before stream_offset were lost in the kernel


def decode_event(raw: bytes) -> TlsEvent | None:
    """One ring buffer record; None when it is shorter than its header says (never expected)."""
    if len(raw) < _EVENT.size:
        return None
    ts_ns, ssl, offset, tgid, fd, length, skipped, kind, flags = _EVENT.unpack_from(raw)
    data = raw[_EVENT.size:_EVENT.size + length]
    if len(data) != length:
        return None
    return TlsEvent(ts_ns, ssl, offset, tgid, fd, kind, data, skipped, bool(flags & _FLAG_AFTER_LOSS))


@dataclass(frozen=True, slots=True)
class Endpoints:
    """A watched socket's two ends, from its OPEN event."""

    local_ip: str
    local_port: int
    peer_ip: str
    peer_port: int


def _ip(family: int, raw: bytes) -> str | None:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if family != socket.AF_INET6:
        return None
    if raw[:12] == b"\x00" * 10 + b"\xff\xff":
        return socket.inet_ntop(socket.AF_INET, raw[12:])  # v4-mapped (a dual-stack listener): shown as IPv4
    return socket.inet_ntop(socket.AF_INET6, raw)


def decode_open(data: bytes) -> Endpoints | None:
    """An OPEN event's data (`struct tls_open`); None when it is not one."""
    if len(data) != _OPEN.size:
        return None
    family, local_port, peer_port, local, peer = _OPEN.unpack(data)
    local_ip, peer_ip = _ip(family, local), _ip(family, peer)
    if local_ip is None or peer_ip is None:
        return None
    return Endpoints(local_ip, local_port, peer_ip, int.from_bytes(peer_port, "big"))


def find_libraries(extra: Iterable[str] = (), globs: Iterable[str] = LIBRARY_GLOBS) -> list[str]:
    """Shared libssl copies to probe: the system's, then `extra`, one path per file (inode).

    Probing one file under two names would see every call twice, and merged-/usr systems
    have /lib as a link to /usr/lib.
    """
    seen: set[tuple[int, int]] = set()
    found: list[str] = []
    candidates = [path for pattern in globs for path in sorted(glob.glob(pattern))]
    for path in candidates + list(extra):
        try:
            st = os.stat(path)
        except OSError as exc:
            if path in extra:
                raise CaptureError(f"--libssl {path}: {exc.strerror}") from exc
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        found.append(path)
    return found


def tls_source() -> Path:
    return find_source().with_name("tls_probes.c")


class TlsProbes:
    """bpf/tls_probes.c compiled, loaded and attached by the loader helper; our fds to it.

    The attachments live while this object's descriptors are open; close() detaches.
    """

    def __init__(self, libraries: list[str], ports: Iterable[int] = (), src_file: Path | None = None,
                 test_cflags: tuple[str, ...] = ()) -> None:
        """`test_cflags`: defines only tests set (-DTLS_TEST_REFUSE_EVERY=N, see tls_probes.c)."""
        if not libraries:
            raise CaptureError("no libssl found to probe: give one with --libssl PATH, or run with --no-tls")
        # The kernel's offsets first: without BTF nothing can be probed (KernelLayoutError names the fix).
        kernel = socket_walk_offsets()
        # Each library's own offsets; one that cannot be measured is left out (self.unprobed says why).
        self.unprobed: list[str] = []
        self.layouts: dict[str, SslLayout] = {}
        for library in libraries:
            if len(self.layouts) == MAX_LIBRARIES:
                self.unprobed.append(f"libssl {library}: not probed, {MAX_LIBRARIES} libraries already are")
                continue
            try:
                self.layouts[library] = calibrate(library)
            except SslLayoutError as exc:
                self.unprobed.append(str(exc))
        if not self.layouts:
            raise CaptureError(f"no libssl could be probed: {'; '.join(self.unprobed[:2])}")
        watched = " || ".join(f"(p) == {port}" for port in sorted(set(ports))) or "0"
        cflags = [f"-DTC_{name.upper()}={i}" for i, name in enumerate(COUNTER_NAMES)]
        cflags.append(f"-DTC_COUNT={len(COUNTER_NAMES)}")
        cflags += [f"-D{name}={offset}" for name, offset in sorted(kernel.items())]
        cflags.append(f"-DTLS_LIBRARIES={len(self.layouts)}")
        for slot, layout in enumerate(self.layouts.values()):
            cflags += [f"-DTLS_RBIO_OFFSET_{slot}={layout.rbio_offset}",
                       f"-DTLS_BIO_NUM_OFFSET_{slot}={layout.bio_num_offset}"]
        # A constant, not a map: the verdict is final per connection, and a map filled after attach
        # would let the first calls of a watched connection be judged against an empty set.
        cflags += [f"-DTLS_WATCHED_PORT(p)=({watched})",
                   f"-DTLS_CHUNK={TLS_CHUNK}", f"-DTLS_MAX_CHUNKS={TLS_MAX_CHUNKS}",
                   f"-DTLS_RING_PAGES={RING_PAGES}", f"-DTLS_RING_BYTES={RING_PAGES * mmap.PAGESIZE}",
                   f"-DTLS_FALLBACK_PAGES={FALLBACK_PAGES}", f"-DTLS_FALLBACK_TRIM_BYTES={FALLBACK_TRIM_BYTES}",
                   f"-DTLS_TRIM_BYTES={TLS_TRIM_BYTES}",
                   f"-DTLS_PREFIX={TLS_PREFIX}", f"-DTLS_WAKE_BYTES={TLS_WAKE_BYTES}", *test_cflags, "-w"]
        probes = [probe for slot, (library, layout) in enumerate(self.layouts.items())
                  for probe in probe_requests(library, layout, slot)]
        src = src_file or tls_source()
        cflags += include_flags(src)
        request: dict[str, Any] = {"src": str(src), "cflags": cflags, "maps": list(_MAPS), "probes": probes}
        programs = len({probe["function"] for probe in probes})  # each loaded once, however often attached
        reply, fds = _run_helper(request, max_fds=len(_MAPS) + len(probes) + programs)
        self.compile_s: float = reply["compile_s"]
        self.failed: list[tuple[str, str, str]] = [(lib, sym, msg) for lib, sym, msg in reply["failed"]]
        attached: list[tuple[str, str, bool]] = [(lib, sym, ret) for lib, sym, ret in reply["attached"]]
        self.libraries = sorted({item[0] for item in attached})
        # Maps, attachments, then the programs (held for their run time statistics only).
        map_fds, self._attach_fds = fds[:len(_MAPS)], fds[len(_MAPS):]
        self._ring: DrainedRing | None = None
        self._maps: dict[str, BpfMap] = {}
        try:
            if not attached:
                reasons = "; ".join(f"{lib} {sym}: {msg}" for lib, sym, msg in self.failed[:2])
                raise CaptureError(f"no uprobe could be attached to libssl ({reasons}): run with --no-tls")
            ncpus = possible_cpus()
            by_name = dict(zip(_MAPS, map_fds, strict=True))
            events_fd = by_name.pop("tls_events")
            fallback_fd = by_name.pop("tls_fallback")
            self._maps = {name: BpfMap(fd, ncpus) for name, fd in by_name.items()}
            for name, bpf_map in self._maps.items():
                info = bpf_map.info
                if (info.key_size, info.value_size) != _MAPS[name]:
                    raise CaptureError(f"BPF map {name} has {info.key_size}-byte keys and {info.value_size}-byte "
                                       f"values, tls.py expects {_MAPS[name]}: tls_probes.c and tls.py disagree")
            try:
                self._ring_pos = mmap.mmap(by_name["tls_ring_pos"], mmap.PAGESIZE, mmap.MAP_SHARED,
                                           mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                raise CaptureError(f"cannot map the BPF array tls_ring_pos: {exc.strerror}") from exc
            ring_pos = self._ring_pos
            self._ring = DrainedRing(
                RingBuffer(events_fd, map_info(events_fd).max_entries), TLS_QUEUE_BYTES, TLS_DRAIN_EVERY_S,
                on_drained=lambda position: _U64.pack_into(ring_pos, _RING_DRAINED_AT, position),
                fallback=RingBuffer(fallback_fd, map_info(fallback_fd).max_entries),
                on_fallback_drained=lambda position: _U64.pack_into(ring_pos, _FALLBACK_DRAINED_AT, position))
            self._events_fds = (events_fd, fallback_fd)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def fileno(self) -> int:
        assert self._ring is not None
        return self._ring.fileno()

    def read(self, timeout_s: float) -> list[bytes]:
        """Spans of ring records (ringbuf.py), in ring order."""
        assert self._ring is not None
        spans = self._ring.read(timeout_s)
        if spans:
            # The probes trim calls while the backlog is large: tell them how far we are.
            _U64.pack_into(self._ring_pos, _RING_CONSUMED_AT, self._ring.processed_position)
        return spans

    def flush(self) -> None:
        """What the ring holds now goes to the next read (it is otherwise taken in batches)."""
        assert self._ring is not None
        self._ring.flush()

    def queued(self) -> bool:
        """Whether records wait for a read (one read takes at most its size limit)."""
        assert self._ring is not None
        return self._ring.queued()

    def ring_thread_cpu_s(self) -> float:
        """CPU time of the thread that empties the ring (ringbuf.DrainedRing)."""
        return self._ring.thread_cpu_s() if self._ring is not None else 0.0

    def set_skip(self, tgid: int, ssl: int, conn: int, direction: int, stretch: tuple[int, int] | None) -> None:
        """A body stretch [start, end) of one direction's stream (32-bit offsets) of connection `conn`
        (its OPEN's time); None: none."""
        key = _SKIP_KEY.pack(ssl, tgid, direction)
        if stretch is None:
            self._maps["tls_skips"].delete(key)
        else:
            self._maps["tls_skips"].update(key, _SKIP.pack(stretch[0] & _SEQ_MASK, stretch[1] & _SEQ_MASK, conn))

    def forget(self, tgid: int, ssl: int) -> None:
        """The kernel's state of a connection that ended without SSL_free (its process exited or
        exec'd): a later process with the same pid and SSL* address starts afresh, with an OPEN."""
        self._maps["tls_state"].delete(_STATE_KEY.pack(ssl, tgid))

    def anchor_to(self, tls_flows_fd: int) -> None:
        """Read the wire times of the socket filter whose `tls_flows` this is (HttpFilter.share_tls_flows):
        from now on a call on a connection it sees is timed by its encrypted segments when they match."""
        self._maps["tls_wire_maps"].update(_U32.pack(0), _U32.pack(tls_flows_fd))

    def counters(self) -> dict[str, int]:
        table = self._maps["tls_counters"]
        return {name: table.per_cpu_u64_sum(_U32.pack(i)) for i, name in enumerate(COUNTER_NAMES)}

    def close(self) -> None:
        _detach_in_background(self._attach_fds)
        self._attach_fds = []
        if self._ring is not None:
            self._ring.close()
            self._ring = None
            self._ring_pos.close()
            for fd in self._events_fds:
                os.close(fd)
        for bpf_map in self._maps.values():
            bpf_map.close()
        self._maps = {}


def probe_requests(library: str, layout: SslLayout, slot: int) -> Iterator[dict[str, Any]]:
    """The loader's probe requests for one library: per direction its internal function (one
    place for both forms of the call, and a first instruction the kernel emulates) where
    calibrate found it, else the exported symbols; and SSL_free."""
    for direction, (internal_entry, exported) in SYMBOLS.items():
        entry_point: EntryPoint | None = getattr(layout, direction)
        if entry_point is not None:
            where = {"symbol": f"{direction}@{entry_point.vaddr:#x}", "address": entry_point.vaddr}
            yield {"library": library, **where, "function": f"{internal_entry}_{slot}", "return": False}
            yield {"library": library, **where, "function": "tls_return", "return": True}
            continue
        for symbol, entry in exported:
            yield {"library": library, "symbol": symbol, "function": f"{entry}_{slot}", "return": False}
            yield {"library": library, "symbol": symbol, "function": "tls_return", "return": True}
    yield {"library": library, "symbol": FREE_SYMBOL[0], "function": FREE_SYMBOL[1], "return": False}


def _fd_open(tgid: int, fd: int) -> bool:
    """Whether a process still has an fd open: False only when /proc says it is gone. Under --user
    another user's /proc/<pid>/fd cannot be read; such a connection is not ended here (its
    SSL_free, or the Tracker's idle timeout, ends it)."""
    try:
        os.lstat(f"/proc/{tgid}/fd/{fd}")
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def _detach_in_background(fds: list[int]) -> None:
    """Close the attachment descriptors without waiting for the kernel to unregister the uprobes.

    Each uprobe's last close waits for an RCU grace period (about 0.1 s each here, and they do
    not overlap), which would hold up a SIGTERM for a second, and our own exit too while it
    goes on (this process maps libssl, so unregistering visits its memory). A `sleep 1` process
    is given copies of just these descriptors: its exit, after ours, does the waiting, while
    ours are closed at once (no longer the last reference). The probes stay attached for that
    second, feeding a ring nobody reads. posix_spawn, not fork: a fork copies the address
    space, which waits while any uprobe is being unregistered on the machine. Without `sleep`,
    they are closed here.
    """
    if not fds:
        return
    sleep = shutil.which("sleep")
    if sleep is not None:
        # Its stdio on /dev/null: a pipe our parent reads would otherwise stay open for that second.
        actions: list[tuple[Any, ...]] = [(os.POSIX_SPAWN_OPEN, n, os.devnull, os.O_RDWR, 0) for n in (0, 1, 2)]
        # Above every source, so that no copy overwrites a descriptor still to be copied.
        actions += [(os.POSIX_SPAWN_DUP2, fd, max(fds) + 1 + i) for i, fd in enumerate(fds)]
        try:
            pid = os.posix_spawn(sleep, [sleep, "1"], {}, file_actions=actions)
        except OSError:
            pass
        else:
            # Reaped off the stopping path; a daemon thread, so it never delays the exit.
            threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True, name="tls-detach").start()
    for fd in fds:
        os.close(fd)


def _run_helper(request: dict[str, Any], max_fds: int) -> tuple[dict[str, Any], list[int]]:
    """Ask exporter.capture.bpf_loader to compile, load and attach; see its docstring."""
    reply, fds = ask_loader(request, max_fds, "run with --no-tls")
    if not reply["ok"]:
        kind, msg = reply["kind"], reply["message"]
        if kind == "compile":
            raise CaptureError(f"BPF program tls_probes.c failed to compile: {msg} (see clang output above)")
        if os.geteuid() != 0 and ("Operation not permitted" in msg or "Permission denied" in msg):
            raise CaptureError("TLS probes need root or CAP_SYS_ADMIN kept across exec (the kernel refuses "
                               "uprobe events without it): run with sudo, grant it as an ambient capability, "
                               "or run with --no-tls")
        raise CaptureError(f"kernel refused the TLS probes: {msg} (run with --no-tls to go without)")
    return reply, fds


@dataclass(slots=True)
class _Conn:
    """One watched connection, from its OPEN: its ends and its streams' next offsets."""

    key: tuple[int, int]  # (tgid, SSL*)
    conn: int  # its OPEN's time: the kernel's name for it in tls_skips
    fd: int
    client: tuple[str, int]
    server: tuple[str, int]
    next_offset: list[int] = field(default_factory=lambda: [-1, -1])  # read (to server), write
    # A Segment's (src ip, src port, dst ip, dst port) by KIND_READ (to the server), KIND_WRITE: built
    # once here rather than per event.
    ends: tuple[tuple[str, int, str, int], tuple[str, int, str, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.ends = ((*self.client, *self.server), (*self.server, *self.client))

    @property
    def flow(self) -> tuple[str, int, str, int]:
        return self.ends[KIND_READ]


class TlsCapture:
    """Ring buffer events -> Segments of watched connections, with body skips pushed back."""

    def __init__(
        self,
        ports: Iterable[int],
        libraries: list[str],
        *,
        max_connections: int = 65536,
        realtime_offset_ns: Callable[[], int] = lambda: time.time_ns() - time.monotonic_ns(),
        probes_factory: Callable[[list[str], frozenset[int]], TlsProbes] = TlsProbes,
    ) -> None:
        self._ports = frozenset(ports)
        self._libraries = libraries
        self._max = max_connections
        self._offset = realtime_offset_ns
        self._factory = probes_factory
        self.probes: TlsProbes | None = None
        # The watched connections, least recently used first, and by flow key for the Tracker's
        # skip hints. The kernel sends nothing else.
        self._conns: OrderedDict[tuple[int, int], _Conn] = OrderedDict()
        self._flows: dict[tuple[str, int, str, int], _Conn] = {}
        self.evicted = 0
        self.decode_errors = 0
        self.loss_gaps = 0
        self.segments = 0
        self._closed_counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)

    def open(self) -> TlsCapture:
        self.probes = self._factory(self._libraries, self._ports)
        return self

    def fileno(self) -> int:
        assert self.probes is not None
        return self.probes.fileno()

    def read(self, timeout_s: float) -> list[Segment]:
        if self.probes is None:
            return []
        spans = self.probes.read(timeout_s)
        if not spans:
            return []
        realtime = self._offset()
        out: list[Segment] = []
        append = out.append
        unpack_length, unpack = _U32.unpack_from, _RECORD.unpack_from
        event_size, record_size = _EVENT.size, _RECORD.size
        conns = self._conns
        new_segment = _new_tuple
        for span in spans:
            # The ring's records, walked here rather than cut into objects of their own (ringbuf.py).
            at, end = 0, len(span)
            while at < end:
                here = at
                try:
                    record, ts_ns, ssl, offset, tgid, _fd, length, skipped, kind, flags = unpack(span, here)
                except struct.error:  # fewer bytes left than an event takes: a broken record (below)
                    record, length = unpack_length(span, here)[0], -1
                data_end = here + HEADER + (record & LENGTH)
                at = (data_end + 7) & ~7  # records start 8-aligned
                # The common case, inline: data of a known connection, in order (what segments_of does).
                # The record holds exactly its event and data (a discarded one's header has bit 30 set,
                # so never equals); KIND_READ and KIND_WRITE index a direction's ends and next offset.
                if record == event_size + length:
                    key = (tgid, ssl)
                    conn = conns.get(key)
                    if conn is not None and kind <= KIND_WRITE and not flags & _FLAG_AFTER_LOSS:
                        conns.move_to_end(key)
                        length += skipped
                        conn.next_offset[kind] = offset + length
                        append(new_segment(Segment, (ts_ns + realtime, *conn.ends[kind], offset & _SEQ_MASK,
                                                     ACK | PSH, span[here + record_size:data_end], length)))
                        continue
                if record & DISCARD:
                    continue
                event = decode_event(span[here + HEADER:data_end])
                if event is None:
                    self.decode_errors += 1
                else:
                    out.extend(self.segments_of(event, realtime))
        self.segments += len(out)
        return out

    def segments_of(self, event: TlsEvent, realtime_offset_ns: int) -> Iterator[Segment]:
        """The Segment(s) one event stands for (none for an OPEN)."""
        key = (event.tgid, event.ssl)
        conn = self._conns.get(key)
        ts = event.ts_ns + realtime_offset_ns
        if event.kind == KIND_OPEN:
            if conn is not None:
                # The SSL* was freed unseen (its CLOSE lost) or moved to another fd: end the old flow.
                self._forget(conn)
                yield from self._fins(conn, ts)
            self._open(event)
            return
        if conn is None:
            return  # evicted from the table (counted); the kernel sends no data before an OPEN
        if event.kind == KIND_CLOSE:
            self._forget(conn)
            yield from self._fins(conn, ts)
            return
        self._conns.move_to_end(key)
        direction = 1 if event.kind == KIND_WRITE else 0
        if direction:
            src, dst = conn.server, conn.client
        else:
            src, dst = conn.client, conn.server
        expected = conn.next_offset[direction]
        if event.after_loss and 0 <= expected < event.stream_offset:
            # The kernel lost these bytes and says so: they will never come. Their length is
            # known, so the parser counts them as bytes it cannot read (exact inside a body).
            self.loss_gaps += 1
            yield Segment(ts, src[0], src[1], dst[0], dst[1], expected & _SEQ_MASK, ACK, b"",
                          event.stream_offset - expected)
        length = len(event.data) + event.skipped
        conn.next_offset[direction] = event.stream_offset + length
        yield Segment(ts, src[0], src[1], dst[0], dst[1], event.stream_offset & _SEQ_MASK, ACK | PSH, event.data,
                      length)

    def apply_skip_hints(self, hints: dict[tuple[tuple[str, int, str, int], bool], tuple[int, int] | None]) -> None:
        """The Tracker's body stretches (see Tracker.skip_hints) as `tls_skips` entries."""
        if self.probes is None:
            return
        for (flow, to_server), stretch in hints.items():
            conn = self._flows.get(flow)
            if conn is None:
                continue  # closed meanwhile: the kernel dropped its entries at SSL_free
            try:
                self.probes.set_skip(conn.key[0], conn.key[1], conn.conn, KIND_READ if to_server else KIND_WRITE,
                                     stretch)
            except CaptureError:
                pass  # LRU map: never full; a closed map means we are stopping

    def _forget(self, conn: _Conn) -> None:
        self._conns.pop(conn.key, None)
        if self._flows.get(conn.flow) is conn:
            del self._flows[conn.flow]

    def _open(self, event: TlsEvent) -> None:
        ends = decode_open(event.data)
        if ends is None:
            self.decode_errors += 1
            return
        conns = self._conns
        if len(conns) >= self._max:
            self._forget(next(iter(conns.values())))
            self.evicted += 1
        conn = _Conn((event.tgid, event.ssl), event.ts_ns, event.fd, (ends.peer_ip, ends.peer_port),
                     (ends.local_ip, ends.local_port))
        conns[conn.key] = conn
        self._flows[conn.flow] = conn

    @staticmethod
    def _fins(conn: _Conn, ts: int) -> Iterator[Segment]:
        """close(fd): the server ends both streams; a FIN each way ends the flow in the Tracker."""
        server_next, client_next = conn.next_offset[1], conn.next_offset[0]
        yield Segment(ts, conn.server[0], conn.server[1], conn.client[0], conn.client[1],
                      max(server_next, 0) & _SEQ_MASK, ACK | FIN, b"", 0)
        yield Segment(ts, conn.client[0], conn.client[1], conn.server[0], conn.server[1],
                      max(client_next, 0) & _SEQ_MASK, ACK | FIN, b"", 0)

    def reap(self, now_ns: int, is_open: Callable[[int, int], bool] | None = None) -> list[Segment]:
        """Watched connections whose socket is gone without an SSL_free (the process exited, or exec'd):
        an RST each, so their flows end now rather than at the idle timeout. One lstat per watched socket."""
        still_open = is_open or _fd_open
        gone = [conn for conn in self._conns.values() if not still_open(conn.key[0], conn.fd)]
        if not gone:
            return []
        # A gone fd's last events (its last response, its close) were written before we looked, but
        # may still wait in the ring (it is read in batches): take them first, or the RST would end
        # the flow before its last exchange. All of them: one read stops at its size limit, and they
        # may lie past it (behind a large backlog, or in the fallback ring's records, queued after).
        if self.probes is not None:
            self.probes.flush()
        out = self.read(0)
        while self.probes is not None and self.probes.queued():
            out += self.read(0)
        for conn in gone:
            if self._conns.get(conn.key) is conn:  # no close (or new OPEN) in what was just read
                self._forget(conn)
                if self.probes is not None:
                    try:
                        self.probes.forget(*conn.key)
                    except CaptureError:
                        pass  # a closed map means we are stopping
                out.append(Segment(now_ns, conn.client[0], conn.client[1], conn.server[0], conn.server[1],
                                   max(conn.next_offset[0], 0) & _SEQ_MASK, RST, b"", 0))
        return out

    def anchor_to(self, tls_flows_fd: int) -> None:
        """Time calls by the wire where the socket filter with this `tls_flows` sees them (TlsProbes.anchor_to)."""
        if self.probes is not None:
            self.probes.anchor_to(tls_flows_fd)

    def connections_tracked(self) -> int:
        return len(self._conns)

    def counters(self) -> dict[str, int]:
        if self.probes is None:
            return dict(self._closed_counters)
        return self.probes.counters()

    def close(self) -> None:
        if self.probes is not None:
            try:
                self._closed_counters = self.probes.counters()
            except CaptureError:
                pass
            self.probes.close()
            self.probes = None

    def self_samples(self) -> Iterator[SelfSample]:
        kernel = self.counters()
        libraries = len(self.probes.libraries) if self.probes is not None else 0
        yield SelfSample(SELF_TLS_LIBRARIES_PROBED, "gauge", "TLS libraries with uprobes attached.", libraries)
        yield SelfSample(SELF_TLS_EVENTS_TOTAL, "counter",
                         "Events the TLS probes handed to user space (opens, data chunks and closes).",
                         kernel["events"])
        yield SelfSample(SELF_TLS_EVENTS_LOST_TOTAL, "counter",
                         "TLS events the ring buffer had no room for (their bytes become a gap).", kernel["lost"])
        yield SelfSample(SELF_TLS_EVENTS_LOST_WITH_ROOM_TOTAL, "counter",
                         "Of the lost TLS events, those the kernel refused while the ring had room (not a full "
                         "ring: the ring's lock gave up).", kernel["lost_with_room"])
        yield SelfSample(SELF_TLS_EVENTS_RETRIED_TOTAL, "counter",
                         "TLS events the kernel refused while the ring had room, then took at a later try "
                         "(not lost).", kernel["retried"])
        yield SelfSample(SELF_TLS_EVENTS_FALLBACK_TOTAL, "counter",
                         "TLS events the ring refused (at every try, when it had room), handed over by the "
                         "fallback ring instead (not lost).", kernel["fallback"])
        yield SelfSample(SELF_TLS_EVENTS_FALLBACK_FOLLOWING_TOTAL, "counter",
                         "TLS events sent through the fallback ring behind one the ring refused, until user "
                         "space had taken it, so that every connection's events stay in order.",
                         kernel["fallback_following"])
        yield SelfSample(SELF_TLS_CALLS_TOTAL, "counter",
                         "SSL_read/SSL_write calls on watched connections that returned data.", kernel["calls"])
        yield SelfSample(SELF_TLS_CALLS_IGNORED_TOTAL, "counter",
                         "SSL calls with data on connections whose local port is not watched (clients, other "
                         "services), dropped in the kernel.",
                         kernel["ignored_calls"])
        yield SelfSample(SELF_TLS_CALLS_TRUNCATED_TOTAL, "counter",
                         f"SSL calls longer than {TLS_CHUNK * TLS_MAX_CHUNKS} bytes; the rest became a gap.",
                         kernel["truncated"])
        yield SelfSample(SELF_TLS_CALLS_TRIMMED_TOTAL, "counter",
                         f"SSL calls cut to their first {TLS_PREFIX} bytes while the ring buffer was over "
                         f"{TLS_TRIM_BYTES // (1 << 20)} MiB unread (or the fallback ring over "
                         f"{FALLBACK_TRIM_BYTES // (1 << 20)} MiB); the rest became a gap.", kernel["trimmed"])
        yield SelfSample(SELF_TLS_CALLS_WITHOUT_SOCKET_TOTAL, "counter",
                         "SSL calls with data whose read BIO has no socket fd (a memory BIO): not counted.",
                         kernel["no_fd"])
        yield SelfSample(SELF_TLS_CALLS_UNTRACKED_TOTAL, "counter",
                         "SSL calls whose arguments the probes could not keep for the call's return (the thread's "
                         "task storage could not be made): their bytes are missed.", kernel["untracked"])
        yield SelfSample(SELF_TLS_READ_ERRORS_TOTAL, "counter", "TLS buffers the probes could not read.",
                         kernel["read_errors"])
        yield SelfSample(SELF_TLS_CONNECTIONS_TRACKED, "gauge", "Watched TLS connections known now.",
                         self.connections_tracked())
        yield SelfSample(SELF_TLS_CONNECTIONS_EVICTED_TOTAL, "counter",
                         "TLS sockets forgotten because the connection table was full.", self.evicted)
        yield SelfSample(SELF_TLS_UNRESOLVED_SOCKETS_TOTAL, "counter",
                         "SSL connections whose fd the kernel found no TCP socket behind (not TCP, a BIO type "
                         "of the application's own, or closed under the probe): ignored.", kernel["unresolved"])
        yield SelfSample(SELF_TLS_DECODE_ERRORS_TOTAL, "counter", "TLS events shorter than their header says.",
                         self.decode_errors)
        yield SelfSample(SELF_TLS_CALLS_SKIPPED_TOTAL, "counter",
                         "SSL calls inside a body the parser only counts: their length was sent, not their bytes.",
                         kernel["skipped"])
        for end in ("start", "end"):
            yield SelfSample(SELF_TLS_EXCHANGE_ENDS_WIRE_TIMED_TOTAL, "counter",
                             "HTTPS exchange ends timed by their encrypted segments on the wire, per client turn "
                             "(start: a request's first read) and server turn (end: a response's last write).",
                             kernel[f"{end}_wire"], (("end", end),))
            for reason in ("no_match", "no_wire"):
                yield SelfSample(SELF_TLS_EXCHANGE_ENDS_PROBE_TIMED_TOTAL, "counter",
                                 "HTTPS exchange ends timed by the SSL call's return instead of the wire: the "
                                 "wire's segments did not match the call exactly (no_match), or the socket filter "
                                 "has no wire times for the connection (no_wire).",
                                 kernel[f"{end}_{reason}"], (("end", end), ("reason", reason)))
        yield SelfSample(SELF_TLS_LOSS_GAPS_TOTAL, "counter",
                         "Stretches of a watched stream lost in the kernel, counted by length.", self.loss_gaps)
