"""The few bpf(2) map commands the exporter needs, over ctypes, without BCC.

The filter is compiled and loaded by a short-lived helper process
(`exporter.capture.bpf_loader`), which is the only place LLVM and clang are
mapped. This process receives the program and map file descriptors and works
the maps with the raw syscall: lookup, update, delete, next key and map info.
Keys and values are bytes; their layout is bpf.py's business.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import platform
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import CaptureError
from exporter.preflight import SYS_BPF

__all__ = ["BpfMap", "MapInfo", "enable_run_time_stats", "map_info", "possible_cpus", "test_run", "timed_test_run"]


_MAP_LOOKUP_ELEM = 1
_MAP_UPDATE_ELEM = 2
_MAP_DELETE_ELEM = 3
_MAP_GET_NEXT_KEY = 4
_BPF_NOEXIST = 1  # an update's flag: only when the key has no entry
_OBJ_GET_INFO_BY_FD = 15
_PROG_TEST_RUN = 10
_ENABLE_STATS = 32
_STATS_RUN_TIME = 0

# Map types whose lookups return one value per possible CPU.
_PERCPU_TYPES = frozenset({5, 6, 10})  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH

# union bpf_attr for the map element commands: u32 map_fd, (pad), u64 key, u64 value/next_key, u64 flags.
_ELEM_ATTR = struct.Struct("=I4xQQQ")
# OBJ_GET_INFO_BY_FD: u32 bpf_fd, u32 info_len, u64 info.
_INFO_ATTR = struct.Struct("=IIQ")
# bpf_attr.test: prog_fd, retval, data_size_in, data_size_out, data_in, data_out, repeat, duration,
# ctx_size_in, ctx_size_out, ctx_in, ctx_out, flags, cpu, batch_size.
_TEST_ATTR = struct.Struct("=IIIIQQIIIIQQIII4x")
# The head of struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags, name[16].
_MAP_INFO = struct.Struct("=IIIIII16s")

_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


def _syscall_nr() -> int:
    machine = platform.machine()
    try:
        return SYS_BPF[machine]
    except KeyError:
        raise CaptureError(f"no bpf(2) syscall number known for {machine}: please report this") from None


_BPF = _syscall_nr()


def _bpf(cmd: int, attr: ct.Array[ct.c_char]) -> int:
    """One bpf(2) call; returns its result, or -errno."""
    ret = int(_libc.syscall(_BPF, cmd, attr, len(attr)))
    return -ct.get_errno() if ret < 0 else ret


def possible_cpus() -> int:
    """How many values a per-CPU lookup returns: the kernel's possible CPUs, not the online ones."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    highest = 0
    for part in text.split(","):
        highest = max(highest, int(part.rsplit("-", 1)[-1]))
    return highest + 1


def test_run(prog_fd: int, data: bytes) -> int:
    """Run a loaded program once on `data` (BPF_PROG_TEST_RUN) and return its return value.

    For a socket filter the kernel builds an skb from `data` as an Ethernet frame and
    pulls the link header: the program sees the frame from its IP header on. Tests use
    it to drive the real filter with packets no interface carries.
    """
    return timed_test_run(prog_fd, data)[0]


def timed_test_run(prog_fd: int, data: bytes) -> tuple[int, int]:
    """As test_run: (return value, nanoseconds the kernel timed the run, tail calls included)."""
    buf = ct.create_string_buffer(data, len(data))
    attr = ct.create_string_buffer(
        _TEST_ATTR.pack(prog_fd, 0, len(data), 0, ct.addressof(buf), 0, 1, 0, 0, 0, 0, 0, 0, 0, 0),
        _TEST_ATTR.size)
    err = _bpf(_PROG_TEST_RUN, attr)
    if err < 0:
        raise OSError(-err, f"BPF_PROG_TEST_RUN: {os.strerror(-err)}")
    fields = _TEST_ATTR.unpack(attr.raw)
    return int(fields[1]), int(fields[7])


def enable_run_time_stats() -> int:
    """Make the kernel time every BPF program run until the returned fd is closed (Linux >= 5.8).

    For measuring only: it costs two clock reads per run. Programs then report
    run_time_ns and run_cnt in /proc/<pid>/fdinfo/<fd>.
    """
    attr = ct.create_string_buffer(struct.pack("=I", _STATS_RUN_TIME), 8)
    fd = _bpf(_ENABLE_STATS, attr)
    if fd < 0:
        raise CaptureError(f"cannot enable BPF run time statistics: {os.strerror(-fd)} (needs root, Linux 5.8)")
    return fd


@dataclass(frozen=True, slots=True)
class MapInfo:
    name: str
    map_type: int
    key_size: int
    value_size: int
    max_entries: int


