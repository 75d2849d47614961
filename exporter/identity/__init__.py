"""Server → service_name and instance labels: socket → process → cgroup → container / pod.

`model` is pure (names in, labels out); `resolver` is the edge that reads /proc and the
kubelet's log directories, cached and bounded.
"""

from exporter.identity.model import (
    IDENTITY_LABEL_NAMES,
    Identity,
    ServiceOverride,
    parse_cgroup,
    parse_pod_dir,
    parse_service_override,
)

__all__ = [
    "IDENTITY_LABEL_NAMES",
    "Identity",
    "ServiceOverride",
    "parse_cgroup",
    "parse_pod_dir",
    "parse_service_override",
]
