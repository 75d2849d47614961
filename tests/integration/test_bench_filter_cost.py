"""bench/filter_cost.py on the real kernel: a small written capture through the loaded filter."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench.filter_cost import main
from tests.unit.test_bench_replay_cost import PORT, write_capture

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF: needs root")


def test_every_exchange_is_completed_in_the_kernel_and_timed_per_shape(tmp_path: Path) -> None:
    path = tmp_path / "h1.pcap"
    write_capture(path, connections=3, exchanges_each=4)
    result = CliRunner().invoke(main, [str(path), "--port", str(PORT), "--passes", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == (f"h1.pcap: 42 frames on port {PORT} (12 client data, 12 server data, 18 no payload); "
                        "least of 1 passes")
    # Simple requests answered with Content-Length: all 12 exchanges end in http_agg, and the
    # bare ACKs and the FINs of idle connections die in the kernel too: nothing is passed up.
    assert re.fullmatch(r"this tree +\d+ +\d+ +\d+ +\d+ +12 +0", lines[2]), lines[2]


def test_tls_marks_every_connection_so_its_payload_dies_in_the_kernel(tmp_path: Path) -> None:
    path = tmp_path / "h1.pcap"
    write_capture(path, connections=3, exchanges_each=4)
    result = CliRunner().invoke(main, [str(path), "--port", str(PORT), "--passes", "1", "--tls"])
    assert result.exit_code == 0, result.output
    # Every data segment dropped as TLS (no exchange in the kernel); only the FINs still go up.
    assert re.fullmatch(r"this tree +\d+ +\d+ +\d+ +n/a +0 +6", result.output.splitlines()[2]), result.output
