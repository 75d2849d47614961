"""Load bpf/http_filter.c and talk to its maps.

BCC compiles and loads the filter in a helper process (bpf_loader.py), so that
LLVM never maps into the exporter; this module receives the program and map
descriptors and reads the maps with bpf(2) (bpfsys.py). Everything BCC, clang
or the kernel can throw at load time becomes a `CaptureError` whose message
names the fix. The counter and config indices are defined here, once, and
handed to the C file as -D defines; the C source itself is never edited or
templated. So are the byte layouts of its map keys and values (the `struct`
formats below), which are checked against the loaded maps' sizes.
"""

from __future__ import annotations

import ipaddress
import json
import os
import platform
import socket
import struct
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.capture.bpfsys import BpfMap, possible_cpus
from exporter.errors import CaptureError
from exporter.preflight import (
    CAPTURE_CAPABILITIES,
    SECCOMP_FIX,
    check_bpf_syscall,
    effective_capabilities,
    has_capture_privileges,
    lost_across_exec,
    missing_capture_capabilities,
    seccomp_mode,
)

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
    "dropped_interface",  # node-wide capture: an interface no --interface pattern matches
    "dropped_duplicate",  # node-wide capture: a copy seen on a second interface (flow_iface)
    "dropped_tls",  # payload of a connection user space found to be TLS (the uprobes read its plaintext)
)

# Slots of the per-CPU `fast_counters` array: fast path events, not packet verdicts.
FAST_COUNTER_NAMES: tuple[str, ...] = (
    "requests",  # request heads taken in the kernel
    "exchanges",  # exchanges completed and aggregated in the kernel
    "retransmits",  # segments of FAST flows already seen
    "busy",  # segments passed up because another CPU held the flow (inexact; expected 0)
    "flows_created",  # flow_state entries created
    "flows_deleted",  # flow_state entries deleted at FIN/RST (LRU evictions are not seen)
    "handover_map_full",  # connections whose record did not fit: dropped in the kernel from then on (expected 0)
    "overtaken",  # response body segments that overtook the one before them, held by range
    "tail_call_failed",  # packets passed up because a scan_progs slot was empty (a loader bug; expected 0)
    "split_heads",  # requests taken whose head came in more than one segment
    "head_lost",  # connections given up mid-head whose kept head part was evicted: lost (expected 0)
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
    "agg_full",  # http_agg full, or (one CPU) the path shares its key's hash with another path
    "head_too_long",  # a request head longer than the kernel scans (HEAD_MAX bytes)
    "head_split",  # a head over segments the kernel could not follow to its end (order, a part not kept)
    "path_too_long",  # a path (before '?') longer than the kernel keeps (PATH_LEN bytes)
    "request_body",  # a request announcing a body (Content-Length > 0)
)

