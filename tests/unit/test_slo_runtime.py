"""SloRuntime without pushing: /metrics gauges, the /api/v1/slo snapshot and self-metrics, on a fake clock."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import CollectorRegistry

from exporter.core.model import Exchange
from exporter.metrics import ExporterCollector, HttpMetrics
from exporter.slo.manifest import load_manifest
from exporter.slo.runtime import SloRuntime
from tests.fake_clock import Clock

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "reliably.yaml"
S = 1_000_000_000
LATENCY = {
    "slo": "ebpf_2021_demo_99_of_the_responses_are_under_150ms",
    "service": "ebpf-2021-demo",
    "category": "latency",
    "window": "1m",
}
AVAILABILITY = {
    "slo": "ebpf_2021_demo_99_of_the_responses_to_our_users_are_in_the_2xx_class",
    "service": "ebpf-2021-demo",
    "category": "availability",
    "window": "1m",
}


def ex(end_s: float, ms: float = 10, status: int = 200) -> Exchange:
    end = round(end_s * S)
    return Exchange("GET", "/", status, end - round(ms * 1e6), end, 0, 0, 8000)


def registry_for(runtime: SloRuntime) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExporterCollector(HttpMetrics(), [runtime.self_samples], runtime.collect))
    return registry


def test_no_data_means_absent_series_and_null_json() -> None:
    clock = Clock(1003.0)
    runtime = SloRuntime(load_manifest(EXAMPLE), wall_clock=clock)
    registry = registry_for(runtime)
    assert registry.get_sample_value("slo_objective_ratio", LATENCY) == 0.995
    assert registry.get_sample_value("slo_sli_ratio", LATENCY) is None
    clock.now = 1012.0
    runtime.tick()
    assert registry.get_sample_value("slo_sli_ratio", LATENCY) is None
    assert registry.get_sample_value("slo_burn_rate", LATENCY) is None
    assert registry.get_sample_value("slo_total_events", LATENCY) == 0
    snap = runtime.snapshot()
    assert snap["objectives"][0]["current"]["sli_percent"] is None
    assert snap["objectives"][0]["current"]["met"] is None
    assert registry.get_sample_value("ebpf_slo_exporter_slo_evaluations_total", {"outcome": "no_data"}) == 2


def test_gauges_and_snapshot_after_traffic() -> None:
    clock = Clock(1003.0)
    runtime = SloRuntime(load_manifest(EXAMPLE), wall_clock=clock)
    for i in range(200):
        clock.now = 1003 + i * 0.03
        slow = i % 40 == 0  # 5 of 200 over 150 ms
        runtime.observe(ex(clock.now, ms=400 if slow else 5, status=500 if i % 100 == 1 else 200), "/")
    runtime.observe(ex(1009, status=500), "/elsewhere")  # another route: not counted
    clock.now = 1012.0
    closed = runtime.tick()
    assert [c.interval.total for c in closed] == [200, 200]
    registry = registry_for(runtime)
    assert registry.get_sample_value("slo_sli_ratio", LATENCY) == 195 / 200
    assert registry.get_sample_value("slo_good_events", LATENCY) == 195
    assert registry.get_sample_value("slo_total_events", LATENCY) == 200
    assert registry.get_sample_value("slo_burn_rate", LATENCY) == 5 / (200 * 0.005)
    assert registry.get_sample_value("slo_error_budget_remaining_ratio", LATENCY) == 1 - 5 / (200 * 0.005)
    assert registry.get_sample_value("slo_sli_ratio", AVAILABILITY) == 198 / 200
    assert registry.get_sample_value("slo_burn_rate", AVAILABILITY) == 1.0

    snap = runtime.snapshot()
    json.dumps(snap)  # JSON-able
    latency = snap["objectives"][0]
    assert latency == {
        "name": "99% of the responses are under 150ms",
        "service": "ebpf-2021-demo",
        "slug": LATENCY["slo"],
        "category": "latency",
        "objective_percent": 99.5,
        "window": "1m",
        "window_seconds": 60.0,
        "selector": {"category": "latency", "path": "/", "percentile": "100", "latency_target": "150ms"},
        "current": {
            "from": "1970-01-01T00:15:50Z",
            "to": "1970-01-01T00:16:50Z",
            "good": 195,
            "total": 200,
            "sli_percent": 97.5,
            "burn_rate": 5.0,
            "budget_remaining": -4.0,
            "met": False,
            # Started at 1003: 7 s of the minute [950, 1010) were observed.
            "covered_seconds": 7.0,
            "coverage": 7 / 60,
        },
        "history": [latency["current"]],
    }
    assert snap["push"] == {"enabled": False}
    assert snap["generated_at"] == "1970-01-01T00:16:52Z"
    assert (snap["push_interval_seconds"], snap["bucket_seconds"]) == (10, 10)


def test_history_is_the_last_five_windows_oldest_first() -> None:
    clock = Clock(1000.0)
    runtime = SloRuntime(load_manifest(EXAMPLE), wall_clock=clock)
    for second in range(1000, 1070):
        clock.now = second + 0.5
        runtime.observe(ex(clock.now), "/")
        runtime.tick()
    history = runtime.snapshot()["objectives"][0]["history"]
    assert [h["to"][-9:] for h in history] == [
        "00:17:00Z",
        "00:17:10Z",
        "00:17:20Z",
        "00:17:30Z",
        "00:17:40Z",
    ]
    assert all(h["met"] is True for h in history)


def test_self_samples_without_push() -> None:
    clock = Clock(1003.0)
    runtime = SloRuntime(load_manifest(EXAMPLE), wall_clock=clock)
    runtime.observe(ex(1100), "/")  # far in the future of the clock
    names = {(s.name, s.labels) for s in runtime.self_samples()}
    assert ("slo_events_dropped_total", (("reason", "future"),)) in names
    assert ("slo_evaluations_total", (("outcome", "error"),)) in names
    assert not any(name.startswith("slo_push") for name, _ in names)
    values = {(s.name, s.labels): s.value for s in runtime.self_samples()}
    assert values[("slo_events_dropped_total", (("reason", "future"),))] == 1


def test_start_and_stop_without_push_return_promptly() -> None:
    runtime = SloRuntime(load_manifest(EXAMPLE), push_interval_s=1)
    runtime.start()
    runtime.stop(timeout_s=2.0)
    assert runtime.scheduler._thread is None
