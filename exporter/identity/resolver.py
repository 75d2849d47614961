"""The edge of identity/: which process answers on (server address, port), and what it is.

From the node alone, no API server:
  listening socket (/proc/<pid>/net/tcp{,6}, read through a process inside each network
  namespace, state 0A) → its inode → the process holding it (/proc/<pid>/fd links
  `socket:[inode]`, searched among that namespace's processes) → its name (/proc/<pid>/comm)
  and cgroup (/proc/<pid>/cgroup) → container id, pod uid (model.parse_cgroup) → namespace and
  pod name (/var/log/pods/<ns>_<pod>_<uid>) and container name (/var/log/containers/
  <pod>_<ns>_<container>-<id>.log, else the pod's only /var/log/pods subdirectory).

A wildcard listener (0.0.0.0, ::) answers for an address only in the namespace that owns it
(/proc/<pid>/net/fib_trie, if_inet6); loopback addresses are looked up in the exporter's own
namespace, the only one whose loopback its packet socket sees.

Results are cached per (address, port): found ones for `ttl_s`, misses for `miss_ttl_s`, at most
`max_entries` (the oldest is evicted and counted). Every failure gives empty labels and a
counted reason, never an exception: a process that exits mid-resolution (`process_gone`), no
listener found (`no_listener`), /proc entries we may not read (`permission_denied`: grant
CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH), a cgroup layout we do not know (`unknown_cgroup_layout`).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from exporter.identity.model import (
    UNKNOWN,
    Identity,
    ServiceOverride,
    instance_id,
    parse_cgroup,
    parse_pod_dir,
)

__all__ = ["REASONS", "ResolvedServer", "Resolver"]

_LISTEN = "0A"
REASONS = ("process_gone", "no_listener", "ambiguous_port", "permission_denied", "unknown_cgroup_layout", "evicted")


@dataclass(frozen=True, slots=True)
class ResolvedServer:
    identity: Identity
    pid: int  # 0 when not found
    container_name: str = ""


def _hex_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order.
    return ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


class Resolver:
    def __init__(
        self,
        *,
        proc: Path = Path("/proc"),
        pod_logs: Path = Path("/var/log/pods"),
        container_logs: Path = Path("/var/log/containers"),
        overrides: Iterable[ServiceOverride] = (),
        max_entries: int = 4096,
        ttl_s: float = 60.0,
        miss_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proc = proc
        self.pod_logs = pod_logs
        self.container_logs = container_logs
        self.overrides = tuple(overrides)
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.miss_ttl_s = miss_ttl_s
        self.clock = clock
        self._cache: OrderedDict[tuple[str, int], tuple[float, ResolvedServer]] = OrderedDict()
        # Every server found, by instance id, until sweep() retires it: what target_info lists
        # and what sweep() checks (a cache entry can expire and be replaced meanwhile).
        self._known: OrderedDict[str, ResolvedServer] = OrderedDict()
        self._lock = threading.Lock()
        self._gone_since: dict[str, float] = {}  # instance id -> when sweep() first found its process gone
        self.failures: Counter[str] = Counter()
        self.resolutions = 0

    # -- the cached answer -------------------------------------------------

    def identify(self, server_ip: str, port: int) -> Identity:
        """The server answering on server_ip:port; server_ip "" for a source that knows only the port
        (then the one listener on that port anywhere on the node, if there is exactly one).

        Thread-safe: the capture thread and a scrape (the fast path's series) both ask.
        """
        with self._lock:
            return self._identify(server_ip, port)

    def _identify(self, server_ip: str, port: int) -> Identity:
        key = (server_ip, port)
        now = self.clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(key)
            return hit[1].identity
        found = self.resolve(server_ip, port)
        self._cache[key] = (now + (self.ttl_s if found.pid else self.miss_ttl_s), found)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
            self.failures["evicted"] += 1
        if found.pid:
            self._known[found.identity.service_instance_id] = found
            self._known.move_to_end(found.identity.service_instance_id)
            while len(self._known) > self.max_entries:
                self._known.popitem(last=False)
                self.failures["evicted"] += 1
        return found.identity

    def servers(self) -> list[ResolvedServer]:
        """Every server found and not retired yet (for the target_info metric)."""
        with self._lock:
            return list(self._known.values())

    def sweep(self, grace_s: float) -> set[str]:
        """Instance ids of servers whose process has been gone for `grace_s`: their series can go.

        Cheap (one stat per known server); they are forgotten here too.
        """
        with self._lock:
            return self._sweep(grace_s)

    def _sweep(self, grace_s: float) -> set[str]:
        now = self.clock()
        gone: set[str] = set()
        for instance, entry in list(self._known.items()):
            if (self.proc / str(entry.pid)).exists():
                self._gone_since.pop(instance, None)
                continue
            since = self._gone_since.setdefault(instance, now)
            if now - since >= grace_s:
                del self._known[instance]
                del self._gone_since[instance]
                gone.add(instance)
        if gone:
            for key, (_, entry) in list(self._cache.items()):
                if entry.identity.service_instance_id in gone:
                    del self._cache[key]
        return gone

    # -- resolution (uncached) ---------------------------------------------

    def resolve(self, server_ip: str, port: int) -> ResolvedServer:
        self.resolutions += 1
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        if server_ip:
            try:
                address = ipaddress.ip_address(server_ip)
            except ValueError:
                self.failures["no_listener"] += 1
                return ResolvedServer(Identity(service_instance_id=server_ip), 0)
        namespaces, denied = self._namespaces()
        if address is not None and address.is_loopback:
            own = self._readlink(self.proc / "self" / "ns" / "net")
            namespaces = {ns: pids for ns, pids in namespaces.items() if ns == own}
        if address is None:
            found = self._only_listener(namespaces, port)
            if found is None:
                return ResolvedServer(UNKNOWN, 0)
        else:
            found = self._find_listener(namespaces, address, port)
        if found is None:
            # Some namespaces we may not look into may hold it.
            self.failures["permission_denied" if denied else "no_listener"] += 1
            return ResolvedServer(self._named(Identity(service_instance_id=server_ip), port, "", "", ""), 0)
        netns, inode, listen = found
        pid = self._socket_owner(namespaces[netns], inode)
        fallback = Identity(service_instance_id=instance_id("", "", netns, listen))
        if pid == 0:
            return ResolvedServer(self._named(fallback, port, "", "", ""), 0)
        try:
            comm = (self.proc / str(pid) / "comm").read_text().strip()
            cgroup_text = (self.proc / str(pid) / "cgroup").read_text()
        except FileNotFoundError:
            self.failures["process_gone"] += 1
            return ResolvedServer(fallback, 0)
        except OSError:
            self.failures["permission_denied"] += 1
            return ResolvedServer(fallback, 0)
        cgroup = parse_cgroup(cgroup_text)
        if not cgroup.known_layout:
            self.failures["unknown_cgroup_layout"] += 1
        namespace = pod = container = ""
        if cgroup.pod_uid:
            namespace, pod, container = self._pod_names(cgroup.pod_uid, cgroup.container_id)
        identity = Identity(
            service_name=container or comm,
            service_instance_id=instance_id(cgroup.pod_uid, cgroup.container_id, netns, listen),
            k8s_namespace_name=namespace,
            k8s_pod_name=pod,
            k8s_pod_uid=cgroup.pod_uid,
            container_id=cgroup.container_id,
        )
        cgroup_path = cgroup_text.strip().splitlines()[-1].split(":", 2)[-1] if cgroup_text.strip() else ""
        return ResolvedServer(self._named(identity, port, comm, cgroup_path, cgroup.container_id), pid, container)

    def _named(self, identity: Identity, port: int, process: str, cgroup: str, container_id: str) -> Identity:
        for override in self.overrides:
            if override.matches(port, process, cgroup, container_id):
                return Identity(override.name, *identity.labels()[1:])
        return identity

    def _readlink(self, path: Path) -> str:
        try:
            return os.readlink(path)
        except OSError:
            return ""

    def _pids(self) -> Iterator[int]:
        try:
            names = os.listdir(self.proc)
        except OSError:
            return
        for name in names:
            if name.isdigit():
                yield int(name)

    def _namespaces(self) -> tuple[dict[str, list[int]], bool]:
        """({`net:[inode]`: pids in it} for every process whose namespace link we may read, whether
        some we may not)."""
        out: dict[str, list[int]] = {}
        denied = False
        for pid in self._pids():
            try:
                ns = os.readlink(self.proc / str(pid) / "ns" / "net")
            except PermissionError:
                denied = True
                continue
            except OSError:
                continue  # exited meanwhile
            out.setdefault(ns, []).append(pid)
        return out, denied

    def _find_listener(
        self, namespaces: dict[str, list[int]], address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int,
    ) -> tuple[str, str, str] | None:
        """(netns, socket inode, listening address) of the listener that answers address:port."""
        wildcard: list[tuple[str, str, str]] = []
        for netns, pids in namespaces.items():
            for pid in pids[:3]:  # any live process of the namespace reads the same tables
                listeners = self._listeners(pid, port)
                if listeners is None:
                    continue
                for local, inode in listeners:
                    mapped = local.ipv4_mapped if isinstance(local, ipaddress.IPv6Address) else None
                    if local == address or mapped == address:
                        return netns, inode, str(address)
                    if local.is_unspecified:
                        wildcard.append((netns, inode, str(local)))
                break
        for netns, inode, listen in wildcard:
            if self._owns(namespaces[netns], address):
                return netns, inode, listen
        return None

    def _only_listener(self, namespaces: dict[str, list[int]], port: int) -> tuple[str, str, str] | None:
        """(netns, inode, listening address) of the one listener on `port` on the whole node, if one."""
        found: list[tuple[str, str, str]] = []
        for netns, pids in namespaces.items():
            for pid in pids[:3]:
                listeners = self._listeners(pid, port)
                if listeners is None:
                    continue
                found += [(netns, inode, str(local)) for local, inode in listeners]
                break
        if len({netns for netns, _, _ in found}) == 1:
            return found[0]  # one namespace (a dual-stack server lists two sockets)
        self.failures["ambiguous_port" if found else "no_listener"] += 1
        return None

    def _listeners(self, pid: int, port: int) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, str]] | None:
        out = []
        for table in ("tcp", "tcp6"):
            try:
                text = (self.proc / str(pid) / "net" / table).read_text()
            except FileNotFoundError:
                if table == "tcp":
                    return None  # the process is gone: try another of the namespace
                continue
            except OSError:
                continue
            for line in text.splitlines()[1:]:
                fields = line.split()
                if len(fields) < 10 or fields[3] != _LISTEN:
                    continue
                local, _, hex_port = fields[1].partition(":")
                if int(hex_port, 16) == port:
                    out.append((_hex_address(local), fields[9]))
        return out

    def _owns(self, pids: list[int], address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        for pid in pids[:3]:
            try:
                if address.version == 4:
                    text = (self.proc / str(pid) / "net" / "fib_trie").read_text()
                    lines = text.splitlines()
                    wanted = str(address)
                    return any(line.strip() == f"|-- {wanted}" and "/32 host LOCAL" in nxt
                               for line, nxt in itertools.pairwise(lines))
                text = (self.proc / str(pid) / "net" / "if_inet6").read_text()
                return any(line.split()[0] == address.packed.hex() for line in text.splitlines() if line)
            except OSError:
                continue
        return False

    def _socket_owner(self, pids: list[int], inode: str) -> int:
        link = f"socket:[{inode}]"
        denied = gone = False
        for pid in pids:
            fd_dir = self.proc / str(pid) / "fd"
            try:
                fds = os.listdir(fd_dir)
            except FileNotFoundError:
                gone = True
                continue
            except PermissionError:
                denied = True
                continue
            for fd in fds:
                try:
                    if os.readlink(fd_dir / fd) == link:
                        return pid
                except OSError:
                    continue
        self.failures["permission_denied" if denied else "process_gone" if gone else "no_listener"] += 1
        return 0

    def _pod_names(self, uid: str, container_id: str) -> tuple[str, str, str]:
        """(namespace, pod, container) from the kubelet's log directories; "" where missing."""
        try:
            entries = os.listdir(self.pod_logs)
        except OSError:
            return "", "", ""
        for entry in entries:
            parsed = parse_pod_dir(entry)
            if parsed is None or parsed.uid != uid:
                continue
            container = self._container_name(parsed.namespace, parsed.pod, container_id)
            if not container:
                try:
                    subdirs = [d for d in os.listdir(self.pod_logs / entry) if (self.pod_logs / entry / d).is_dir()]
                except OSError:
                    subdirs = []
                container = subdirs[0] if len(subdirs) == 1 else ""
            return parsed.namespace, parsed.pod, container
        return "", "", ""

    def _container_name(self, namespace: str, pod: str, container_id: str) -> str:
        if not container_id:
            return ""
        prefix = f"{pod}_{namespace}_"
        suffix = f"-{container_id}.log"
        try:
            for name in os.listdir(self.container_logs):
                if name.startswith(prefix) and name.endswith(suffix):
                    return name[len(prefix):-len(suffix)]
        except OSError:
            pass
        return ""

