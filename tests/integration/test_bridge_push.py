"""Pushing indicators to a real local HTTP receiver: bodies, retries, rejections, outages, restarts."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.bridge.backoff import Backoff
from exporter.bridge.indicator import rfc3339
from exporter.bridge.settings import PushSettings
from exporter.core.model import Exchange
from exporter.slo.manifest import load_manifest
from exporter.slo.runtime import SloRuntime
from tests.fake_clock import Clock
from tests.integration.receiver import Receiver

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "reliably.yaml"
TOKEN = "tok-9f8e7d6c5b4a-secret"
ORG = "demo-org"
PATH = f"/entities/{ORG}/reliably.com/v1/indicator"
T0 = 1622548800  # 2021-06-01T12:00:00Z


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as rx:
        yield rx


def ex(end_s: float, ms: float = 10, status: int = 200) -> Exchange:
    end = round(end_s * 1e9)
    return Exchange("GET", "/", status, end - round(ms * 1e6), end, 0, 0, 8000)


def runtime_for(url: str, spool: Path, clock: Clock | None = None, **kwargs: float) -> SloRuntime:
    return SloRuntime(
        load_manifest(EXAMPLE),
        push=PushSettings(url, ORG, TOKEN, timeout_s=kwargs.pop("timeout_s", 2.0)),
        spool_dir=spool,
        wall_clock=clock or time.time,
        backoff=Backoff(base_s=0.02, max_s=0.1),
        **kwargs,  # type: ignore[arg-type]
    )


def drain(runtime: SloRuntime, seconds: float = 5.0) -> None:
    assert runtime.pusher is not None
    runtime.pusher.pump(time.monotonic() + seconds, threading.Event())


def traffic(runtime: SloRuntime, clock: Clock, start: float, n: int, slow: int = 0, errors: int = 0) -> None:
    """n exchanges spread over [start, start + 9); the first `slow` are slow, the next `errors` fail."""
    for i in range(n):
        clock.now = start + i * 9 / n
        runtime.observe(
            ex(clock.now, ms=300 if i < slow else 5, status=500 if slow <= i < slow + errors else 200), "/"
        )


def test_exact_bodies_and_headers(receiver: Receiver, tmp_path: Path) -> None:
    clock = Clock(T0 + 0.5)
    runtime = runtime_for(receiver.url, tmp_path, clock)
    traffic(runtime, clock, T0 + 0.5, 200, slow=3, errors=1)
    clock.now = T0 + 12
    runtime.tick()
    drain(runtime)
    latency, availability = receiver.wait_for(2)
    assert (latency.method, latency.path) == ("PUT", PATH)
    assert latency.headers["Authorization"] == f"Bearer {TOKEN}"
    assert latency.headers["Content-Type"] == "application/json"
    assert latency.body == {
        "metadata": {
            "labels": {
                "category": "latency",
                "latency_target": "150ms",
                "path": "/",
                "percentile": "100",
                "from": "2021-06-01T12:00:00Z",
                "to": "2021-06-01T12:00:10Z",
            }
        },
        "spec": {"from": "2021-06-01T12:00:00Z", "to": "2021-06-01T12:00:10Z", "percent": 98.5},
    }
    assert availability.body == {
        "metadata": {
            "labels": {
                "category": "availability",
                "path": "/",
                "from": "2021-06-01T12:00:00Z",
                "to": "2021-06-01T12:00:10Z",
            }
        },
        "spec": {"from": "2021-06-01T12:00:00Z", "to": "2021-06-01T12:00:10Z", "percent": 99.5},
    }
    # The next interval had no traffic: nothing is sent for it (never a 0%).
    clock.now = T0 + 22
    runtime.tick()
    drain(runtime, 0.3)
    assert len(receiver.requests) == 2
    assert runtime.pusher is not None and runtime.pusher.outcomes["ok"] == 2


def test_server_errors_are_retried_until_accepted(receiver: Receiver, tmp_path: Path) -> None:
    receiver.script(500, 502, (429, {"Retry-After": "1"}))
    clock = Clock(T0 + 0.5)
    runtime = runtime_for(receiver.url, tmp_path, clock)
    traffic(runtime, clock, T0 + 0.5, 10)
    clock.now = T0 + 12
    runtime.tick()
    drain(runtime)
    requests = receiver.wait_for(5)
    assert len(requests) == 5
    bodies = [r.body for r in requests]
    assert bodies[0] == bodies[1] == bodies[2] == bodies[3]  # the same indicator, unchanged, until accepted
    assert bodies[4] != bodies[0]  # then the next one
    assert requests[3].at - requests[2].at >= 0.95  # Retry-After: 1 was honoured
    samples = {(s.name, s.labels): s.value for s in runtime.self_samples()}
    assert samples[("slo_push_total", (("outcome", "retry"),))] == 3
    assert samples[("slo_push_total", (("outcome", "ok"),))] == 2
    assert samples[("slo_push_errors_total", (("reason", "http_5xx"),))] == 2
    assert samples[("slo_push_errors_total", (("reason", "http_429"),))] == 1
    assert samples[("slo_spool_indicators", ())] == 0


def test_client_errors_are_not_retried(
    receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.script(400)
    clock = Clock(T0 + 0.5)
    runtime = runtime_for(receiver.url, tmp_path, clock)
    traffic(runtime, clock, T0 + 0.5, 10)
    clock.now = T0 + 12
    with caplog.at_level(logging.ERROR):
        runtime.tick()
        drain(runtime)
    requests = receiver.wait_for(2)
    time.sleep(0.2)
    assert len(receiver.requests) == 2  # the rejected one was not sent again; the other went through
    assert requests[0].body != requests[1].body
    samples = {(s.name, s.labels): s.value for s in runtime.self_samples()}
    assert samples[("slo_push_total", (("outcome", "rejected"),))] == 1
    assert samples[("slo_push_total", (("outcome", "ok"),))] == 1
    assert samples[("slo_spool_indicators", ())] == 0
    assert any(f"PUT {receiver.url}{PATH} answered 400" in r.getMessage() for r in caplog.records)


def test_unreachable_then_recovered_loses_nothing(tmp_path: Path) -> None:
    """A real loop with 1 s intervals and live traffic; the endpoint goes away for ~3 s."""
    first = Receiver().start()
    runtime = runtime_for(first.url, tmp_path, timeout_s=0.5, push_interval_s=1, grace_s=0.2)
    second = Receiver(first.port)
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            runtime.observe(ex(time.time(), ms=1), "/")
            time.sleep(0.02)

    feeder = threading.Thread(target=load, daemon=True)
    load_started = time.time()
    feeder.start()
    runtime.start()
    try:
        time.sleep(2.5)
        first.stop()
        time.sleep(3.0)
        second.start()
        time.sleep(2.0)
        stop.set()
        feeder.join()
        load_stopped = time.time()
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline and (
            runtime.evaluator.closed_until_s < int(load_stopped)
            or (runtime.pusher and len(runtime.pusher.spool))
        ):
            time.sleep(0.05)
    finally:
        runtime.stop(2.0)
        second.stop()
    assert runtime.pusher is not None
    assert runtime.pusher.reasons["network"] >= 1  # the outage was noticed
    assert len(runtime.pusher.spool) == 0
    bodies: dict[tuple[str, str], set[str]] = {}
    for request in first.requests + second.requests:
        key = (request.body["metadata"]["labels"]["category"], request.body["spec"]["to"])
        bodies.setdefault(key, set()).add(repr(request.body))
    # Every interval with traffic arrived, and a resend (if any) carried the same value.
    wanted = {
        (c, rfc3339(to))
        for to in range(int(load_started) + 1, int(load_stopped) + 1)
        for c in ("latency", "availability")
    }
    assert wanted <= set(bodies)
    assert all(len(v) == 1 for v in bodies.values())
    assert len(second.requests) >= 6  # the backlog from the outage went to the second receiver


def test_outage_delivery_is_complete_and_ordered(tmp_path: Path) -> None:
    """Same outage with a fake clock: every interval exactly once, in order, none lost."""
    receiver = Receiver().start()
    clock = Clock(T0 + 0.5)
    runtime = runtime_for(receiver.url, tmp_path, clock, timeout_s=0.5)
    delivered = []
    for k in range(6):
        traffic(runtime, clock, T0 + 10 * k + 0.5, 20)
        clock.now = T0 + 10 * k + 12
        runtime.tick()
        if k == 2:
            receiver.stop()  # unreachable for intervals 2, 3 and 4
        if k == 5:
            receiver = Receiver(receiver.port).start()
        drain(runtime, 1.0)
        delivered += [r.body["spec"]["to"] for r in receiver.requests]
        receiver.requests.clear()
    drain(runtime, 3.0)
    delivered += [r.body["spec"]["to"] for r in receiver.requests]
    receiver.stop()
    expected = [
        f"2021-06-01T12:00:{10 * (k + 1):02d}Z" if k < 5 else "2021-06-01T12:01:00Z" for k in range(6)
    ]
    assert delivered == [to for to in expected for _ in range(2)]


def test_restart_delivers_spooled_indicators_exactly_once(tmp_path: Path) -> None:
    down = Receiver().start()
    port = down.port
    down.stop()  # nobody listens on the port
    clock = Clock(T0 + 0.5)
    first = runtime_for(f"http://127.0.0.1:{port}", tmp_path, clock, timeout_s=0.3)
    for k in range(2):
        traffic(first, clock, T0 + 10 * k + 0.5, 20, errors=k + 1)
        clock.now = T0 + 10 * k + 12
        first.tick()
    drain(first, 0.3)
    assert first.pusher is not None and len(first.pusher.spool) == 4
    first.stop()

    clock.now = T0 + 25  # the restart happens during interval [20, 30)
    with Receiver(port) as rx:
        second = runtime_for(rx.url, tmp_path, clock)
        assert second.evaluator.closed_until_s == T0 + 20  # never re-closes what the first run closed
        drain(second)
        rx.wait_for(4)
        time.sleep(0.2)
        assert [
            (r.body["metadata"]["labels"]["category"], r.body["spec"]["to"], r.body["spec"]["percent"])
            for r in rx.requests
        ] == [
            ("latency", "2021-06-01T12:00:10Z", 100.0),
            ("availability", "2021-06-01T12:00:10Z", 95.0),
            ("latency", "2021-06-01T12:00:20Z", 100.0),
            ("availability", "2021-06-01T12:00:20Z", 90.0),
        ]
        third = runtime_for(rx.url, tmp_path, clock)
        drain(third, 0.3)
        assert len(rx.requests) == 4  # delivered once: a third start has nothing left to send
    assert not list(tmp_path.glob("0*.json"))


def test_stop_returns_while_the_endpoint_hangs(receiver: Receiver, tmp_path: Path) -> None:
    receiver.hang_next(5)
    clock = Clock(T0 + 0.5)
    runtime = runtime_for(receiver.url, tmp_path, clock, timeout_s=10.0)
    traffic(runtime, clock, T0 + 0.5, 10)
    clock.now = T0 + 12
    runtime.tick()
    runtime.start()
    receiver.wait_for(1)
    started = time.monotonic()
    runtime.stop(timeout_s=1.0)
    assert time.monotonic() - started < 1.5
    assert runtime.pusher is not None and len(runtime.pusher.spool) == 2  # still spooled for the next run
    receiver.release()


def test_token_never_leaks(receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    receiver.echo_headers = True  # a server that reflects the Authorization header in its error body
    receiver.script(500, 401)
    clock = Clock(T0 + 0.5)
    runtime = runtime_for(receiver.url, tmp_path, clock)
    traffic(runtime, clock, T0 + 0.5, 10)
    clock.now = T0 + 12
    with caplog.at_level(logging.DEBUG):
        runtime.tick()
        drain(runtime)
        receiver.wait_for(3)
    assert receiver.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert any("answered 500" in r.getMessage() for r in caplog.records)
    assert TOKEN not in caplog.text
    assert all(TOKEN not in r.getMessage() for r in caplog.records)
    assert TOKEN not in repr(runtime) and TOKEN not in repr(runtime.pusher.client if runtime.pusher else None)
    assert TOKEN not in str(runtime.snapshot())
    assert all(TOKEN not in str(s) for s in runtime.self_samples())
    assert runtime.snapshot()["push"]["last_error"].startswith(f"PUT {receiver.url}{PATH} answered 401")


def test_stop_closes_the_interval_still_in_its_grace_period(receiver: Receiver, tmp_path: Path) -> None:
    clock = Clock(T0 + 0.5)
    runtime = runtime_for(receiver.url, tmp_path, clock)
    traffic(runtime, clock, T0 + 0.5, 10)
    clock.now = T0 + 11  # [T0, T0+10) has ended; its grace runs until T0+12
    assert runtime.tick() == []
    runtime.stop()
    assert runtime.pusher is not None and len(runtime.pusher.spool) == 2
    restarted = runtime_for(receiver.url, tmp_path, clock)
    assert restarted.evaluator.closed_until_s == T0 + 10
    drain(restarted)
    assert [r.body["spec"]["to"] for r in receiver.wait_for(2)] == ["2021-06-01T12:00:10Z"] * 2
