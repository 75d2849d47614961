"""HTTPS: the plaintext of OpenSSL's SSL_read/SSL_write, as the same Segments the wire gives.

    find_libraries     the system's libssl copies (+ --libssl), one per inode
    TlsProbes          bpf/tls_probes.c loaded and attached by the BPF loader helper process;
                       its maps over bpf(2) and its ring buffer over mmap
    decode_event       the one decoder of `struct tls_event`
    SocketResolver     (tgid, fd) -> the socket's local and peer address, from /proc
    TlsCapture         events -> Segments for a Tracker of its own (scheme "https")

How a byte becomes a Segment: an event carries the process (tgid), the fd the socket BIO
used, a direction (SSL_read: client -> server; SSL_write: server -> client), the offset
of its data in that direction's byte stream (kept by the kernel per SSL*), and the
kernel's CLOCK_MONOTONIC time at the call's return, made CLOCK_REALTIME here as
kernel_agg does. The resolver turns (tgid, fd) into addresses; the offset becomes the
Segment's sequence number, so bytes the kernel could not hand over are a gap of known
length, as on the wire. A close(fd) of a watched socket becomes a FIN each way.

Which connections count: those whose socket's local port is a watched port, i.e. the
server's accepted sockets. The kernel drops client sockets (connect()ed) by itself, and
sockets accepted from a listener this module found on an unwatched port (`tls_listeners`);
everything else that is not counted gets an IGNORE verdict in `tls_verdicts` after its
first event. Either way it costs a hash lookup or two per SSL call from then on.

The ring is read in batches (see TLS_WAKE_BYTES): at least every POLL_S, at once for a
socket's first event (resolving it needs its process alive), and when 256 KiB wait.

Failures leave as CaptureError; a socket that cannot be resolved is counted
(`tls_unresolved_sockets_total`) and ignored, never raised.
"""

from __future__ import annotations

import glob
import mmap
import os
import platform
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

from exporter.capture.bpf import ask_loader, find_source
from exporter.capture.bpfsys import BpfMap, map_info, possible_cpus
from exporter.capture.ringbuf import RingBuffer
from exporter.core.model import ACK, FIN, PSH, RST, Segment
from exporter.errors import CaptureError
from exporter.metrics import (
    SELF_TLS_CALLS_IGNORED_TOTAL,
    SELF_TLS_CALLS_SKIPPED_TOTAL,
    SELF_TLS_CALLS_TOTAL,
    SELF_TLS_CALLS_TRIMMED_TOTAL,
    SELF_TLS_CALLS_TRUNCATED_TOTAL,
    SELF_TLS_CALLS_WITHOUT_SOCKET_TOTAL,
    SELF_TLS_CONNECTIONS_EVICTED_TOTAL,
    SELF_TLS_CONNECTIONS_TRACKED,
    SELF_TLS_DECODE_ERRORS_TOTAL,
    SELF_TLS_EVENTS_LOST_TOTAL,
    SELF_TLS_EVENTS_TOTAL,
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
    "SocketResolver",
    "TlsCapture",
    "TlsEvent",
    "TlsProbes",
    "decode_event",
    "find_libraries",
    "parse_proc_net_tcp",
]

# Slots of the per-CPU `tls_counters` array, in index order (handed to the C file as -D).
COUNTER_NAMES: tuple[str, ...] = (
    "calls",  # SSL calls that returned data, before the verdict
    "events",  # events written to the ring buffer (data chunks and closes)
    "lost",  # events the ring buffer had no room for: their bytes are a gap in user space
    "truncated",  # calls longer than TLS_CHUNK * TLS_MAX_CHUNKS: the rest is a gap
    "no_fd",  # calls with data before any syscall showed the SSL*'s socket
    "ignored_calls",  # calls on connections with an IGNORE verdict or connect()ed here, dropped in the kernel
    "read_errors",  # bpf_probe_read_user failures (the buffer was not readable)
    "skipped",  # calls (or their head) inside a body stretch user space only counts: length only
    "trimmed",  # calls cut to their first TLS_PREFIX bytes because the ring was filling: the rest is a gap
)

