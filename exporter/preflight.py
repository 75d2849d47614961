"""`ebpf-slo-exporter check`: what the capture needs, each with a verdict and the fix."""

from __future__ import annotations

import ctypes
import fnmatch
import os
import platform
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from exporter.capture.openssl_layout import SslLayout

# Capability bit numbers from linux/capability.h.
CAPABILITIES = {
    "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
    "CAP_DAC_READ_SEARCH": 2, "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24, "CAP_PERFMON": 38, "CAP_BPF": 39,
}
# What capture needs, and nothing more: tests/integration/test_privileges.py runs the real
# filter with exactly this set, then without each member in turn and expects the kernel to
# refuse, so the set follows the filter as it changes. CAP_BPF loads the program and creates
# its maps; CAP_NET_RAW opens the packet socket; CAP_PERFMON is needed only because the
# in-kernel aggregation (bpf/http_filter.c, `v->resp[si]++` on an http_agg value) does pointer
# arithmetic the verifier allows only with it (Spectre v1 masking, "pointer arithmetic ...
# prohibited for !root"). Make that code verifiable without it and drop CAP_PERFMON here.
CAPTURE_CAPABILITIES = ("CAP_BPF", "CAP_NET_RAW", "CAP_PERFMON")
# What naming the server (exporter/identity/) needs on top, in a container that is not root in
# the host's sense: the listening socket's owner is found by reading other processes'
# /proc/<pid>/fd links and /proc/<pid>/ns/net, which the kernel allows only with
# CAP_SYS_PTRACE (ptrace read access) and, for processes of other users, CAP_DAC_READ_SEARCH
# (their /proc/<pid>/fd directory is mode 0500). Without them capture still works; the identity
# labels are then empty and the reason is counted.
IDENTITY_CAPABILITIES = ("CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH")
# The set the shipped manifests (deploy/kubernetes/daemonset.yaml, docker/compose.yaml) grant:
# tests/unit/test_docker.py holds every manifest to exactly this list.
MANIFEST_CAPABILITIES = CAPTURE_CAPABILITIES + IDENTITY_CAPABILITIES
# What the TLS uprobes need (measured on this Linux 6.18 with perf_event_paranoid=2, as nobody
# with ambient capabilities; tests/integration/test_tls.py): CAP_BPF+CAP_PERFMON load the
# programs, but opening a uprobe perf event is refused (EACCES) without CAP_SYS_ADMIN, also as
# uid 0 with only those two, and also with a perf_event_open of our own that asks for no raw
# samples (tried, not kept). CAP_SYS_ADMIN alone is enough; it covers CAP_BPF and CAP_PERFMON,
# and with them the bpf_probe_read_kernel of the socket walk (measured again after the probes
# began reading kernel memory: the same set attaches, the capture's set is still refused). The
# kernel's BTF (/sys/kernel/btf/vmlinux) and the libssl copies are world-readable: no more.
TLS_CAPABILITIES = ("CAP_SYS_ADMIN",)
# CAP_SYS_ADMIN stands in for these (kernels before 5.8 know no other way).
SYS_ADMIN_COVERS = frozenset({"CAP_BPF", "CAP_PERFMON"})
# What --user needs on top when the exporter does not start as root (to change uid/gid and
# empty the bounding set).
DROP_CAPABILITIES = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")
UNPRIVILEGED_BPF = Path("/proc/sys/kernel/unprivileged_bpf_disabled")
BPF_PROG_LOAD = 5
# bpf(2) is not in libc; its number by architecture (also used by capture/bpfsys.py).
SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False  # ok for what is asked, but a part will not work: said, not failed


def _capability_set(field: str, status_text: str | None) -> set[str]:
    text = status_text if status_text is not None else Path("/proc/self/status").read_text()
    for line in text.splitlines():
        if line.startswith(field + ":"):
            mask = int(line.split()[1], 16)
            return {name for name, bit in CAPABILITIES.items() if mask >> bit & 1}
    return set()


def effective_capabilities(status_text: str | None = None) -> set[str]:
    """Names of the capabilities in this process's effective set (from /proc/self/status)."""
    return _capability_set("CapEff", status_text)


def exec_capabilities(status_text: str | None = None, euid: int | None = None) -> set[str]:
    """What a child started with exec holds: the BPF loader is one (exporter/capture/bpf_loader.py).

    Root's child gets the bounding set back; anyone else's only the ambient set (Python
    carries no file capabilities).
    """
    root = (os.geteuid() if euid is None else euid) == 0
    return _capability_set("CapBnd" if root else "CapAmb", status_text)


def lost_across_exec(status_text: str | None = None, euid: int | None = None) -> list[str]:
    """Capture capabilities this process has but its BPF loader child would not."""
    now = missing_capture_capabilities(effective_capabilities(status_text))
    child = missing_capture_capabilities(exec_capabilities(status_text, euid))
    return [c for c in child if c not in now]


