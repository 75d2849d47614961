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
"""

from __future__ import annotations

import ctypes as ct
import json
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


def main() -> int:
    # Die with the exporter: a compile nobody waits for is wasted.
    ct.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    sock = socket.socket(fileno=int(sys.argv[1]))
    request = json.loads(sock.recv(MAX_MESSAGE))
    reply, fds = _load(request)
    socket.send_fds(sock, [json.dumps(reply).encode()], fds)
    # The parent holds duplicates now; exiting closes ours, and the program and maps live on.
    return 0


if __name__ == "__main__":
    sys.exit(main())
