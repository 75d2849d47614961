"""Child process of openssl_layout.calibrate: where one libssl keeps an SSL's read BIO and its fd.

Run by path as `python -I -S openssl_probe.py LIBSSL`, standard library only: the libssl
under test (maybe a container's, with its libcrypto) loads here and never into the
exporter, a crash in it kills only this process, and BCC is not importable here at all.

Prints one JSON object and exits 0: {"rbio_offset": int, "bio_num_offset": int, "entry_note": str}
with "read" and "write" ({"vaddr": int, "first": str}, see entry_points) for the internal
functions found; or {"error": "reason"} and exits 1.

How: OpenSSL's own API sets known values and reads them back; the struct bytes are
scanned for them. For each of two fresh SSLs, SSL_set_wfd(B) then SSL_set_rfd(A) with A != B
gives two socket BIOs (one BIO for both directions would put its pointer at two offsets);
SSL_get_rbio() is looked for among the SSL's first SSL_SCAN bytes (8-aligned), the int A
among the read BIO's first BIO_SCAN bytes (4-aligned), and B at the same place in the write
BIO. Only offsets that hold in both SSLs, with different values, count; anything but one
answer each is refused.

Where to probe (x86-64): `SSL_read_ex`/`SSL_write_ex` are thin wrappers, in 1.1.1 and 3.x, around
one internal function each (ssl_read_internal, ssl_write_internal) that `SSL_read`/`SSL_write`
call too, with the same arguments as the `_ex` forms. A uprobe there sees every call of both
forms at one place, and that function starts with `push` (the wrappers start with `sub rsp`).
That matters: the kernel emulates a probed push, call, jmp or nop, but must single-step any other
instruction out of line, a second trap that costs about 12 us per call on a VM against 1 us
(bench/tls_trap_cost.py). The callee is followed only when the `_ex` wrapper reaches it through
instructions that cannot change an argument register (endbr64, push, sub rsp) and `SSL_read`
calls the same address; anything else reports no entry point, and the exported symbols are probed.
"""

from __future__ import annotations

import ctypes as ct
import json
import os
import struct
import sys

SSL_SCAN = 1024  # the SSL struct is several KiB in 1.0-3.x; rbio sits in its first 100 bytes
BIO_SCAN = 128  # struct bio_st: num follows the method, callbacks and four ints (offset 40-56)
# (read fd, write fd) for each trial: ints unlikely to be found in a struct by chance.
TRIALS = ((0x1E2D3C4B, 0x2A3B4C5D), (0x3C4B5A69, 0x4D5E6F70))


class ProbeFailure(Exception):
    """The reason, as one short phrase, that no single layout was found."""


def _load(path: str) -> ct.CDLL:
    # Its libcrypto first, by path, when it sits beside it (libssl.so.X -> libcrypto.so.X): the
    # dynamic linker then resolves libssl's DT_NEEDED libcrypto to it by soname. Not
    # LD_LIBRARY_PATH: pointed at a container's lib directory it would give this interpreter
    # the container's libc too, under the host's dynamic linker.
    directory, name = os.path.split(path)
    crypto = os.path.join(directory, name.replace("libssl", "libcrypto", 1))
    if crypto != path and os.path.exists(crypto):
        try:
            ct.CDLL(crypto, mode=ct.RTLD_GLOBAL)
        except OSError as exc:
            raise ProbeFailure(f"cannot load its libcrypto: {exc}") from None
    try:
        return ct.CDLL(path)
    except OSError as exc:
        raise ProbeFailure(f"cannot load it: {exc}") from None


def _function(lib: ct.CDLL, *names: str) -> ct._NamedFuncPointer:
    for name in names:
        try:
            return getattr(lib, name)  # type: ignore[no-any-return]
        except AttributeError:
            continue
    raise ProbeFailure(f"it has no {' or '.join(names)}: not an OpenSSL libssl")


def offsets_of(base: int, span: int, value: bytes, step: int) -> set[int]:
    memory = ct.string_at(base, span)
    return {at for at in range(0, span - len(value) + 1, step) if memory[at:at + len(value)] == value}


