"""The system libssl through ctypes, with the prototypes the tests call (one place for them)."""

from __future__ import annotations

import ctypes as ct
from pathlib import Path
from typing import Any

LIB_DIR = Path("/usr/lib/x86_64-linux-gnu")
LIBSSL = LIB_DIR / "libssl.so.3"


def load_libssl(path: Path = LIBSSL) -> Any:
    lib = ct.CDLL(str(path))  # the system copy is already in this process: Python's _ssl links it
    lib.TLS_method.restype = ct.c_void_p
    lib.SSL_CTX_new.restype, lib.SSL_CTX_new.argtypes = ct.c_void_p, [ct.c_void_p]
    lib.SSL_new.restype, lib.SSL_new.argtypes = ct.c_void_p, [ct.c_void_p]
    lib.SSL_free.argtypes = [ct.c_void_p]
    lib.SSL_CTX_free.argtypes = [ct.c_void_p]
    lib.SSL_get_rbio.restype, lib.SSL_get_rbio.argtypes = ct.c_void_p, [ct.c_void_p]
    for name in ("SSL_set_fd", "SSL_set_rfd", "SSL_set_wfd"):
        getattr(lib, name).argtypes = [ct.c_void_p, ct.c_int]
    for name in ("SSL_get_fd", "SSL_get_rfd", "SSL_get_wfd"):
        getattr(lib, name).argtypes = [ct.c_void_p]
    for name in ("SSL_read", "SSL_write", "SSL_peek"):
        getattr(lib, name).argtypes = [ct.c_void_p, ct.c_void_p, ct.c_int]
    for name in ("SSL_read_ex", "SSL_write_ex", "SSL_peek_ex"):
        getattr(lib, name).argtypes = [ct.c_void_p, ct.c_void_p, ct.c_size_t, ct.c_void_p]
    return lib
