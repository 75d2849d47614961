"""Helper process that compiles and loads the filter with BCC, then hands the descriptors over.

Why a separate process: BCC compiles with an in-process clang, which maps about
85 MB of LLVM libraries and leaves its heap behind. The exporter's resident set
would carry that for its whole life. Here it lives for the few seconds of the
compile; the exporter receives the loaded program's and maps' file descriptors
(SCM_RIGHTS over a socketpair) and talks to them with bpf(2) (bpfsys.py).

Protocol, one message each way on a SOCK_SEQPACKET socket passed as argv[1]:
request  {"src": path, "cflags": [...], "function": name, "maps": [names],
          "tail_calls": {"map": name, "functions": [names]}}  (optional: a prog array's slots, filled
          in order with those functions, loaded as socket filters too)
reply    {"ok": true, "compile_s": float, "peak_rss_kb": int} with fds [program, *maps]
         {"ok": false, "kind": "import" | "compile" | "load", "message": str}
Clang's own diagnostics go to the inherited stderr.

Tracing programs (bpf/tls_probes.c) are attached here too, because attaching needs BCC's
ELF symbol lookup. The request then has "probes" instead of "function":
request  {"src", "cflags", "maps": [names],
          "probes": [{"library": path, "symbol": name, "function": name, "return": bool,
                      "address": int (optional: probe this ELF address; then "symbol" only names it)}]}
reply    {"ok": true, ..., "attached": [[library, symbol, return]], "failed": [[library, symbol, message]],
          "programs": [names]}
         with fds [*maps, *one attachment per "attached" entry, *programs]
An attachment lives as long as some process holds its descriptor (a perf event for a
uprobe), so the exporter's copies keep them after this process
exits. This process must then exit without BCC's atexit cleanup, which would disable the
shared perf events (PERF_EVENT_IOC_DISABLE) before closing its own copies.
"""

from __future__ import annotations

import ctypes as ct
import json
import os
import resource
import signal
import socket
import sys
import time
from typing import Any

MAX_MESSAGE = 1 << 16
_PR_SET_PDEATHSIG = 1


def _load(request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    try:
        from bcc import BPF
    except ImportError as exc:
        return {"ok": False, "kind": "import", "message": str(exc)}, []
    started = time.monotonic()
    # BCC raises bare Exception for compile and load failures; the parent turns the kind into
    # the project's CaptureError with the fix.
    try:
        bpf = BPF(src_file=request["src"].encode(), cflags=request["cflags"])
    except Exception as exc:
        return {"ok": False, "kind": "compile", "message": str(exc)}, []
    try:
        fn = bpf.load_func(request["function"].encode(), BPF.SOCKET_FILTER)
        tail_calls = request.get("tail_calls")
        if tail_calls:
            slots = bpf[tail_calls["map"].encode()]
            for slot, name in enumerate(tail_calls["functions"]):
                slots[ct.c_int(slot)] = ct.c_int(bpf.load_func(name.encode(), BPF.SOCKET_FILTER).fd)
        fds = [int(fn.fd)] + [int(bpf[name.encode()].map_fd) for name in request["maps"]]
    except Exception as exc:
        return {"ok": False, "kind": "load", "message": str(exc)}, []
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"ok": True, "compile_s": round(time.monotonic() - started, 3), "peak_rss_kb": peak_kb}, fds


def _attach(request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """Compile, load and attach tracing programs; see the module docstring."""
    try:
        from bcc import BPF
    except ImportError as exc:
        return {"ok": False, "kind": "import", "message": str(exc)}, []
    started = time.monotonic()
    try:
        bpf = BPF(src_file=request["src"].encode(), cflags=request["cflags"])
    except Exception as exc:
        return {"ok": False, "kind": "compile", "message": str(exc)}, []
    try:
        fds = [int(bpf[name.encode()].map_fd) for name in request["maps"]]
    except Exception as exc:
        return {"ok": False, "kind": "load", "message": str(exc)}, []
    attached: list[tuple[str, str, bool]] = []
    failed: list[tuple[str, str, str]] = []
    for probe in request["probes"]:
        library, symbol, function, ret = probe["library"], probe["symbol"], probe["function"], probe["return"]
        before = set(bpf.uprobe_fds)
        attach = bpf.attach_uretprobe if ret else bpf.attach_uprobe
        try:
            if "address" in probe:  # an ELF address (openssl_layout.EntryPoint); `symbol` only names it
                attach(name=library.encode(), addr=probe["address"], fn_name=function.encode())
            else:
                attach(name=library.encode(), sym=symbol.encode(), fn_name=function.encode())
        except Exception as exc:  # BCC: bare Exception for a missing symbol, a refused load or attach
            failed.append((library, symbol, str(exc)))
            continue
        new = [bpf.uprobe_fds[name] for name in set(bpf.uprobe_fds) - before]
        attached.append((library, symbol, ret))
        fds.extend(int(fd) for fd in new[:1])
    # The loaded programs too: holding them costs nothing, and /proc/<pid>/fdinfo of a program
    # fd is where the kernel's run time statistics are read (bench --filter-stats).
    programs = sorted(name.decode() for name in bpf.funcs)
    fds.extend(int(bpf.funcs[name.encode()].fd) for name in programs)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reply = {"ok": True, "compile_s": round(time.monotonic() - started, 3), "peak_rss_kb": peak_kb,
             "attached": attached, "failed": failed, "programs": programs}
    return reply, fds


def main() -> int:
    # Die with the exporter: a compile nobody waits for is wasted.
    ct.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    sock = socket.socket(fileno=int(sys.argv[1]))
    request = json.loads(sock.recv(MAX_MESSAGE))
    tracing = "probes" in request
    reply, fds = _attach(request) if tracing else _load(request)
    socket.send_fds(sock, [json.dumps(reply).encode()], fds)
    if tracing:
        # Skip BCC's atexit cleanup: it would disable the perf events the parent now shares.
        sys.stderr.flush()
        os._exit(0)
    # The parent holds duplicates now; exiting closes ours, and the program and maps live on.
    return 0


if __name__ == "__main__":
    sys.exit(main())
