"""The identity capabilities the manifests grant, measured: the exporter as root with exactly
preflight.MANIFEST_CAPABILITIES names a server run by another user; without CAP_DAC_READ_SEARCH
it cannot read that server's /proc/<pid>/fd, and says so with empty labels and a counted reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.preflight import MANIFEST_CAPABILITIES
from tests.integration.harness import REPO, ExporterProcess, free_port, self_metric

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start processes with chosen capabilities")

NOBODY = 65534
NAME = "nobodysrv"


def _setpriv(capabilities: tuple[str, ...]) -> list[str]:
    caps = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in capabilities)])
    return ["setpriv", f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set={caps}"]


@pytest.fixture
def server() -> Iterator[int]:
    """ns_server as `nobody` on 127.0.0.1 (its /proc/<pid>/fd is then mode 0500, owned by nobody)."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="esxnode-ident-"))
    workdir.chmod(0o777)
    proc = subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-m",
         "tests.integration.ns_server", str(port), str(workdir / "access.log"), NAME],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + 15
        while subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/"]).returncode != 0:
            assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(workdir)


def _names_seen(capabilities: tuple[str, ...], port: int) -> tuple[set[str], float]:
    exporter = ExporterProcess("--interface", "lo", "--port", str(port), "--no-fast-path",
                               prefix=_setpriv(capabilities)).start(timeout=120)
    try:
        for _ in range(3):
            subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/x"], check=True)
        samples = exporter.wait_for_exchanges(3)
    finally:
        exporter.stop()
    names = {dict(labels)["service_name"] for (name, labels), _ in samples.items()
             if name == "http_server_request_duration_seconds_count"}
    return names, self_metric(samples, "identity_failures_total", reason="permission_denied")


def test_the_manifest_capabilities_name_another_users_server(server: int) -> None:
    names, denied = _names_seen(MANIFEST_CAPABILITIES, server)
    assert names == {NAME} and denied == 0


def test_without_cap_dac_read_search_the_labels_stay_empty_and_the_reason_is_counted(server: int) -> None:
    fewer = tuple(c for c in MANIFEST_CAPABILITIES if c != "CAP_DAC_READ_SEARCH")
    names, denied = _names_seen(fewer, server)
    assert names == {""} and denied >= 1
