"""openssl_layout: the system's real libssl, read back through OpenSSL's own API; bad files.

The oracle for the offsets is OpenSSL itself (SSL_get_rbio, SSL_get_fd, SSL_get_rfd) called
here over ctypes, not the child's scan: what a BPF program reads at SSL* + rbio_offset and
BIO* + bio_num_offset must be what the library says the fd is.
"""

from __future__ import annotations

import ctypes as ct
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.capture import openssl_layout, openssl_probe
from exporter.capture.openssl_layout import SslLayout, SslLayoutError, calibrate
from tests.libssl import LIB_DIR, LIBSSL, load_libssl

LIBC = LIB_DIR / "libc.so.6"
needs_libssl = pytest.mark.skipif(not LIBSSL.exists(), reason=f"no {LIBSSL} (Debian's libssl3)")


def fix(path: object, reason: str) -> str:
    return (f"libssl {path}: could not find its SSL layout ({reason}): HTTPS through it is not counted; "
            f"point --libssl at an OpenSSL libssl, or run with --no-tls")


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[str]]]:
    """The child processes calibrate starts, and a cache of its own for each test."""
    started: list[list[str]] = []
    real_run = subprocess.run

    def run(argv: list[str], **kwargs: Any) -> Any:
        started.append(argv)
        return real_run(argv, **kwargs)

    monkeypatch.setattr(openssl_layout.subprocess, "run", run)
    monkeypatch.setattr(openssl_layout, "_cache", {})
    yield started


@needs_libssl
def test_system_libssl3(runs: list[list[str]]) -> None:
    layout = calibrate(str(LIBSSL))
    assert layout[:2] == SslLayout(rbio_offset=16, bio_num_offset=56)[:2]
    # Where to probe: what the probes see there is tests/integration/test_tls_entry_points.py's.
    assert layout.read is not None and layout.write is not None and layout.read != layout.write
    assert (layout.read.first, layout.write.first, layout.entry_note) == ("push", "push", "")
    assert calibrate(str(LIBSSL)) == layout
    assert len(runs) == 1  # the second answer came from the cache
    assert runs[0][:3] == [sys.executable, "-I", "-S"]  # the venv's interpreter, no site-packages: no bcc


@needs_libssl
def test_offsets_read_what_openssl_says_the_fd_is() -> None:
    layout = calibrate(str(LIBSSL))
    lib = load_libssl()

    def fd_at_offsets(ssl: int) -> int:
        bio = ct.c_void_p.from_address(ssl + layout.rbio_offset).value
        assert bio == lib.SSL_get_rbio(ssl)
        return ct.c_int.from_address(bio + layout.bio_num_offset).value

    ctx = lib.SSL_CTX_new(lib.TLS_method())
    left, right = socket.socketpair()
    try:
        for fd in (left.fileno(), right.fileno(), 0, 1 << 20):
            ssl = lib.SSL_new(ctx)
            assert lib.SSL_set_fd(ssl, fd) == 1
            assert fd_at_offsets(ssl) == lib.SSL_get_fd(ssl) == fd
            lib.SSL_free(ssl)
        ssl = lib.SSL_new(ctx)  # read and write BIOs apart: the offsets name the read one
        assert lib.SSL_set_rfd(ssl, left.fileno()) == 1 and lib.SSL_set_wfd(ssl, right.fileno()) == 1
        assert fd_at_offsets(ssl) == lib.SSL_get_rfd(ssl) == left.fileno() != lib.SSL_get_wfd(ssl)
        lib.SSL_free(ssl)
    finally:
        lib.SSL_CTX_free(ctx)
        left.close()
        right.close()


@needs_libssl
def test_a_copy_loads_with_its_own_libcrypto_in_the_child_only(tmp_path: Path, runs: list[list[str]]) -> None:
    """A container's or a bundled copy: its libcrypto is the one beside it, and neither is
    ever mapped into this process. A new version of the file (mtime) is calibrated again."""
    copy = tmp_path / "libssl.so.3"
    shutil.copy(LIBSSL, copy)
    shutil.copy(LIB_DIR / "libcrypto.so.3", tmp_path / "libcrypto.so.3")
    assert calibrate(str(copy))[:2] == (16, 56)
    maps = Path("/proc/self/maps").read_text()
    assert str(tmp_path) not in maps
    assert calibrate(str(copy))[:2] == (16, 56) and len(runs) == 1
    os.utime(copy, ns=(1, 1))
    assert calibrate(str(copy)) == calibrate(str(LIBSSL)) and len(runs) == 3  # the same code: the same places

    (tmp_path / "libcrypto.so.3").write_bytes(b"not an ELF file\n" * 16)
    os.utime(copy, ns=(2, 2))
    with pytest.raises(SslLayoutError) as broken:
        calibrate(str(copy))
    assert str(broken.value) == fix(copy, f"cannot load its libcrypto: {tmp_path}/libcrypto.so.3: invalid ELF "
                                          f"header")


