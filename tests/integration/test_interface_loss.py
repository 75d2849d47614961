"""The capture's interface goes down, comes back, is deleted and created again.

Two network namespaces made here, joined by a veth pair: the exporter runs in the first
(`ip netns exec`), capturing on its end of the pair; an HTTP server runs in the second.
Clients in the first namespace make requests across the pair. Checked at each step:
/healthz (503 with the reason while detached), the self-metrics (filter_attached,
capture_detached_total, capture_reattached_total), that /metrics keeps serving, the log
lines, and exact request counts after each reattach.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import REPO

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces and BPF")

SUFFIX = f"{os.getpid() % 100000}"
NS_EXP, NS_SRV = f"eslo-exp-{SUFFIX}", f"eslo-srv-{SUFFIX}"
IF_EXP, IF_SRV = f"esx{SUFFIX}", f"ess{SUFFIX}"
ADDR_EXP, ADDR_SRV = "10.213.77.1", "10.213.77.2"
PORT, LISTEN = 8080, 9640


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, check=check)


def in_ns(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *args, check=check)


def make_pair() -> None:
    sh("ip", "link", "add", IF_EXP, "netns", NS_EXP, "type", "veth", "peer", "name", IF_SRV, "netns", NS_SRV)
    sh("ip", "-n", NS_EXP, "addr", "add", f"{ADDR_EXP}/30", "dev", IF_EXP)
    sh("ip", "-n", NS_SRV, "addr", "add", f"{ADDR_SRV}/30", "dev", IF_SRV)
    sh("ip", "-n", NS_EXP, "link", "set", IF_EXP, "up")
    sh("ip", "-n", NS_SRV, "link", "set", IF_SRV, "up")


@pytest.fixture
def namespaces() -> Iterator[None]:
    for ns in (NS_EXP, NS_SRV):
        sh("ip", "netns", "del", ns, check=False)
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    make_pair()
    server = subprocess.Popen(["ip", "netns", "exec", NS_SRV, sys.executable, "-m", "http.server", str(PORT),
                               "--bind", ADDR_SRV], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        server.terminate()
        server.wait(10)
        for ns in (NS_EXP, NS_SRV):
            sh("ip", "netns", "del", ns, check=False)


def get(path: str) -> tuple[int, str]:
    """GET on the exporter, from inside its namespace: (status, body)."""
    result = in_ns(NS_EXP, "curl", "-s", "-m", "5", "-w", "\n%{http_code}", f"http://127.0.0.1:{LISTEN}{path}",
                   check=False)
    body, _, code = result.stdout.rpartition("\n")
    return int(code or 0), body


def requests(count: int) -> None:
    for _ in range(count):
        result = in_ns(NS_EXP, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5",
                       f"http://{ADDR_SRV}:{PORT}/")
        assert result.stdout == "200"


def metrics() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get("/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def self_value(name: str) -> float:
    return metrics().get((f"ebpf_slo_exporter_{name}", ()), -1.0)


def served() -> float:
    wanted = {("http_request_method", "GET"), ("http_response_status_code", "200"), ("http_route", "/"),
              ("server_port", str(PORT))}
    # Summed over the labels not named here (scheme, protocol version, the server's identity).
    return sum(value for (name, labels), value in metrics().items()
               if name == "http_server_request_duration_seconds_count" and wanted <= set(labels))


def wait_for(what: str, condition: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_interface_down_deleted_and_back(namespaces: None) -> None:
    exporter = subprocess.Popen(
        ["ip", "netns", "exec", NS_EXP, sys.executable, "-m", "exporter", "run", "-i", IF_EXP, "-p", str(PORT),
         "--listen", f"127.0.0.1:{LISTEN}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for("the first attach", lambda: get("/healthz")[0] == 200, 60)
        requests(3)
        wait_for("3 requests counted", lambda: served() == 3)

        sh("ip", "-n", NS_EXP, "link", "set", IF_EXP, "down")
        wait_for("503 while down", lambda: get("/healthz")[0] == 503)
        assert get("/healthz")[1] == (f"not ready: capture detached: interface {IF_EXP} is down; "
                                      "retrying every 1s\n")
        assert self_value("filter_attached") == 0
        assert self_value("capture_detached_total") == 1
        assert served() == 3  # /metrics keeps serving what was counted

        sh("ip", "-n", NS_EXP, "link", "set", IF_EXP, "up")
        wait_for("reattached after up", lambda: get("/healthz")[0] == 200, 60)
        assert self_value("capture_reattached_total") == 1
        assert self_value("filter_attached") == 1
        requests(2)
        wait_for("5 requests counted", lambda: served() == 5)

        sh("ip", "-n", NS_EXP, "link", "del", IF_EXP)
        wait_for("503 when deleted", lambda: get("/healthz")[0] == 503)
        assert get("/healthz")[1] == (f"not ready: capture detached: interface {IF_EXP} was deleted; "
                                      "retrying every 1s\n")
        assert self_value("capture_detached_total") == 2
        assert served() == 5
        time.sleep(2.5)  # a few reattach attempts find nothing
        assert get("/healthz")[0] == 503

        make_pair()
        wait_for("reattached after re-creation", lambda: get("/healthz")[0] == 200, 60)
        assert self_value("capture_reattached_total") == 2
        requests(4)
        wait_for("9 requests counted", lambda: served() == 9)
        time.sleep(0.5)
        assert served() == 9
        assert self_value("capture_detached_total") == 2
    finally:
        exporter.terminate()
        output = exporter.communicate(timeout=20)[0]
    assert exporter.returncode == 0, output
    assert f"capture detached: interface {IF_EXP} is down; /metrics keeps serving" in output
    assert f"capture detached: interface {IF_EXP} was deleted; /metrics keeps serving" in output
    assert output.count(f"capture reattached to {IF_EXP}") == 2
