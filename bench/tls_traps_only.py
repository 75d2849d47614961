"""The uprobes' traps alone, held on the system's libssl: `python -m bench.tls_traps_only` (root).

The tls scenario's `traps` configuration runs this beside nginx. It attaches an empty program
at every place the exporter probes (the same list, `probe_requests`: each direction's entry and
return, and SSL_free) and holds them until it is stopped. Nothing is read, copied or sent, so
what nginx loses against no capture is the price of the traps themselves on this machine: the
ceiling that no cheaper program or exporter can raise.
"""

from __future__ import annotations

import os
import signal
import sys

from exporter.capture.openssl_layout import SslLayoutError, calibrate
from exporter.capture.tls import find_libraries, probe_requests


def main() -> int:
    from bcc import BPF  # root with BCC, as the exporter's loader

    bpf = BPF(text="int noop(void *ctx) { return 0; }")
    attached = 0
    for slot, library in enumerate(find_libraries()):
        try:
            layout = calibrate(library)
        except SslLayoutError as exc:
            print(f"skipped: {exc}", flush=True)
            continue
        for probe in probe_requests(library, layout, slot):
            where = {"addr": probe["address"]} if "address" in probe else {"sym": probe["symbol"].encode()}
            attach = bpf.attach_uretprobe if probe["return"] else bpf.attach_uprobe
            attach(name=library.encode(), fn_name=b"noop", **where)
            attached += 1
    if not attached:
        print("no libssl found to probe", file=sys.stderr, flush=True)
        return 1
    print(f"ready: {attached} empty probes", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    # Closing the perf events detaches; BCC's own cleanup also writes tracefs, maybe unmounted.
    for fd in bpf.uprobe_fds.values():
        os.close(fd)
    bpf.uprobe_fds.clear()
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    sys.exit(main())
