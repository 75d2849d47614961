"""Kernel-path durations against an independent clock: a dumpcap capture of the same exchanges.

A small server on lo holds each response for a time the client asks for (sleep, then a spin
for the last 300 us, so holds are exact to a few microseconds), spread across +-300 us around
each bucket bound, sub-millisecond ones included. Every exchange is one the kernel fast path
takes (a one-segment GET answered with Content-Length); fast_path_exchanges_total must rise by
exactly the number sent. dumpcap captures the same port at the same time, with nanosecond
timestamps; each exchange's duration is taken from the pcap with the exporter's definition
(README: the first request byte's packet to the last response byte's packet), and binned on
the same bounds, `le` inclusive.

The exporter's per-bucket counts must equal the pcap's, except that an exchange whose pcap
duration lies within TOLERANCE_NS of a bound may sit on either side of it, and that at most
STRAGGLERS exchanges in all may be further off (see below). Why 20 us: the
fast path times packets with bpf_ktime_get_ns() when the filter runs (CLOCK_MONOTONIC), the
pcap with the skb's receive timestamp (CLOCK_REALTIME, taken as lo queues the packet to the
backlog). For one packet the two differ by the backlog wait, which is the same softirq
microseconds later; a duration is a difference of two such packets, so only the change in that
wait between the request and the response packet counts, plus NTP slewing of REALTIME (at most
500 ppm: 2.5 us over 5 ms). The pcap's own resolution is 1 ns. Measured (the test prints the
tightest tolerance that fits): 0 to 5 us in four runs on a shared 2-core machine, with
exchanges 0.1 to 6 us from a bound binned alike; 20 us leaves a margin of four. The wait is
not bounded on a loaded VM, though: one CI run on two busy cores had one exchange of 300 further
off, hence STRAGGLERS; a 200 us error moves tens of exchanges per bound.

The test can fail: the same pcap durations shifted by 200 us (either way) must fail the
comparison, and the test checks that they do. Tried end to end once (2026-11-30): the exporter
given every bound moved by +200 us, -200 us and +50 us (so binning as if its durations were that
far off) failed the comparison at all five bounds each time, e.g. le=0.0005: 50 exported where
the pcap allows 30 to 33.
"""

from __future__ import annotations

import bisect
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.harness import ExporterProcess, free_port, scrape, self_metric

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("dumpcap") is None or
                                shutil.which("tshark") is None,
                                reason="needs root, dumpcap and tshark")

BOUNDS_S = (0.0005, 0.001, 0.002, 0.003, 0.005)
BOUNDS_NS = tuple(round(b * 1e9) for b in BOUNDS_S)
PER_BOUND = 60
SPREAD_NS = 300_000  # holds spread over bound +- 300 us
TOLERANCE_NS = 20_000
SHIFT_NS = 200_000  # what the test must catch
# Exchanges allowed past TOLERANCE_NS: a request packet that waited in lo's backlog while the vCPU
# was descheduled or the softirq deferred to ksoftirqd (a CI run on 2 busy cores had one of 300,
# at le=0.002); the pcap stamps it at netif_rx, the filter when the backlog is processed.
STRAGGLERS = 2
SPIN_NS = 300_000  # the server sleeps, then spins for the last 300 us of a hold
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def hold_server(sock: socket.socket, stop: threading.Event) -> None:
    """Answer `GET /hold/<ns>` after holding the response <ns> nanoseconds from the request's arrival."""
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        threading.Thread(target=serve_connection, args=(conn,), daemon=True).start()