# Method ids of the fast path; index 0 is "none". CONNECT never takes it.
METHODS: tuple[str, ...] = ("", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH")

# Must match the C file's MAX_DUR_BOUNDS / MAX_SIZE_BOUNDS / PATH_LEN / RAW_PATH_LEN / HEAD_MAX.
MAX_DURATION_BOUNDS = 32
MAX_SIZE_BOUNDS = 16
PATH_LEN = 96  # the kernel's key
RAW_PATH_LEN = 128  # a path as sent that the kernel takes, if its key fits PATH_LEN
HEAD_MAX = 4096

# Slots of the `config` array.
_CONFIG_NAMES: tuple[str, ...] = ("loopback", "snaplen", "link_header_len", "fast_path", "node", "iface_set",
                                  "route_ids", "agg_gen", "tls_flows")

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
    lost = lost_across_exec()
    if lost:
        raise CaptureError(
            f"{', '.join(lost)} would not reach the BPF loader process (not ambient): grant them as "
            "ambient capabilities (systemd AmbientCapabilities=, setpriv --ambient-caps), or run as root"
        )


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
    # A response body range the kernel held (it overtook the segment before it): user space
    # counts its held_length bytes when the stream reaches held_seq. 0: none.
    held_ns: int = 0
    held_seq: int = 0
    held_length: int = 0
    # The open request's body (Content-Length) and how many of its bytes are still to come.
    request_length: int = 0
    request_left: int = 0
    # The kernel read HTTP on this connection (a FAST flow), not only its first sequence numbers.
    http_seen: bool = False
    # A request head the kernel had begun (its earlier segments) when it gave up: head_length bytes
    # from client_next_seq on, which user space parses first. `head` is None if they were gone.
    head_length: int = 0
    head: bytes | None = None


@dataclass(frozen=True, slots=True)
class KernelAggregate:
    """One `http_agg` entry summed over CPUs: every exchange of one label set taken in the kernel."""

    server_ip: str  # the server's address, as in flows (IPv4 dotted, IPv6 compressed)
    port: int
    method: str
    status: int
    path: str
    count: int
    duration_sum_ns: int
    response_sum: int
    duration_counts: tuple[int, ...]  # one per duration bound, then the overflow slot
    response_counts: tuple[int, ...]  # one per size bound, then the overflow slot
    request_sum: int = 0  # request body bytes (Content-Length, counted by sequence number)
    request_counts: tuple[int, ...] = ()  # one per size bound, then the overflow slot; () as all empty


# Byte layouts of the C structs (native order, the C file's field order and padding).
_U32 = struct.Struct("=I")
_FLOW_KEY = struct.Struct("=16s16sHH")  # struct flow_key
_SKIP_RANGE = struct.Struct("=II")  # struct skip_range: start, end (exclusive)
# struct tls_wire (bpf/tls_wire.h): ns, seq, record, ack, pad. Written by the filter and read by the
# TLS probes only; user space makes an entry zeroed (no wire time yet).
TLS_WIRE_SIZE = 24
_HIST_BOUNDS = struct.Struct(f"={MAX_DURATION_BOUNDS}Q{MAX_SIZE_BOUNDS}QII")  # struct hist_bounds
# struct fp_handover: start_ns, cseq, sseq, resp_len, resp_seen, status, phase, method, path_len,
# sseq_known, reason, http_seen, path, held_ns, held_seq, held_len, req_len, req_left, head_len, pad.
_HANDOVER = struct.Struct(f"=QIIIIHBBBBBB{PATH_LEN}sQIIIII4x")
# struct head_part: seq, len, bytes (twice HEAD_MAX, see the C file; the first len count).
_HEAD_PART = struct.Struct(f"=II{2 * HEAD_MAX}s")
# struct http_agg_key: server_ip, port, status, method, path_len, gen, pad, path_hash
_AGG_KEY = struct.Struct("=16sHHBBBxQ")
# struct http_agg_val: u64 count, dur_sum, resp_sum, dur[], resp[], req_sum, req[]; then the path
# of the exchanges this CPU's copy counts (each copy's own: see the C file's aggregate)
_AGG_VAL_SLOTS = 3 + MAX_DURATION_BOUNDS + 1 + MAX_SIZE_BOUNDS + 1 + 1 + MAX_SIZE_BOUNDS + 1
_AGG_VAL_SIZE = _AGG_VAL_SLOTS * 8 + PATH_LEN
_AGG_REQ_SUM = 3 + MAX_DURATION_BOUNDS + 1 + MAX_SIZE_BOUNDS + 1
_PER_CPU_U64 = 8

# Every map this module touches: name -> (key size, value size) as the kernel reports them.
_MAP_LAYOUT: dict[str, tuple[int, int]] = {
    "watched_ports": (4, 1),  # array indexed by port
    "config": (4, 4),
    "filter_counters": (4, _PER_CPU_U64),
    "fast_counters": (4, _PER_CPU_U64),
    "handover_counters": (4, _PER_CPU_U64),
    "body_skip": (_FLOW_KEY.size, 8),  # struct skip_range
    "agg_bounds": (4, _HIST_BOUNDS.size),
    "flow_state": (_FLOW_KEY.size, 176),  # struct fp_state: only its capacity is read here
    "handover": (_FLOW_KEY.size, _HANDOVER.size),
    "head_parts": (_FLOW_KEY.size, _HEAD_PART.size),  # a head's earlier segments, for a handover mid-head
    "http_agg": (_AGG_KEY.size, _AGG_VAL_SIZE),
    "capture_ifaces": (4, 1),  # node-wide capture: ifindexes the --interface patterns match
    "flow_iface": (_FLOW_KEY.size, 4),  # node-wide capture: the interface each connection counts on
    "tls_flows": (_FLOW_KEY.size, TLS_WIRE_SIZE),
    "syn_seq": (_FLOW_KEY.size, 4),  # server's first data seq per connection, from its SYN-ACK
    "scan_progs": (4, 4),  # prog array: holding its fd keeps the tail-call slots filled
    "agg_fence": (4, 4),  # array of maps: updating it waits until no BPF program runs (drain_aggregates)
    "agg_fence_inner": (4, 4),
}
# Must match the C file's AGG_ENTRIES.
AGG_ENTRIES = 8192
# Must match the C file's CAPTURE_IFACES.
MAX_CAPTURE_INTERFACES = 4096

# Programs of the C file: the entry (attached to sockets) and what it tail-calls, by scan_progs slot.
_ENTRY = "http_filter"
_TAIL_CALLS: tuple[str, ...] = ("http_scan", "http_finish")  # PROG_SCAN, PROG_FINISH

_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


def _ip_from_key(packed: bytes) -> str:
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed)


