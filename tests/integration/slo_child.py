"""A child process running the exporter's SLO runtime (evaluation, spool, pusher) on
synthetic exchanges, for tests that SIGKILL it: `python -m tests.integration.slo_child`.

It is the same SloRuntime `run --slo` embeds, minus the capture: the exchanges come from a
loop here (about `--rate` per second, 1 in 10 slow, 1 in 20 failing), stamped with the real
clock. It prints `ready` once the runtime runs, and on SIGTERM prints one JSON line with the
pusher's and spool's counters, then exits 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

from exporter.bridge.backoff import Backoff
from exporter.bridge.settings import PushSettings
from exporter.core.model import Exchange
from exporter.slo.manifest import load_manifest
from exporter.slo.runtime import SloRuntime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--spool", required=True)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    runtime = SloRuntime(
        load_manifest(args.manifest),
        push=PushSettings(args.url, "kill-test", "tok-kill-test", timeout_s=args.timeout),
        push_interval_s=1,
        spool_dir=Path(args.spool),
        grace_s=0.3,
        backoff=Backoff(base_s=0.05, max_s=0.2),
    )
    stop = threading.Event()

    def on_term(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    runtime.start()
    print("ready", flush=True)
    i = 0
    while not stop.is_set():
        end = time.time_ns()
        slow = i % 10 == 0
        runtime.observe(Exchange("GET", "/", 500 if i % 20 == 1 else 200, end - (300 if slow else 5) * 10**6, end,
                                 0, 2, 8080), "/")
        i += 1
        stop.wait(1 / args.rate)
    runtime.stop(timeout_s=0.5)
    pusher = runtime.pusher
    assert pusher is not None
    print(json.dumps({"outcomes": dict(pusher.outcomes), "spooled": len(pusher.spool),
                      "quarantined": pusher.spool.quarantined}), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
