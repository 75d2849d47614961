"""Workload identity from names alone (pure: strings in, labels out; no file, no clock).

- `parse_cgroup`: a process's cgroup path (the `0::<path>` line of /proc/<pid>/cgroup, or any
  v1 line) → container id and pod uid, for the layouts kubelet and the runtimes write:
  systemd driver `kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<64 hex>.scope`
  (also `crio-`, `docker-`), cgroupfs driver `/kubepods/burstable/pod<uid>/<64 hex>`, plain Docker
  `/system.slice/docker-<64 hex>.scope` and `/docker/<64 hex>`, podman `libpod-<64 hex>.scope`.
  Paths seen through a cgroup namespace (`/../../kubepods…`) parse the same: only the
  components are matched.
- `parse_pod_dir`: a kubelet `/var/log/pods/<namespace>_<pod>_<uid>` directory name → the
  namespace, pod name and uid (namespace and uid never contain `_`; a pod name may not either,
  DNS-1123, but the split is from both ends to be safe).
- `Identity`: the labels one server carries, and its instance id: pod uid, else container id,
  else the network namespace and listening address, so two servers that share a name and a port
  never merge.
- `ServiceOverride`: `--service NAME=SELECTOR`.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from exporter.errors import ConfigError

__all__ = [
    "IDENTITY_LABEL_NAMES",
    "SERVICE_NAME_SLOT",
    "CgroupIdentity",
    "Identity",
    "PodName",
    "ServiceOverride",
    "parse_cgroup",
    "parse_pod_dir",
    "parse_service_override",
]

# The label names, in the order metrics.http_key appends them (metrics.py owns the order; this
# tuple is what it appends).
IDENTITY_LABEL_NAMES = (
    "service_name", "service_instance_id", "k8s_namespace_name", "k8s_pod_name", "k8s_pod_uid", "container_id",
)

# Where service_name sits in Identity.labels() (SLO objectives select on it).
SERVICE_NAME_SLOT = IDENTITY_LABEL_NAMES.index("service_name")

_HEX64 = re.compile(r"^(?:(?:cri-containerd|crio|docker|libpod|containerd)-)?([0-9a-f]{64})(?:\.scope)?$")
_POD_SYSTEMD = re.compile(r"^kubepods(?:-[a-z]+)?-pod([0-9a-f_]{36})\.slice$")
_POD_CGROUPFS = re.compile(r"^pod([0-9a-f-]{36})$")
_UID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True, slots=True)
class CgroupIdentity:
    container_id: str  # 64 hex digits, "" outside a container
    pod_uid: str  # "" outside Kubernetes
    known_layout: bool  # False: a path under a container manager we do not know (counted)


def parse_cgroup(proc_cgroup: str) -> CgroupIdentity:
    """The container and pod of a /proc/<pid>/cgroup text (v2 `0::` line first, else any line)."""
    lines = [line.split(":", 2) for line in proc_cgroup.splitlines() if line.count(":") >= 2]
    paths = [path for hierarchy, _controllers, path in lines if hierarchy == "0"]
    paths += [path for hierarchy, _controllers, path in lines if hierarchy != "0"]
    for path in paths:
        container_id = pod_uid = ""
        for part in path.split("/"):
            if m := _HEX64.match(part):
                container_id = m.group(1)
            elif m := _POD_SYSTEMD.match(part):
                pod_uid = m.group(1).replace("_", "-")
            elif m := _POD_CGROUPFS.match(part):
                pod_uid = m.group(1)
        if container_id or pod_uid:
            return CgroupIdentity(container_id, pod_uid if _UID.match(pod_uid) else "", True)
    # A host process (/, /user.slice/…, /system.slice/nginx.service) is a known layout; a path
    # under kubepods or a container manager that did not parse is not.
    unknown = any(word in path for path in paths for word in ("kubepods", "docker", "containerd", "crio", "libpod"))
    return CgroupIdentity("", "", not unknown)


@dataclass(frozen=True, slots=True)
class PodName:
    namespace: str
    pod: str
    uid: str


def parse_pod_dir(name: str) -> PodName | None:
    """`<namespace>_<pod>_<uid>` (a /var/log/pods entry) → its parts; None for anything else."""
    namespace, sep, rest = name.partition("_")
    pod, sep2, uid = rest.rpartition("_")
    if not (sep and sep2 and namespace and pod and _UID.match(uid)):
        return None
    return PodName(namespace, pod, uid)


@dataclass(frozen=True, slots=True)
class Identity:
    service_name: str = ""
    service_instance_id: str = ""
    k8s_namespace_name: str = ""
    k8s_pod_name: str = ""
    k8s_pod_uid: str = ""
    container_id: str = ""

    def labels(self) -> tuple[str, str, str, str, str, str]:
        """Values in IDENTITY_LABEL_NAMES' order."""
        return (self.service_name, self.service_instance_id, self.k8s_namespace_name, self.k8s_pod_name,
                self.k8s_pod_uid, self.container_id)


UNKNOWN = Identity()


def instance_id(pod_uid: str, container_id: str, netns: str, listen_address: str) -> str:
    """Pod uid, else container id, else `<netns>/<listening address>`, else the address alone."""
    if pod_uid:
        return pod_uid
    if container_id:
        return container_id
    if netns:
        return f"{netns}/{listen_address}"
    return listen_address


_SELECTOR_KINDS = ("port", "process", "cgroup", "container")


@dataclass(frozen=True, slots=True)
class ServiceOverride:
    """`--service NAME=KIND:VALUE`: servers matching the selector are called NAME.

    port:8080 (server port), process:nginx (process name, a glob), cgroup:*payments* (cgroup path,
    a glob), container:3f2a… (container id, a prefix).
    """

    name: str
    kind: str
    value: str

    def matches(self, port: int, process: str, cgroup: str, container_id: str) -> bool:
        if self.kind == "port":
            return str(port) == self.value
        if self.kind == "process":
            return fnmatch.fnmatchcase(process, self.value)
        if self.kind == "cgroup":
            return fnmatch.fnmatchcase(cgroup, self.value)
        return bool(container_id) and container_id.startswith(self.value)


def parse_service_override(text: str) -> ServiceOverride:
    name, sep, selector = text.partition("=")
    kind, sep2, value = selector.partition(":")
    if not (sep and sep2 and name.strip() and value.strip()) or kind not in _SELECTOR_KINDS:
        raise ConfigError(
            f"--service {text!r}: expected NAME=KIND:VALUE with KIND one of {', '.join(_SELECTOR_KINDS)}, "
            "e.g. checkout=port:8080 or api=process:nginx"
        )
    if kind == "port" and not value.isdigit():
        raise ConfigError(f"--service {text!r}: port:{value} is not a port number")
    return ServiceOverride(name.strip(), kind, value.strip())
