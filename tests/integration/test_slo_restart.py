"""The real exporter restarted, cleanly and by SIGKILL, between two batches of known traffic
through the real filter on lo: the 30-day windows (from an OpenSLO file) still count the
first batch after the restart, coverage leaves exactly the unobserved time out, and the
status page shows it all in a real headless Chromium, behind basic auth.

Oracles: the test server's own access log for the counts; the wall clock around the stop
and the restart for the coverage; Chromium's rendered DOM for the page.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from exporter.slo.report import lines_from_snapshot, render_text
from tests.integration.harness import ExporterProcess, LoggingServer, logging_server

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to attach a BPF filter")

MANIFEST = """\
apiVersion: openslo/v1
kind: Service
metadata: {name: restart}
spec: {}
---
apiVersion: openslo/v1
kind: SLO
metadata: {name: not-failing}
spec:
  service: restart
  indicator:
    metadata: {name: server-errors}
    spec:
      ratioMetric:
        counter: true
        bad: {metricSource: {type: ebpf-slo-exporter, spec: {statusClasses: [5xx]}}}
        total: {metricSource: {type: ebpf-slo-exporter}}
  timeWindow: [{duration: 30d, isRolling: true}]
  budgetingMethod: Occurrences
  objectives: [{target: 0.99}]
---
apiVersion: openslo/v1
kind: SLO
metadata: {name: fast}
spec:
  service: restart
  indicator:
    metadata: {name: duration}
    spec:
      thresholdMetric: {metricSource: {type: ebpf-slo-exporter}}
  timeWindow: [{duration: 30d, isRolling: true}]
  budgetingMethod: Occurrences
  objectives: [{op: lte, value: 0.15, target: 0.995}]
