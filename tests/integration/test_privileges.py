"""Least privilege, tested on the real exporter: what it needs, and giving it all up.

The needed set is `exporter.preflight.CAPTURE_CAPABILITIES`; these tests keep it true:

- The capture runs as an unprivileged uid holding only that set (ambient, via setpriv),
  with RLIMIT_MEMLOCK at 0, and counts real traffic exactly.
- Each member is needed: without any one of them the kernel itself refuses (the
  exporter's own precheck is bypassed in that probe, so the refusal is the kernel's).
- `--user` drops every capability in every thread (effective, permitted, inheritable,
  bounding, ambient), sets no_new_privs and switches uid/gid; counting goes on afterwards.
- `check` names the capabilities present and missing.
"""

from __future__ import annotations

import http.client
import os
import pwd
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from exporter.preflight import CAPABILITIES, CAPTURE_CAPABILITIES
from tests.integration.harness import REPO, ExporterProcess, counts_by_key, logging_server, self_metric

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to grant capabilities")

NEEDED = [name.removeprefix("CAP_").lower() for name in CAPTURE_CAPABILITIES]  # setpriv's spelling
NOBODY = pwd.getpwnam("nobody")


def setpriv(caps: Sequence[str], uid: int = NOBODY.pw_uid, gid: int = NOBODY.pw_gid) -> list[str]:
    """A setpriv prefix: become uid/gid holding exactly `caps` (names without CAP_), ambient."""
    spec = ",".join(["-all", *(f"+{c}" for c in caps)])
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", f"--inh-caps={spec}",
            f"--ambient-caps={spec}", f"--bounding-set={spec}"]


def no_memlock() -> None:
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))


def unprivileged_env(tmp_path: Path) -> dict[str, str]:
    """A HOME the unprivileged user can reach (pytest's tmp_path is root-only): BCC and Python
    write nothing there today, but a run must not depend on root's HOME."""
    home = Path(tempfile.mkdtemp(prefix="ebpf-slo-home-"))
    os.chmod(home, 0o777)
    return {"HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"}


