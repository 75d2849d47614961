"""Ring reservations refused while the ring has room: `python -m bench.tls_ring_contention
[--seconds 15] [--rounds 5]` (root).

Two nginx over HTTPS (one worker each, so one producer per core), both ports watched by one
TlsCapture reading the ring as the exporter does, each under its own wrk (-t1 -c16, keep-alive).
Since Linux 6.15 the ring's lock is an rqspinlock, which can refuse a reservation under
contention whatever the room; the probes try again while the ring has room, then hand the
event to the fallback ring (tls_probes.c, main_output() and output()). Per round it prints the
probes' counters: events, lost and lost_with_room (refused by both rings), retried (taken at a
later try), fallback (taken by the fallback ring) and fallback_following (sent there behind one,
to stay in order). With one worker (the tls bench) there is one producer and no contention.
"""

from __future__ import annotations

import subprocess
import tempfile
import threading
import time
from pathlib import Path

import click

from bench.nginx import Nginx
from bench.procs import Children, require_tools
from bench.wrk import parse_wrk
from exporter.capture.tls import TlsCapture, find_libraries

_SHOWN = ("events", "lost", "lost_with_room", "retried", "fallback", "fallback_following", "calls")


def _drain(capture: TlsCapture, stop: threading.Event) -> None:
    while not stop.is_set():
        capture.read(0.05)


@click.command()
@click.option("--seconds", default=15.0, show_default=True, help="wrk's duration per round.")
@click.option("--rounds", default=5, show_default=True, help="Rounds, each with a fresh capture.")
def main(seconds: float, rounds: int) -> None:
    tools = require_tools(["nginx", "wrk"])
    totals = dict.fromkeys(_SHOWN, 0)
    with tempfile.TemporaryDirectory() as tmp, Children(Path(tmp)) as children:
        servers = [Nginx(children, tools["nginx"], Path(tmp) / f"nginx{i}", tls=True) for i in range(2)]
        for server in servers:
            server.start()
        print("| round | requests | " + " | ".join(_SHOWN) + " |")
        print("|---:|---:|" + "---:|" * len(_SHOWN))
        for round_ in range(1, rounds + 1):
            capture = TlsCapture([server.port for server in servers], find_libraries()).open()
            stop = threading.Event()
            reader = threading.Thread(target=_drain, args=(capture, stop))
            reader.start()
            try:
                loads = [subprocess.Popen([tools["wrk"], "-t1", "-c16", f"-d{seconds:g}s", server.url("/")],
                                          stdout=subprocess.PIPE, text=True) for server in servers]
                requests = sum(parse_wrk(load.communicate()[0]).requests for load in loads)
                time.sleep(0.5)  # the last events into the ring
            finally:
                stop.set()
                reader.join()
            counters = capture.probes.counters() if capture.probes is not None else {}
            capture.close()
            for name in _SHOWN:
                totals[name] += counters.get(name, 0)
            print(f"| {round_} | {requests} | " + " | ".join(str(counters.get(name, 0)) for name in _SHOWN) + " |")
            time.sleep(1.5)  # the previous probes detach in the background (tls.py)
    print("| all | | " + " | ".join(str(totals[name]) for name in _SHOWN) + " |")


if __name__ == "__main__":
    main()
