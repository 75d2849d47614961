"""Flood: 100,000 distinct connections, each asking for a distinct path, through `replay`.

The pcap is written here with struct (Ethernet, IPv4, TCP), one request and one response
segment per connection, no FIN: every connection stays open until the flow table is full.
With the defaults (65,536 flows, 100 routes per port) the exact outcome is known:

- exchanges_total = 100,000 (every exchange completes before its flow is evicted);
- flows_evicted_total{reason="capacity"} = 100,000 - 65,536 = 34,464;
- route_overflow_total = 100,000 - 100 = 99,900, and the histograms hold 101 routes;
- peak RSS of the replay process stays under FLOOD_RSS_BOUND_MB (155 MB measured; README).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import REPO

CONNECTIONS = 100_000
PORT = 8080
FLOOD_RSS_BOUND_MB = 256  # measured: 155 MB at the default 65,536 flows
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def word(i: int) -> str:
    """A distinct letters-only path segment per i (the route heuristic keeps words as they are)."""
    out = ""
    for _ in range(5):
        out += LETTERS[i % 26]
        i //= 26
    return out


def frame(src: bytes, dst: bytes, sport: int, dport: int, seq: int, payload: bytes) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 1, 5 << 4, 0x18, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0x4000, 64, 6, 0, src, dst)
    return b"\x00" * 12 + b"\x08\x00" + ip + tcp + payload


def write_flood(path: Path) -> None:
    server = bytes([10, 9, 0, 1])
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    with path.open("wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1))  # ns pcap, Ethernet
        ts = 1_700_000_000 * 10**9
        for i in range(CONNECTIONS):
            client = bytes([10, 8, (i >> 8) & 0xFF, i & 0xFF])
            sport = 1024 + (i >> 16)
            request = f"GET /flood/{word(i)} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            for data in (frame(client, server, sport, PORT, 1000, request),
                         frame(server, client, PORT, sport, 5000, response)):
                ts += 1000
                out.write(struct.pack("<IIII", ts // 10**9, ts % 10**9, len(data), len(data)))
                out.write(data)


def test_flood_of_connections_and_paths_stays_bounded(tmp_path: Path) -> None:
    pcap = tmp_path / "flood.pcap"
    write_flood(pcap)
    out_path = tmp_path / "replay.out"
    with out_path.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "exporter", "replay", str(pcap), "--port", str(PORT)],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
    peak_mb = usage.ru_maxrss / 1024
    stdout = out_path.read_text()
    assert proc.returncode == 0, stdout[-2000:]
    print(f"flood replay: peak RSS {peak_mb:.0f} MB")
    samples = {}
    routes = set()
    for family in text_string_to_metric_families(stdout):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
            if sample.name == "http_server_request_duration_seconds_count":
                routes.add(sample.labels["http_route"])
    assert samples[("ebpf_slo_exporter_exchanges_total", ())] == CONNECTIONS
    assert samples[("ebpf_slo_exporter_flows_evicted_total", (("reason", "capacity"),))] == CONNECTIONS - 65536
    assert samples[("ebpf_slo_exporter_flows_evicted_total", (("reason", "idle"),))] == 0
    assert samples[("ebpf_slo_exporter_route_overflow_total", ())] == CONNECTIONS - 100
    assert len(routes) == 101 and "/{overflow}" in routes
    overflow = {("http_request_method", "GET"), ("http_response_status_code", "200"), ("http_route", "/{overflow}"),
                ("server_port", str(PORT))}
    [overflowed] = [value for (name, labels), value in samples.items()
                    if name == "http_server_request_duration_seconds_count" and overflow <= set(labels)]
    assert overflowed == CONNECTIONS - 100
    assert samples[("ebpf_slo_exporter_requests_without_response_total", ())] == 0
    assert peak_mb < FLOOD_RSS_BOUND_MB, f"peak RSS {peak_mb:.0f} MB"
