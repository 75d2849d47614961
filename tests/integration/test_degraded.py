"""/healthz says degraded, with the reason, while the exporter falls behind for real, and recovers.

The real filter on lo, every exchange sent up to user space (--no-fast-path). The exporter is
stopped with SIGSTOP while clients keep a real HTTP server busy: its TPACKET_V3 ring (32 blocks,
each handed over when full or after 64 ms) fills within about two seconds and the kernel
drops the rest, exactly what happens when user space cannot keep up. After SIGCONT:

- /healthz answers 200 "degraded: kernel_drops; ..." (200: no probe may restart an exporter
  for being behind) and, once the exporter has worked off its ring, the count it gives is
  kernel_drops_total's, since nothing was lost before the stop;
- ebpf_slo_exporter_degraded is 1 for reason kernel_drops and 0 for every other reason;
- once --degraded-window (10 s here) passes without a new drop, /healthz says ok and the
  gauge goes back to 0, while traffic goes on.
"""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest

from exporter.health import LOSS_SIGNALS
from tests.integration.harness import ExporterProcess, logging_server, self_metric

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to attach a BPF filter")

WINDOW_S = 10.0
STOPPED_S = 5.0  # the ring holds about 2 s of this traffic (32 blocks x 64 ms)


def healthz(base: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for_healthz(base: str, first_word: str, timeout_s: float,
                     containing: str = "") -> tuple[int, str, float]:
    started = time.monotonic()
    deadline = started + timeout_s
    while True:
        status, body = healthz(base)
        if (body.startswith(first_word + ":") and containing in body) or time.monotonic() > deadline:
            return status, body, time.monotonic() - started
        time.sleep(0.1)


def settled_drops(exporter: ExporterProcess) -> int:
    """kernel_drops_total once it stops moving: the exporter has worked off its full ring."""
    last = -1
    for _ in range(20):
        drops = int(self_metric(exporter.scrape(), "kernel_drops_total"))
        if drops == last:
            return drops
        last = drops
        time.sleep(0.5)
    raise AssertionError(f"kernel_drops_total still moving 10 s after SIGCONT: {last}")


def keep_busy(port: int, stop: threading.Event, sent: list[int]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    while not stop.is_set():
        conn.request("GET", "/busy")
        conn.getresponse().read()
        sent[0] += 1
    conn.close()


def test_falling_behind_shows_on_healthz_with_its_reason_and_clears() -> None:
    with logging_server("127.0.0.1") as server, ExporterProcess(
        "--interface", "lo", "--port", str(server.port), "--no-fast-path", "--no-tls",
        "--degraded-window", f"{WINDOW_S:g}",
    ) as exporter:
        assert exporter.proc is not None
        base = exporter.base
        assert healthz(base) == (200, "ok: filter attached to lo\n")
        stop = threading.Event()
        sent = [[0] for _ in range(3)]
        clients = [threading.Thread(target=keep_busy, args=(server.port, stop, sent[i]))
                   for i in range(3)]
        for client in clients:
            client.start()
        try:
            time.sleep(1.0)
            samples = exporter.scrape()
            assert self_metric(samples, "kernel_drops_total") == 0, "dropping before the stop: machine too busy"
            os.kill(exporter.proc.pid, signal.SIGSTOP)
            try:
                time.sleep(STOPPED_S)
            finally:
                os.kill(exporter.proc.pid, signal.SIGCONT)
            assert wait_for_healthz(base, "degraded", 5)[0] == 200
            drops = settled_drops(exporter)
            assert drops > 0
            # For a window after SIGCONT the baseline is an observation from before the stop (0
            # drops), so the count is the whole loss; the watcher reads the counters once a second.
            expected = f"kernel_drops: {drops} in the last {WINDOW_S:g}s"
            status, body, _ = wait_for_healthz(base, "degraded", 3, containing=expected)
            samples = exporter.scrape()
            assert status == 200
            assert body.splitlines()[0] == "degraded: kernel_drops; filter attached to lo"
            assert body.splitlines()[1:] == [
                f"kernel_drops: {drops} in the last {WINDOW_S:g}s: frames the kernel dropped because the "
                "capture buffer was full (user space fell behind)"]
            assert {signal.reason: self_metric(samples, "degraded", reason=signal.reason)
                    for signal in LOSS_SIGNALS} == {signal.reason: float(signal.reason == "kernel_drops")
                                                    for signal in LOSS_SIGNALS}
            # Traffic goes on, without loss now: the state clears one window after the last drop.
            status, body, waited = wait_for_healthz(base, "ok", WINDOW_S + 10)
            assert (status, body) == (200, "ok: filter attached to lo\n"), f"after {waited:.1f}s"
            samples = exporter.scrape()
            assert self_metric(samples, "kernel_drops_total") == drops
            assert self_metric(samples, "degraded", reason="kernel_drops") == 0
        finally:
            stop.set()
            for client in clients:
                client.join()
        assert all(count[0] > 0 for count in sent)
