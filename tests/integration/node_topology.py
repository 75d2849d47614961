"""A small "node" built by the test: network namespaces as pods, veth pairs into a Linux bridge.

Every name starts with a per-run prefix (`esxnode-` for namespaces, `esxn` for links: an
interface name has at most 15 characters), so tests of other areas running on the same machine
never clash with it, and `close()` deletes exactly what was created. Addresses stay inside
10.231.<subnet>.0/24, on the bridge and in the namespaces; nothing is routed off the host.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.harness import REPO


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30)


@dataclass
class Pod:
    name: str  # the namespace: esxnode-<tag>-<name>
    link: str  # host end of its veth, enslaved to the bridge
    address: str
    server: subprocess.Popen[bytes] | None = None
    log: Path | None = None


@dataclass
class Node:
    tag: str
    subnet: int
    bridge: str = ""
    pods: dict[str, Pod] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bridge = f"esxn{self.tag}br"

    @property
    def host_address(self) -> str:
        return f"10.231.{self.subnet}.1"

    def up(self) -> Node:
        self.close()
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.host_address}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        return self

    def add_pod(self, name: str, index: int) -> Pod:
        ns = f"esxnode-{self.tag}-{name}"
        link = f"esxn{self.tag}{name}"
        address = f"10.231.{self.subnet}.{10 + index}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", link, "master", self.bridge)
        sh("ip", "link", "set", link, "up")
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", self.host_address)
        pod = Pod(ns, link, address)
        self.pods[name] = pod
        return pod

    def serve(self, pod: Pod, port: int, log: Path, name: str = "") -> None:
        """The harness' logging HTTP server inside the pod's namespace; `name` its process name."""
        pod.log = log
        argv = ["ip", "netns", "exec", pod.name, sys.executable, "-m", "tests.integration.ns_server",
                str(port), str(log)]
        if name:
            argv.append(name)
        pod.server = subprocess.Popen(argv, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})

    def in_pod(self, pod: Pod, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", pod.name, *argv], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})

    def close(self) -> None:
        for pod in self.pods.values():
            if pod.server is not None and pod.server.poll() is None:
                pod.server.terminate()
                try:
                    pod.server.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pod.server.kill()
                    pod.server.wait()
        out = sh("ip", "-o", "link", "show", check=False).stdout
        for line in out.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if name.startswith(f"esxn{self.tag}"):
                sh("ip", "link", "del", name, check=False)
        for ns in sh("ip", "netns", "list", check=False).stdout.split("\n"):
            ns = ns.split(" ")[0]
            if ns.startswith(f"esxnode-{self.tag}-"):
                sh("ip", "netns", "del", ns, check=False)
        self.pods.clear()
