"""OpenSLO v1 files through the same paths as Reliably manifests: indicators pushed to a local
receiver (exact bodies), `slo report` from the exporter's snapshot, and `slo rules` through
the real promtool. The Reliably demo manifest and its OpenSLO twin must push the same
percents for the same exchanges."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.bridge.backoff import Backoff
from exporter.bridge.settings import PushSettings
from exporter.core.model import Exchange
from exporter.slo.manifest import load_manifest
from exporter.slo.report import lines_from_snapshot, render_text
from exporter.slo.runtime import SloRuntime
from tests.fake_clock import Clock
from tests.integration.harness import REPO
from tests.integration.receiver import Receiver

OPENSLO = REPO / "examples" / "openslo.yaml"
RELIABLY = REPO / "examples" / "reliably.yaml"
FIXTURES = REPO / "tests" / "fixtures" / "openslo"
T0 = 1622548800  # 2021-06-01T12:00:00Z


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as rx:
        yield rx


def pushed(manifest: Path, receiver: Receiver, spool: Path) -> tuple[list[dict[str, object]], SloRuntime]:
    """200 exchanges in [T0, T0+9): 3 slow (300 ms), 2 failing; one interval closed and pushed."""
    clock = Clock(T0 + 0.5)
    runtime = SloRuntime(load_manifest(manifest), push=PushSettings(receiver.url, "org", "token", timeout_s=2.0),
                         spool_dir=spool, wall_clock=clock, backoff=Backoff(base_s=0.02, max_s=0.1))
    for i in range(200):
        clock.now = T0 + 0.5 + i * 9 / 200
        end = round(clock.now * 1e9)
        slow, failing = i < 3, 3 <= i < 5
        runtime.observe(Exchange("GET", "/", 500 if failing else 200, end - (300 if slow else 5) * 10**6, end,
                                 0, 0, 8000), "/")
    clock.now = T0 + 12
    runtime.tick()
    assert runtime.pusher is not None
    runtime.pusher.pump(time.monotonic() + 5, threading.Event())
    return [r.body for r in receiver.wait_for(2)], runtime


def test_openslo_pushes_the_same_percents_as_its_reliably_twin(receiver: Receiver, tmp_path: Path) -> None:
    bodies, runtime = pushed(OPENSLO, receiver, tmp_path / "openslo")
    by_category = {b["metadata"]["labels"]["category"]: b for b in bodies}  # type: ignore[index]
    assert by_category["availability"] == {
        "metadata": {"labels": {"category": "availability", "path": "/",
                                "from": "2021-06-01T12:00:00Z", "to": "2021-06-01T12:00:10Z"}},
        "spec": {"from": "2021-06-01T12:00:00Z", "to": "2021-06-01T12:00:10Z", "percent": 99.0},
    }
    assert by_category["latency"] == {
        "metadata": {"labels": {"category": "latency", "latency_target": "150ms", "path": "/",
                                "from": "2021-06-01T12:00:00Z", "to": "2021-06-01T12:00:10Z"}},
        "spec": {"from": "2021-06-01T12:00:00Z", "to": "2021-06-01T12:00:10Z", "percent": 98.5},
    }
    with Receiver() as twin_receiver:
        twin_bodies, _ = pushed(RELIABLY, twin_receiver, tmp_path / "reliably")
    twin = {b["metadata"]["labels"]["category"]: b["spec"]["percent"] for b in twin_bodies}  # type: ignore[index]
    assert twin == {"availability": 99.0, "latency": 98.5}

    report = render_text(lines_from_snapshot(runtime.snapshot()))
    assert report == (
        "Service #1: web-shop\n"
        "  ✅ search-availability: 99.00% of 99% / 30d (Availability, met, <0.01% of the window observed) trend ✓\n"
        "  ❌ search-latency: 98.50% of 99.5% / 30d (Latency, not met, <0.01% of the window observed) trend ✕\n"
    )


@pytest.mark.parametrize("manifest", [OPENSLO, FIXTURES / "prometheus.yaml", FIXTURES / "occurrences-search.yaml"],
                         ids=lambda p: p.name)
def test_slo_rules_from_openslo_pass_promtool(manifest: Path, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: `make setup` installs Debian's prometheus package")
    rules = subprocess.run([sys.executable, "-m", "exporter", "slo", "rules", "--slo", str(manifest)],
                           cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
    path = tmp_path / "rules.yml"
    path.write_text(rules)
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    objectives = load_manifest(manifest)
    assert "SUCCESS" in checked.stdout + checked.stderr
    for objective in objectives:
        assert f'slo: {objective.slug}' in rules