def probe(lib: ct.CDLL) -> tuple[int, int]:
    method = _function(lib, "TLS_method", "SSLv23_method")
    if hasattr(lib, "SSL_library_init"):  # 1.0.x needs it; 1.1+ initialises itself (and has no symbol)
        lib.SSL_library_init()
    ctx_new, ssl_new = _function(lib, "SSL_CTX_new"), _function(lib, "SSL_new")
    set_rfd, set_wfd = _function(lib, "SSL_set_rfd"), _function(lib, "SSL_set_wfd")
    get_rbio, get_wbio, get_rfd = (_function(lib, "SSL_get_rbio"), _function(lib, "SSL_get_wbio"),
                                   _function(lib, "SSL_get_rfd"))
    method.restype = ct.c_void_p
    ctx_new.restype, ctx_new.argtypes = ct.c_void_p, [ct.c_void_p]
    ssl_new.restype, ssl_new.argtypes = ct.c_void_p, [ct.c_void_p]
    for setter in (set_rfd, set_wfd):
        setter.restype, setter.argtypes = ct.c_int, [ct.c_void_p, ct.c_int]
    for getter in (get_rbio, get_wbio):
        getter.restype, getter.argtypes = ct.c_void_p, [ct.c_void_p]
    get_rfd.restype, get_rfd.argtypes = ct.c_int, [ct.c_void_p]

    ctx = ctx_new(method())
    if not ctx:
        raise ProbeFailure("SSL_CTX_new failed")
    rbio_found: list[set[int]] = []
    num_found: list[set[int]] = []
    for read_fd, write_fd in TRIALS:
        ssl = ssl_new(ctx)
        if not ssl:
            raise ProbeFailure("SSL_new failed")
        if set_wfd(ssl, write_fd) != 1 or set_rfd(ssl, read_fd) != 1:
            raise ProbeFailure("SSL_set_wfd/SSL_set_rfd failed")
        rbio, wbio = get_rbio(ssl), get_wbio(ssl)
        if not rbio or not wbio or rbio == wbio or get_rfd(ssl) != read_fd:
            raise ProbeFailure("SSL_set_rfd did not give a read BIO of its own")
        rbio_found.append(offsets_of(ssl, SSL_SCAN, rbio.to_bytes(8, sys.byteorder), 8))
        num_found.append(offsets_of(rbio, BIO_SCAN, read_fd.to_bytes(4, sys.byteorder), 4)
                         & offsets_of(wbio, BIO_SCAN, write_fd.to_bytes(4, sys.byteorder), 4))
    return single_offset("the read BIO pointer", rbio_found), single_offset("the BIO's fd", num_found)


def single_offset(what: str, trials: list[set[int]]) -> int:
    """The one offset where every trial found its value; ProbeFailure for none or several."""
    common = set.intersection(*trials)
    if not common:
        raise ProbeFailure(f"{what} was at no offset common to all {len(trials)} trials")
    if len(common) > 1:
        raise ProbeFailure(f"{what} was at each of offsets {sorted(common)}: ambiguous")
    return common.pop()


ENDBR64 = bytes.fromhex("f30f1efa")
# ELF64: the section headers (type SHT_DYNSYM) and the symbols' sizes, read from the file.
_ELF_HEADER = struct.Struct("<16xHHIQQQIHHHHHH")
_SECTION = struct.Struct("<IIQQQQIIQQ")
_SYMBOL = struct.Struct("<IBBHQQ")
_SHT_DYNSYM = 11


def _push_length(code: bytes, at: int) -> int:
    """Length of a `push reg` at `at` (50-57, or 41 50-57 for r8-r15), else 0."""
    if at < len(code) and 0x50 <= code[at] <= 0x57:
        return 1
    if code[at:at + 1] == b"\x41" and at + 1 < len(code) and 0x50 <= code[at + 1] <= 0x57:
        return 2
    return 0


def _prologue_step(code: bytes, at: int) -> int:
    """Length of the instruction at `at` if it cannot change rdi, rsi, rdx or rcx (endbr64, push
    reg, sub imm from rsp), else 0."""
    if code[at:at + 4] == ENDBR64:
        return 4
    if push := _push_length(code, at):
        return push
    if code[at:at + 3] == b"\x48\x83\xec":
        return 4
    if code[at:at + 3] == b"\x48\x81\xec":
        return 7
    return 0


def _rel32(code: bytes, at: int, address: int) -> int:
    """Target of the rel32 call or jmp whose opcode is at `at`, code being at `address`."""
    return address + at + 5 + int.from_bytes(code[at + 1:at + 5], "little", signed=True)


def wrapper_callee(code: bytes, address: int) -> int | None:
    """The function a wrapper at `address` (its first bytes `code`) calls with its own arguments:
    the target of its first call (or of a jmp right at its start) when only endbr64, push and
    sub-from-rsp come before it; None otherwise."""
    at = 4 if code.startswith(ENDBR64) else 0
    if len(code) >= at + 5 and code[at] == 0xE9:
        return _rel32(code, at, address)
    while len(code) >= at + 5:
        if code[at] == 0xE8:
            return _rel32(code, at, address)
        step = _prologue_step(code, at)
        if not step:
            return None
        at += step
    return None


def calls_address(code: bytes, address: int, target: int) -> bool:
    """Whether a call or jmp rel32 to `target` appears in `code` (at `address`). A false match needs
    four bytes equal to an exact displacement after an e8 or e9: not seen by chance."""
    return any(code[at] in (0xE8, 0xE9) and _rel32(code, at, address) == target for at in range(len(code) - 4))