def serve_connection(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffered = b""
    with conn:
        while True:
            data = conn.recv(4096)
            arrived = time.perf_counter_ns()
            if not data:
                return
            buffered += data
            while b"\r\n\r\n" in buffered:
                head, buffered = buffered.split(b"\r\n\r\n", 1)
                hold_ns = int(head.split(b" ", 2)[1].rsplit(b"/", 1)[1])
                due = arrived + hold_ns
                if hold_ns > SPIN_NS:
                    time.sleep((hold_ns - SPIN_NS) / 1e9)
                while time.perf_counter_ns() < due:
                    pass
                conn.sendall(RESPONSE)


@contextmanager
def dumpcap(port: int, path: Path) -> Iterator[None]:
    log = path.with_suffix(".log")
    with log.open("w") as err:
        proc = subprocess.Popen(["dumpcap", "-q", "-i", "lo", "-f", f"tcp port {port}", "-B", "64", "-w", str(path)],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 10
        while not (path.exists() and path.stat().st_size > 0):  # the section header is written once capturing
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        time.sleep(0.5)
        yield
    finally:
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
    # "Packets received/dropped on interface 'lo': 1234/0 (pcap:0/dumpcap:0/flushed:0/ps_ifdrop:0) (100.0%)"
    counts = re.search(r"received/dropped on interface '[^']*': (\d+)/(\d+) ", log.read_text())
    assert counts is not None and counts[2] == "0", log.read_text()


def pcap_durations(path: Path, port: int) -> list[int]:
    """Each exchange's duration in ns: first request data packet to last response data packet."""
    out = subprocess.run(
        ["tshark", "-r", str(path), "-Y", "tcp.len > 0", "-T", "fields",
         "-e", "frame.time_epoch", "-e", "tcp.stream", "-e", "tcp.srcport", "-e", "tcp.len"],
        capture_output=True, text=True, check=True).stdout
    open_exchanges: dict[str, list[int]] = {}  # stream -> [start, end]
    durations = []
    for line in out.splitlines():
        epoch, stream, sport, _ = line.split("\t")
        seconds, fraction = epoch.split(".")
        ts = int(seconds) * 10**9 + int(fraction.ljust(9, "0")[:9])  # a float would round to 0.2 us
        exchange = open_exchanges.get(stream)
        if int(sport) != port:  # request data: a new exchange once the previous one was answered
            if exchange is None or exchange[1]:
                if exchange is not None:
                    durations.append(exchange[1] - exchange[0])
                open_exchanges[stream] = [ts, 0]
        else:
            assert exchange is not None, "response data before any request"
            exchange[1] = ts
    durations += [end - start for start, end in open_exchanges.values() if end]
    return durations


def bucket_of(duration_ns: int) -> int:
    return bisect.bisect_left(BOUNDS_NS, duration_ns)  # le is inclusive, as the exporter's buckets


def mismatches(exported: Sequence[int], durations: Sequence[int], tolerance_ns: int) -> list[str]:
    """Why `exported` (counts per bucket, +Inf last) cannot be these durations, each within tolerance.

    An exchange may fall in any bucket that [d - tolerance, d + tolerance] touches; intervals of
    consecutive buckets fit counts iff each cumulative count lies between the number of exchanges
    that must be at or below that bound and the number that may be. Each problem names by how many
    exchanges the exporter is off at that bound.
    """
    problems = []
    if sum(exported) != len(durations):
        problems.append(f"{sum(exported)} exchanges exported, {len(durations)} in the pcap")
    cumulative = 0
    for k, count in enumerate(exported):
        cumulative += count
        must = sum(1 for d in durations if bucket_of(d + tolerance_ns) <= k)
        may = sum(1 for d in durations if bucket_of(d - tolerance_ns) <= k)
        if not must <= cumulative <= may:
            bound = f"le={BOUNDS_S[k]}" if k < len(BOUNDS_S) else "le=+Inf"
            off = must - cumulative if cumulative < must else cumulative - may
            problems.append(f"{bound}: exporter {cumulative}, pcap between {must} and {may} ({off} off)")
    return problems


def exchanges_off(problems: Sequence[str]) -> int:
    """How many exchanges, summed over the bounds, the exporter's buckets are off by."""
    return sum(int(re.search(r"\((\d+) off\)", p)[1]) if "off)" in p else len(BOUNDS_S) for p in problems)


def exported_buckets(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], port: int) -> list[int]:
    cumulative = [0.0] * (len(BOUNDS_S) + 1)
    for (name, labels), value in samples.items():
        label = dict(labels)
        if name != "http_server_request_duration_seconds_bucket" or label["server_port"] != str(port):
            continue
        le = label["le"]
        cumulative[len(BOUNDS_S) if le == "+Inf" else BOUNDS_S.index(float(le))] += value
    return [int(c - (cumulative[i - 1] if i else 0)) for i, c in enumerate(cumulative)]


def holds() -> list[int]:
    rng = random.Random(1130)
    wanted = [bound + rng.randint(-SPREAD_NS, SPREAD_NS) for bound in BOUNDS_NS for _ in range(PER_BOUND)]
    rng.shuffle(wanted)
    return [max(50_000, hold - 60_000) for hold in wanted]  # lo and the two wake-ups add ~60 us


def test_kernel_path_durations_match_a_packet_capture_per_bucket() -> None:
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    stop = threading.Event()
    server = threading.Thread(target=hold_server, args=(listener, stop), daemon=True)
    server.start()
    pcap = Path(tempfile.mkdtemp(prefix="ebpf-slo-durations-")) / "lo.pcapng"
    plan = holds()
    try:
        with ExporterProcess("--interface", "lo", "--port", str(port), "--no-tls",
                             "--duration-buckets", ",".join(map(str, BOUNDS_S))) as exporter:
            before = self_metric(exporter.scrape(), "fast_path_exchanges_total")
            with dumpcap(port, pcap), socket.create_connection(("127.0.0.1", port)) as client:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for hold_ns in plan:
                    client.sendall(f"GET /hold/{hold_ns} HTTP/1.1\r\nHost: d\r\n\r\n".encode())
                    reply = b""
                    while not reply.endswith(b"\r\n\r\nok"):
                        reply += client.recv(4096)
                    time.sleep(0.001)
            samples = exporter.wait_for_exchanges(len(plan))
            samples = scrape(exporter.base + "/metrics")
    finally:
        stop.set()
        server.join()
        listener.close()
    assert self_metric(samples, "fast_path_exchanges_total") - before == len(plan)
    assert self_metric(samples, "exchanges_total") == len(plan)
    # One kernel aggregate: GET, 200, /hold/{id} (all-digit segments share a key) on this server.
    assert (self_metric(samples, "fast_path_aggregates"), self_metric(samples, "fast_path_aggregates_capacity")) \
        == (1, 8192)
    durations = pcap_durations(pcap, port)
    shutil.rmtree(pcap.parent)
    assert len(durations) == len(plan)
    exported = exported_buckets(samples, port)
    distances = sorted(min(abs(d - b) for b in BOUNDS_NS) for d in durations)
    near = sum(1 for distance in distances if distance <= TOLERANCE_NS)
    fits = [t for t in (0, 1_000, 2_000, 5_000, 10_000, TOLERANCE_NS) if not mismatches(exported, durations, t)]
    print(f"exporter {exported}, pcap {[sum(1 for d in durations if bucket_of(d) == k) for k in range(6)]}; "
          f"{near} of {len(durations)} within {TOLERANCE_NS // 1000} us of a bound, the closest at "
          f"{[round(d / 1000, 1) for d in distances[:5]]} us; tightest tolerance that fits: "
          f"{fits[0] if fits else None} ns")
    problems = mismatches(exported, durations, TOLERANCE_NS)
    assert exchanges_off(problems) <= STRAGGLERS, problems
    assert near <= len(durations) // 10, "too many exchanges near a bound: the comparison says little"
    # The same comparison catches a kernel path 200 us off, either way, by far more than the stragglers.
    for shift in (SHIFT_NS, -SHIFT_NS):
        assert exchanges_off(mismatches(exported, [d + shift for d in durations], TOLERANCE_NS)) > 5 * STRAGGLERS, shift
