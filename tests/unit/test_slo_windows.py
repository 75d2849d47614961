"""Bucketed windows and interval closing, driven by plain numbers (a fake clock)."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.core.model import Exchange
from exporter.slo.evaluate import Evaluator
from exporter.slo.manifest import load_manifest, parse_manifest
from exporter.slo.windows import BucketRing, choose_bucket_seconds, slots_needed

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "reliably.yaml"
S = 1_000_000_000


def exchange(end_s: float, *, ms: float = 10, status: int = 200, port: int = 8000) -> Exchange:
    end_ns = round(end_s * S)
    return Exchange("GET", "/", status, end_ns - round(ms * 1_000_000), end_ns, 0, 0, port)


@pytest.mark.parametrize(
    ("push", "windows", "expected"),
    [
        (10, [60], 10),
        (10, [15], 5),
        (10, [60, 30 * 86400], 10),
        (3, [60], 3),
        (7, [60], 1),
        (30, [3600], 10),
        (20, [60], 10),
        (1, [], 1),
        (10, [1.5], 2),  # a window of 1.5 s counts as 2 s for alignment
    ],
)
def test_bucket_size_divides_push_interval_and_windows(
    push: int, windows: list[float], expected: int
) -> None:
    assert choose_bucket_seconds(push, windows) == expected


@pytest.mark.parametrize("push", [0, 2.5, -10])
def test_bucket_size_needs_a_whole_push_interval(push: float) -> None:
    with pytest.raises(ValueError, match="whole number of seconds"):
        choose_bucket_seconds(push, [60])  # type: ignore[arg-type]


def test_slots_cover_window_open_interval_grace_and_skew() -> None:
    assert slots_needed(60, 10, 2, 10) == 6 + 2 + 2
    assert slots_needed(5, 10, 0, 5) == 2 + 2 + 2  # window shorter than an interval: the interval wins


def test_ring_counts_per_bucket_and_reuses_slots() -> None:
    ring = BucketRing(3)
    assert ring.add(100, True) and ring.add(100, False) and ring.add(101, True)
    assert ring.sum(100, 102) == (2, 3)
    assert ring.add(103, True)  # slot of 100 is reused: 100 is gone
    assert ring.sum(100, 104) == (2, 2)
    assert ring.add(100, True) is False  # that slot now holds a newer bucket
    assert ring.sum(101, 104) == (2, 2)
    assert ring.sum(0, 1000) == (0, 0)  # only the last `slots` buckets before `end` are ever held


def demo(start_s: float = 1003.0, **kwargs: float) -> Evaluator:
    return Evaluator(load_manifest(EXAMPLE), 10, start_s=start_s, **kwargs)  # type: ignore[arg-type]


def test_demo_manifest_gives_ten_second_buckets() -> None:
    ev = demo()
    assert ev.bucket_s == 10
    assert ev.closed_until_s == 1000


def test_event_on_the_boundary_belongs_to_the_next_interval() -> None:
    ev = demo()
    ev.observe(exchange(1009.999999999), "/", 1010 * S)
    ev.observe(exchange(1010.0), "/", 1010 * S)
    first = ev.close(1010)[0].interval
    assert (first.start_s, first.end_s, first.good, first.total) == (1000, 1010, 1, 1)
    second = ev.close(1020)[0].interval
    assert (second.start_s, second.end_s, second.total) == (1010, 1020, 1)


def test_event_arriving_during_a_close_lands_in_exactly_one_bucket() -> None:
    ev = demo()
    for t in (1001, 1002, 1008):
        ev.observe(exchange(t), "/", 1011 * S)
    closed = ev.close(1010)
    assert closed[0].interval.total == 3
    # Arrives after the close (a backlog), stamped before the boundary: it is counted once,
    # in its own bucket; the indicator already closed is not changed, the window includes it.
    ev.observe(exchange(1009.5), "/", 1013 * S)
    assert ev.late_after_close == 1
    assert closed[0].interval.total == 3
    later = ev.close(1020)[0]
    assert later.interval.total == 0
    assert (later.window.start_s, later.window.total) == (960, 4)


def test_latency_and_availability_verdicts() -> None:
    ev = demo()
    ev.observe(exchange(1001, ms=150), "/", 1010 * S)  # exactly on target: good
    ev.observe(exchange(1002, ms=150.000001), "/", 1010 * S)  # 1 ns over: bad
    ev.observe(exchange(1003, status=404), "/", 1010 * S)  # 4xx is good by default
    ev.observe(exchange(1004, status=503), "/", 1010 * S)
    latency, availability = ev.close(1010)
    assert (latency.interval.good, latency.interval.total) == (3, 4)
    assert (availability.interval.good, availability.interval.total) == (3, 4)


def test_other_routes_and_ports_are_not_counted() -> None:
    text = EXAMPLE.read_text().replace(
        "    path: /\n  objectivePercent: 99", '    path: /\n    port: "8000"\n  objectivePercent: 99'
    )
    ev = Evaluator(parse_manifest(text), 10, start_s=1003)
    ev.observe(exchange(1001), "/other", 1010 * S)
    ev.observe(exchange(1002, port=9000), "/", 1010 * S)
    latency, availability = ev.close(1010)
    assert latency.interval.total == 2 - 1  # no port in the latency objective: only /other is skipped
    assert availability.interval.total == 0


def test_empty_window_is_no_data_not_zero() -> None:
    ev = demo()
    closed = ev.close(1010)
    for item in closed:
        assert item.window.total == 0
        assert item.window.sli is None
        assert item.window.percent is None
        assert item.window.burn_rate is None
        assert item.window.budget_remaining is None
        assert item.window.met is None
    assert ev.latest() == [closed[0].window, closed[1].window]


def test_idle_gap_does_not_shift_windows() -> None:
    ev = demo()
    for t in range(1000, 1010):
        ev.observe(exchange(t + 0.5), "/", 1010 * S)
    ev.close(1010)
    # Nothing for three minutes: the window at 1210 covers [1150, 1210) and is empty.
    for to in range(1020, 1211, 10):  # what the scheduler closes by 1212
        ev.close(to)
    window = ev.latest()[0]
    assert window is not None and (window.start_s, window.end_s, window.total) == (1150, 1210, 0)
    ev.observe(exchange(1205), "/", 1212 * S)
    window = ev.close(1220)[0].window
    assert (window.start_s, window.end_s, window.total) == (1160, 1220, 1)


def test_late_event_counts_while_its_bucket_is_kept() -> None:
    ev = demo()
    ev.observe(exchange(1012), "/", 1035 * S)  # 23 s late: still in a kept bucket
    for to in range(1010, 1041, 10):
        ev.close(to)
    window = ev.latest()[0]
    assert window is not None and window.total == 1
    ev.observe(exchange(1012), "/", 2000 * S)  # far older than any kept bucket
    assert ev.too_old == 1


def test_timestamp_far_in_the_future_is_refused() -> None:
    ev = demo()
    ev.observe(exchange(1040), "/", 1010 * S)
    assert ev.future == 1
    assert ev.close(1010)[0].window.total == 0


def test_window_slides_over_aligned_buckets() -> None:
    ev = demo(start_s=1000)
    for t in range(1000, 1100):  # one request per second, each second's is bad every 10th
        ev.observe(exchange(t + 0.5, ms=500 if t % 10 == 0 else 10), "/", (t + 1) * S)
    for to in range(1010, 1101, 10):
        ev.close(to)
    window = ev.latest()[0]
    assert window is not None
    assert (window.start_s, window.end_s, window.good, window.total) == (1040, 1100, 54, 60)


def test_history_keeps_the_last_five_results() -> None:
    ev = demo(start_s=1000)
    for to in range(1010, 1080, 10):
        ev.close(to)
    trend = ev.trends()[0]
    assert [r.end_s for r in trend] == [1030, 1040, 1050, 1060, 1070]


def test_watermark_from_a_previous_run_is_not_closed_again() -> None:
    ev = demo(start_s=1003, closed_until_s=1030)
    assert ev.closed_until_s == 1030
    ev.observe(exchange(1025), "/", 1042 * S)  # in an interval the previous run closed
    assert ev.late_after_close == 1


def test_grace_must_be_shorter_than_the_interval() -> None:
    with pytest.raises(ValueError, match="grace"):
        demo(grace_s=10)
