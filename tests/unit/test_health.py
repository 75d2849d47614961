"""The degraded state: loss counters over a window, with a fake clock; and /healthz's answer."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from prometheus_client import CollectorRegistry

from exporter.health import LOSS_SIGNALS, Loss, LossWatch, loss_totals
from exporter.metrics import (
    SELF_FLOWS_EVICTED_TOTAL,
    SELF_HTTP2_STREAMS_DROPPED_TOTAL,
    SELF_KERNEL_DROPS_TOTAL,
    SELF_PACKETS_RECEIVED_TOTAL,
    SelfSample,
)
from exporter.server import Health, build_app

WINDOW = 60.0


def counts(**reasons: int) -> dict[str, int]:
    return {signal.reason: reasons.get(signal.reason, 0) for signal in LOSS_SIGNALS}


def reasons(losses: Iterable[Loss]) -> list[tuple[str, int]]:
    return [(loss.reason, loss.count) for loss in losses]


def test_no_loss_is_not_degraded() -> None:
    watch = LossWatch(WINDOW, now_s=0.0)
    for t in range(1, 200):
        assert watch.observe(float(t), counts()) == ()


def test_a_loss_degrades_for_one_window_after_it_stops_then_clears() -> None:
    watch = LossWatch(WINDOW, now_s=0.0)
    for t in range(1, 10):
        watch.observe(float(t), counts())
    # 500 frames dropped between t=9 and t=10, then none.
    for t in range(10, 70):
        assert reasons(watch.observe(float(t), counts(kernel_drops=500))) == [("kernel_drops", 500)], t
    # At t=70 the baseline is t=10's observation, which already had the 500.
    assert watch.observe(70.0, counts(kernel_drops=500)) == ()


def test_the_count_is_what_was_lost_within_the_window_only() -> None:
    watch = LossWatch(WINDOW, now_s=0.0)
    for t in range(1, 121):  # 10 frames lost each second for two minutes
        losses = watch.observe(float(t), counts(kernel_drops=10 * t))
    assert reasons(losses) == [("kernel_drops", 600)]  # t=60 -> t=120


def test_losses_at_start_count_from_zero() -> None:
    watch = LossWatch(WINDOW, now_s=100.0)
    assert reasons(watch.observe(101.0, counts(tls_events_lost=3))) == [("tls_events_lost", 3)]


def test_several_reasons_in_table_order() -> None:
    watch = LossWatch(WINDOW, now_s=0.0)
    losses = watch.observe(1.0, counts(http2_caps=1, kernel_drops=2, capture_detached=1))
    assert reasons(losses) == [("kernel_drops", 2), ("http2_caps", 1), ("capture_detached", 1)]


def test_a_counter_that_went_back_was_reset_and_all_of_it_is_new() -> None:
    watch = LossWatch(WINDOW, now_s=0.0)
    watch.observe(1.0, counts(kernel_drops=1000))
    for t in range(2, 100):
        watch.observe(float(t), counts(kernel_drops=1000))
    assert reasons(watch.observe(100.0, counts(kernel_drops=7))) == [("kernel_drops", 7)]


def test_history_stays_bounded_by_the_window() -> None:
    watch = LossWatch(10.0, now_s=0.0)
    for t in range(1, 10_000):
        watch.observe(float(t), counts())
    assert len(watch._history) <= 12


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        LossWatch(0, now_s=0.0)


def test_loss_totals_pick_their_counter_and_label_and_sum_the_rest() -> None:
    samples = [
        SelfSample(SELF_KERNEL_DROPS_TOTAL, "counter", "", 12),
        SelfSample(SELF_PACKETS_RECEIVED_TOTAL, "counter", "", 99_999),
        SelfSample(SELF_FLOWS_EVICTED_TOTAL, "counter", "", 40, (("reason", "idle"),)),
        SelfSample(SELF_FLOWS_EVICTED_TOTAL, "counter", "", 5, (("reason", "capacity"),)),
        SelfSample(SELF_HTTP2_STREAMS_DROPPED_TOTAL, "counter", "", 2, (("reason", "lost"),)),
        SelfSample(SELF_HTTP2_STREAMS_DROPPED_TOTAL, "counter", "", 9, (("reason", "goaway"),)),
    ]
    assert loss_totals(samples) == counts(kernel_drops=12, flows_evicted_capacity=5, http2_streams_lost=2)


def get(app: object, path: str) -> tuple[str, str, dict[str, str]]:
    seen: dict[str, object] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = status, dict(headers)

    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, start_response))  # type: ignore[operator]
    return str(seen["status"]), body.decode(), seen["headers"]  # type: ignore[return-value]


def test_healthz_ok_degraded_and_not_ready() -> None:
    health = Health(window_s=30)
    app = build_app(CollectorRegistry(), health, "test")
    assert get(app, "/healthz")[:2] == ("503 Service Unavailable",
                                        "not ready: starting: the BPF filter is not attached yet\n")
    health.set(True, "filter attached to lo")
    assert get(app, "/healthz")[:2] == ("200 OK", "ok: filter attached to lo\n")
    watch = LossWatch(30, now_s=0.0)
    health.losses = watch.observe(1.0, counts(kernel_drops=169_588, handover_map_full=2))
    status, body, headers = get(app, "/healthz")
    assert status == "200 OK"  # behind is not dead: no probe may restart or unready it
    assert headers["Cache-Control"] == "no-store"
    assert body == (
        "degraded: kernel_drops, handover_map_full; filter attached to lo\n"
        "kernel_drops: 169588 in the last 30s: frames the kernel dropped because the capture buffer was full "
        "(user space fell behind)\n"
        "handover_map_full: 2 in the last 30s: connections the kernel could not hand over to user space "
        "(handover map full)\n"
    )
    health.losses = watch.observe(40.0, counts(kernel_drops=169_588, handover_map_full=2))
    assert get(app, "/healthz")[:2] == ("200 OK", "ok: filter attached to lo\n")
    health.set(False, "capture detached: interface lo is down; retrying every 1s")
    assert get(app, "/healthz")[0] == "503 Service Unavailable"  # not capturing wins over degraded
