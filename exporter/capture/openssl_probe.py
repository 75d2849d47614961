"""Child process of openssl_layout.calibrate: where one libssl keeps an SSL's read BIO and its fd.

Run by path as `python -I -S openssl_probe.py LIBSSL`, standard library only: the libssl
under test (maybe a container's, with its libcrypto) loads here and never into the
exporter, a crash in it kills only this process, and BCC is not importable here at all.

Prints one JSON object: {"rbio_offset": int, "bio_num_offset": int} and exits 0, or
{"error": "reason"} and exits 1.

How: OpenSSL's own API sets known values and reads them back; the struct bytes are
scanned for them. For each of two fresh SSLs, SSL_set_wfd(B) then SSL_set_rfd(A) with A != B
gives two socket BIOs (one BIO for both directions would put its pointer at two offsets);
SSL_get_rbio() is looked for among the SSL's first SSL_SCAN bytes (8-aligned), the int A
among the read BIO's first BIO_SCAN bytes (4-aligned), and B at the same place in the write
BIO. Only offsets that hold in both SSLs, with different values, count; anything but one
answer each is refused.
"""

from __future__ import annotations

import ctypes as ct
import json
import os
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


def probe(path: str) -> tuple[int, int]:
    lib = _load(path)
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


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(json.dumps({"error": "usage: openssl_probe.py LIBSSL"}))
        return 2
    try:
        rbio_offset, bio_num_offset = probe(argv[1])
    except ProbeFailure as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(json.dumps({"rbio_offset": rbio_offset, "bio_num_offset": bio_num_offset}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
