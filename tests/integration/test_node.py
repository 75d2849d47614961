"""Node-wide capture on a small "node" built here: pods as network namespaces behind a bridge.

Two pods serve on the SAME port (8080) with the SAME process name, so only the identity
labels keep them apart. Clients: a third pod (its requests cross two captured interfaces:
its own veth, received, and the server's veth, sent) and the host (the bridge, sent, and the
server's veth, sent). The oracle is each server's own access log: per (server, method, status,
route), the exporter's count must equal it exactly. A pod created after the exporter started
is picked up without a restart. One pod runs in a cgroup laid out as the kubelet's systemd
driver makes them, with a /var/log/pods tree beside it, so the k8s labels resolve from the node
alone as they would on a real one.

Everything created here (namespaces esxnode-<tag>-*, links esxn<tag>*, the cgroup
esxnode-<tag>/ in the unified hierarchy) is deleted at the end.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.core.routes import RouteMapper
from tests.integration.harness import ExporterProcess, scrape, self_metric
from tests.integration.node_topology import Node, Pod

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces and BPF")

PORT = 8080
TAG = f"{os.getpid() % 1000:03d}"
SUBNET = 20 + os.getpid() % 200
NAME = "websrv"  # every server's process name: only the instance labels tell them apart
UID = "5c4e1d2a-8b7f-4e3a-9d1c-0a1b2c3d4e5f"
CID = "3f2a" + "0123456789abcdef" * 3 + "0123456789ab"
UNIFIED = Path("/sys/fs/cgroup/unified") if Path("/sys/fs/cgroup/unified/cgroup.procs").exists() \
    else Path("/sys/fs/cgroup")
CGROUP = UNIFIED / f"esxnode-{TAG}"
POD_CGROUP = CGROUP / "kubepods.slice" / "kubepods-burstable.slice" / \
    f"kubepods-burstable-pod{UID.replace('-', '_')}.slice" / f"cri-containerd-{CID}.scope"
PATHS = ("/", "/x", "/status/404", "/status/503")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
Key = tuple[str, str, str, str]  # service_instance_id, method, status, route


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    built = Node(TAG, SUBNET).up()
    try:
        yield built
    finally:
        built.close()
        for directory in sorted(CGROUP.rglob("*"), key=lambda p: len(p.parts), reverse=True) if CGROUP.exists() else []:
            if directory.is_dir():
                directory.rmdir()
        if CGROUP.exists():
            CGROUP.rmdir()


def _serve(node: Node, pod: Pod, tmp_path: Path) -> None:
    node.serve(pod, PORT, tmp_path / f"{pod.name}.log", name=NAME)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        probe = node.in_pod(pod, sys.executable, "-c",
                            f"import socket; socket.create_connection(('127.0.0.1', {PORT}), 1)", timeout=10)
        if probe.returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"server in {pod.name} did not start")


_CLIENT = f"""
import http.client, sys
host, paths, rounds = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
conn = http.client.HTTPConnection(host, {PORT}, timeout=10)
for _ in range(rounds):
    for path in paths:
        conn.request("POST" if path == "/x" else "GET", path, body=b"q" * 10 if path == "/x" else None)
        conn.getresponse().read()
