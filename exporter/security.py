"""Least privilege: what the capture needs, and giving everything up once it has it.

The capture needs, only while it starts, the capabilities in
`exporter.preflight.CAPTURE_CAPABILITIES` (found by test and kept true by
tests/integration/test_privileges.py, which removes each in turn):

- CAP_BPF to load the socket filter and create its maps: with
  kernel.unprivileged_bpf_disabled at 1 or 2 nothing else may;
- CAP_NET_RAW to open the AF_PACKET socket;
- CAP_PERFMON, for now, because one piece of the filter's in-kernel aggregation does
  pointer arithmetic the verifier allows only with it (see preflight.py).

Not needed: CAP_SYS_ADMIN (CAP_BPF replaced it in Linux 5.8), CAP_NET_ADMIN (the ring path
never forces the socket buffer past net.core.rmem_max), CAP_SYS_RESOURCE (BPF memory is
charged to the memory cgroup since Linux 5.11, not to RLIMIT_MEMLOCK: tested at 0).

After the filter is attached and the packet socket with its ring is open, the process only
reads that socket and the filter's maps through file descriptors it already holds. Since
Linux 6.5 the kernel checks CAP_BPF when a map or program is *created or fetched by id*,
not on lookups or updates through an fd already held, so `drop_privileges` can give up
every capability and the exporter keeps counting (tested: kernel counters, body_skip
updates and packet reads all continue as uid nobody with no capability).

`drop_privileges` runs before any other thread exists: capabilities, the bounding set and
no_new_privs are per thread in Linux, and a thread started earlier would keep its own.
It verifies the result for every thread from /proc and fails closed.
"""

from __future__ import annotations

import ctypes
import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import ConfigError, ExporterError

__all__ = ["DroppedTo", "capability_sets", "drop_privileges", "resolve_user"]

PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_CAP_LAST_CAP = Path("/proc/sys/kernel/cap_last_cap")
_CAP_SETPCAP = 8

_CAP_SET_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32))


@dataclass(frozen=True, slots=True)
class DroppedTo:
    user: str
    uid: int
    gid: int


def capability_sets(status_text: str) -> dict[str, int]:
    """{"CapInh": mask, "CapPrm": …, "CapEff": …, "CapBnd": …, "CapAmb": …} from a /proc status file."""
    sets: dict[str, int] = {}
    for line in status_text.splitlines():
        name, _, value = line.partition(":")
        if name in _CAP_SET_FIELDS:
            sets[name] = int(value.strip(), 16)
    return sets


def resolve_user(user: str) -> DroppedTo:
    """A user name or numeric uid → (name, uid, primary gid). ConfigError when unknown."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise ConfigError(f"--user {user!r}: no such user on this system") from None
    if entry.pw_uid == 0:
        raise ConfigError(f"--user {user!r} is root: name an unprivileged user such as nobody")
    return DroppedTo(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _prctl(libc: ctypes.CDLL, *args: int) -> None:
    if libc.prctl(*[ctypes.c_ulong(a) for a in args]) != 0:
        err = ctypes.get_errno()
        raise ExporterError(f"prctl{args[:2]} failed: {os.strerror(err)}")


def _task_statuses() -> list[tuple[str, str]]:
    out = []
    for task in sorted(Path("/proc/self/task").iterdir()):
        try:
            out.append((task.name, (task / "status").read_text()))
        except FileNotFoundError:
            continue  # a thread that ended while we looked
    return out


def drop_privileges(user: str, hand_over: Iterable[Path] = ()) -> DroppedTo:
    """Become `user` with no capability at all, for good; raise ExporterError if that fails.

    `hand_over`: directories the process must still write afterwards (the spool); they are
    given to the user first (recursively, files directly inside included).
    """
    target = resolve_user(user)
    if len(_task_statuses()) > 1:
        raise ExporterError("cannot drop privileges: other threads already run (a bug: drop before starting them)")
    for directory in hand_over:
        directory = Path(directory)
        for path in [directory, *directory.iterdir()] if directory.is_dir() else []:
            try:
                os.chown(path, target.uid, target.gid, follow_symlinks=False)
            except OSError as exc:
                raise ExporterError(f"cannot give {path} to user {target.user}: {exc.strerror}") from exc
    libc = ctypes.CDLL(None, use_errno=True)
    # 1. No later execve can gain privileges back (setuid binaries, file capabilities).
    _prctl(libc, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    # 2. The bounding set: needs CAP_SETPCAP, so before the uid change.
    last_cap = int(_CAP_LAST_CAP.read_text())
    before = capability_sets(Path("/proc/self/status").read_text())
    bounding = before.get("CapBnd", 0)
    if bounding and not before.get("CapEff", 0) >> _CAP_SETPCAP & 1:
        raise ExporterError("cannot empty the capability bounding set without CAP_SETPCAP: grant it, or run as root")
    for cap in range(last_cap + 1):
        if bounding >> cap & 1:
            _prctl(libc, PR_CAPBSET_DROP, cap, 0, 0, 0)
    # 3. Ambient capabilities (what setpriv/capsh --addamb hand to a non-root user).
    _prctl(libc, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    # 4. Groups, then gid, then uid (gid first: setgid needs CAP_SETGID, gone after setuid).
    try:
        os.setgroups([])
        os.setresgid(target.gid, target.gid, target.gid)
        os.setresuid(target.uid, target.uid, target.uid)
    except PermissionError as exc:
        raise ExporterError(
            f"cannot switch to user {target.user}: {exc.strerror} (needs CAP_SETUID and CAP_SETGID, or root)"
        ) from exc
    # 5. Whatever is left in effective/permitted/inheritable (a uid change from non-root keeps them).
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        raise ExporterError(f"capset failed: {os.strerror(ctypes.get_errno())}")
    # 6. What the user must still write must be reachable: chown does not open the parents.
    for directory in hand_over:
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ExporterError(
                f"user {target.user} cannot write {directory} (a parent directory is closed to it): "
                "give --spool-dir a place that user can reach, such as /var/lib/ebpf-slo-exporter"
            )
    # 7. Verify, for every thread, from what the kernel says.
    for task, status in _task_statuses():
        sets = capability_sets(status)
        held = {name: mask for name, mask in sets.items() if mask}
        if held:
            raise ExporterError(f"thread {task} still holds capabilities after the drop: {held}")
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        if any(int(uid) != target.uid for uid in uids):
            raise ExporterError(f"thread {task} still runs with uids {uids} after the drop")
    return target