def missing_capture_capabilities(caps: set[str]) -> list[str]:
    """The members of CAPTURE_CAPABILITIES not in `caps` (CAP_SYS_ADMIN covering its share)."""
    covered = SYS_ADMIN_COVERS if "CAP_SYS_ADMIN" in caps else frozenset()
    return [c for c in CAPTURE_CAPABILITIES if c not in caps and c not in covered]


def has_capture_privileges(caps: set[str]) -> bool:
    """Everything in CAPTURE_CAPABILITIES (see there for why each is needed)."""
    return not missing_capture_capabilities(caps)


def check_privileges(caps: set[str] | None = None) -> CheckResult:
    """Which of the capabilities capture needs are present and which are missing."""
    caps = effective_capabilities() if caps is None else caps
    present = sorted(set(CAPTURE_CAPABILITIES) & caps)
    missing = missing_capture_capabilities(caps)
    if "CAP_SYS_ADMIN" in caps and SYS_ADMIN_COVERS - caps:
        present.append("CAP_SYS_ADMIN")
    drop_missing = [c for c in DROP_CAPABILITIES if c not in caps]
    detail = f"uid {os.geteuid()}; present: {', '.join(present) or 'none'}; missing: {', '.join(missing) or 'none'}"
    detail += f"; for --user: {'missing ' + ', '.join(drop_missing) if drop_missing else 'ok'}"
    try:
        detail += f"; kernel.unprivileged_bpf_disabled={UNPRIVILEGED_BPF.read_text().strip()}"
    except OSError:
        pass
    lost: list[str] = lost_across_exec() if caps is None else []
    if not missing and lost:
        return CheckResult("privileges", False, detail + f"; not ambient: {', '.join(lost)}",
                           "the BPF filter is loaded by a helper process, which keeps only ambient "
                           "capabilities: grant them as ambient (systemd AmbientCapabilities=, "
                           "setpriv --ambient-caps, capsh --addamb)")
    if not missing:
        return CheckResult("privileges", True, detail)
    return CheckResult("privileges", False, detail,
                       f"run as root, or grant exactly {' '.join(CAPTURE_CAPABILITIES)} "
                       "(e.g. systemd AmbientCapabilities=)")


def seccomp_mode(status_text: str | None = None) -> int:
    """The `Seccomp:` line of /proc/self/status: 0 none, 1 strict, 2 a filter (a container's profile)."""
    text = status_text if status_text is not None else Path("/proc/self/status").read_text()
    for line in text.splitlines():
        if line.startswith("Seccomp:"):
            return int(line.split()[1])
    return 0


SECCOMP_FIX = ("a seccomp filter is in the way: run the container with a seccomp profile that allows "
               "bpf(2), or unconfined (Kubernetes: securityContext.seccompProfile.type: Unconfined; "
               "podman/docker: --security-opt seccomp=unconfined)")