# (symbol, entry program) probed in each library; every symbol's return goes to tls_return.
SYMBOLS: tuple[tuple[str, str], ...] = (
    ("SSL_read", "tls_read_entry"),
    ("SSL_read_ex", "tls_read_ex_entry"),
    ("SSL_write", "tls_write_entry"),
    ("SSL_write_ex", "tls_write_ex_entry"),
)

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
TLS_TRIM_BYTES = 2 * 1024 * 1024
TLS_PREFIX = 4096
# The kernel wakes the reader once this much is unread, or for a socket's first event; otherwise the
# exporter's loop reads the ring every POLL_S (app.py). A wakeup per event cost more than the probe
# itself (see tls_probes.c) and made the exporter handle one or two events per read.
TLS_WAKE_BYTES = 256 * 1024

# The syscalls an OpenSSL socket BIO may do its I/O with, and close, by machine.
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {"read": 0, "write": 1, "close": 3, "readv": 19, "writev": 20, "sendto": 44, "recvfrom": 45,
               "sendmsg": 46, "recvmsg": 47, "accept": 43, "accept4": 288, "connect": 42},
    "aarch64": {"read": 63, "write": 64, "close": 57, "readv": 65, "writev": 66, "sendto": 206, "recvfrom": 207,
                "sendmsg": 211, "recvmsg": 212, "accept": 202, "accept4": 242, "connect": 203},
}

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
VERDICT_WATCH = b"\x01"
VERDICT_IGNORE = b"\x02"

# struct tls_event's header: ts_ns, ssl, stream_off, tgid, fd, listen_fd, len, skipped, kind, flags, pad[2].
_EVENT = struct.Struct("=QQQIiiIIBB2x")
_FLAG_AFTER_LOSS = 1
_KIND_AT = 44  # struct tls_event's kind: after ts_ns, ssl, stream_off (8 each), tgid, fd, listen_fd, len, skipped
_SOCK_KEY = struct.Struct("=Ii")  # struct tls_sock_key
_SKIP_KEY = struct.Struct("=IiI")  # struct tls_skip_key: tgid, fd, dir
_SKIP = struct.Struct("=II")  # struct tls_skip: start, end (exclusive)
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_SEQ_MASK = 0xFFFFFFFF
_MAX_LISTENERS = 4096

_MAPS: dict[str, tuple[int, int]] = {  # name -> (key size, value size), checked after load
    "tls_verdicts": (_SOCK_KEY.size, 1),
    "tls_counters": (4, 8),
    "tls_events": (0, 0),
    "tls_skips": (_SKIP_KEY.size, _SKIP.size),
    "tls_ring_pos": (4, 8),
    "tls_listeners": (_SOCK_KEY.size, 1),
}
_RING_CONSUMED_AT = 8  # tls_ring_pos[1], our consumer position, in the map's mmap (8-byte values from 0)


@dataclass(frozen=True, slots=True)
class TlsEvent:
    ts_ns: int  # CLOCK_MONOTONIC
    ssl: int
    stream_offset: int
    tgid: int
    fd: int
    listen_fd: int  # the listening fd this one was accepted from; -1: accepted before we looked
    kind: int
    data: bytes
    skipped: int = 0  # bytes past `data` the kernel did not copy (a body stretch, or over the chunk budget)
    after_loss: bool = False  # bytes of this direction before stream_offset were lost in the kernel


def decode_event(raw: bytes) -> TlsEvent | None:
    """One ring buffer record; None when it is shorter than its header says (never expected)."""
    if len(raw) < _EVENT.size:
        return None
    ts_ns, ssl, offset, tgid, fd, listen_fd, length, skipped, kind, flags = _EVENT.unpack_from(raw)
    data = raw[_EVENT.size:_EVENT.size + length]
    if len(data) != length:
        return None
    return TlsEvent(ts_ns, ssl, offset, tgid, fd, listen_fd, kind, data, skipped, bool(flags & _FLAG_AFTER_LOSS))


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