conn.close()
"""


def _requests(node: Node, client: Pod | None, server: Pod, rounds: int) -> None:
    argv = [sys.executable, "-c", _CLIENT, server.address, ",".join(PATHS), str(rounds)]
    done = node.in_pod(client, *argv) if client is not None else subprocess.run(
        argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _instance(pod: Pod) -> str:
    assert pod.server is not None
    return f"{os.readlink(f'/proc/{pod.server.pid}/ns/net')}/0.0.0.0"


def _logged(pod: Pod, instance: str) -> collections.Counter[Key]:
    assert pod.log is not None
    routes = RouteMapper(())
    out: collections.Counter[Key] = collections.Counter()
    for line in pod.log.read_text().splitlines():
        method, status, path = line.split(" ", 2)
        out[(instance, method, status, routes.route(PORT, path))] += 1
    return out


def _counted(samples: Samples) -> collections.Counter[Key]:
    out: collections.Counter[Key] = collections.Counter()
    for (name, labels), value in samples.items():
        if name == "http_server_request_duration_seconds_count" and value:
            label = dict(labels)
            out[(label["service_instance_id"], label["http_request_method"], label["http_response_status_code"],
                 label["http_route"])] += int(value)
    return out


def _wait_counts(exporter: ExporterProcess, expected: collections.Counter[Key], timeout: float = 15) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(exporter.base + "/metrics")
        if _counted(samples) == expected or time.monotonic() > deadline:
            return samples
        time.sleep(0.3)


def _wait_attached(exporter: ExporterProcess, interface: str, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if self_metric(scrape(exporter.base + "/metrics"), "interface_attached", interface=interface) == 1:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"{interface} not attached within {timeout} s")


def _series_labels(samples: Samples, instance: str) -> dict[str, str]:
    for (name, labels), _ in samples.items():
        label = dict(labels)
        if name == "http_server_request_duration_seconds_count" and label["service_instance_id"] == instance:
            return {k: v for k, v in label.items() if k.startswith(("service_", "k8s_", "container_"))}
    raise AssertionError(f"no series for {instance}")


def test_any_interface_names_each_server_and_counts_each_exchange_once(node: Node, tmp_path: Path) -> None:
    a, b, c = node.add_pod("a", 1), node.add_pod("b", 2), node.add_pod("c", 3)
    for pod in (a, b):
        _serve(node, pod, tmp_path)
    # Pod a runs as a Kubernetes container would: cgroup by the systemd driver, kubelet log dirs.
    POD_CGROUP.mkdir(parents=True)
    assert a.server is not None
    (POD_CGROUP / "cgroup.procs").write_text(str(a.server.pid))
    pod_logs = tmp_path / "log" / "pods"
    (pod_logs / f"payments_checkout-7d9f8b6c5-x2x4z_{UID}" / "checkout").mkdir(parents=True)

    exporter = ExporterProcess("--interface", "any", "--port", str(PORT), "--no-fast-path",
                               "--pod-logs", str(pod_logs), "--instance-grace", "1").start(timeout=120)
    try:
        _requests(node, c, a, 7)  # pod -> pod: client veth (received) and server veth (sent)
        _requests(node, c, b, 5)
        _requests(node, None, a, 3)  # host -> pod: bridge (sent) and server veth (sent)
        _requests(node, None, b, 4)
        # A pod that appears now is captured without a restart.
        d = node.add_pod("d", 4)
        _serve(node, d, tmp_path)
        _wait_attached(exporter, d.link, 2.5)
        _requests(node, c, d, 2)

        instance_a, instance_b, instance_d = UID, _instance(b), _instance(d)
        expected = _logged(a, instance_a) + _logged(b, instance_b) + _logged(d, instance_d)
        assert sum(expected.values()) == (7 + 3 + 5 + 4 + 2) * len(PATHS)
        samples = _wait_counts(exporter, expected)
        assert _counted(samples) == expected
        assert _series_labels(samples, instance_a) == {
            "service_name": "checkout", "service_instance_id": UID, "k8s_namespace_name": "payments",
            "k8s_pod_name": "checkout-7d9f8b6c5-x2x4z", "k8s_pod_uid": UID, "container_id": CID,
        }
        assert _series_labels(samples, instance_b) == {
            "service_name": NAME, "service_instance_id": instance_b, "k8s_namespace_name": "",
            "k8s_pod_name": "", "k8s_pod_uid": "", "container_id": "",
        }
        assert instance_b != instance_d and _series_labels(samples, instance_d)["service_name"] == NAME
        info = {dict(labels)["service_instance_id"]: dict(labels) for (name, labels), value in samples.items()
                if name == "ebpf_slo_exporter_target_info" and value == 1}
        assert info[UID]["uid"] == UID and info[UID]["k8s_pod_name"] == "checkout-7d9f8b6c5-x2x4z"
        assert {instance_b, instance_d} <= set(info)
        # Every copy beyond the first interface died in the kernel: one per kept segment here.
        assert self_metric(samples, "filter_packets_total", verdict="dropped_duplicate") >= \
            self_metric(samples, "filter_packets_total", verdict="kept")
        assert self_metric(samples, "decode_errors_total") == 0
        # Pod d's server goes away: after the grace period its series and target_info go too.
        assert d.server is not None
        d.server.terminate()
        d.server.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(dict(labels).get("service_instance_id") == instance_d for (_, labels) in samples):
            assert time.monotonic() < deadline, "the gone server's series are still on /metrics"
            time.sleep(0.3)
            samples = scrape(exporter.base + "/metrics")
        assert _counted(samples) == _logged(a, instance_a) + _logged(b, instance_b)
        assert self_metric(samples, "identity_instances_forgotten_total") == len(_logged(d, instance_d))
    finally:
        exporter.stop()


def test_a_glob_waits_for_its_interfaces_and_the_fast_path_counts_once(node: Node, tmp_path: Path) -> None:
    glob = f"esxn{TAG}*"
    exporter = ExporterProcess("--interface", glob, "--port", str(PORT), "--fast-path").start(timeout=120)
    try:
        with urllib.request.urlopen(exporter.base + "/healthz", timeout=5) as reply:
            health = reply.read().decode()
        # Only the bridge exists yet: it matches; a second pattern that matches nothing waits.
        assert reply.status == 200 and node.bridge in health
        a, c = node.add_pod("a", 1), node.add_pod("c", 3)
        _serve(node, a, tmp_path)
        waited = _wait_attached(exporter, a.link, 2.5)
        _wait_attached(exporter, c.link, 2.5)
        _requests(node, c, a, 20)
        _requests(node, None, a, 10)
        logged = collections.Counter({key[1:]: n for key, n in _logged(a, "").items()})
        deadline = time.monotonic() + 15
        while True:
            samples = scrape(exporter.base + "/metrics")
            totals: collections.Counter[tuple[str, str, str]] = collections.Counter()
            for (_i, method, status, route), n in _counted(samples).items():
                totals[(method, status, route)] += n
            if totals == logged or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert totals == logged and sum(logged.values()) == 30 * len(PATHS)
        assert self_metric(samples, "filter_packets_total", verdict="consumed_fast_path") > 0
        assert self_metric(samples, "filter_packets_total", verdict="dropped_duplicate") > 0
        assert self_metric(samples, "interface_attached", interface="lo") == 0  # not matched
        # The pod goes away: its veth is dropped from the set, the capture carries on.
        subprocess.run(["ip", "link", "del", a.link], check=True)
        deadline = time.monotonic() + 2.5
        while self_metric(scrape(exporter.base + "/metrics"), "interface_attached", interface=a.link) == 1:
            assert time.monotonic() < deadline, f"{a.link} still listed after it was deleted"
            time.sleep(0.1)
        assert waited < 2.5
    finally:
        exporter.stop()


def test_a_pattern_matching_nothing_yet_is_allowed_and_said_on_healthz(tmp_path: Path) -> None:
    exporter = ExporterProcess("--interface", f"esxn{TAG}none*", "--interface", "lo",
                               "--port", str(PORT)).start(timeout=120)
    try:
        with urllib.request.urlopen(exporter.base + "/healthz", timeout=5) as reply:
            text = reply.read().decode()
        assert reply.status == 200
        assert f"waiting for esxn{TAG}none* (no interface matches yet)" in text and "lo" in text
    finally:
        exporter.stop()


def test_cleanup_leaves_nothing_behind() -> None:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert f"esxn{TAG}" not in links
    assert not any(ns.startswith(f"esxnode-{TAG}-") for ns in
                   subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split())
    assert not CGROUP.exists()
