"""The one interval scheduler (exporter/bridge/scheduler.py) with a fake clock and a scripted source:
due times, the watermark, the indicator shape, the one backoff policy, catch-up limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.bridge.backoff import Backoff
from exporter.bridge.client import ReliablyClient
from exporter.bridge.indicator import Indicator
from exporter.bridge.pusher import Pusher
from exporter.bridge.scheduler import IntervalScheduler, Measured
from exporter.bridge.settings import PushSettings
from exporter.bridge.spool import Spool
from exporter.errors import QueryError
from tests.fake_clock import Clock


class Source:
    """Two objectives; `a` at 99.5 %, `b` with no data; fails while `failing` is set."""

    def __init__(self) -> None:
        self.closed: list[int] = []
        self.failing = 0

    def close_interval(self, to_s: int) -> list[tuple[str, float | None]]:
        if self.failing:
            self.failing -= 1
            raise QueryError("Prometheus did not answer within 5s")
        self.closed.append(to_s)
        return [("a", 99.5), ("b", None)]

    def measured(self, item: tuple[str, float | None]) -> Measured:
        return Measured(item[0], (("service", item[0]),), item[1])


def scheduler(clock: Clock, source: Source, pusher: Pusher | None = None, **kwargs: object) -> IntervalScheduler:
    sent: list[Indicator] = []
    sched: IntervalScheduler = IntervalScheduler(
        source,
        pusher,
        interval_s=10,
        grace_s=2.0,
        max_catchup_s=kwargs.pop("max_catchup_s", 3600.0),  # type: ignore[arg-type]
        wall_clock=clock,
        backoff=Backoff(base_s=1.0, max_s=4.0, jitter=None),
        on_indicators=sent.extend,
    )
    sched.sent = sent  # type: ignore[attr-defined]
    return sched


def test_due_waits_for_the_grace_period_and_catches_up_in_order() -> None:
    clock, source = Clock(1003.0), Source()
    sched = scheduler(clock, source)
    assert sched.closed_until_s == 1000  # the interval under way at start is never closed half-empty
    assert sched.due(1011.9) == []
    assert sched.due(1012.0) == [1010]
    clock.now = 1012.0
    sched.tick()
    assert sched.due(1035.0) == [1020, 1030]
    assert sched.next_due_s() == 1022.0


def test_one_indicator_per_objective_with_data_and_counted_outcomes() -> None:
    clock, source = Clock(1003.0), Source()
    sched = scheduler(clock, source)
    clock.now = 1032.5
    assert sched.tick() == [("a", 99.5), ("b", None)] * 3
    assert sched.sent == [Indicator("a", (("service", "a"),), t - 10, t, 99.5) for t in (1010, 1020, 1030)]
    assert dict(sched.evaluations) == {"ok": 3, "no_data": 3, "error": 0}
    assert sched.closed_until_s == 1030


def test_a_failing_source_retries_the_same_interval_after_the_backoff() -> None:
    clock, source = Clock(1003.0), Source()
    sched = scheduler(clock, source)
    source.failing = 2
    clock.now = 1022.0
    assert sched.tick() == []  # 1010 fails: stop there, keep the order
    assert sched.closed_until_s == 1000 and sched.last_error == "Prometheus did not answer within 5s"
    assert sched.next_due_s() == 1023.0  # backoff 1 s
    clock.now = 1022.5
    assert sched.tick() == [] and source.closed == []  # still backing off: the source is not asked
    clock.now = 1023.0
    assert sched.tick() == []  # second failure: 2 s
    assert sched.next_due_s() == 1025.0
    clock.now = 1025.0
    sched.tick()
    assert source.closed == [1010, 1020]
    assert [i.to_s for i in sched.sent] == [1010, 1020]
    assert dict(sched.evaluations) == {"ok": 2, "no_data": 2, "error": 2}


def test_intervals_beyond_the_catch_up_limit_are_skipped_and_counted() -> None:
    clock, source = Clock(1003.0), Source()
    sched = scheduler(clock, source, max_catchup_s=30.0)
    clock.now = 1102.0
    sched.tick()
    assert source.closed == [1070, 1080, 1090, 1100]
    samples = {(s.name, s.labels): s.value for s in sched.self_samples()}
    assert samples[("slo_intervals_skipped_total", ())] == 6


def test_final_tick_closes_what_ended_without_waiting_for_the_grace() -> None:
    clock, source = Clock(1003.0), Source()
    sched = scheduler(clock, source)
    clock.now = 1010.5
    assert sched.tick() == []
    sched.stop(timeout_s=0.2)
    assert source.closed == [1010]


def test_the_watermark_is_saved_with_the_indicators_and_wins_after_a_restart(tmp_path: Path) -> None:
    client = ReliablyClient(PushSettings("http://127.0.0.1:9", "org", "token"))
    try:
        clock, source = Clock(1003.0), Source()
        sched = scheduler(clock, source, Pusher(client, Spool(tmp_path)))
        clock.now = 1032.0
        sched.tick()
        assert Spool(tmp_path).read_state() == {"closed_until": 1030}
        assert len(Spool(tmp_path)) == 3
        clock.now = 1033.0  # restarted in the interval after: 1030 is not closed again
        again = scheduler(clock, Source(), Pusher(client, Spool(tmp_path)))
        assert again.closed_until_s == 1030
        assert again.due(1042.0) == [1040]
    finally:
        client.close()


@pytest.mark.parametrize(("failures", "fixed"), [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)])
def test_backoff_is_capped_exponential_with_equal_jitter(failures: int, fixed: float) -> None:
    assert Backoff(1.0, 8.0, jitter=None).delay(failures) == fixed
    assert Backoff(1.0, 8.0, jitter=lambda: 0.0).delay(failures) == fixed / 2
    assert Backoff(1.0, 8.0, jitter=lambda: 1.0).delay(failures) == fixed


def test_bridge_never_imports_slo() -> None:
    """The dependency runs one way: slo/ plugs its sources into bridge/'s scheduler."""
    import ast

    bridge = Path(__file__).resolve().parents[2] / "exporter" / "bridge"
    offenders = []
    for path in sorted(bridge.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [node.module or ""] if isinstance(node, ast.ImportFrom)
                else [alias.name for alias in node.names] if isinstance(node, ast.Import)
                else []
            )
            offenders += [f"{path.name}: {name}" for name in names if name.startswith("exporter.slo")]
    assert {p.name for p in bridge.glob("*.py")} >= {"backoff.py", "pusher.py", "scheduler.py"}
    assert offenders == []
