"""Spool integrity under SIGKILL: the SLO runtime's process is killed mid-push and mid-write.

The process is tests/integration/slo_child.py: the exporter's own SloRuntime, Pusher and
Spool with 1 s push intervals, fed synthetic exchanges (no BPF needed). After each kill a
new process starts on the same spool directory. Checked:

- killed while a push hangs: the indicator in flight is still spooled and is sent again by
  the next process with the same value; every indicator spooled at the kill is delivered;
- killed at random moments while 40 objectives write their indicators every second: no
  temporary file survives a restart, nothing is ever quarantined (each write is atomic),
  and in the end everything spooled is delivered, each indicator with one value only
  (a kill lands inside a write only now and then: the torn write itself is covered
  deterministically by the next case);
- a corrupt spool file and a corrupt state file are moved aside (`*.corrupt`), counted, and
  the process carries on delivering the rest.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from exporter.bridge.indicator import Indicator
from tests.integration.harness import REPO
from tests.integration.receiver import Receiver, Recorded

EXAMPLE = REPO / "examples" / "reliably.yaml"


def start_child(url: str, spool: Path, manifest: Path = EXAMPLE, timeout_s: float = 30.0) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.slo_child", "--manifest", str(manifest), "--url", url,
         "--spool", str(spool), "--timeout", str(timeout_s)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.stderr else "")
    return proc


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)  # reaps it and closes the pipes
    assert proc.returncode == -signal.SIGKILL


def stop(proc: subprocess.Popen[str]) -> dict[str, object]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    return dict(json.loads(out.strip().splitlines()[-1]))


def spooled(spool: Path) -> dict[str, float]:
    """Indicator id → percent, for every indicator file in the spool (all must parse)."""
    out = {}
    for path in spool.glob("0*.json"):
        item = Indicator.from_json(json.loads(path.read_bytes()))
        out[item.id] = item.percent
    return out


Key = tuple[str, str, str, str]


def body_key(body: dict[str, Any]) -> Key:
    """(category, from, to, all labels): one indicator of one objective for one interval."""
    labels = body["metadata"]["labels"]
    return labels["category"], body["spec"]["from"], body["spec"]["to"], json.dumps(labels, sort_keys=True)


def key(request: Recorded) -> Key:
    return body_key(request.body)


def delivered(requests: Iterable[Recorded]) -> dict[Key, set[float]]:
    out: dict[Key, set[float]] = {}
    for request in requests:
        if isinstance(request.body, dict) and "spec" in request.body:
            out.setdefault(key(request), set()).add(request.body["spec"]["percent"])
    return out


def spooled_keys(spool: Path) -> dict[Key, float]:
    out = {}
    for path in spool.glob("0*.json"):
        item = Indicator.from_json(json.loads(path.read_bytes()))
        out[body_key(item.body())] = item.percent
    return out


def wait_until(condition: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_sigkill_during_a_hanging_push_loses_nothing(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    with Receiver() as hanging:
        hanging.hang_next(10_000)  # every push hangs until the receiver stops
        first = start_child(hanging.url, spool)
        wait_until(lambda: len(hanging.requests) >= 1, 10)  # a push is in flight
        time.sleep(1.5)
        kill(first)
        in_flight = hanging.requests[0]
        at_kill = spooled_keys(spool)
    assert key(in_flight) in at_kill  # not acknowledged, so still spooled
    assert at_kill[key(in_flight)] == in_flight.body["spec"]["percent"]
    # The hung one and its sibling of the same interval. (The loop that closes intervals also
    # pushes, so while a push hangs, up to its timeout, no later interval is closed yet.)
    assert len(at_kill) >= 2
    with Receiver() as receiver:
        second = start_child(receiver.url, spool)
        wait_until(lambda: set(at_kill) <= set(delivered(receiver.requests)), 15)
        counters = stop(second)
        sent = delivered(receiver.requests)
    for k, percent in at_kill.items():
        assert sent[k] == {percent}, k  # delivered, with the value it had when spooled
    both = delivered([in_flight, *receiver.requests])
    assert all(len(values) == 1 for values in both.values())  # never two values for one indicator
    assert counters["quarantined"] == 0
    assert not list(spool.glob(".tmp-*")) and not list(spool.glob("*.corrupt"))


def many_objectives(path: Path, count: int) -> Path:
    docs = []
    for i in range(count):
        docs.append(f"""apiVersion: reliably.com/v1
kind: Objective
metadata:
  labels:
    name: objective {i}
    service: kill-test
spec:
  indicatorSelector:
    category: availability
    path: /
    n: "{i}"
  objectivePercent: 99
  window: 10s
""")
    path.write_text("---\n".join(docs))
    return path


def test_sigkill_at_random_moments_of_spool_writes(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    manifest = many_objectives(tmp_path / "many.yaml", 40)  # 40 atomic writes every second
    rng = random.Random(6)
    down = Receiver().start()
    url = down.url
    down.stop()  # pushes fail fast (connection refused): indicators pile up in the spool
    torn = 0
    for _ in range(6):
        proc = start_child(url, spool, manifest, timeout_s=0.2)
        time.sleep(1.0 + rng.random() * 1.5)
        kill(proc)
        assert all(p.suffix == ".json" or p.name.startswith(".tmp-") for p in spool.iterdir())
        torn += len(list(spool.glob(".tmp-*")))  # kills that landed inside a write
        spooled(spool)  # every file parses: a kill never leaves half a file under a real name
    print(f"kills inside a spool write: {torn} of 6")
    at_end = spooled_keys(spool)
    assert len(at_end) >= 40
    port = int(url.rsplit(":", 1)[1])
    with Receiver(port) as receiver:
        last = start_child(receiver.url, spool, manifest)
        assert not list(spool.glob(".tmp-*"))  # leftovers of interrupted writes are removed at start
        wait_until(lambda: set(at_end) <= set(delivered(receiver.requests)), 30)
        counters = stop(last)
    sent = delivered(receiver.requests)
    assert all(len(values) == 1 for values in sent.values())
    for k, percent in at_end.items():
        assert sent[k] == {percent}
    assert counters["quarantined"] == 0
    assert not list(spool.glob("*.corrupt"))


def test_corrupt_spool_files_are_quarantined_not_fatal(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    good = Indicator("slug", (("category", "availability"), ("path", "/")), 1_700_000_000, 1_700_000_001, 99.5)
    (spool / f"{1:016d}-{good.id}.json").write_text(json.dumps(good.to_json()))
    truncated = json.dumps(good.to_json())[:40]
    (spool / f"{2:016d}-{'a' * 24}.json").write_text(truncated)  # a torn write
    (spool / f"{3:016d}-{'b' * 24}.json").write_bytes(b"\x00\xff garbage")
    (spool / "not-a-spool-name.json").write_text("{}")
    (spool / ".tmp-0000000000000004-cccccccccccccccccccccccc.json").write_text("{\"half")
    (spool / "state.json").write_text("{not json")
    with Receiver() as receiver:
        proc = start_child(receiver.url, spool)
        wait_until(lambda: body_key(good.body()) in delivered(receiver.requests), 10)
        counters = stop(proc)
    assert sorted(p.name for p in spool.glob("*.corrupt")) == sorted([
        f"{2:016d}-{'a' * 24}.json.corrupt", f"{3:016d}-{'b' * 24}.json.corrupt",
        "not-a-spool-name.json.corrupt", "state.json.corrupt"])
    assert counters["quarantined"] == 4
    assert not list(spool.glob(".tmp-*"))
    assert delivered(receiver.requests)[body_key(good.body())] == {99.5}