"""
PASSWORD = "page-test-password"
# (fast 200s, slow 200s at 200 ms, fast 500s) per batch
BEFORE = (60, 2, 3)
AFTER = (40, 1, 2)
WINDOW_S = 30 * 86400


def send(port: int, fast: int, slow: int, errors: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for path in ["/"] * fast + ["/delay/200"] * slow + ["/status/500"] * errors:
        conn.request("GET", path)
        conn.getresponse().read()
    conn.close()


def get(url: str, auth: str | None = None) -> bytes:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=5) as response:
        return bytes(response.read())


def snapshot(exporter: ExporterProcess) -> dict[str, Any]:
    return dict(json.loads(get(exporter.base + "/api/v1/slo")))


def wait_for_window(exporter: ExporterProcess, total: int, saved: bool, timeout: float = 20.0) -> dict[str, Any]:
    """Poll /api/v1/slo until both windows hold `total` events (and, with `saved`, until the
    state was saved after that)."""
    deadline = time.monotonic() + timeout
    seen_at: str | None = None
    snap = snapshot(exporter)
    while time.monotonic() < deadline:
        currents = [o["current"] for o in snap["objectives"]]
        if all(c is not None and c["total"] == total for c in currents):
            seen_at = seen_at or snap["generated_at"]
            last_save = snap["state"]["last_save"]
            if not saved or (last_save is not None and last_save > seen_at):
                return snap
        time.sleep(0.2)
        snap = snapshot(exporter)
    raise AssertionError(f"windows never reached {total} events: {json.dumps(snap)[:2000]}")


def args(manifest: Path, port: int, state: Path, *extra: str) -> list[str]:
    return ["--interface", "lo", "--port", str(port), "--route", "/delay/{ms}", "--route", "/status/{code}",
            "--slo", str(manifest), "--push-interval", "1s", "--state-dir", str(state),
            "--state-save-interval", "1s", *extra]


def served(server: LoggingServer) -> tuple[int, int, int]:
    """(total, slow, 5xx) from the server's own log."""
    log = server.log
    total = sum(log.values())
    slow = sum(count for (method, status, path), count in log.items() if path.startswith("/delay/"))
    errors = sum(count for (method, status, path), count in log.items() if status.startswith("5"))
    return total, slow, errors


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_restart_keeps_the_window_and_its_coverage(tmp_path: Path, how: str) -> None:
    manifest = tmp_path / "openslo.yaml"
    manifest.write_text(MANIFEST)
    state = tmp_path / "state"
    with logging_server("127.0.0.1") as server:
        first = ExporterProcess(*args(manifest, server.port, state))
        launched = time.time()
        first.start()
        send(server.port, *BEFORE)
        wait_for_window(first, sum(BEFORE), saved=True)
        stopped = time.time()
        first.stop(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        assert first.proc is not None
        assert first.proc.returncode == (0 if how == "sigterm" else -signal.SIGKILL)
        time.sleep(2.0)  # down for a while: that time must not count as observed

        with ExporterProcess(*args(manifest, server.port, state)) as second:
            relaunched = time.time()
            send(server.port, *AFTER)
            total, slow, errors = served(server)
            assert (total, slow, errors) == (sum(BEFORE) + sum(AFTER), BEFORE[1] + AFTER[1], BEFORE[2] + AFTER[2])
            snap = wait_for_window(second, total, saved=False)
            samples = second.scrape()
            report = render_text(lines_from_snapshot(snap))

    availability, latency = snap["objectives"]
    assert (availability["current"]["good"], availability["current"]["total"]) == (total - errors, total)
    assert (latency["current"]["good"], latency["current"]["total"]) == (total - slow, total)
    # Coverage: everything from the first start to the window's end is observed or lost in
    # the gap; the gap spans at least the downtime and, after a SIGKILL, at most one save
    # interval (1 s) more, plus the processes' start-up.
    restored = snap["state"]
    assert restored["restored_objectives"] == 2
    gap = restored["restore_gap_seconds"]
    assert relaunched - stopped - 0.5 > gap > 2.0 if how == "sigterm" else relaunched - stopped + 1.5 > gap > 2.0
    current = availability["current"]
    end = time.mktime(time.strptime(current["to"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    start = time.mktime(time.strptime(current["from"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert end - start > WINDOW_S - 300  # the coarse edge: within 5 minutes of 30 days
    assert end - launched + 0.5 >= current["covered_seconds"] + gap >= end - launched - 8.0
    assert current["coverage"] == pytest.approx(current["covered_seconds"] / (end - start))
    assert 0 < current["coverage"] < 0.0001
    labels = (("category", "availability"), ("service", "restart"), ("slo", "restart_not_failing"), ("window", "30d"))
    assert samples[("slo_window_coverage_ratio", labels)] == current["coverage"]
    assert samples[("ebpf_slo_exporter_slo_state_restore_gap_seconds", ())] == gap
    assert "of the window observed" in report and f"{100 * (total - errors) / total:.2f}%" in report


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed: `make setup` installs Debian's chromium package")
    return path


def headless(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=90, check=False,
    )


def test_status_page_in_chromium_behind_basic_auth(tmp_path: Path) -> None:
    manifest = tmp_path / "openslo.yaml"
    manifest.write_text(MANIFEST)
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  viewer: {bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()}\n")
    with logging_server("127.0.0.1") as server, \
            ExporterProcess(*args(manifest, server.port, tmp_path / "state", "--web-config", str(web))) as exporter:
        send(server.port, 50, 1, 2)
        # Wait (with the password) until the windows hold the traffic.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            snap = json.loads(get(exporter.base + "/api/v1/slo", f"viewer:{PASSWORD}"))
            if all(o["current"] and o["current"]["total"] == 53 for o in snap["objectives"]):
                break
            time.sleep(0.2)
        with pytest.raises(urllib.error.HTTPError) as denied:
            get(exporter.base + "/")
        denied.value.close()
        assert denied.value.code == 401
        url = f"http://viewer:{PASSWORD}@127.0.0.1:{exporter.listen_port}/"
        dom = headless(tmp_path, "--dump-dom", url)
        shot = tmp_path / "page.png"
        picture = headless(tmp_path, "--window-size=1280,560", f"--screenshot={shot}", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert '<meta http-equiv="refresh" content="10">' in page
    assert "Filter: attached" in page and "Parse errors: 0" in page
    # The two objectives, each with its SLI over the exact counts, target, and coverage.
    assert f"{100 * 51 / 53:.3f}%" in page  # not-failing: 2 of 53 are 5xx
    assert f"{100 * 52 / 53:.3f}%" in page  # fast: 1 of 53 is slow
    assert "99% / 30d" in page and "99.5% / 30d" in page
    assert page.count("(partial)") == 2
    assert page.count('<svg class="chart"') == 2
    # RED per route: the server's log says 50 on /, 1 on /delay/{ms}, 2 on /status/{code}.
    for route, count in (("/", 50), ("/delay/{ms}", 1), ("/status/{code}", 2)):
        assert f"<tr><td>{route}</td><td>{server.port}</td><td class=\"num\">{count}</td>" in page
    assert picture.returncode == 0 and shot.stat().st_size > 10_000, picture.stderr[-2000:]
    # The README's picture is this screenshot: EBPF_SLO_PAGE_SCREENSHOT=docs/status-page.png
    if os.environ.get("EBPF_SLO_PAGE_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["EBPF_SLO_PAGE_SCREENSHOT"])
