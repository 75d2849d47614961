"""bench/tls_replay_cost.py on a small written file of TLS ring records: the exchanges it replays."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from bench.tls_replay_cost import load, main, save
from exporter.capture.tls import KIND_CLOSE, KIND_READ, KIND_WRITE
from tests.unit.test_tls import REQUEST, RESPONSE, event, opened, raw


def write_events(path: Path, connections: int, exchanges_each: int) -> None:
    """Keep-alive connections of `exchanges_each` exchanges each, a batch per connection, then its close."""
    batches = []
    for conn in range(connections):
        ssl = 0x100 + conn
        records = [raw(opened(ssl=ssl, fd=10 + conn, peer_port=40000 + conn))]
        for i in range(exchanges_each):
            records += [raw(event(KIND_READ, i * len(REQUEST), REQUEST, ssl=ssl, ts=1000 * i)),
                        raw(event(KIND_WRITE, i * len(RESPONSE), RESPONSE, ssl=ssl, ts=1000 * i + 500))]
        records.append(raw(event(KIND_CLOSE, 0, ssl=ssl, ts=10**6)))
        batches.append(records)
    save(path, 8443, batches)


def test_the_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "tls.events"
    write_events(path, connections=2, exchanges_each=3)
    port, batches = load(path)
    assert port == 8443
    assert [len(batch) for batch in batches] == [8, 8]
    assert batches[0][1] == raw(event(KIND_READ, 0, REQUEST, ssl=0x100, ts=0))


def test_replays_every_exchange(tmp_path: Path) -> None:
    path = tmp_path / "tls.events"
    write_events(path, connections=3, exchanges_each=4)
    result = CliRunner().invoke(main, [str(path), "--passes", "2", "--profile", "3"])
    assert result.exit_code == 0, result.output
    assert "30 records in 3 batches, 12 exchanges (2.50 records each), port 8443" in result.output
    assert re.search(r"^capture +[0-9.]+ µs/exchange", result.output, re.M)
    assert re.search(r"^pipeline +[0-9.]+ µs/exchange", result.output, re.M)
    assert "function calls" in result.output  # the profile


def test_a_file_without_exchanges_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tls.events"
    save(path, 8443, [[raw(opened())]])
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 1
    assert "no exchanges in" in result.output
