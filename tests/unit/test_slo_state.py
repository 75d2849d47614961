"""30-day windows: coarse buckets with exact sums, coverage, and the saved state across restarts,
on a fake clock and real files in a temporary directory."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from exporter.core.model import Exchange
from exporter.metrics import ExporterCollector, HttpMetrics
from exporter.slo.evaluate import Evaluator
from exporter.slo.manifest import parse_manifest
from exporter.slo.runtime import SloRuntime
from exporter.slo.windows import COARSE_TARGET_S, BucketRing, WindowCounts
from tests.fake_clock import Clock

S = 1_000_000_000
DAY = 86400
T0 = 1_700_000_000  # a multiple of 10 and of 300

MANIFEST = """
apiVersion: reliably.com/v1
kind: Objective
metadata: {labels: {name: fast, service: shop}}
spec:
  indicatorSelector: {category: latency, latency_target: 150ms}
  objectivePercent: 99
  window: 30d
---
apiVersion: reliably.com/v1
kind: Objective
metadata: {labels: {name: up, service: shop}}
spec:
  indicatorSelector: {category: availability}
  objectivePercent: 99.9
  window: 30d
"""
FAST = {"slo": "shop_fast", "service": "shop", "category": "latency", "window": "30d"}


def exchange(end_s: float, ms: float = 10, status: int = 200) -> Exchange:
    end = round(end_s * S)
    return Exchange("GET", "/", status, end - round(ms * 1e6), end, 0, 0, 80)


def test_thirty_day_window_is_small_and_its_sums_exact() -> None:
    window = WindowCounts(30 * DAY, 10, 2, 10)
    assert window.per_coarse == COARSE_TARGET_S // 10
    assert (window.fine.slots, window.coarse.slots if window.coarse else 0) == (30 + 2 + 2, 8640 + 2)
    arrays = (window.fine._good, window.fine._total, window.coarse._good, window.coarse._total)  # type: ignore[union-attr]
    assert sum(a.itemsize * len(a) for a in arrays) < 150_000  # 8 bytes a slot: ~140 kB, not ~6 MB
    rng = random.Random(7)
    events = []  # (bucket index, good)
    base = T0 // 10
    for _ in range(20_000):
        index = base + rng.randrange(0, 31 * DAY // 10)
        events.append((index, rng.random() < 0.9))
    events.sort()
    for index, good in events:
        assert window.add(index, good)
    end = base + 31 * DAY // 10 - 3  # not on a coarse boundary
    first, good, total = window.window_sum(end)
    # The older edge moves to the next 5-minute boundary: between 30d - 5m and 30d.
    assert first % window.per_coarse == 0
    assert end - 3 * DAY // 10 * 10 <= first < end - 30 * DAY // 10 + window.per_coarse
    expected = [g for i, g in events if first <= i < end]
    assert (good, total) == (sum(expected), len(expected))
    assert window.edge_seconds == 300


def test_short_windows_stay_exact_to_the_bucket() -> None:
    window = WindowCounts(3600, 10, 2, 10)
    assert window.coarse is None and window.edge_seconds == 10
    for i in range(400):
        window.add(1000 + i, i % 3 == 0)
    first, good, total = window.window_sum(1400)
    assert (first, total) == (1040, 360)
    assert good == sum(1 for i in range(40, 400) if i % 3 == 0)


def test_ring_sum_wraps_and_forgets_what_it_passed() -> None:
    ring = BucketRing(4)
    for index in range(10, 17):
        ring.add_many(index, 1, 2)
    assert ring.sum(13, 17) == (4, 8)  # wraps around the array's end
    assert ring.sum(10, 17) == (4, 8)  # 10..12 are no longer held
    assert ring.add(12, True) is False
    ring.add(40, True)  # a jump past the whole ring clears it
    assert ring.sum(0, 41) == (1, 1)


def run_traffic(runtime: SloRuntime, clock: Clock, start: float, seconds: int, slow_every: int) -> int:
    """One exchange a second for `seconds`; every `slow_every`th is slow. Returns the slow count."""
    slow = 0
    for i in range(seconds):
        clock.now = start + i + 0.5
        is_slow = i % slow_every == 0
        slow += is_slow
        runtime.observe(exchange(clock.now, ms=400 if is_slow else 5), "/")
        runtime.tick()
    return slow


def registry_for(runtime: SloRuntime) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExporterCollector(HttpMetrics(), [runtime.self_samples], runtime.collect))
    return registry


def test_restart_keeps_the_window_and_leaves_the_downtime_uncovered(tmp_path: Path) -> None:
    objectives = parse_manifest(MANIFEST)
    clock = Clock(T0)
    first = SloRuntime(objectives, wall_clock=clock, state_dir=tmp_path, state_save_every_s=60)
    slow = run_traffic(first, clock, T0, 600, 10)  # ten minutes
    first.stop()  # a clean stop saves
    assert json.loads((tmp_path / "windows.json").read_text())["saved_at"] == clock.now

    clock.now = T0 + 900.0  # down for about five minutes
    second = SloRuntime(objectives, wall_clock=clock, state_dir=tmp_path, state_save_every_s=60)
    assert second.persistence.restored.restored == 2
    assert second.persistence.restore_gap_s == pytest.approx(900 - 599.5)  # saved at the last clock reading
    slow += run_traffic(second, clock, T0 + 900, 300, 10)
    clock.now = T0 + 1212.0
    second.tick()
    window = second.evaluator.latest()[0]
    assert window is not None
    assert (window.total, window.total - window.good) == (900, slow)
    # Observed: [T0, T0+599.5) before (until the save at stop), [T0+900, T0+1210) after;
    # the window is about 30 days.
    assert window.covered_s == pytest.approx(599.5 + 310)
    assert window.coverage == pytest.approx(909.5 / (window.end_s - window.start_s))
    registry = registry_for(second)
    assert registry.get_sample_value("slo_window_coverage_ratio", FAST) == window.coverage
    assert registry.get_sample_value("ebpf_slo_exporter_slo_state_restored_objectives") == 2
    gap = second.persistence.restore_gap_s
    assert registry.get_sample_value("ebpf_slo_exporter_slo_state_restore_gap_seconds") == gap
    current = second.snapshot()["objectives"][0]["current"]
    assert (current["covered_seconds"], current["coverage"]) == (window.covered_s, window.coverage)


def test_sigkill_loses_at_most_one_save_interval_and_counts_it(tmp_path: Path) -> None:
    objectives = parse_manifest(MANIFEST)
    clock = Clock(T0)
    first = SloRuntime(objectives, wall_clock=clock, state_dir=tmp_path, state_save_every_s=60)
    for i in range(150):
        clock.now = T0 + i + 0.5
        first.observe(exchange(clock.now), "/")
        first.tick()
        first.scheduler.after_tick(False)  # what the scheduler's loop does after each tick
    # Saved at T0+60.5 and T0+120.5; the 29 exchanges after it die with the process (no stop()).
    clock.now = T0 + 200.0
    second = SloRuntime(objectives, wall_clock=clock, state_dir=tmp_path)
    assert second.persistence.restore_gap_s == pytest.approx(200 - 120.5)
    clock.now = T0 + 212.0
    second.tick()
    window = second.evaluator.latest()[0]
    assert window is not None and window.total == 121
    assert window.covered_s == pytest.approx(120.5 + 10)


def test_changed_objective_does_not_inherit_counts(tmp_path: Path) -> None:
    clock = Clock(T0)
    first = SloRuntime(parse_manifest(MANIFEST), wall_clock=clock, state_dir=tmp_path)
    run_traffic(first, clock, T0, 30, 10)
    first.stop()
    changed = parse_manifest(MANIFEST.replace("150ms", "200ms").replace("99.9", "99.5"))
    clock.now = T0 + 40.0
    second = SloRuntime(changed, wall_clock=clock, state_dir=tmp_path)
    # The latency target decides which exchanges are good: a fresh start. The availability
    # target changed too, but its counts do not depend on it: kept.
    assert (second.persistence.restored.restored, second.persistence.restored.discarded) == (1, 1)
    clock.now = T0 + 52.0
    second.tick()
    latency, availability = second.evaluator.latest()
    assert latency is not None and availability is not None
    assert (latency.total, availability.total) == (0, 30)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\x00\xff" * 20, b"[1, 2]", json.dumps({"version": 99}).encode(),
     json.dumps({"version": 1, "saved_at": 1.0, "byteorder": sys.byteorder, "objectives": []}).encode()],
)
def test_corrupt_state_is_moved_aside_and_counted(tmp_path: Path, content: bytes,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "windows.json").write_bytes(content)
    runtime = SloRuntime(parse_manifest(MANIFEST), wall_clock=Clock(T0), state_dir=tmp_path)
    assert (tmp_path / "windows.json.corrupt").read_bytes() == content
    assert not (tmp_path / "windows.json").exists()
    registry = registry_for(runtime)
    assert registry.get_sample_value("ebpf_slo_exporter_slo_state_quarantined_total") == 1
    assert registry.get_sample_value("ebpf_slo_exporter_slo_state_restored_objectives") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "moved aside to windows.json.corrupt" in warnings[0]
    assert "\n" not in warnings[0]


def test_damaged_objective_entry_is_discarded_not_fatal(tmp_path: Path) -> None:
    clock = Clock(T0)
    first = SloRuntime(parse_manifest(MANIFEST), wall_clock=clock, state_dir=tmp_path)
    run_traffic(first, clock, T0, 20, 10)
    first.stop()
    state = json.loads((tmp_path / "windows.json").read_text())
    key = next(iter(state["objectives"]))
    state["objectives"][key]["fine"]["good"] = "not base64!"
    (tmp_path / "windows.json").write_text(json.dumps(state))
    second = SloRuntime(parse_manifest(MANIFEST), wall_clock=Clock(T0 + 30), state_dir=tmp_path)
    assert (second.persistence.restored.restored, second.persistence.restored.discarded) == (1, 1)


def test_unwritable_state_dir_is_a_config_error(tmp_path: Path) -> None:
    from exporter.errors import ConfigError

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="--state-dir"):
        SloRuntime(parse_manifest(MANIFEST), state_dir=blocker / "sub")


def test_fresh_start_coverage_is_the_observed_part() -> None:
    ev = Evaluator(parse_manifest(MANIFEST), 10, start_s=T0 + 3)
    window = ev.close(T0 + 10)[0].window
    assert window.covered_s == 7.0
    assert window.coverage == pytest.approx(7 / (window.end_s - window.start_s))


def test_saved_counts_that_do_not_fit_the_ring_are_refused() -> None:
    import base64
    import zlib

    ring = BucketRing(10)
    ring.add(5, True)
    saved = ring.to_dict()
    too_big = base64.b64encode(zlib.compress(bytes(10**7))).decode()  # inflates to 10 MB
    for damaged in ({**saved, "good": too_big}, {**saved, "total": saved["good"][:8]}, {**saved, "slots": 11},
                    {**saved, "head": "5"}):
        with pytest.raises(ValueError):
            BucketRing(10).load(damaged, sys.byteorder)
    restored = BucketRing(10)
    restored.load(saved, sys.byteorder)
    assert restored.sum(0, 10) == (1, 1)