@dataclass(frozen=True, slots=True)
class Endpoints:
    """A resolved socket: its local and peer address."""

    local_ip: str
    local_port: int
    peer_ip: str
    peer_port: int


def _hex_ip(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order.
    packed = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    if packed[:12] == b"\x00" * 10 + b"\xff\xff":
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed)


def parse_proc_net_tcp(text: str, inode: int) -> Endpoints | None:
    """The line of socket `inode` in a /proc/<pid>/net/tcp{,6} table."""
    wanted = str(inode)
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 9 and fields[9] == wanted:
            local, _, local_port = fields[1].partition(":")
            peer, _, peer_port = fields[2].partition(":")
            return Endpoints(_hex_ip(local), int(local_port, 16), _hex_ip(peer), int(peer_port, 16))
    return None


class SocketResolver:
    """(tgid, fd) -> Endpoints through /proc; `proc` is a parameter so tests can point it elsewhere."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self._proc = proc

    def inode(self, tgid: int, fd: int) -> int | None:
        """The socket inode behind an fd; None when it is gone, not a socket, or not ours to see."""
        try:
            target = os.readlink(self._proc / str(tgid) / "fd" / str(fd))
        except OSError:
            return None  # the process or the fd is gone, or we may not look (another user's)
        if not target.startswith("socket:["):
            return None
        return int(target[8:-1])

    def resolve(self, tgid: int, fd: int) -> Endpoints | None:
        inode = self.inode(tgid, fd)
        if inode is None:
            return None
        for table in ("tcp", "tcp6"):
            try:
                text = (self._proc / str(tgid) / "net" / table).read_text()
            except OSError:
                continue
            found = parse_proc_net_tcp(text, inode)
            if found is not None:
                return found
        return None


class TlsProbes:
    """bpf/tls_probes.c compiled, loaded and attached by the loader helper; our fds to it.

    The attachments live while this object's descriptors are open; close() detaches.
    """

    def __init__(self, libraries: list[str], src_file: Path | None = None) -> None:
        machine = platform.machine()
        numbers = SYSCALLS.get(machine)
        if numbers is None:
            raise CaptureError(f"TLS capture knows no syscall numbers for {machine}: run with --no-tls")
        if not libraries:
            raise CaptureError("no libssl found to probe: give one with --libssl PATH, or run with --no-tls")
        cflags = [f"-DTC_{name.upper()}={i}" for i, name in enumerate(COUNTER_NAMES)]
        cflags.append(f"-DTC_COUNT={len(COUNTER_NAMES)}")
        cflags += [f"-DSYSNR_{name.upper()}={nr}" for name, nr in numbers.items()]
        cflags += [f"-DTLS_CHUNK={TLS_CHUNK}", f"-DTLS_MAX_CHUNKS={TLS_MAX_CHUNKS}",
                   f"-DTLS_RING_PAGES={RING_PAGES}", f"-DTLS_TRIM_BYTES={TLS_TRIM_BYTES}",
                   f"-DTLS_PREFIX={TLS_PREFIX}", f"-DTLS_WAKE_BYTES={TLS_WAKE_BYTES}", "-w"]
        probes = []
        for library in libraries:
            for symbol, entry in SYMBOLS:
                probes.append({"library": library, "symbol": symbol, "function": entry, "return": False})
                probes.append({"library": library, "symbol": symbol, "function": "tls_return", "return": True})
        request: dict[str, Any] = {"src": str(src_file or tls_source()), "cflags": cflags, "maps": list(_MAPS),
                   "probes": probes, "raw_tracepoints": [{"tracepoint": "sys_enter", "function": "tls_sys_enter"},
                                       {"tracepoint": "sys_exit", "function": "tls_sys_exit"}]}
        reply, fds = _run_helper(request, max_fds=len(_MAPS) + len(probes) + 2 + len(SYMBOLS) + 3)
        self.compile_s: float = reply["compile_s"]
        self.failed: list[tuple[str, str, str]] = [(lib, sym, msg) for lib, sym, msg in reply["failed"]]
        attached: list[tuple[str, str, bool]] = [(lib, sym, ret) for lib, sym, ret in reply["attached"]]
        self.libraries = sorted({item[0] for item in attached})
        # Maps, attachments, then the programs (held for their run time statistics only).
        map_fds, self._attach_fds = fds[:len(_MAPS)], fds[len(_MAPS):]
        self._ring: RingBuffer | None = None
        self._maps: dict[str, BpfMap] = {}
        try:
            if not attached:
                reasons = "; ".join(f"{lib} {sym}: {msg}" for lib, sym, msg in self.failed[:2])
                raise CaptureError(f"no uprobe could be attached to libssl ({reasons}): run with --no-tls")
            ncpus = possible_cpus()
            events_fd = map_fds[2]
            self._maps = {"tls_verdicts": BpfMap(map_fds[0], ncpus), "tls_counters": BpfMap(map_fds[1], ncpus),
                          "tls_skips": BpfMap(map_fds[3], ncpus), "tls_ring_pos": BpfMap(map_fds[4], ncpus),
                          "tls_listeners": BpfMap(map_fds[5], ncpus)}
            for name in ("tls_verdicts", "tls_counters", "tls_skips", "tls_ring_pos", "tls_listeners"):
                info = self._maps[name].info
                if (info.key_size, info.value_size) != _MAPS[name]:
                    raise CaptureError(f"BPF map {name} has {info.key_size}-byte keys and {info.value_size}-byte "
                                       f"values, tls.py expects {_MAPS[name]}: tls_probes.c and tls.py disagree")
            self._ring = RingBuffer(events_fd, map_info(events_fd).max_entries)
            self._events_fd = events_fd
            try:
                self._ring_pos = mmap.mmap(map_fds[4], mmap.PAGESIZE, mmap.MAP_SHARED,
                                           mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                raise CaptureError(f"cannot map the BPF array tls_ring_pos: {exc.strerror}") from exc
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def fileno(self) -> int:
        assert self._ring is not None
        return self._ring.fileno()

    def read(self, timeout_s: float) -> list[bytes]:
        assert self._ring is not None
        records = self._ring.read(timeout_s)
        if records:
            # The probes trim calls while the backlog is large: tell them how far we are.
            _U64.pack_into(self._ring_pos, _RING_CONSUMED_AT, self._ring.consumer_position())
        return records

    def set_verdict(self, tgid: int, fd: int, watch: bool) -> None:
        self._maps["tls_verdicts"].update(_SOCK_KEY.pack(tgid, fd), VERDICT_WATCH if watch else VERDICT_IGNORE)

    def ignore_listener(self, tgid: int, listen_fd: int) -> None:
        """A listening socket on a port we do not watch: the kernel drops what it accepts from now on."""
        self._maps["tls_listeners"].update(_SOCK_KEY.pack(tgid, listen_fd), VERDICT_IGNORE)

    def forget_verdict(self, tgid: int, fd: int) -> None:
        self._maps["tls_verdicts"].delete(_SOCK_KEY.pack(tgid, fd))
        for direction in (KIND_READ, KIND_WRITE):
            self._maps["tls_skips"].delete(_SKIP_KEY.pack(tgid, fd, direction))

    def set_skip(self, tgid: int, fd: int, direction: int, stretch: tuple[int, int] | None) -> None:
        """A body stretch [start, end) of one direction's stream (32-bit offsets); None: none."""
        key = _SKIP_KEY.pack(tgid, fd, direction)
        if stretch is None:
            self._maps["tls_skips"].delete(key)
        else:
            self._maps["tls_skips"].update(key, _SKIP.pack(stretch[0] & _SEQ_MASK, stretch[1] & _SEQ_MASK))

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
            os.close(self._events_fd)
        for bpf_map in self._maps.values():
            bpf_map.close()
        self._maps = {}


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
    """One (tgid, fd) the resolver has seen, with its verdict and its streams' next offsets."""

    watched: bool
    ssl: int = 0
    key: tuple[int, int] = (0, 0)  # (tgid, fd)
    client: tuple[str, int] = ("", 0)
    server: tuple[str, int] = ("", 0)
    next_offset: list[int] = field(default_factory=lambda: [-1, -1])  # read (to server), write

    @property
    def flow(self) -> tuple[str, int, str, int]:
        return (*self.client, *self.server)