@pytest.mark.skipif(not LIBC.exists(), reason=f"no {LIBC}")
def test_a_library_that_is_not_libssl(runs: list[list[str]]) -> None:
    with pytest.raises(SslLayoutError) as not_ssl:
        calibrate(str(LIBC))
    assert str(not_ssl.value) == fix(LIBC, "it has no TLS_method or SSLv23_method: not an OpenSSL libssl")


def test_missing_and_non_elf_files(tmp_path: Path, runs: list[list[str]]) -> None:
    with pytest.raises(SslLayoutError) as missing:
        calibrate(str(tmp_path / "libssl.so.3"))
    assert str(missing.value) == fix(tmp_path / "libssl.so.3", "no such file or directory")
    assert runs == []  # refused before starting a process
    text = tmp_path / "libssl.so.1.1"
    text.write_text("#!/bin/sh\n" * 16)
    with pytest.raises(SslLayoutError) as not_elf:
        calibrate(str(text))
    assert str(not_elf.value) == fix(text, f"cannot load it: {text}: invalid ELF header")


@pytest.mark.parametrize(("script", "reason"), [
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)",
     f"loading it killed the probe process with {signal.SIGSEGV.name}"),
    ("import os; os.kill(os.getpid(), 50)", "loading it killed the probe process with signal 50"),
    ("import time; time.sleep(30)", "the probe process took over 0.5 s"),
    ("import sys; print('half', end=''); sys.exit(3)", "the probe process exited with status 3"),
    ("raise SystemExit('libfoo.so: cannot open shared object file')",
     "the probe process exited with status 1: libfoo.so: cannot open shared object file"),
])
def test_a_probe_that_crashes_hangs_or_babbles_is_an_error(
        script: str, reason: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runs: list[list[str]]) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(script + "\n")
    monkeypatch.setattr(openssl_layout, "_PROBE", probe)
    with pytest.raises(SslLayoutError) as failed:
        calibrate(str(LIBC), timeout_s=0.5)
    assert str(failed.value) == fix(LIBC, reason)


def test_nss_libssl3_is_not_openssl(runs: list[list[str]]) -> None:
    """Debian's libnss3 ships a libssl3.so: a name that looks right, another library."""
    nss = LIB_DIR / "libssl3.so"
    if not nss.exists():
        pytest.skip(f"no {nss} (libnss3)")
    with pytest.raises(SslLayoutError) as not_openssl:
        calibrate(str(nss))
    assert str(not_openssl.value) == fix(nss, "it has no TLS_method or SSLv23_method: not an OpenSSL libssl")


@pytest.mark.parametrize(("trials", "answer"), [
    ([{16, 40}, {16, 96}], 16),  # a chance match in one trial only
    ([{56}, {56}], 56),
    ([{16, 40}, {16, 40}], "the read BIO pointer was at each of offsets [16, 40]: ambiguous"),
    ([{16}, {24}], "the read BIO pointer was at no offset common to all 2 trials"),
    ([set(), set()], "the read BIO pointer was at no offset common to all 2 trials"),
])
def test_only_one_offset_common_to_every_trial_is_an_answer(trials: list[set[int]], answer: int | str) -> None:
    if isinstance(answer, int):
        assert openssl_probe.single_offset("the read BIO pointer", trials) == answer
    else:
        with pytest.raises(openssl_probe.ProbeFailure, match=f"^{re.escape(answer)}$"):
            openssl_probe.single_offset("the read BIO pointer", trials)


def test_scan_finds_every_aligned_copy_and_no_unaligned_one() -> None:
    memory = ct.create_string_buffer(64)
    value = (0x1E2D3C4B).to_bytes(4, sys.byteorder)
    for at in (0, 12, 30, 60):
        memory[at:at + 4] = value
    assert openssl_probe.offsets_of(ct.addressof(memory), 64, value, 4) == {0, 12, 60}  # 30: not 4-aligned
    assert openssl_probe.offsets_of(ct.addressof(memory), 64, value, 8) == {0}


