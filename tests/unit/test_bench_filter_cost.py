"""bench/filter_cost.py without a kernel: the frames it replays, by shape, and its one-line errors."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from bench.filter_cost import load, main
from tests.unit.test_bench_replay_cost import PORT, write_capture


def test_every_frame_of_the_port_is_replayed_by_shape(tmp_path: Path) -> None:
    path = tmp_path / "h1.pcap"
    write_capture(path, connections=3, exchanges_each=4)
    shapes = [shape for shape, _ in load(path, PORT)]
    # 3 x 4 requests and responses; a bare ACK after each response and a FIN each way per connection.
    assert shapes.count("client data") == 12
    assert shapes.count("server data") == 12
    assert shapes.count("no payload") == 12 + 6
    assert len(shapes) == 42
    assert load(path, PORT + 1) == []


def test_a_port_without_traffic_and_a_missing_port_are_one_line_errors(tmp_path: Path) -> None:
    path = tmp_path / "h1.pcap"
    write_capture(path, connections=1, exchanges_each=1)
    result = CliRunner().invoke(main, [str(path), "--port", "9"])
    assert result.exit_code == 1
    assert result.output == f"Error: no frames on port 9 in {path}\n"
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 2
    assert "--port is required to replay" in result.output