def first_instruction(code: bytes) -> tuple[int, str]:
    """(offset to probe, kind) at a function's start: past an endbr64 (a no-op that the kernel
    would single-step), and whether the kernel emulates what is there ("push", "call", "jmp",
    "nop") or single-steps it ("other")."""
    at = 4 if code.startswith(ENDBR64) else 0
    op = code[at:at + 2]
    if _push_length(code, at):
        return at, "push"
    if op[:1] == b"\xe8":
        return at, "call"
    if op[:1] in (b"\xe9", b"\xeb"):
        return at, "jmp"
    if op[:1] == b"\x90" or op == b"\x0f\x1f":
        return at, "nop"
    return at, "other"


RTLD_DI_LINKMAP = 2


def _load_bias(lib: ct.CDLL) -> int:
    """What the dynamic linker added to the library's ELF addresses (link_map's l_addr, its first
    field): ELF address = run-time address - this. BCC attaches at ELF addresses."""
    libdl = ct.CDLL(None)
    libdl.dlinfo.argtypes = [ct.c_void_p, ct.c_int, ct.c_void_p]
    link_map = ct.c_void_p()
    if libdl.dlinfo(lib._handle, RTLD_DI_LINKMAP, ct.byref(link_map)) != 0 or not link_map.value:
        raise ProbeFailure("dlinfo gave no link map")
    return ct.c_size_t.from_address(link_map.value).value


def _symbol_size(path: str, vaddr: int) -> int:
    """st_size of the exported symbol at ELF address `vaddr` in the library at `path` (0: none):
    how far a function's own bytes go, so that a scan of them never reads into the next one."""
    with open(path, "rb") as file:
        elf = file.read()
    if elf[:6] != b"\x7fELF\x02\x01":  # 64-bit, little-endian
        return 0
    (_, _, _, _, _, shoff, _, _, _, _, shentsize, shnum, _) = _ELF_HEADER.unpack_from(elf)
    for index in range(shnum):
        _, kind, _, _, offset, size, _, _, _, entsize = _SECTION.unpack_from(elf, shoff + index * shentsize)
        if kind != _SHT_DYNSYM or not entsize:
            continue
        for at in range(offset, offset + size, entsize):
            _, _, _, _, value, symbol_size = _SYMBOL.unpack_from(elf, at)
            if value == vaddr and symbol_size:
                return int(symbol_size)
    return 0


def _mapped_file(address: int) -> tuple[str, int] | None:
    """(path, file offset) of run-time `address`, from this process's mappings."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end and len(fields) == 6 and fields[5].startswith("/"):
                return fields[5].rstrip("\n"), address - start + int(fields[2], 16)
    return None


def _code(address: int, length: int) -> bytes:
    """Up to `length` bytes of code at run-time `address`, read from the file mapped there, never
    from memory: a uprobe attached by anyone (another exporter, a debugger) shows in memory as an
    int3 over the instruction's first byte."""
    mapped = _mapped_file(address)
    if mapped is None:
        return b""
    with open(mapped[0], "rb") as file:
        file.seek(mapped[1])
        return file.read(length)


def entry_points(lib: ct.CDLL) -> tuple[dict[str, dict[str, object]], str]:
    """For "read" and "write": {"vaddr": the ELF address to probe, "first": its instruction kind},
    where the internal function is found as the module docstring says; and a note for those not."""
    if os.uname().machine != "x86_64":
        return {}, "internal functions are looked for on x86_64 only"
    bias = _load_bias(lib)
    found: dict[str, dict[str, object]] = {}
    notes = []
    for direction, wrapper, plain in (("read", "SSL_read_ex", "SSL_read"), ("write", "SSL_write_ex", "SSL_write")):
        try:
            wrapper_at = ct.cast(getattr(lib, wrapper), ct.c_void_p).value or 0
            plain_at = ct.cast(getattr(lib, plain), ct.c_void_p).value or 0
        except AttributeError:  # 1.0.x has no _ex forms
            notes.append(f"no {wrapper}")
            continue
        callee = wrapper_callee(_code(wrapper_at, 32), wrapper_at)
        if callee is None:
            notes.append(f"{wrapper} does not start with a call we can follow")
            continue
        mapped = _mapped_file(plain_at)
        plain_size = _symbol_size(mapped[0], plain_at - bias) if mapped else 0
        if not plain_size:
            notes.append(f"no size for {plain} in the library's symbols")
            continue
        if not calls_address(_code(plain_at, plain_size), plain_at, callee):
            notes.append(f"{plain} does not call what {wrapper} calls")
            continue
        skip, kind = first_instruction(_code(callee, 8))
        found[direction] = {"vaddr": callee + skip - bias, "first": kind}
    return found, "; ".join(notes)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(json.dumps({"error": "usage: openssl_probe.py LIBSSL"}))
        return 2
    try:
        lib = _load(argv[1])
        rbio_offset, bio_num_offset = probe(lib)
    except ProbeFailure as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    try:  # without them the exported symbols are probed: slower, as exact
        found, note = entry_points(lib)
    except (ProbeFailure, OSError, ValueError) as exc:
        found, note = {}, f"internal functions not found: {exc}"
    print(json.dumps({"rbio_offset": rbio_offset, "bio_num_offset": bio_num_offset, **found, "entry_note": note}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
