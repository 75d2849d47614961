"""A small node for the `node` scenario and tests/integration/test_node.py: network namespaces
as pods, each with a veth pair whose host end is enslaved to one Linux bridge.

Every name starts with a caller-chosen tag (namespaces `esxnode-<tag>-<pod>`, links
`esxn<tag><pod>` and the bridge `esxn<tag>br`: a link name has at most 15 characters), so
runs by other people on the same machine never clash with it, and `close()` deletes exactly
what was created. Addresses stay inside 10.231.<subnet>.0/24, on the bridge and in the
namespaces; nothing is routed off the host.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30)


@dataclass
class Pod:
    name: str  # the network namespace
    link: str  # host end of its veth, enslaved to the bridge
    address: str

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """argv run inside this pod's network namespace (same PID: ip execs it)."""
        return ["ip", "netns", "exec", self.name, *argv]


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

    @property
    def link_glob(self) -> str:
        """Matches the bridge and every pod's veth (a --interface pattern)."""
        return f"esxn{self.tag}*"

    def up(self) -> Node:
        self.close()
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.host_address}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        return self

    def add_pod(self, name: str, index: int) -> Pod:
        ns, link = f"esxnode-{self.tag}-{name}", f"esxn{self.tag}{name}"
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

    def close(self) -> None:
        """Delete every link and namespace with this node's tag (its processes are the caller's)."""
        out = sh("ip", "-o", "link", "show", check=False).stdout
        for line in out.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if name.startswith(f"esxn{self.tag}"):
                sh("ip", "link", "del", name, check=False)
        for entry in sh("ip", "netns", "list", check=False).stdout.splitlines():
            ns = entry.split(" ")[0]
            if ns.startswith(f"esxnode-{self.tag}-"):
                sh("ip", "netns", "del", ns, check=False)
        self.pods.clear()
