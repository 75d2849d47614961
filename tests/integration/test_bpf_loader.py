"""The filter is compiled in a helper process and worked over raw bpf(2): the real kernel, no BCC here.

- The exporter process never maps LLVM, clang or libbcc, and still counts exactly.
- Map writes through bpfsys read back byte for byte as the C structs lay them out.
- A compile error, and a loader that dies before answering, are one-line CaptureErrors.
"""

from __future__ import annotations

import http.client
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.capture import bpf as bpf_module
from exporter.capture.bpf import MAX_DURATION_BOUNDS, MAX_SIZE_BOUNDS, HttpFilter, find_source
from exporter.capture.bpfsys import possible_cpus
from exporter.errors import CaptureError
from tests.integration.harness import ExporterProcess, counts_by_key, logging_server

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF: needs root")

U64_MAX = (1 << 64) - 1


@pytest.fixture(scope="module")
def bpf_filter() -> Iterator[HttpFilter]:
    f = HttpFilter([8080], loopback=True, fast_path=True, histogram_bounds=((0.005, 0.25, 1.5), (100, 1e6)))
    yield f
    f.close()


def test_ports_round_trip(bpf_filter: HttpFilter) -> None:
    def in_kernel(port: int) -> bytes | None:
        return bpf_filter._ports.lookup(struct.pack("=I", port))

    bpf_filter.set_ports([80, 443, 65535])
    assert bpf_filter.ports() == {80, 443, 65535}
    assert [in_kernel(p) for p in (80, 443, 65535, 8080, 1)] == [b"\x01", b"\x01", b"\x01", b"\x00", b"\x00"]
    bpf_filter.set_ports([8080])
    assert bpf_filter.ports() == {8080}
    assert [in_kernel(p) for p in (80, 443, 65535, 8080)] == [b"\x00", b"\x00", b"\x00", b"\x01"]


def test_bounds_are_written_as_struct_hist_bounds(bpf_filter: HttpFilter) -> None:
    raw = bpf_filter._bounds.lookup(struct.pack("=I", 0))
    assert raw is not None
    values = struct.unpack(f"={MAX_DURATION_BOUNDS}Q{MAX_SIZE_BOUNDS}QII", raw)
    durations, sizes = values[:MAX_DURATION_BOUNDS], values[MAX_DURATION_BOUNDS:-2]
    assert durations[:3] == (5_000_000, 250_000_000, 1_500_000_000)
    assert set(durations[3:]) == {U64_MAX}
    assert sizes[:2] == (100, 1_000_000)
    assert set(sizes[2:]) == {U64_MAX}
    assert values[-2:] == (3, 2)


def test_body_skip_set_and_forget(bpf_filter: HttpFilter) -> None:
    skip = bpf_filter._skip
    key = bpf_filter._skip_key("127.0.0.1", 40000, "::1", 8080)
    assert key[:16] == b"\0" * 10 + b"\xff\xff" + bytes([127, 0, 0, 1])
    assert key[16:32] == b"\0" * 15 + b"\x01"
    bpf_filter.skip_body("127.0.0.1", 40000, "::1", 8080, (1 << 32) - 5, (1 << 32) + 7)
    assert skip.lookup(key) == struct.pack("=II", (1 << 32) - 5, 7)  # seq space wraps at 2**32
    assert key in list(skip.keys())
    bpf_filter.forget_skip("127.0.0.1", 40000, "::1", 8080)
    assert skip.lookup(key) is None
    bpf_filter.forget_skip("127.0.0.1", 40000, "::1", 8080)  # a second forget is not an error
    assert not skip.delete(key)


def test_per_cpu_maps_and_capacity(bpf_filter: HttpFilter) -> None:
    assert bpf_filter._counters.ncpus == possible_cpus() >= 1
    assert bpf_filter._counters.value_stride == 8
    assert bpf_filter.flow_state_capacity() == 65536
    assert set(bpf_filter.counters()) == set(bpf_module.COUNTER_NAMES)
    assert bpf_filter.drain_handovers() == []
    assert bpf_filter.read_aggregates() == []
    assert bpf_filter.load_report.compile_s > 0
    assert bpf_filter.load_report.helper_peak_rss_kb > 0


def test_compile_error_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text(find_source().read_text() + "\nint this is not C;\n")
    one_line = r"^BPF program .*broken\.c failed to compile: .*\(see clang output above\)$"
    with pytest.raises(CaptureError, match=one_line):
        HttpFilter([8080], src_file=broken)


def test_loader_that_dies_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # An interpreter that exits at once stands in for a loader that crashed before answering.
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\nexit 3\n")
    fake_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    with pytest.raises(CaptureError, match=r"^the BPF loader process .* exited with status 3 before answering"):
        HttpFilter([8080])


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "user-space"])
def test_exporter_maps_no_compiler_and_counts(fast_path: bool) -> None:
    with logging_server("127.0.0.1") as server, ExporterProcess(
        "--interface", "lo", "--port", str(server.port), *([] if fast_path else ["--no-fast-path"])
    ) as exporter:
        assert exporter.proc is not None
        libraries = Path(f"/proc/{exporter.proc.pid}/maps").read_text()
        for library in ("libLLVM", "libclang", "libbcc"):
            assert library not in libraries
        conn = http.client.HTTPConnection("127.0.0.1", server.port)
        for _ in range(25):
            conn.request("GET", "/ok")
            conn.getresponse().read()
        conn.close()
        samples = exporter.wait_for_exchanges(25)
    assert server.log == {("GET", "200", "/ok"): 25}
    assert counts_by_key(samples, server.port) == server.log
