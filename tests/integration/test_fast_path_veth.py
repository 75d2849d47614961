"""Browser-sized request heads behind a 1500-byte MTU stay on the kernel path, counted exactly.

A container's traffic crosses a veth with MTU 1500: a 2 KB request head is two TCP segments
(MSS 1448). Here nginx serves in one network namespace and a client in another sends ~2 KB
heads (a 1.6 KB cookie, browser headers) to paths with random UUIDs and hex hashes; the
exporter captures the server's veth (host end) with the fast path on. The client's interface
segments in software (gso_max_segs 1), as a NIC without TSO does: with TSO a veth hands the
packet tap the whole super-packet, and no head is split at all.

The oracle is nginx's own access log (`$request_method $status $uri`): per (method, status,
route) the exporter's counts must equal it exactly, every request must have been completed
in the kernel (fast_path_exchanges_total), and every one of them must have had its head split
(fast_path_split_heads_total), so that the test proves what it claims.

Everything created here (namespaces esxnode-<tag>-*, links esxn<tag>*) is deleted at the end.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import ExporterProcess, counts_by_key, scrape, self_metric
from tests.integration.nginx_conf import nginx_config
from tests.integration.node_topology import Node, Pod

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces and BPF")

PORT = 8080
TAG = f"{(os.getpid() + 500) % 1000:03d}"
SUBNET = 20 + (os.getpid() + 100) % 200
CONNECTIONS, PER_CONNECTION = 4, 60

_NGINX_SERVER = """
listen 0.0.0.0:{port};
location = /ready {{ access_log off; return 200 "ready"; }}
location ~ "0$" {{ return 500 "error"; }}
location /api/orders/ {{ return 200 "ok"; }}
location /blobs/ {{ return 200 "blob"; }}
"""

# A browser's head (user agent, accept lists, trace context, a 1.6 KB cookie) and a small body
# written with it in one send, as browsers and curl do (Python's http.client writes a body
# apart: nginx's `return` would then answer before it arrives, which the kernel leaves to user
# space as request_body).
_CLIENT = """
import http.client, random, socket, sys, uuid
host, port, per_connection, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
cookie = "; ".join("c%d=%016x" % (i, rng.getrandbits(64)) for i in range(70))
fields = (f"Host: {host}:{port}\\r\\n"
          "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0\\r\\n"
          "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\\r\\n"
          "Accept-Language: en-GB,en-US;q=0.9,en;q=0.8\\r\\n"
          "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\\r\\n"
          f"Cookie: {cookie}\\r\\n")
sock = socket.create_connection((host, port), timeout=10)
for i in range(per_connection):
    if i % 3 == 0:
        method, path, body = "GET", "/blobs/%040x" % rng.getrandbits(160), b""
    else:
        method, body = ("POST", b"q" * 10) if i % 3 == 1 else ("GET", b"")
        path = "/api/orders/" + str(uuid.UUID(int=rng.getrandbits(128)))
    length = f"Content-Length: {len(body)}\\r\\n" if body else ""
    sock.sendall(f"{method} {path} HTTP/1.1\\r\\n{fields}{length}\\r\\n".encode() + body)
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
sock.close()
"""


@pytest.fixture
def node() -> Iterator[Node]:
    built = Node(TAG, SUBNET).up()
    try:
        yield built
    finally:
        built.close()


def _nginx(node: Node, pod: Pod, root: Path) -> subprocess.Popen[bytes]:
    (root / "tmp").mkdir(parents=True)
    conf = root / "nginx.conf"
    conf.write_text(nginx_config(root, log_format="$request_method $status $uri", user_root=True,
                                 worker_connections=256, server=_NGINX_SERVER.format(port=PORT)))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    server = subprocess.Popen(pod.wrap([nginx, "-p", str(root), "-c", str(conf)]))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = node.in_pod(pod, "curl", "-sf", f"http://127.0.0.1:{PORT}/ready", timeout=5)
        if probe.stdout == "ready":
            return server
        time.sleep(0.1)
    server.terminate()
    raise AssertionError(f"nginx did not start: {(root / 'error.log').read_text(errors='replace')[-300:]}")


def _logged(log: Path) -> collections.Counter[tuple[str, str, str]]:
    """nginx's lines per (method, status, route), the route derived here: the last segment (the id) is `{id}`."""
    out: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for line in log.read_text().splitlines():
        method, status, uri = line.split(" ", 2)
        prefix = uri[:uri.rindex("/") + 1]
        out[(method, status, prefix + "{id}")] += 1
    return out


@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(), reason="needs nginx")
def test_two_kilobyte_heads_over_a_1500_mtu_veth_stay_in_the_kernel(node: Node, tmp_path: Path) -> None:
    server_pod, client_pod = node.add_pod("a", 1), node.add_pod("c", 3)
    subprocess.run(["ip", "-n", client_pod.name, "link", "set", "eth0", "gso_max_segs", "1"], check=True)
    mtu = subprocess.run(["ip", "-n", server_pod.name, "-o", "link", "show", "eth0"], capture_output=True,
                         text=True, check=True).stdout
    assert " mtu 1500 " in mtu
    nginx = _nginx(node, server_pod, tmp_path / "nginx")
    exporter = ExporterProcess("--interface", server_pod.link, "--port", str(PORT), "--fast-path").start(timeout=120)
    try:
        clients = [subprocess.Popen(client_pod.wrap([sys.executable, "-c", _CLIENT, server_pod.address, str(PORT),
                                                     str(PER_CONNECTION), str(random.randrange(1 << 30))]))
                   for _ in range(CONNECTIONS)]
        assert all(client.wait(timeout=60) == 0 for client in clients)
        total = CONNECTIONS * PER_CONNECTION
        logged = _logged(tmp_path / "nginx" / "access.log")
        assert sum(logged.values()) == total
        assert {status for _, status, _ in logged} == {"200", "500"}  # a hash or a UUID ends in 0 at times
        deadline = time.monotonic() + 15
        samples = scrape(exporter.base + "/metrics")
        while counts_by_key(samples, PORT) != logged and time.monotonic() < deadline:
            time.sleep(0.3)
            samples = scrape(exporter.base + "/metrics")
    finally:
        exporter.stop()
        nginx.terminate()
        nginx.wait(timeout=10)
    assert counts_by_key(samples, PORT) == logged
    assert self_metric(samples, "fast_path_exchanges_total") == total
    assert self_metric(samples, "fast_path_split_heads_total") == total  # every head came in two segments
    handovers = sum(value for (name, _), value in samples.items()
                    if name == "ebpf_slo_exporter_fast_path_handovers_total")
    assert handovers == 0
    assert self_metric(samples, "kernel_drops_total") == 0
