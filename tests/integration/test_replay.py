"""A pcap of a live run, replayed through `replay`, gives the same histograms as the live run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.harness import REPO, ExporterProcess, logging_server
from tests.integration.test_exporter_lo import ROUTES, mixed_traffic, raw_exchange

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to capture")

HTTP_FAMILIES = ("http_server_request_duration_seconds", "http_server_request_body_size_bytes",
                 "http_server_response_body_size_bytes")


def http_samples(text: str) -> dict[str, float]:
    """HTTP histogram samples by name and labels, without the identity labels: a pcap file does
    not say which process answered, so replay leaves them empty while live capture fills them."""
    from prometheus_client.parser import text_string_to_metric_families

    from exporter.identity import IDENTITY_LABEL_NAMES

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in HTTP_FAMILIES:
            for sample in family.samples:
                labels = sorted((k, v) for k, v in sample.labels.items() if k not in IDENTITY_LABEL_NAMES)
                key = f"{sample.name}{labels}"
                assert key not in out, f"two servers in one run: {key}"
                out[key] = sample.value
    return out


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_replay_matches_live(tmp_path: Path, fmt: str) -> None:
    capture = tmp_path / f"run.{fmt}"
    with logging_server("127.0.0.1") as server:
        tshark = subprocess.Popen(
            ["tshark", "-q", "-B", "64", "-i", "lo", "-f", f"tcp port {server.port}", "-F", fmt, "-w", str(capture)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            assert tshark.stderr is not None
            # tshark says "Capturing on 'Loopback: lo'" once the capture filter is live.
            deadline = time.monotonic() + 20
            while "Capturing on" not in tshark.stderr.readline() and time.monotonic() < deadline:
                pass
            # The user-space path, as replay runs: it times packets by their capture timestamps, as the
            # file does. The fast path clocks exchanges when the filter runs, which trails the capture
            # stamp by the backlog wait (test_fast_path_durations bounds that, stragglers included).
            with ExporterProcess("--interface", "lo", "--port", str(server.port), "--no-fast-path",
                                 *ROUTES) as exporter:
                sent = mixed_traffic("127.0.0.1", server.port)
                raw_exchange("127.0.0.1", server.port,
                             b"".join(b"GET /status/%d HTTP/1.1\r\nHost: x\r\n\r\n" % c for c in (200, 404, 500)),
                             responses=3)
                exporter.wait_for_exchanges(sent + 3)
                with __import__("urllib.request").request.urlopen(exporter.base + "/metrics") as response:
                    live = http_samples(response.read().decode())
            time.sleep(0.5)
        finally:
            tshark.terminate()
            tshark.wait(10)
            if tshark.stderr is not None:
                tshark.stderr.close()
    replayed = subprocess.run(
        [sys.executable, "-m", "exporter", "replay", str(capture), "--port", str(server.port), *ROUTES],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    )
    replayed_samples = http_samples(replayed.stdout)
    assert replayed_samples.keys() == live.keys()
    for key, value in live.items():
        if "duration_seconds_sum" in key:
            # Both are kernel timestamps of the same packets; the file keeps microseconds.
            assert replayed_samples[key] == pytest.approx(value, abs=2e-6 * 30), key
        else:
            assert replayed_samples[key] == value, key
    assert sum(v for k, v in live.items() if k.startswith("http_server_request_duration_seconds_count")) == sent + 3


def test_replay_of_garbage_is_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"this is not a capture file at all")
    result = subprocess.run([sys.executable, "-m", "exporter", "replay", str(junk), "--port", "80"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
