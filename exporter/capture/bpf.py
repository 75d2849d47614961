"""Load bpf/http_filter.c with BCC and talk to its maps.

This module is the only one that imports bcc. Everything BCC, clang or the
kernel can throw at load time becomes a `CaptureError` whose message names the
fix. The counter and config indices are defined here, once, and handed to the C
file as -D defines; the C source itself is never edited or templated.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import os
import platform
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.errors import CaptureError
from exporter.preflight import effective_capabilities, has_capture_privileges

__all__ = [
    "COUNTER_NAMES",
    "DEFAULT_SNAPLEN",
    "FAST_COUNTER_NAMES",
    "HANDOVER_REASONS",
    "METHODS",
    "HttpFilter",
    "KernelAggregate",
    "KernelHandover",
    "find_source",
    "require_privileges",
]

# Slots of the per-CPU `filter_counters` array, in index order. Every packet the
# filter sees lands in exactly one of kept / dropped_*; truncated_body_skip is
# the subset of kept that was cut to headers by a body_skip entry.
COUNTER_NAMES: tuple[str, ...] = (
    "seen",
    "kept",
    "truncated_body_skip",
    "dropped_loopback_dup",
    "dropped_not_tcp",
    "dropped_fragment",
    "dropped_port",
    "dropped_no_payload",
    "dropped_malformed",
    "consumed_fast_path",
)

# Slots of the per-CPU `fast_counters` array: fast path events, not packet verdicts.
FAST_COUNTER_NAMES: tuple[str, ...] = (
    "requests",  # request heads taken in the kernel
    "exchanges",  # exchanges completed and aggregated in the kernel
    "retransmits",  # segments of FAST flows already seen
    "busy",  # segments passed up because another CPU held the flow (inexact; expected 0)
    "flows_created",  # flow_state entries created
    "flows_deleted",  # flow_state entries deleted at FIN/RST (LRU evictions are not seen)
    "handover_map_full",  # handover records lost to a full map (inexact; expected 0)
)

# Slots of `handover_counters`: why a flow went to user space. `new_flow` is a flow
# whose first request was not simple: it never was FAST, so there is nothing to hand over.
HANDOVER_REASONS: tuple[str, ...] = (
    "new_flow",
    "request",
    "pipelined",
    "response",
    "extra",
    "seq",
    "unsolicited",
    "close",
    "agg_full",
)

# Method ids of the fast path; index 0 is "none". CONNECT never takes it.
METHODS: tuple[str, ...] = ("", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH")

# Must match the C file's MAX_DUR_BOUNDS / MAX_SIZE_BOUNDS / PATH_LEN.
MAX_DURATION_BOUNDS = 32
MAX_SIZE_BOUNDS = 16
PATH_LEN = 96

# Slots of the `config` array.
_CONFIG_NAMES: tuple[str, ...] = ("loopback", "snaplen", "link_header_len", "fast_path")

# 256 KiB, as tcpdump: a GSO super-packet on lo is up to 14 + 65535 bytes, so
# 65535 would clip the tail of the largest ones.
DEFAULT_SNAPLEN = 262144


def find_source() -> Path:
    """Path of http_filter.c: repo checkout (bpf/) first, then the installed package copy."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "bpf" / "http_filter.c", here.parents[1] / "bpf" / "http_filter.c"):
        if candidate.is_file():
            return candidate
    raise CaptureError(f"BPF source http_filter.c not found next to {here.parents[1]}: reinstall the package")


def require_privileges() -> None:
    """Raise a CaptureError naming the fix unless we may load BPF and open packet sockets."""
    if os.geteuid() == 0:
        return
    if not has_capture_privileges(effective_capabilities()):
        raise CaptureError("BPF needs root or CAP_BPF+CAP_NET_RAW: run with sudo")


@dataclass(frozen=True, slots=True)
class KernelHandover:
    """One `handover` record: a FAST flow the kernel turned over to user space (see the C header)."""

    flow: tuple[str, int, str, int]  # client ip, client port, server ip, server port
    reason: str
    phase: int  # 0 nothing open, 1 request waiting, 2 response head consumed
    method: str
    path: str
    start_ns: int  # bpf_ktime_get_ns: CLOCK_MONOTONIC
    client_next_seq: int
    server_next_seq: int | None
    status: int
    response_length: int
    response_seen: int


