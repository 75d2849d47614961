"""bench/filter_cost.py without a kernel: the frames it replays, by shape (its one-line errors are
tested with replay_cost's, whose loader it shares: test_bench_replay_cost.py)."""

from __future__ import annotations

from pathlib import Path

from bench.filter_cost import load
from tests.unit.test_bench_replay_cost import PORT, write_capture


def test_every_frame_of_the_port_is_replayed_by_shape(tmp_path: Path) -> None:
    path = tmp_path / "h1.pcap"
    write_capture(path, connections=3, exchanges_each=4)
    shapes = [shape for shape, _, _ in load(path, PORT)]
    # 3 x 4 requests and responses; a bare ACK after each response and a FIN each way per connection.
    assert shapes.count("client data") == 12
    assert shapes.count("server data") == 12
    assert shapes.count("no payload") == 12 + 6
    assert len(shapes) == 42
    assert load(path, PORT + 1) == []
