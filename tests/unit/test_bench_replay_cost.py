"""bench/replay_cost.py on a small written capture: the frames it keeps and the exchanges it counts."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from pypacker import ppcap
from pypacker.layer3 import ip
from pypacker.layer4 import tcp

from bench.filter_cost import main as filter_cost_main
from bench.replay_cost import main, new_traces
from exporter.capture.frames import LINKTYPE_ETHERNET
from exporter.core.model import ACK, FIN, PSH

CLIENT, SERVER, PORT = "10.0.0.1", "10.0.0.2", 8000
REQUEST = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def frame(src: str, dst: str, sport: int, dport: int, seq: int, flags: int, payload: bytes = b"") -> bytes:
    segment = tcp.TCP(sport=sport, dport=dport, seq=seq, ack=1, flags=flags)
    segment.body_bytes = payload
    packet = ip.IP(src_s=src, dst_s=dst, p=6) + segment
    return b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", 0x0800) + bytes(packet.bin())


def write_capture(path: Path, connections: int, exchanges_each: int) -> None:
    """Keep-alive connections of `exchanges_each` exchanges, a bare ACK after each response, then FINs."""
    writer = ppcap.Writer(filename=str(path), linktype=LINKTYPE_ETHERNET, magic=ppcap.TCPDUMP_MAGIC_NANO)
    ts = 1_700_000_000_000_000_000
    for conn in range(connections):
        client_port = 40000 + conn
        cseq, sseq = 1000, 5000
        for _ in range(exchanges_each):
            out = [frame(CLIENT, SERVER, client_port, PORT, cseq, ACK | PSH, REQUEST),
                   frame(SERVER, CLIENT, PORT, client_port, sseq, ACK | PSH, RESPONSE)]
            cseq += len(REQUEST)
            sseq += len(RESPONSE)
            out.append(frame(CLIENT, SERVER, client_port, PORT, cseq, ACK))  # the filter drops it
            for data in out:
                ts += 1_000_000
                writer.write(data, ts=ts)
        for data in (frame(CLIENT, SERVER, client_port, PORT, cseq, ACK | FIN),
                     frame(SERVER, CLIENT, PORT, client_port, sseq, ACK | FIN)):
            ts += 1_000_000
            writer.write(data, ts=ts)
    writer.close()


def test_counts_every_exchange_on_both_paths(tmp_path: Path) -> None:
    path = tmp_path / "h1.pcap"
    write_capture(path, connections=3, exchanges_each=4)
    result = CliRunner().invoke(main, [str(path), "--port", str(PORT), "--passes", "2", "--profile", "3"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"h1.pcap: 30 frames kept on port {PORT}"  # 3 x (4 x 2 payloads + 2 FINs)
    for name, line in zip(("pipeline", "tracker"), lines[1:3], strict=True):
        assert re.fullmatch(rf"{name} +\d+\.\d\d µs/exchange  \(12 exchanges, 2\.50 frames each, "
                            r"least of 2 passes\)", line), line
    assert "Ordered by: internal time" in result.output


@pytest.mark.parametrize("command", [main, filter_cost_main], ids=["replay_cost", "filter_cost"])
def test_port_without_traffic_and_missing_port_are_one_line_errors(tmp_path: Path, command: click.Command) -> None:
    path = tmp_path / "h1.pcap"
    write_capture(path, connections=1, exchanges_each=1)
    result = CliRunner().invoke(command, [str(path), "--port", "9"])
    assert result.exit_code == 1
    assert result.output == f"Error: no frames on port 9 in {path}\n"
    result = CliRunner().invoke(command, [str(path)])
    assert result.exit_code == 2
    assert result.output.endswith("Error: --port is required to replay\n")


def test_a_file_that_is_not_a_capture_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a capture\n")
    result = CliRunner().invoke(main, [str(path), "--port", str(PORT)])
    assert result.exit_code == 1
    assert result.output == f"Error: not a pcap or pcapng file: {path}\n"


def test_new_traces_make_every_head_unique_and_keep_every_length() -> None:
    head = b"GET / HTTP/1.1\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n"
    frames = [(1, head, len(head), LINKTYPE_ETHERNET), (2, b"HTTP/1.1 200 OK\r\n\r\n", 19, LINKTYPE_ETHERNET),
              (3, head, len(head), LINKTYPE_ETHERNET)]
    out = list(new_traces(frames))
    assert out[1] == frames[1]
    assert [len(f[1]) for f in out] == [len(f[1]) for f in frames] and out[0][1] != out[2][1]
    for got in (out[0][1], out[2][1]):
        assert re.fullmatch(rb"GET / HTTP/1.1\r\ntraceparent: 00-[0-9a-f]{32}-[0-9a-f]{16}-01\r\n\r\n", got)