@dataclass(frozen=True, slots=True)
class KernelAggregate:
    """One `http_agg` entry summed over CPUs: every exchange of one label set taken in the kernel."""

    port: int
    method: str
    status: int
    path: str
    count: int
    duration_sum_ns: int
    response_sum: int
    duration_counts: tuple[int, ...]  # one per duration bound, then the overflow slot
    response_counts: tuple[int, ...]  # one per size bound, then the overflow slot


def _release_compiler_heap() -> None:
    """Give clang's freed heap back to the OS: ~35 MB of RSS that glibc would otherwise keep."""
    try:
        ct.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def _key_ip(raw: Any) -> str:
    packed = bytes(raw)
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed)


_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


def _flow_key_bytes(ip: str) -> bytes:
    """16-byte address as the filter keys it: IPv6 as is, IPv4 as ::ffff:a.b.c.d."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError as exc:
        raise CaptureError(f"not an IP address: {ip!r}") from exc
    if addr.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


class HttpFilter:
    """The compiled socket filter and its maps.

    One instance can be attached to several sockets on the same interface; they
    then share ports, config, counters and body_skip entries.
    """

    def __init__(
        self,
        ports: Iterable[int],
        *,
        loopback: bool = False,
        snaplen: int = DEFAULT_SNAPLEN,
        link_header_len: int = 14,
        src_file: Path | None = None,
        fast_path: bool = False,
        histogram_bounds: tuple[Iterable[float], Iterable[float]] = ((), ()),
    ) -> None:
        require_privileges()
        self._fast_path = fast_path
        self._n_dur = self._n_size = 0
        release = platform.release()
        build = Path("/lib/modules") / release / "build"
        if not build.is_dir():
            raise CaptureError(f"kernel headers not found under {build}: run `make setup`")
        try:
            from bcc import BPF
        except ImportError as exc:
            raise CaptureError(
                "BCC Python bindings not importable: install python3-bpfcc (`make setup`)"
            ) from exc
        src = src_file or find_source()
        cflags = [f"-DCNT_{name.upper()}={i}" for i, name in enumerate(COUNTER_NAMES)]
        cflags.append(f"-DCNT_COUNT={len(COUNTER_NAMES)}")
        cflags += [f"-DCFG_{name.upper()}={i}" for i, name in enumerate(_CONFIG_NAMES)]
        cflags.append(f"-DCFG_COUNT={len(_CONFIG_NAMES)}")
        cflags += [f"-DFC_{name.upper()}={i}" for i, name in enumerate(FAST_COUNTER_NAMES)]
        cflags.append(f"-DFC_COUNT={len(FAST_COUNTER_NAMES)}")
        cflags += [f"-DHO_{name.upper()}={i}" for i, name in enumerate(HANDOVER_REASONS)]
        cflags.append(f"-DHO_COUNT={len(HANDOVER_REASONS)}")
        cflags.append("-w")  # kernel headers are noisy under BCC's clang; our own code is reviewed
        # BCC raises bare Exception for compile and load failures; this is the one
        # place that catches that, and it turns it into the project's error.
        try:
            self._bpf: Any = BPF(src_file=str(src).encode(), cflags=cflags)
        except Exception as exc:
            raise CaptureError(
                f"BPF program {src} failed to compile: {exc} (see clang output above)"
            ) from exc
        try:
            self._fn: Any = self._bpf.load_func(b"http_filter", BPF.SOCKET_FILTER)
        except Exception as exc:
            self._bpf.cleanup()
            msg = str(exc)
            # As root, EACCES is the verifier's refusal, not a privilege problem.
            if os.geteuid() != 0 and ("Operation not permitted" in msg or "Permission denied" in msg):
                raise CaptureError("BPF needs root or CAP_BPF+CAP_NET_RAW: run with sudo") from exc
            raise CaptureError(f"kernel refused the BPF program: {msg}") from exc
        _release_compiler_heap()
        self._ports = self._bpf[b"watched_ports"]
        self._config = self._bpf[b"config"]
        self._counters = self._bpf[b"filter_counters"]
        self._skip = self._bpf[b"body_skip"]
        self._fast_counters = self._bpf[b"fast_counters"]
        self._handover_counters = self._bpf[b"handover_counters"]
        self._bounds = self._bpf[b"agg_bounds"]
        self._flow_states = self._bpf[b"flow_state"]
        self.handovers = self._bpf[b"handover"]
        self.aggregates = self._bpf[b"http_agg"]
        # Bounds before the fast path is switched on: a zeroed bounds map would put every
        # exchange in the overflow bucket.
        self.set_bounds(*histogram_bounds)
        self.configure(loopback=loopback, snaplen=snaplen, link_header_len=link_header_len)
        self.set_ports(ports)

    @property
    def fd(self) -> int:
        """File descriptor of the loaded program, for SO_ATTACH_BPF."""
        return int(self._fn.fd)

    def configure(
        self, *, loopback: bool, snaplen: int, link_header_len: int, fast_path: bool | None = None
    ) -> None:
        if fast_path is not None:
            self._fast_path = fast_path
        if not 64 <= snaplen <= 1 << 20:
            raise CaptureError(f"snap length {snaplen} out of range 64..1048576")
        if link_header_len not in (0, 14):
            raise CaptureError(f"link header length {link_header_len} unsupported (0 or 14)")
        values = {"loopback": int(loopback), "snaplen": snaplen, "link_header_len": link_header_len,
                  "fast_path": int(self._fast_path)}
        for i, name in enumerate(_CONFIG_NAMES):
            self._config[ct.c_int(i)] = ct.c_uint32(values[name])

    def set_ports(self, ports: Iterable[int]) -> None:
        """Replace the watched ports (1..65535)."""
        wanted = set()
        for port in ports:
            if not 0 < port < 65536:
                raise CaptureError(f"port {port} out of range 1..65535")
            wanted.add(port)
        for key in list(self._ports.keys()):
            if key.value not in wanted:
                del self._ports[key]
        for port in wanted:
            self._ports[self._ports.Key(port)] = self._ports.Leaf(1)

    @property
    def fast_path(self) -> bool:
        return self._fast_path

    def set_bounds(self, duration_s: Iterable[float], sizes: Iterable[float]) -> None:
        """The histogram bounds the kernel buckets fast-path exchanges with (HttpMetrics' own).

        Set them before turning the fast path on; a bucket of the kernel is then exactly
        the bucket `bisect_left` picks in user space.
        """
        durations = sorted(set(float(b) for b in duration_s))
        size_list = sorted(set(float(b) for b in sizes))
        if len(durations) > MAX_DURATION_BOUNDS or len(size_list) > MAX_SIZE_BOUNDS:
            raise CaptureError(
                f"the fast path takes at most {MAX_DURATION_BOUNDS} duration and {MAX_SIZE_BOUNDS} size "
                "buckets: use fewer, or run with --no-fast-path"
            )
        if any(b < 0 for b in durations + size_list):
            raise CaptureError("the fast path needs non-negative bucket bounds: run with --no-fast-path")
        leaf = self._bounds.Leaf()
        for i in range(MAX_DURATION_BOUNDS):
            leaf.dur_ns[i] = (1 << 64) - 1  # unused: nothing lies above it
        for i in range(MAX_SIZE_BOUNDS):
            leaf.size[i] = (1 << 64) - 1
        for i, bound in enumerate(durations):
            # d_ns > floor(b * 1e9) <=> d_ns / 1e9 > b for integer d_ns (to float precision).
            leaf.dur_ns[i] = min(int(bound * 1e9), (1 << 64) - 1)
        for i, bound in enumerate(size_list):
            leaf.size[i] = min(int(bound), (1 << 64) - 1)  # integer n > floor(b) <=> n > b
        leaf.n_dur = len(durations)
        leaf.n_size = len(size_list)
        self._bounds[ct.c_int(0)] = leaf
        self._n_dur = len(durations)
        self._n_size = len(size_list)

    def fast_counters(self) -> dict[str, int]:
        """Fast path events since load, summed over CPUs."""
        return {name: int(self._fast_counters.sum(ct.c_int(i)).value) for i, name in enumerate(FAST_COUNTER_NAMES)}

    def handover_counters(self) -> dict[str, int]:
        """Flows turned over to user space, by reason, summed over CPUs."""
        return {name: int(self._handover_counters.sum(ct.c_int(i)).value)
                for i, name in enumerate(HANDOVER_REASONS)}

    def drain_handovers(self) -> list[KernelHandover]:
        """Take (read and delete) every handover record the kernel wrote since the last call.

        One syscall when there are none. Call it after each ring read and before parsing
        what was read: a record is always written before its flow's first passed-up segment.
        """
        table = self.handovers
        out: list[KernelHandover] = []
        for key in list(table.keys()):
            try:
                leaf = table[key]
                del table[key]
            except KeyError:
                continue  # gone already (a second reader); nothing to seed
            out.append(KernelHandover(
                flow=(_key_ip(key.saddr), int(key.sport), _key_ip(key.daddr), int(key.dport)),
                reason=HANDOVER_REASONS[leaf.reason] if leaf.reason < len(HANDOVER_REASONS) else "?",
                phase=int(leaf.phase),
                method=METHODS[leaf.method] if leaf.method < len(METHODS) else "",
                path=bytes(leaf.path[: leaf.path_len]).decode("latin-1"),
                start_ns=int(leaf.start_ns),
                client_next_seq=int(leaf.cseq),
                server_next_seq=int(leaf.sseq) if leaf.sseq_known else None,
                status=int(leaf.status),
                response_length=int(leaf.resp_len),
                response_seen=int(leaf.resp_seen),
            ))
        return out

    def read_aggregates(self) -> list[KernelAggregate]:
        """Every `http_agg` entry, summed over CPUs (one lookup per entry)."""
        n_dur = self._n_dur + 1
        n_size = self._n_size + 1
        out: list[KernelAggregate] = []
        for key, per_cpu in self.aggregates.items():
            count = dur_sum = resp_sum = 0
            dur = [0] * n_dur
            resp = [0] * n_size
            for value in per_cpu:
                count += value.count
                dur_sum += value.dur_sum_ns
                resp_sum += value.resp_sum
                for i in range(n_dur):
                    dur[i] += value.dur[i]
                for i in range(n_size):
                    resp[i] += value.resp[i]
            if not count:
                continue
            out.append(KernelAggregate(
                port=int(key.port),
                method=METHODS[key.method] if key.method < len(METHODS) else "",
                status=int(key.status),
                path=bytes(key.path[: key.path_len]).decode("latin-1"),
                count=count,
                duration_sum_ns=dur_sum,
                response_sum=resp_sum,
                duration_counts=tuple(dur),
                response_counts=tuple(resp),
            ))
        return out

    def flow_state_capacity(self) -> int:
        return int(self._flow_states.max_entries)

    def ports(self) -> set[int]:
        return {k.value for k in self._ports.keys()}

    def counters(self) -> dict[str, int]:
        """Kernel counters summed over CPUs, since load. Cheap: one lookup per slot.

        Not an atomic snapshot while packets flow. The filter counts `seen` before a
        packet's outcome, so outcomes are read first and `seen` last: then
        seen >= kept + sum(dropped_*) always holds in what this returns.
        """
        values = {
            name: int(self._counters.sum(ct.c_int(i)).value)
            for i, name in reversed(list(enumerate(COUNTER_NAMES)))
        }
        return {name: values[name] for name in COUNTER_NAMES}

    def _skip_key(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int) -> Any:
        key = self._skip.Key()
        ct.memmove(key.saddr, _flow_key_bytes(src_ip), 16)
        ct.memmove(key.daddr, _flow_key_bytes(dst_ip), 16)
        key.sport = src_port
        key.dport = dst_port
        return key

    def skip_body(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int, seq_end: int) -> None:
        """Truncate to headers every segment of this direction whose payload ends at or before seq_end."""
        key = self._skip_key(src_ip, src_port, dst_ip, dst_port)
        self._skip[key] = self._skip.Leaf(seq_end & 0xFFFFFFFF)

    def forget_skip(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int) -> None:
        key = self._skip_key(src_ip, src_port, dst_ip, dst_port)
        try:
            del self._skip[key]
        except KeyError:
            pass  # already gone (LRU eviction or never set): nothing to forget

    def close(self) -> None:
        self._bpf.cleanup()