def traffic(port: int, paths: Sequence[str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for path in paths:
        conn.request("GET", path)
        conn.getresponse().read()
    conn.close()


def task_status(pid: int) -> dict[str, dict[str, str]]:
    """Every thread's /proc status, as {tid: {field: value}}."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = {}
        try:
            text = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a request thread that ended while we looked
        for line in text.splitlines():
            name, _, value = line.partition(":")
            fields[name] = value.strip()
        out[task.name] = fields
    return out


def test_capture_needs_only_cap_bpf_and_cap_net_raw(tmp_path: Path) -> None:
    env = unprivileged_env(tmp_path)
    with logging_server("127.0.0.1") as server, ExporterProcess(
        "--interface", "lo", "--port", str(server.port), prefix=setpriv(NEEDED), preexec=no_memlock,
        env=env,
    ) as exporter:
        assert exporter.proc is not None
        status = task_status(exporter.proc.pid)
        traffic(server.port, ["/a", "/b", "/a", "/status/404"])
        samples = exporter.wait_for_exchanges(4)
    mask = f"{sum(1 << CAPABILITIES[name] for name in CAPTURE_CAPABILITIES):016x}"
    for fields in status.values():
        assert fields["Uid"].split() == [str(NOBODY.pw_uid)] * 4
        assert (fields["CapEff"], fields["CapPrm"], fields["CapAmb"], fields["CapBnd"]) == (mask,) * 4
    assert counts_by_key(samples, server.port) == {("GET", "200", "/a"): 2, ("GET", "200", "/b"): 1,
                                                   ("GET", "404", "/status/{id}"): 1}
    assert self_metric(samples, "exchanges_total") == 4


PROBE = """
import exporter.capture.bpf as bpf
bpf.require_privileges = lambda: None  # let the kernel be the judge
from exporter.capture.live import LiveCapture
from exporter.errors import CaptureError
try:
    LiveCapture("lo", [9]).open().close()
    print("OPENED")
except CaptureError as exc:
    print("REFUSED", exc)
"""


def probe(tmp_path: Path, caps: list[str]) -> str:
    result = subprocess.run([*setpriv(caps), sys.executable, "-c", PROBE], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env={**os.environ, **unprivileged_env(tmp_path)},
                            preexec_fn=no_memlock)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("OPENED", "REFUSED"))]
    assert len(lines) == 1, result.stdout + result.stderr
    return lines[0]


def test_the_needed_set_is_enough_and_each_member_is_needed(tmp_path: Path) -> None:
    assert probe(tmp_path, NEEDED) == "OPENED"
    for name in NEEDED:
        assert probe(tmp_path, [c for c in NEEDED if c != name]).startswith("REFUSED"), name
    # Never needed: these must stay out of the set.
    assert not {"CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SYS_RESOURCE"} & set(CAPTURE_CAPABILITIES)
    assert {"CAP_BPF", "CAP_NET_RAW"} <= set(CAPTURE_CAPABILITIES)
    assert sysctl_unprivileged_bpf() == "2"  # why nothing loads without CAP_BPF here


def sysctl_unprivileged_bpf() -> str:
    return Path("/proc/sys/kernel/unprivileged_bpf_disabled").read_text().strip()


def assert_no_privileges(pid: int, uid: int) -> None:
    tasks = task_status(pid)
    assert tasks, "no threads?"
    for fields in tasks.values():
        assert fields["Uid"].split() == [str(uid)] * 4
        assert fields["Gid"].split() == [str(NOBODY.pw_gid)] * 4
        assert fields["Groups"] == ""
        for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert fields[name] == "0000000000000000", (name, fields[name])
        assert fields["NoNewPrivs"] == "1"


@pytest.mark.parametrize("start", ["root", "ambient"])
def test_user_drops_every_capability_and_keeps_counting(tmp_path: Path, start: str) -> None:
    if start == "root":
        prefix: list[str] = []
        env = None
    else:  # a non-root start (uid daemon) with what --user needs on top of capture
        daemon = pwd.getpwnam("daemon")
        prefix = setpriv([*NEEDED, "setuid", "setgid", "setpcap"], daemon.pw_uid, daemon.pw_gid)
        env = unprivileged_env(tmp_path)
    with logging_server("127.0.0.1") as server, ExporterProcess(
        "--interface", "lo", "--port", str(server.port), "--user", "nobody", prefix=prefix, env=env,
    ) as exporter:
        assert exporter.proc is not None
        traffic(server.port, ["/before"] * 3)
        exporter.wait_for_exchanges(3)
        assert_no_privileges(exporter.proc.pid, NOBODY.pw_uid)
        traffic(server.port, ["/after"] * 5)
        samples = exporter.wait_for_exchanges(8)
        assert_no_privileges(exporter.proc.pid, NOBODY.pw_uid)  # the request threads too
        # Kernel counters are still read through the map fds, without CAP_BPF.
        # With the fast path, simple exchanges are taken in the kernel instead of kept.
        kept = (self_metric(samples, "filter_packets_total", verdict="kept")
                + self_metric(samples, "filter_packets_total", verdict="consumed_fast_path"))
        exporter.stop()
    assert counts_by_key(samples, server.port) == {("GET", "200", "/before"): 3, ("GET", "200", "/after"): 5}
    assert kept >= 16  # a request and a response segment per exchange at least
    assert "dropped every capability; now running as nobody (uid 65534, gid 65534)" in exporter.output


def test_unknown_or_root_user_is_one_line_error() -> None:
    for user, message in (("no-such-user-x", "--user 'no-such-user-x': no such user on this system"),
                          ("root", "--user 'root' is root")):
        result = subprocess.run([sys.executable, "-m", "exporter", "run", "-p", "8080", "--listen", "127.0.0.1:0",
                                 "--user", user], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), result.stderr
        assert "Traceback" not in result.stderr


def test_check_names_present_and_missing_capabilities(tmp_path: Path) -> None:
    env = {**os.environ, **unprivileged_env(tmp_path)}
    partial = subprocess.run([*setpriv(["net_raw"]), sys.executable, "-m", "exporter", "check"], cwd=REPO,
                             capture_output=True, text=True, timeout=60, env=env)
    assert partial.returncode == 1
    line = next(x for x in partial.stdout.splitlines() if "privileges" in x)
    assert line.startswith("FAIL privileges")
    missing = ", ".join(c for c in CAPTURE_CAPABILITIES if c != "CAP_NET_RAW")
    assert f"uid 65534; present: CAP_NET_RAW; missing: {missing};" in line
    assert "for --user: missing CAP_SETUID, CAP_SETGID, CAP_SETPCAP" in line
    full = subprocess.run([*setpriv(NEEDED), sys.executable, "-m", "exporter", "check"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env=env)
    line = next(x for x in full.stdout.splitlines() if "privileges" in x)
    assert line.startswith("ok   privileges")
    assert f"present: {', '.join(sorted(CAPTURE_CAPABILITIES))}; missing: none" in line


EXAMPLE = REPO / "examples" / "reliably.yaml"


def test_user_keeps_spooling_and_pushing(tmp_path: Path) -> None:
    from tests.integration.receiver import Receiver

    base = Path(tempfile.mkdtemp(prefix="ebpf-slo-spool-"))
    os.chmod(base, 0o755)
    spool = base / "spool"
    closed = tmp_path / "closed-spool"  # under pytest's root-only tmp: unreachable for nobody
    with Receiver() as rx, logging_server("127.0.0.1") as server:
        rx.script(500)  # the first push fails: its indicator waits in the spool
        env = {"RELIABLY_TOKEN": "tok-priv-test", "RELIABLY_ORG": "priv"}
        with ExporterProcess("--interface", "lo", "--port", str(server.port), "--user", "nobody", "--slo",
                          str(EXAMPLE), "--reliably-url", rx.url, "--push-interval", "1s", "--spool-dir",
                          str(spool), env=env) as exporter:
            assert exporter.proc is not None
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and sum(r.body is not None for r in rx.requests) < 3:
                traffic(server.port, ["/"] * 5)
                time.sleep(0.3)
            assert_no_privileges(exporter.proc.pid, NOBODY.pw_uid)
            owners = {p.name: p.stat().st_uid for p in [spool, *spool.iterdir()]}
        assert len(rx.requests) >= 3
        assert rx.requests[0].body == rx.requests[1].body  # the failed one, sent again by user nobody
        assert set(owners.values()) == {NOBODY.pw_uid} and "state.json" in owners
        refused = subprocess.run(
            [sys.executable, "-m", "exporter", "run", "-i", "lo", "-p", str(server.port), "--listen", "127.0.0.1:0",
             "--user", "nobody", "--slo", str(EXAMPLE), "--reliably-url", rx.url, "--spool-dir", str(closed)],
            cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: user nobody cannot write {closed} (a parent directory is closed to it): give --spool-dir "
        "a place that user can reach, such as /var/lib/ebpf-slo-exporter")