class TlsCapture:
    """Ring buffer events -> Segments of watched connections, with verdicts and body skips pushed back."""

    def __init__(
        self,
        ports: Iterable[int],
        libraries: list[str],
        *,
        max_connections: int = 65536,
        resolver: SocketResolver | None = None,
        realtime_offset_ns: Callable[[], int] = lambda: time.time_ns() - time.monotonic_ns(),
        probes_factory: Callable[[list[str]], TlsProbes] = TlsProbes,
    ) -> None:
        self._ports = frozenset(ports)
        self._libraries = libraries
        self._max = max_connections
        self._resolver = resolver or SocketResolver()
        self._offset = realtime_offset_ns
        self._factory = probes_factory
        self.probes: TlsProbes | None = None
        # Every (tgid, fd) seen, least recently used first; the watched ones also by flow key,
        # for the Tracker's skip hints.
        self._conns: OrderedDict[tuple[int, int], _Conn] = OrderedDict()
        self._flows: dict[tuple[str, int, str, int], _Conn] = {}
        self._listeners: dict[tuple[int, int], tuple[int, Endpoints | None]] = {}
        self._closing: set[tuple[int, int]] = set()
        self._generation = 0
        self.unresolved = 0
        self.evicted = 0
        self.decode_errors = 0
        self.loss_gaps = 0
        self.segments = 0
        self._closed_counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)

    def open(self) -> TlsCapture:
        self.probes = self._factory(self._libraries)
        return self

    def fileno(self) -> int:
        assert self.probes is not None
        return self.probes.fileno()

    def read(self, timeout_s: float) -> list[Segment]:
        if self.probes is None:
            return []
        records = self.probes.read(timeout_s)
        if not records:
            return []
        realtime = self._offset()
        out: list[Segment] = []
        append = out.append
        unpack, header = _EVENT.unpack_from, _EVENT.size
        conns = self._conns
        # A socket closed further on in this batch gets no verdict: the kernel has already
        # forgotten it, and a verdict now would apply to the next socket with its number.
        self._closing = {_SOCK_KEY.unpack_from(raw, 24) for raw in records
                         if len(raw) >= header and raw[_KIND_AT] == KIND_CLOSE}
        for raw in records:
            if len(raw) < header:
                self.decode_errors += 1
                continue
            ts_ns, ssl, offset, tgid, fd, _listen_fd, length, skipped, kind, flags = unpack(raw)
            conn = conns.get((tgid, fd))
            # The common case, inline: data of a known connection, in order (what segments_of does).
            if (conn is not None and conn.watched and conn.ssl == ssl and kind != KIND_CLOSE
                    and not flags & _FLAG_AFTER_LOSS and len(raw) == header + length):
                conns.move_to_end(conn.key)
                ts = ts_ns + realtime
                if kind == KIND_WRITE:
                    (src_ip, src_port), (dst_ip, dst_port) = conn.server, conn.client
                    conn.next_offset[1] = offset + length + skipped
                else:
                    (src_ip, src_port), (dst_ip, dst_port) = conn.client, conn.server
                    conn.next_offset[0] = offset + length + skipped
                append(Segment(ts, src_ip, src_port, dst_ip, dst_port, offset & _SEQ_MASK, ACK | PSH,
                               raw[header:], length + skipped))
                continue
            event = decode_event(raw)
            if event is None:
                self.decode_errors += 1
            else:
                out.extend(self.segments_of(event, realtime))
        self._closing = set()
        self.segments += len(out)
        return out

    def segments_of(self, event: TlsEvent, realtime_offset_ns: int) -> Iterator[Segment]:
        """The Segment(s) one event stands for (none for an unwatched connection)."""
        key = (event.tgid, event.fd)
        conn = self._conns.get(key)
        ts = event.ts_ns + realtime_offset_ns
        if event.kind == KIND_CLOSE:
            if conn is None:
                return
            self._forget(conn)
            if self.probes is not None:
                self.probes.forget_verdict(event.tgid, event.fd)  # one we may have set after the close
            if conn.watched:
                yield from self._fins(conn, ts)
            return
        if conn is not None and conn.ssl != event.ssl:
            # Another SSL* on the same fd: the old connection closed unseen (a close() before
            # our first look at it); end its flow before the new one begins.
            self._forget(conn)
            if conn.watched:
                yield from self._fins(conn, ts)
            conn = None
        if conn is None:
            conn = self._resolve(event)
        else:
            self._conns.move_to_end(key)
        if not conn.watched:
            return
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
                continue  # closed meanwhile: the kernel dropped its entry at close()
            try:
                self.probes.set_skip(conn.key[0], conn.key[1], KIND_READ if to_server else KIND_WRITE, stretch)
            except CaptureError:
                pass  # LRU map: never full; a closed map means we are stopping

    def _forget(self, conn: _Conn) -> None:
        self._conns.pop(conn.key, None)
        if conn.watched:
            self._flows.pop(conn.flow, None)

    def _listener(self, tgid: int, listen_fd: int) -> Endpoints | None:
        """The listening socket's address, cached by inode (the fd number could be reused)."""
        inode = self._resolver.inode(tgid, listen_fd)
        if inode is None:
            return None
        cached = self._listeners.get((tgid, listen_fd))
        if cached is not None and cached[0] == inode:
            return cached[1]
        found = self._resolver.resolve(tgid, listen_fd)
        if found is not None and found.local_port not in self._ports and self.probes is not None:
            try:
                self.probes.ignore_listener(tgid, listen_fd)
            except CaptureError:
                pass  # LRU map: never full; a closed map means we are stopping
        if len(self._listeners) >= _MAX_LISTENERS:
            self._listeners.clear()  # listeners are few; a full table means churn, start over
        self._listeners[(tgid, listen_fd)] = (inode, found)
        return found

    def _resolve(self, event: TlsEvent) -> _Conn:
        tgid, fd = event.tgid, event.fd
        key = (tgid, fd)
        conn = _Conn(False, event.ssl, key)
        if event.listen_fd >= 0:
            # Accepted while we watched: the listening socket says which port, and it is still
            # open even when this connection closed before its first event was read. The client
            # end is named by process and fd (unique while the connection lives): no metric
            # carries the peer address.
            listener = self._listener(tgid, event.listen_fd)
            if listener is None:
                self.unresolved += 1
            elif listener.local_port in self._ports:
                self._generation = (self._generation + 1) & 0xFFFF
                conn = _Conn(True, event.ssl, key, (f"tls:{tgid}:{fd}", self._generation),
                             (listener.local_ip, listener.local_port))
        else:
            found = self._resolver.resolve(tgid, fd)
            if found is None:
                self.unresolved += 1
            elif found.local_port in self._ports:
                conn = _Conn(True, event.ssl, key, (found.peer_ip, found.peer_port),
                             (found.local_ip, found.local_port))
        if self.probes is not None and key not in self._closing:
            try:
                self.probes.set_verdict(tgid, fd, conn.watched)
            except CaptureError:
                pass  # map full (LRU: never) or closed; the next event asks again
        conns = self._conns
        if len(conns) >= self._max:
            self._forget(next(iter(conns.values())))
            self.evicted += 1
        conns[key] = conn
        if conn.watched:
            self._flows[conn.flow] = conn
        return conn

    @staticmethod
    def _fins(conn: _Conn, ts: int) -> Iterator[Segment]:
        """close(fd): the server ends both streams; a FIN each way ends the flow in the Tracker."""
        server_next, client_next = conn.next_offset[1], conn.next_offset[0]
        yield Segment(ts, conn.server[0], conn.server[1], conn.client[0], conn.client[1],
                      max(server_next, 0) & _SEQ_MASK, ACK | FIN, b"", 0)
        yield Segment(ts, conn.client[0], conn.client[1], conn.server[0], conn.server[1],
                      max(client_next, 0) & _SEQ_MASK, ACK | FIN, b"", 0)

    def reap(self, now_ns: int, is_open: Callable[[int, int], bool] | None = None) -> list[Segment]:
        """Watched sockets closed without a close() we saw (the process exited, or exec'd): an RST
        each, so their flows end now rather than at the idle timeout. One lstat per watched socket."""
        still_open = is_open or (lambda tgid, fd: os.path.lexists(f"/proc/{tgid}/fd/{fd}"))
        gone = [conn for conn in self._conns.values() if conn.watched and not still_open(*conn.key)]
        if not gone:
            return []
        # A gone fd's last events (its last response, its close) were written before we looked, but
        # may still wait in the ring (it is read in batches): take them first, or the RST would end
        # the flow before its last exchange.
        out = self.read(0)
        for conn in gone:
            if self._conns.get(conn.key) is conn:  # no close (or new SSL*) in what was just read
                self._forget(conn)
                out.append(Segment(now_ns, conn.client[0], conn.client[1], conn.server[0], conn.server[1],
                                   max(conn.next_offset[0], 0) & _SEQ_MASK, RST, b"", 0))
        return out

    def connections_tracked(self) -> int:
        return sum(1 for conn in self._conns.values() if conn.watched)

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
                         "Events the TLS probes handed to user space (data chunks and closes).", kernel["events"])
        yield SelfSample(SELF_TLS_EVENTS_LOST_TOTAL, "counter",
                         "TLS events the ring buffer had no room for (their bytes become a gap).", kernel["lost"])
        yield SelfSample(SELF_TLS_CALLS_TOTAL, "counter", "SSL_read/SSL_write calls that returned data.",
                         kernel["calls"])
        yield SelfSample(SELF_TLS_CALLS_IGNORED_TOTAL, "counter",
                         "SSL calls on unwatched connections (clients, other ports), dropped in the kernel.",
                         kernel["ignored_calls"])
        yield SelfSample(SELF_TLS_CALLS_TRUNCATED_TOTAL, "counter",
                         f"SSL calls longer than {TLS_CHUNK * TLS_MAX_CHUNKS} bytes; the rest became a gap.",
                         kernel["truncated"])
        yield SelfSample(SELF_TLS_CALLS_TRIMMED_TOTAL, "counter",
                         f"SSL calls cut to their first {TLS_PREFIX} bytes while the ring buffer was over "
                         f"{TLS_TRIM_BYTES // (1 << 20)} MiB unread; the rest became a gap.", kernel["trimmed"])
        yield SelfSample(SELF_TLS_CALLS_WITHOUT_SOCKET_TOTAL, "counter",
                         "SSL calls with data before any syscall showed their socket (not counted).",
                         kernel["no_fd"])
        yield SelfSample(SELF_TLS_READ_ERRORS_TOTAL, "counter", "TLS buffers the probes could not read.",
                         kernel["read_errors"])
        yield SelfSample(SELF_TLS_CONNECTIONS_TRACKED, "gauge", "Watched TLS connections known now.",
                         self.connections_tracked())
        yield SelfSample(SELF_TLS_CONNECTIONS_EVICTED_TOTAL, "counter",
                         "TLS sockets forgotten because the connection table was full.", self.evicted)
        yield SelfSample(SELF_TLS_UNRESOLVED_SOCKETS_TOTAL, "counter",
                         "TLS sockets whose addresses /proc did not give (process gone, not TCP, or no "
                         "permission): ignored.", self.unresolved)
        yield SelfSample(SELF_TLS_DECODE_ERRORS_TOTAL, "counter", "TLS events shorter than their header says.",
                         self.decode_errors)
        yield SelfSample(SELF_TLS_CALLS_SKIPPED_TOTAL, "counter",
                         "SSL calls inside a body the parser only counts: their length was sent, not their bytes.",
                         kernel["skipped"])
        yield SelfSample(SELF_TLS_LOSS_GAPS_TOTAL, "counter",
                         "Stretches of a watched stream lost in the kernel, counted by length.", self.loss_gaps)