def check_bpf_syscall(status_text: str | None = None) -> CheckResult:
    number = SYS_BPF.get(platform.machine())
    if number is None:
        return CheckResult("bpf syscall", True, f"not probed on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    # A zero-length attribute block: the kernel answers EINVAL/EFAULT when bpf() exists,
    # ENOSYS when it was compiled out, EPERM when we lack the capability.
    result = libc.syscall(number, BPF_PROG_LOAD, None, 0)
    err = ctypes.get_errno()
    if result < 0 and err == 38:
        return CheckResult("bpf syscall", False, "the kernel has no bpf() (CONFIG_BPF_SYSCALL off)",
                           "use a kernel built with CONFIG_BPF_SYSCALL=y")
    if result < 0 and err == 1:
        if seccomp_mode(status_text) == 2:
            return CheckResult("bpf syscall", False,
                               "bpf() refused: operation not permitted, and this process runs under a "
                               "seccomp filter (/proc/self/status Seccomp: 2)", SECCOMP_FIX)
        return CheckResult("bpf syscall", False, "bpf() refused: operation not permitted",
                           "run as root or grant CAP_BPF")
    if seccomp_mode(status_text) == 2:
        return CheckResult("bpf syscall", True, "available (under a seccomp filter that allows it)")
    return CheckResult("bpf syscall", True, "available")


def check_bcc() -> CheckResult:
    try:
        import bcc  # noqa: F401
    except ImportError:
        return CheckResult("bcc", False, "the bcc Python module does not import",
                           "apt-get install python3-bpfcc, and use a venv made with --system-site-packages "
                           "(make setup)")
    version = getattr(__import__("bcc"), "__version__", "unknown version")
    return CheckResult("bcc", True, f"bcc {version}")


def check_headers() -> CheckResult:
    build = Path("/lib/modules") / platform.release() / "build"
    if (build / "include").is_dir():
        return CheckResult("kernel headers", True, f"{build} -> {build.resolve()}")
    return CheckResult("kernel headers", False, f"{build} is missing",
                       "run `make setup` (installs linux-headers and links the nearest version)")


def check_interface(interface: str) -> CheckResult:
    names = sorted(name for _, name in socket.if_nameindex())
    if interface == "any":
        return CheckResult("interface", True, f"any: every interface, now {', '.join(names)}")
    if any(c in interface for c in "*?["):
        matched = [name for name in names if fnmatch.fnmatchcase(name, interface)]
        if matched:
            return CheckResult("interface", True, f"{interface} matches {', '.join(matched)}")
        return CheckResult("interface", True, f"{interface} matches nothing yet; the exporter waits for it "
                                              f"(interfaces here: {', '.join(names)})")
    if interface in names:
        return CheckResult("interface", True, f"{interface} exists")
    return CheckResult("interface", False, f"no interface {interface!r}; interfaces here: {', '.join(names)}",
                       "pick one with --interface")


def probe_points(layout: SslLayout) -> str:
    """Where the uprobes go, and whether the kernel emulates the probed instruction (one trap per
    call) or single-steps it (two, about ten times the cost on a VM)."""
    parts = []
    for direction, entry in (("read", layout.read), ("write", layout.write)):
        pair = f"SSL_{direction}/SSL_{direction}_ex"
        if entry is None:
            parts.append(f"{pair} probed at their own entries")
        else:
            how = "emulated" if entry.first != "other" else "single-stepped"
            parts.append(f"{pair} at their internal function {entry.vaddr:#x} ({entry.first}: {how})")
    note = f" ({layout.entry_note})" if layout.entry_note else ""
    return ", ".join(parts) + note


def check_tls(libssl: tuple[str, ...] = (), caps: set[str] | None = None) -> list[CheckResult]:
    """Which libssl copies `run` would probe, with their struct layouts, whether the kernel's BTF gives
    the socket walk's offsets, and whether uprobes can be attached with these privileges."""
    # The capture edge: imported only when asked.
    from exporter.capture.kernel_layout import KernelLayoutError, socket_walk_offsets
    from exporter.capture.openssl_layout import SslLayoutError, calibrate
    from exporter.capture.tls import find_libraries
    from exporter.errors import CaptureError

    try:
        libraries = find_libraries(libssl)
    except CaptureError as exc:
        return [CheckResult("tls libraries", False, str(exc), "give an existing file to --libssl")]
    results = [
        CheckResult("tls libraries", True, ", ".join(libraries)) if libraries else
        CheckResult("tls libraries", True, "no libssl.so.3 or libssl.so.1.1 found: HTTPS will not be counted",
                    "give the server's copy with --libssl PATH, or run with --no-tls", warning=True)
    ]
    for library in libraries:
        try:
            layout = calibrate(library)
        except SslLayoutError as exc:
            results.append(CheckResult("tls layout", True, str(exc), warning=True))
        else:
            results.append(CheckResult("tls layout", True, f"{library}: SSL rbio at +{layout.rbio_offset}, "
                                                           f"BIO fd at +{layout.bio_num_offset}; "
                                                           f"{probe_points(layout)}"))
    try:
        offsets = socket_walk_offsets()
    except KernelLayoutError as exc:
        results.append(CheckResult("tls kernel btf", False, str(exc),
                                   "use a kernel built with CONFIG_DEBUG_INFO_BTF=y, or run with --no-tls"))
    else:
        results.append(CheckResult("tls kernel btf", True, f"socket walk offsets read ({len(offsets)} members)"))
    caps = effective_capabilities() if caps is None else caps
    missing = [c for c in TLS_CAPABILITIES if c not in caps]
    if os.geteuid() == 0 and not missing:
        results.append(CheckResult("tls uprobes", True, "attachable (root)"))
    elif not missing:
        results.append(CheckResult("tls uprobes", True, f"attachable ({', '.join(TLS_CAPABILITIES)})"))
    else:
        # TLS is optional: `run` warns and counts clear text, so this is not a failure.
        results.append(CheckResult("tls uprobes", True,
                                   f"not attachable with these privileges (missing {', '.join(missing)}): "
                                   "HTTPS will not be counted",
                                   "grant CAP_SYS_ADMIN (ambient) or run as root, or pass --no-tls", warning=True))
    return results


def run_checks(interface: str, libssl: tuple[str, ...] = (), tls: bool = True) -> list[CheckResult]:
    results = [check_privileges(), check_bpf_syscall(), check_bcc(), check_headers(), check_interface(interface)]
    if tls:
        results += check_tls(libssl)
    return results