ENDBR = "f30f1efa"
SUB8 = "4883ec08"  # sub $8, %rsp


def call_to(source: int, target: int) -> str:
    return "e8" + (target - source - 5).to_bytes(4, "little", signed=True).hex()


@pytest.mark.parametrize(("prologue", "followed"), [
    ("", True),  # a bare call
    (SUB8, True),  # 3.0 here: sub $8,%rsp; call
    (ENDBR + SUB8, True),  # built with -fcf-protection
    ("4154" + "55" + "4881ec00010000", True),  # push %r12; push %rbp; sub $256,%rsp
    ("4c89c1", False),  # mov %r8,%rcx: an argument register changed (3.3's SSL_write_ex2 shape)
    ("31c9", False),  # xor %ecx,%ecx
    ("4889fb", False),  # mov %rdi,%rbx: not on the list, refused even though harmless
    (SUB8 + "85c0", False),  # test before the call
])
def test_a_wrapper_is_followed_only_through_instructions_that_keep_the_arguments(prologue: str,
                                                                                 followed: bool) -> None:
    address, target = 0x354C0, 0x35290
    code = bytes.fromhex(prologue + call_to(address + len(prologue) // 2, target) + "31d2c3")
    assert openssl_probe.wrapper_callee(code, address) == (target if followed else None)


def test_a_wrapper_that_jumps_at_once_is_a_tail_call_and_nothing_else_is_followed() -> None:
    jump = "e9" + (0x1000 - 0x2000 - 5).to_bytes(4, "little", signed=True).hex()
    assert openssl_probe.wrapper_callee(bytes.fromhex(jump), 0x2000) == 0x1000
    assert openssl_probe.wrapper_callee(bytes.fromhex(ENDBR + jump), 0x2000 - 4) == 0x1000
    assert openssl_probe.wrapper_callee(bytes.fromhex(SUB8 + jump), 0x2000 - 4) is None  # a jmp after a prologue
    assert openssl_probe.wrapper_callee(bytes.fromhex(SUB8 + "e8000000"), 0x2000) is None  # cut short
    assert openssl_probe.wrapper_callee(b"", 0x2000) is None


def test_the_plain_form_must_call_the_same_function() -> None:
    # SSL_read in 3.0: a check of num, then the call with rcx and rdx rebuilt.
    head = "4883ec18" + "64488b042528000000" + "4889442408" + "31c0" + "85d2" + "782f" + "4889e1" + "4863d2"
    address = 0x35430
    code = bytes.fromhex(head + call_to(address + len(head) // 2, 0x35290) + "85c0")
    assert openssl_probe.calls_address(code, address, 0x35290)
    assert not openssl_probe.calls_address(code, address, 0x355A0)
    assert not openssl_probe.calls_address(code[:len(head) // 2 + 4], address, 0x35290)  # the call cut short


@pytest.mark.parametrize(("code", "answer"), [
    ("4155", (0, "push")), ("53", (0, "push")), (ENDBR + "4156", (4, "push")), ("e8000000", (0, "call")),
    ("eb00", (0, "jmp")), ("90", (0, "nop")), ("0f1f4400", (0, "nop")), (SUB8, (0, "other")),
    (ENDBR + SUB8, (4, "other")), ("488d05", (0, "other")), ("", (0, "other")),
])
def test_the_first_instruction_is_named_past_an_endbr64(code: str, answer: tuple[int, str]) -> None:
    assert openssl_probe.first_instruction(bytes.fromhex(code)) == answer


@needs_libssl
def test_a_function_is_scanned_only_as_far_as_its_symbol_size() -> None:
    """Debian's build puts SSL_read_ex right after SSL_read: a scan that ran past SSL_read's own
    bytes would find SSL_read_ex's call of the internal function and take it for SSL_read's."""
    lib = load_libssl()
    bias = openssl_probe._load_bias(lib)
    read, read_ex = (ct.cast(getattr(lib, name), ct.c_void_p).value or 0 for name in ("SSL_read", "SSL_read_ex"))
    size = openssl_probe._symbol_size(str(LIBSSL), read - bias)
    assert 0 < size
    assert openssl_probe._symbol_size(str(LIBSSL), read - bias + 1) == 0  # not where a symbol starts
    if read < read_ex < read + 4096:
        assert size <= read_ex - read
