"""openssl_layout's entry points: a uprobe there sees every SSL_read/SSL_read_ex (SSL_write/
SSL_write_ex) call once, with the call's own arguments, and nothing else.

The oracle is the calls this test makes through ctypes into the system libssl, with buffers,
lengths and out-pointers it chose; a uprobe (tests/fixtures/bpf/ssl_args.c) at each entry point
stores the argument registers of every hit of this process. The SSL has no connection, so
each call fails at once inside the internal function, after the probe has seen it.
"""

from __future__ import annotations

import ctypes as ct
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from exporter.capture import openssl_layout
from exporter.capture.bpf import ask_loader
from exporter.capture.bpfsys import BpfMap, possible_cpus
from exporter.capture.openssl_layout import calibrate
from tests.libssl import LIBSSL, load_libssl

FIXTURE = Path(__file__).parents[1] / "fixtures" / "bpf" / "ssl_args.c"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF and attaches uprobes: needs root"),
    pytest.mark.skipif(not LIBSSL.exists(), reason=f"no {LIBSSL} (Debian's libssl3)"),
]


class Seen(NamedTuple):
    kind: str
    ssl: int
    buf: int
    num: int
    out: int


def attach(probes: list[dict[str, Any]]) -> tuple[dict[str, Any], list[int]]:
    request = {"src": str(FIXTURE), "cflags": [f"-DTARGET_TGID={os.getpid()}", "-w"], "maps": ["seen", "hits"],
               "probes": probes}
    reply, fds = ask_loader(request, 16, "reinstall the package")
    assert reply["ok"], reply
    assert not reply["failed"], reply["failed"]
    return reply, fds


@pytest.fixture
def libssl() -> Any:
    return load_libssl()


def test_each_call_is_seen_once_with_its_arguments(libssl: Any) -> None:
    layout = calibrate(str(LIBSSL))
    assert layout.read is not None and layout.write is not None, layout.entry_note
    _, fds = attach([
        {"library": str(LIBSSL), "symbol": "read", "address": layout.read.vaddr, "function": "seen_read",
         "return": False},
        {"library": str(LIBSSL), "symbol": "write", "address": layout.write.vaddr, "function": "seen_write",
         "return": False},
    ])
    try:
        seen_map, hits_map = BpfMap(fds[0], possible_cpus()), BpfMap(fds[1], possible_cpus())
        ctx = libssl.SSL_CTX_new(libssl.TLS_method())
        ssl = libssl.SSL_new(ctx)
        buffers = [ct.create_string_buffer(256) for _ in range(6)]
        outs = [ct.c_size_t(0) for _ in range(2)]
        address = [ct.addressof(b) for b in buffers]
        assert libssl.SSL_read(ssl, buffers[0], 77) <= 0
        assert libssl.SSL_read_ex(ssl, buffers[1], 55, ct.byref(outs[0])) == 0
        assert libssl.SSL_write(ssl, buffers[2], 33) <= 0
        assert libssl.SSL_write_ex(ssl, buffers[3], 44, ct.byref(outs[1])) == 0
        libssl.SSL_peek(ssl, buffers[4], 11)  # not a read: the data stays for the next SSL_read
        libssl.SSL_peek_ex(ssl, buffers[5], 12, ct.byref(outs[0]))
        libssl.SSL_free(ssl)
        libssl.SSL_CTX_free(ctx)

        [count] = struct.unpack("=I", hits_map.lookup(struct.pack("=I", 0)) or b"\0\0\0\0")
        seen = [Seen(*row) for row in (
            ("read" if kind == 1 else "write", *rest)
            for kind, *rest in (struct.unpack("=5Q", seen_map.lookup(struct.pack("=I", slot)) or bytes(40))
                                for slot in range(count)))]
        assert count == 4, seen
        # SSL_read passes a size_t of its own stack as the count's out-pointer: any address.
        assert seen[0]._replace(out=0) == Seen("read", ssl, address[0], 77, 0)
        assert seen[1] == Seen("read", ssl, address[1], 55, ct.addressof(outs[0]))
        assert seen[2]._replace(out=0) == Seen("write", ssl, address[2], 33, 0)
        assert seen[3] == Seen("write", ssl, address[3], 44, ct.addressof(outs[1]))
        assert seen[0].out and seen[2].out
    finally:
        for fd in fds:
            os.close(fd)


def test_the_code_is_read_from_the_file_not_from_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """A uprobe anyone attached shows in memory as an int3 over its instruction's first byte: here
    one on SSL_read_ex's and SSL_write_ex's first instruction, while the calibration runs."""
    _, fds = attach([
        {"library": str(LIBSSL), "symbol": name, "function": "seen_read", "return": False}
        for name in ("SSL_read_ex", "SSL_write_ex")
    ])
    try:
        from_memory = ct.string_at(ct.cast(ct.CDLL(str(LIBSSL)).SSL_read_ex, ct.c_void_p).value or 0, 1)
        assert from_memory == b"\xcc"  # the breakpoint, as the calibration child's own mapping shows it too
        monkeypatch.setattr(openssl_layout, "_cache", {})
        layout = calibrate(str(LIBSSL))
        assert layout.read is not None and layout.write is not None, layout.entry_note
    finally:
        for fd in fds:
            os.close(fd)
