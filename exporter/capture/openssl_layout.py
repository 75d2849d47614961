"""Where one libssl keeps an SSL's read BIO, and where a BIO keeps its fd: found at run time.

    calibrate      libssl path -> SslLayout, cached per (path, device, inode, mtime)
    SslLayout      (rbio_offset, bio_num_offset, read, write, entry_note): SSL* + rbio_offset
                   holds the BIO*, BIO* + bio_num_offset holds the socket BIO's fd (an int);
                   read/write: the internal functions to probe (EntryPoint), when found
    SslLayoutError one line naming what is lost and the fix (a CaptureError)

Why at run time: `struct ssl_st` and `struct bio_st` are opaque and move between OpenSSL
releases and builds (3.0.19 here: 16 and 56), and a container may carry its own copy.
The library's own API finds them: openssl_probe.py sets known fds with SSL_set_rfd and
SSL_set_wfd and looks for them in the structs (its docstring has the method). It also finds
where to probe: the internal function that each call pair goes through (its docstring says why
that is about ten times cheaper per call on a VM, and how it is found safely).

It runs in a child process (the interpreter running the exporter, `-I -S`, the standard
library only), so that a foreign libssl, say a container's
/proc/<pid>/root/usr/lib/x86_64-linux-gnu/libssl.so.1.1 with its libcrypto beside it,
never loads into the exporter, and a crash or a hang in it is an error here, not ours.
One calibration takes about 30 ms (mostly the interpreter's start).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from exporter.errors import CaptureError

__all__ = ["CALIBRATE_TIMEOUT_S", "EntryPoint", "SslLayout", "SslLayoutError", "calibrate"]

# Loading a libssl and making two SSLs takes milliseconds; the rest is a hung constructor.
CALIBRATE_TIMEOUT_S = 5.0

_PROBE = Path(__file__).with_name("openssl_probe.py")


class EntryPoint(NamedTuple):
    """OpenSSL's internal read or write function, which both forms of the call go through."""

    vaddr: int  # the ELF address to probe (BCC's `addr`)
    first: str  # the instruction there: "push", "call", "jmp", "nop" (the kernel emulates it) or "other"


class SslLayout(NamedTuple):
    rbio_offset: int  # of the BIO* in the SSL struct (SSL_get_rbio)
    bio_num_offset: int  # of the int fd in a socket BIO (BIO_get_fd)
    read: EntryPoint | None = None  # None: SSL_read and SSL_read_ex are probed themselves
    write: EntryPoint | None = None
    entry_note: str = ""  # why an internal function was not found


class SslLayoutError(CaptureError):
    """A libssl whose SSL layout could not be found: HTTPS through it cannot be counted."""


_cache: dict[tuple[str, int, int, int], SslLayout] = {}


def _error(path: str, reason: str) -> SslLayoutError:
    return SslLayoutError(
        f"libssl {path}: could not find its SSL layout ({reason}): HTTPS through it is not counted; "
        f"point --libssl at an OpenSSL libssl, or run with --no-tls"
    )


def _entry(found: object) -> EntryPoint | None:
    if isinstance(found, dict) and isinstance(found.get("vaddr"), int) and found["vaddr"] > 0 \
            and isinstance(found.get("first"), str):
        return EntryPoint(found["vaddr"], found["first"])
    return None


def calibrate(path: str, timeout_s: float = CALIBRATE_TIMEOUT_S) -> SslLayout:
    """The SslLayout of the libssl at `path`, found in a child process once per file version.

    SslLayoutError when the file is missing, is not an OpenSSL libssl, does not load
    (its libcrypto missing), crashes or hangs the child, or gives no single answer."""
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise _error(path, (exc.strerror or str(exc)).lower()) from None
    key = (path, stat.st_dev, stat.st_ino, stat.st_mtime_ns)
    cached = _cache.get(key)
    if cached is not None:
        return cached
    argv = [sys.executable, "-I", "-S", str(_PROBE), path]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired:
        raise _error(path, f"the probe process took over {timeout_s:g} s") from None
    except OSError as exc:
        raise _error(path, f"cannot start {sys.executable}: {exc.strerror}") from None
    if done.returncode < 0:
        try:
            killed_by = signal.Signals(-done.returncode).name
        except ValueError:  # a real-time signal has no name
            killed_by = f"signal {-done.returncode}"
        raise _error(path, f"loading it killed the probe process with {killed_by}")
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("rbio_offset"), int) \
            and isinstance(answer.get("bio_num_offset"), int):
        layout = SslLayout(answer["rbio_offset"], answer["bio_num_offset"], _entry(answer.get("read")),
                           _entry(answer.get("write")), str(answer.get("entry_note", "")))
    elif isinstance(answer, dict) and answer.get("error"):
        raise _error(path, str(answer["error"]))
    else:  # no answer: whatever the interpreter said last
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise _error(path, f"the probe process exited with status {done.returncode}"
                           + (f": {lines[-1]}" if lines else ""))
    _cache[key] = layout
    return layout