def _flow_from_key(key: bytes) -> tuple[str, int, str, int]:
    saddr, daddr, sport, dport = _FLOW_KEY.unpack(key)
    return _ip_from_key(saddr), sport, _ip_from_key(daddr), dport


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What loading cost, in the helper process: for the startup log and the benchmark."""

    compile_s: float
    helper_peak_rss_kb: int


def _refusal_hint(message: str, status_text: str | None = None) -> str:
    """What most likely stands behind the kernel's refusal, and the fix, as a sentence to append.

    As root in a container without CAP_PERFMON the verifier does not answer EPERM: the load
    fails with EFAULT ("Bad address") or EACCES ("Permission denied": its log says "pointer
    arithmetic ... prohibited for !root"), which name nothing. Under a seccomp filter that
    denies bpf(2), even creating a map fails with EPERM, whatever the capabilities.
    """
    if "Operation not permitted" in message and seccomp_mode(status_text) == 2:
        return f"; {SECCOMP_FIX}"
    refused = "Bad address" in message or "Permission denied" in message
    if refused and "CAP_PERFMON" in missing_capture_capabilities(effective_capabilities(status_text)):
        return ("; CAP_PERFMON is missing (the fast path's in-kernel aggregation needs it): grant "
                f"{'+'.join(CAPTURE_CAPABILITIES)} (Kubernetes: capabilities.add [BPF, NET_RAW, PERFMON]; "
                "podman/docker: --cap-add BPF,NET_RAW,PERFMON)")
    return ""


def ask_loader(request: dict[str, Any], max_fds: int, fix: str) -> tuple[dict[str, Any], list[int]]:
    """Run exporter.capture.bpf_loader as a helper process with `request` (its docstring has the
    protocol); return its reply and the descriptors it sent, which the caller then owns (none
    when the reply is not ok). CaptureError when it cannot start, dies first (`fix`: what to
    do), or finds no BCC; the other refusals (compile, load) are the caller's to word."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    argv = [sys.executable, "-m", "exporter.capture.bpf_loader", str(theirs.fileno())]
    with ours:
        try:
            helper = subprocess.Popen(argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise CaptureError(f"cannot start the BPF loader process {argv[0]}: {exc.strerror}") from None
        finally:
            theirs.close()
        message, fds = b"", list[int]()
        try:
            ours.sendall(json.dumps(request).encode())
            message, fds, _flags, _addr = socket.recv_fds(ours, 1 << 20, max_fds)
        except OSError:
            pass  # the helper died first: reported below with its exit status
        except BaseException:
            helper.kill()
            helper.wait()
            raise
        code = helper.wait()
    if not message:
        raise CaptureError(
            f"the BPF loader process ({sys.executable} -m exporter.capture.bpf_loader) exited with "
            f"status {code} before answering: see its output above, or {fix}"
        )
    reply: dict[str, Any] = json.loads(message)
    if not reply["ok"]:
        for fd in fds:
            os.close(fd)
        if reply["kind"] == "import":
            raise CaptureError("BCC Python bindings not importable: install python3-bpfcc (`make setup`)")
        return reply, []
    return reply, fds


def include_flags(src: Path) -> list[str]:
    """Where the C file's own headers (tls_wire.h) are found: beside it, then in our bpf/ (a copy
    of the file elsewhere, as the benches and tests compile, still finds them). BCC compiles the
    source as /virtual/main.c, so a quoted include does not look beside the file by itself."""
    dirs = dict.fromkeys([src.resolve().parent, find_source().parent])
    return [f"-I{directory}" for directory in dirs]


def _load_in_helper(src: Path, cflags: list[str]) -> tuple[int, dict[str, BpfMap], LoadReport]:
    """Compile and load in bpf_loader.py; return our copies of the program and map descriptors."""
    request = {"src": str(src), "cflags": cflags, "function": _ENTRY, "maps": list(_MAP_LAYOUT),
               "tail_calls": {"map": "scan_progs", "functions": list(_TAIL_CALLS)}}
    reply, fds = ask_loader(request, 1 + len(_MAP_LAYOUT), "reinstall the package")
    if not reply["ok"]:
        kind, msg = reply["kind"], reply["message"]
        if kind == "compile":
            # BCC creates the maps while compiling: a bpf() that seccomp or a missing capability
            # refuses shows up here, as "could not open bpf map ... Operation not permitted" above.
            refused = check_bpf_syscall()
            if not refused.ok:
                raise CaptureError(f"{refused.detail}: {refused.fix}")
            raise CaptureError(f"BPF program {src} failed to compile: {msg} (see clang output above)")
        # As root, EACCES is the verifier's refusal, not a privilege problem.
        if os.geteuid() != 0 and seccomp_mode() != 2 and (
                "Operation not permitted" in msg or "Permission denied" in msg):
            raise CaptureError(
                "BPF needs root or CAP_BPF+CAP_NET_RAW+CAP_PERFMON, kept across exec: run with sudo, "
                "or grant them as ambient capabilities (systemd AmbientCapabilities=, setpriv --ambient-caps)"
            )
        raise CaptureError(f"kernel refused the BPF program: {msg}{_refusal_hint(msg)}")
    if len(fds) != 1 + len(_MAP_LAYOUT):
        for fd in fds:
            os.close(fd)
        raise CaptureError(f"the BPF loader sent {len(fds)} descriptors, expected {1 + len(_MAP_LAYOUT)}")
    prog_fd, map_fds = fds[0], fds[1:]
    ncpus = possible_cpus()
    try:
        maps = {name: BpfMap(fd, ncpus) for name, fd in zip(_MAP_LAYOUT, map_fds, strict=True)}
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return prog_fd, maps, LoadReport(reply["compile_s"], reply["peak_rss_kb"])


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
        self._route_ids = False
        # Set before tls_flows' first entry: until then the filter skips that lookup on every
        # payload packet (most machines never see TLS on a watched port).
        self._tls_flows_used = False
        self._agg_gen = 0  # the generation http_agg keys are added in (drain_aggregates)
        self._n_dur = self._n_size = 0
        self._watched: set[int] = set()  # what watched_ports holds: an array is not worth walking
        # Keys in http_agg at the last read_aggregates (each scrape reads it); counting them
        # apart would walk the map a second time.
        self.aggregate_entries = 0
        release = platform.release()
        build = Path("/lib/modules") / release / "build"
        if not build.is_dir():
            raise CaptureError(f"kernel headers not found under {build}: run `make setup`")
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
        cflags += include_flags(src)
        self._prog_fd, maps, self.load_report = _load_in_helper(src, cflags)
        self._maps = maps
        try:
            for name, (key_size, value_size) in _MAP_LAYOUT.items():
                info = maps[name].info
                if (info.key_size, info.value_size) != (key_size, value_size):
                    raise CaptureError(
                        f"BPF map {name} has {info.key_size}-byte keys and {info.value_size}-byte values, "
                        f"bpf.py expects {key_size} and {value_size}: http_filter.c and bpf.py disagree"
                    )
            self._ports = maps["watched_ports"]
            self._config = maps["config"]
            self._counters = maps["filter_counters"]
            self._skip = maps["body_skip"]
            self._fast_counters = maps["fast_counters"]
            self._handover_counters = maps["handover_counters"]
            self._bounds = maps["agg_bounds"]
            self._flow_states = maps["flow_state"]
            self._handovers = maps["handover"]
            self._head_parts = maps["head_parts"]
            self._aggregates = maps["http_agg"]
            self._fence = maps["agg_fence"]
            self._fence_inner = maps["agg_fence_inner"]
            self._ifaces = maps["capture_ifaces"]
            self._interfaces: set[int] = set()
            self._tls_flows = maps["tls_flows"]
            # Bounds before the fast path is switched on: a zeroed bounds map would put every
            # exchange in the overflow bucket.
            self.set_bounds(*histogram_bounds)
            self.configure(loopback=loopback, snaplen=snaplen, link_header_len=link_header_len)
            self.set_ports(ports)
        except BaseException:
            self.close()
            raise

    @property
    def fd(self) -> int:
        """File descriptor of the loaded program, for SO_ATTACH_BPF."""
        return self._prog_fd

    def configure(
        self, *, loopback: bool, snaplen: int, link_header_len: int, fast_path: bool | None = None,
        node: bool = False, interface_set: bool = False,
    ) -> None:
        """`node`: one socket on every interface, duplicates dropped (see NODE-WIDE CAPTURE in
        the C file); `interface_set`: only the interfaces given to `set_interfaces` count."""
        if fast_path is not None:
            self._fast_path = fast_path
        if not 64 <= snaplen <= 1 << 20:
            raise CaptureError(f"snap length {snaplen} out of range 64..1048576")
        if link_header_len not in (0, 14):
            raise CaptureError(f"link header length {link_header_len} unsupported (0 or 14)")
        values = {"loopback": int(loopback), "snaplen": snaplen, "link_header_len": link_header_len,
                  "fast_path": int(self._fast_path), "node": int(node), "iface_set": int(interface_set),
                  "route_ids": int(self._route_ids), "agg_gen": self._agg_gen,
                  "tls_flows": int(self._tls_flows_used)}
        for i, name in enumerate(_CONFIG_NAMES):
            self._config.update(_U32.pack(i), _U32.pack(values[name]))

    def set_ports(self, ports: Iterable[int]) -> None:
        """Replace the watched ports (1..65535)."""
        wanted = set()
        for port in ports:
            if not 0 < port < 65536:
                raise CaptureError(f"port {port} out of range 1..65535")
            wanted.add(port)
        for port in self._watched - wanted:
            self._ports.update(_U32.pack(port), b"\x00")
        for port in wanted - self._watched:
            self._ports.update(_U32.pack(port), b"\x01")
        self._watched = wanted

    def set_interfaces(self, ifindexes: Iterable[int]) -> int:
        """Replace the captured interfaces (node-wide capture with a set); return how many did not fit."""
        wanted = sorted(set(ifindexes))
        over = max(0, len(wanted) - MAX_CAPTURE_INTERFACES)
        keep = set(wanted[:MAX_CAPTURE_INTERFACES])
        for index in self._interfaces - keep:
            self._ifaces.delete(_U32.pack(index))
        for index in keep - self._interfaces:
            self._ifaces.update(_U32.pack(index), b"\x01")
        self._interfaces = keep
        return over

    @property
    def fast_path(self) -> bool:
        return self._fast_path

    def set_route_ids(self, on: bool) -> None:
        """Key kernel aggregates with every path segment the route heuristic takes for an id as
        `{id}` (see ids_path in the C file). Only when RouteMapper names such a path exactly as
        the path sent, which `RouteMapper.identifiers_are_ids` says."""
        self._route_ids = on
        index = _CONFIG_NAMES.index("route_ids")
        self._config.update(_U32.pack(index), _U32.pack(int(on)))

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
        unused = (1 << 64) - 1  # nothing lies above it
        # d_ns > floor(b * 1e9) <=> d_ns / 1e9 > b for integer d_ns (to float precision);
        # integer n > floor(b) <=> n > b.
        dur_ns = [min(int(bound * 1e9), unused) for bound in durations]
        size_bytes = [min(int(bound), unused) for bound in size_list]
        leaf = _HIST_BOUNDS.pack(
            *dur_ns, *[unused] * (MAX_DURATION_BOUNDS - len(dur_ns)),
            *size_bytes, *[unused] * (MAX_SIZE_BOUNDS - len(size_bytes)),
            len(durations), len(size_list),
        )
        self._bounds.update(_U32.pack(0), leaf)
        self._n_dur = len(durations)
        self._n_size = len(size_list)

    def fast_counters(self) -> dict[str, int]:
        """Fast path events since load, summed over CPUs."""
        return {name: self._fast_counters.per_cpu_u64_sum(_U32.pack(i)) for i, name in enumerate(FAST_COUNTER_NAMES)}

    def handover_counters(self) -> dict[str, int]:
        """Flows turned over to user space, by reason, summed over CPUs."""
        return {name: self._handover_counters.per_cpu_u64_sum(_U32.pack(i))
                for i, name in enumerate(HANDOVER_REASONS)}

    def drain_handovers(self) -> list[KernelHandover]:
        """Take (read and delete) every handover record the kernel wrote since the last call.

        One syscall when there are none. Call it after each ring read and before parsing
        what was read: a record is always written before its flow's first passed-up segment.
        """
        table = self._handovers
        out: list[KernelHandover] = []
        for key in list(table.keys()):
            raw = table.lookup(key)
            if raw is None or not table.delete(key):
                continue  # gone already (a second reader); nothing to seed
            (start_ns, cseq, sseq, resp_len, resp_seen, status, phase, method, path_len, sseq_known, reason,
             http_seen, path, held_ns, held_seq, held_len, req_len, req_left, head_len) = _HANDOVER.unpack(raw)
            out.append(KernelHandover(
                flow=_flow_from_key(key),
                reason=HANDOVER_REASONS[reason] if reason < len(HANDOVER_REASONS) else "?",
                phase=phase,
                method=METHODS[method] if method < len(METHODS) else "",
                path=path[:path_len].decode("latin-1"),
                start_ns=start_ns,
                client_next_seq=cseq,
                server_next_seq=sseq if sseq_known else None,
                status=status,
                response_length=resp_len,
                response_seen=resp_seen,
                held_ns=held_ns,
                held_seq=held_seq,
                held_length=held_len,
                request_length=req_len,
                request_left=req_left,
                http_seen=bool(http_seen),
                head_length=head_len,
                head=self._take_head_part(key, cseq, head_len) if head_len else None,
            ))
        return out

    def _take_head_part(self, key: bytes, seq: int, length: int) -> bytes | None:
        """The first `length` bytes of the head starting at `seq` that the kernel kept for this
        connection (read and deleted), or None when the entry is gone or holds another head."""
        table = self._head_parts
        raw = table.lookup(key)
        if raw is None:
            return None
        table.delete(key)
        part_seq, part_len, data = _HEAD_PART.unpack(raw)
        if part_seq != seq or part_len < length:
            return None
        return bytes(data[:length])

    def read_aggregates(self) -> list[KernelAggregate]:
        """Every `http_agg` entry, summed over CPUs per path (one lookup per entry)."""
        return self._aggregates_of(None)

    def drain_aggregates(self) -> list[KernelAggregate]:
        """Take every `http_agg` entry out of the map, whole, making room for new keys.

        Keys carry the generation they were added in. The kernel is switched to the other one,
        then an update of `agg_fence` (a map-in-map update returns after an RCU grace period)
        waits until no program that may have read the old generation is still running; the
        old generation's entries are then final, and are read and deleted. Not for concurrent
        use with `read_aggregates` (KernelFastPath holds a lock around both).
        """
        old = self._agg_gen
        self._agg_gen = old ^ 1
        self._config.update(_U32.pack(_CONFIG_NAMES.index("agg_gen")), _U32.pack(self._agg_gen))
        self._fence.update(_U32.pack(0), _U32.pack(self._fence_inner.fd))
        return self._aggregates_of(old, delete=True)

    def _aggregates_of(self, gen: int | None, delete: bool = False) -> list[KernelAggregate]:
        n_dur = self._n_dur + 1
        n_size = self._n_size + 1
        out: list[KernelAggregate] = []
        table = self._aggregates
        stride = table.value_stride
        slots = _AGG_VAL_SLOTS
        keys = list(table.keys())
        if gen is None:
            self.aggregate_entries = len(keys)
        for key in keys:
            server_ip, port, status, method, path_len, key_gen, _ = _AGG_KEY.unpack(key)
            if gen is not None and key_gen != gen:
                continue
            raw = table.lookup(key)
            if raw is None:
                continue  # never deleted by the kernel; only a concurrent reader could
            if delete:
                table.delete(key)
            # The copies of CPUs that counted exchanges (a copy counting none is all zeros), summed
            # per path: each holds its own, one path but for two paths of one hash first counted
            # on two CPUs. Slot j of the copy at byte `base` is words[base // 8 + j].
            words = memoryview(raw).cast("Q")
            copies: dict[bytes, list[int]] = {}
            for base in range(0, len(raw), stride):
                if words[base // 8]:
                    path = bytes(raw[base + slots * 8:base + slots * 8 + path_len])
                    copies.setdefault(path, []).append(base // 8)
            for path, starts in copies.items():
                if len(copies) == 1:  # the usual case: column sums over every CPU's copy
                    totals = [sum(words[j::stride // 8]) for j in range(slots)]
                else:
                    totals = [sum(words[start + j] for start in starts) for j in range(slots)]
                dur = totals[3:3 + n_dur]
                resp = totals[3 + MAX_DURATION_BOUNDS + 1:3 + MAX_DURATION_BOUNDS + 1 + n_size]
                req = totals[_AGG_REQ_SUM + 1:_AGG_REQ_SUM + 1 + n_size]
                out.append(KernelAggregate(
                    server_ip=_ip_from_key(server_ip),
                    port=port,
                    method=METHODS[method] if method < len(METHODS) else "",
                    status=status,
                    path=path.decode("latin-1"),
                    count=totals[0],
                    duration_sum_ns=totals[1],
                    response_sum=totals[2],
                    duration_counts=tuple(dur),
                    response_counts=tuple(resp),
                    request_sum=totals[_AGG_REQ_SUM],
                    request_counts=tuple(req),
                ))
        return out

    def flow_state_capacity(self) -> int:
        return self._flow_states.info.max_entries

    def aggregate_capacity(self) -> int:
        return self._aggregates.info.max_entries

    def ports(self) -> set[int]:
        return set(self._watched)

    def counters(self) -> dict[str, int]:
        """Kernel counters summed over CPUs, since load. Cheap: one lookup per slot.

        Not an atomic snapshot while packets flow. The filter counts `seen` before a
        packet's outcome, so outcomes are read first and `seen` last: then
        seen >= kept + sum(dropped_*) always holds in what this returns.
        """
        values = {
            name: self._counters.per_cpu_u64_sum(_U32.pack(i))
            for i, name in reversed(list(enumerate(COUNTER_NAMES)))
        }
        return {name: values[name] for name in COUNTER_NAMES}

    @staticmethod
    def _skip_key(src_ip: str, src_port: int, dst_ip: str, dst_port: int) -> bytes:
        return _FLOW_KEY.pack(_flow_key_bytes(src_ip), _flow_key_bytes(dst_ip), src_port, dst_port)

    def skip_body(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int, seq_start: int,
                  seq_end: int) -> None:
        """Truncate to headers every segment of this direction lying wholly in [seq_start, seq_end)."""
        key = self._skip_key(src_ip, src_port, dst_ip, dst_port)
        self._skip.update(key, _SKIP_RANGE.pack(seq_start & 0xFFFFFFFF, seq_end & 0xFFFFFFFF))

    def forget_skip(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int) -> None:
        key = self._skip_key(src_ip, src_port, dst_ip, dst_port)
        self._skip.delete(key)  # False when already gone (LRU eviction or never set): nothing to forget

    def drop_tls(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int, drop: bool = True) -> None:
        """Drop (or again pass) the payload of this direction of a connection found to carry TLS."""
        key = self._skip_key(src_ip, src_port, dst_ip, dst_port)
        if drop:
            self.use_tls_flows()
            # The TLS probes may have made the entry already (share_tls_flows): its wire times stay.
            self._tls_flows.insert(key, bytes(TLS_WIRE_SIZE))
        else:
            self._tls_flows.delete(key)  # False when already gone (LRU): nothing to forget

    def use_tls_flows(self) -> None:
        """Look `tls_flows` up from now on (until its first entry the filter skips that lookup)."""
        if not self._tls_flows_used:
            self._tls_flows_used = True
            self._config.update(_U32.pack(_CONFIG_NAMES.index("tls_flows")), _U32.pack(1))

    def share_tls_flows(self) -> int:
        """The fd of `tls_flows`, for the TLS probes (TlsProbes.anchor_to): they read its wire times and
        add the connections they watch, which the filter sees once use_tls_flows() was called."""
        return self._tls_flows.fd

    def close(self) -> None:
        """Close our descriptors. Sockets the program is attached to keep it (and its maps) alive."""
        for bpf_map in self._maps.values():
            bpf_map.close()
        self._maps = {}
        if self._prog_fd >= 0:
            os.close(self._prog_fd)
            self._prog_fd = -1