def map_info(fd: int) -> MapInfo:
    info = ct.create_string_buffer(_MAP_INFO.size)
    attr = ct.create_string_buffer(_INFO_ATTR.pack(fd, _MAP_INFO.size, ct.addressof(info)), 16)
    err = _bpf(_OBJ_GET_INFO_BY_FD, attr)
    if err < 0:
        raise CaptureError(f"cannot read BPF map info of fd {fd}: {os.strerror(-err)}")
    map_type, _id, key_size, value_size, max_entries, _flags, name = _MAP_INFO.unpack(info.raw)
    return MapInfo(name.rstrip(b"\0").decode(), map_type, key_size, value_size, max_entries)


class BpfMap:
    """One map, by file descriptor. Per-CPU values come back as the CPUs' values concatenated,
    each padded to 8 bytes (`value_stride`)."""

    def __init__(self, fd: int, ncpus: int) -> None:
        self.fd = fd
        self.info = map_info(fd)
        self.percpu = self.info.map_type in _PERCPU_TYPES
        self.ncpus = ncpus if self.percpu else 1
        self.value_stride = (self.info.value_size + 7) & ~7 if self.percpu else self.info.value_size
        self._key = ct.create_string_buffer(self.info.key_size)
        self._next = ct.create_string_buffer(self.info.key_size)
        self._value = ct.create_string_buffer(self.value_stride * self.ncpus)

    @property
    def name(self) -> str:
        return self.info.name

    def _attr(self, key: int, value: int = 0, flags: int = 0) -> ct.Array[ct.c_char]:
        return ct.create_string_buffer(_ELEM_ATTR.pack(self.fd, key, value, flags), 32)

    def _set_key(self, key: bytes) -> int:
        if len(key) != self.info.key_size:
            raise ValueError(f"{self.name}: key of {len(key)} bytes, map takes {self.info.key_size}")
        ct.memmove(self._key, key, len(key))
        return ct.addressof(self._key)

    def lookup(self, key: bytes) -> bytes | None:
        err = _bpf(_MAP_LOOKUP_ELEM, self._attr(self._set_key(key), ct.addressof(self._value)))
        if err == -2:  # ENOENT
            return None
        self._check(err, "lookup")
        return self._value.raw

    def update(self, key: bytes, value: bytes) -> None:
        if len(value) != len(self._value):
            raise ValueError(f"{self.name}: value of {len(value)} bytes, map takes {len(self._value)}")
        buf = ct.create_string_buffer(value, len(value))
        self._check(_bpf(_MAP_UPDATE_ELEM, self._attr(self._set_key(key), ct.addressof(buf))), "update")

    def insert(self, key: bytes, value: bytes) -> bool:
        """Add an entry unless the key has one (BPF_NOEXIST): False when it had."""
        if len(value) != len(self._value):
            raise ValueError(f"{self.name}: value of {len(value)} bytes, map takes {len(self._value)}")
        buf = ct.create_string_buffer(value, len(value))
        err = _bpf(_MAP_UPDATE_ELEM, self._attr(self._set_key(key), ct.addressof(buf), _BPF_NOEXIST))
        if err == -errno.EEXIST:
            return False
        self._check(err, "insert")
        return True

    def delete(self, key: bytes) -> bool:
        """False when the key was not there."""
        err = _bpf(_MAP_DELETE_ELEM, self._attr(self._set_key(key)))
        if err == -2:
            return False
        self._check(err, "delete")
        return True

    def keys(self) -> Iterator[bytes]:
        """The keys, by repeated next-key. Under concurrent deletes a hash map may restart its walk,
        as with every bpf(2) reader; callers tolerate a key seen twice or a key gone by lookup time."""
        attr = self._attr(0, ct.addressof(self._next))  # key NULL: the first key
        while True:
            err = _bpf(_MAP_GET_NEXT_KEY, attr)
            if err == -2:
                return
            self._check(err, "next key")
            key = self._next.raw
            yield key
            ct.memmove(self._key, key, len(key))
            attr = self._attr(ct.addressof(self._key), ct.addressof(self._next))

    def per_cpu_u64_sum(self, key: bytes) -> int:
        """A per-CPU u64 slot summed over CPUs (wrapping as the kernel's counters do)."""
        raw = self.lookup(key)
        if raw is None:
            return 0
        total = sum(int(struct.unpack_from("=Q", raw, i * self.value_stride)[0]) for i in range(self.ncpus))
        return total & ((1 << 64) - 1)

    def _check(self, err: int, what: str) -> None:
        if err < 0:
            raise CaptureError(f"BPF map {self.name}: {what} failed: {os.strerror(-err)}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
