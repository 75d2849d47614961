"""CPU per exchange of the user-space path, without a kernel or a load: `python -m bench.replay_cost FILE --port N`.

The frames of a capture file are held in memory, then decoded (capture/frames.py, as the live
ring reader does) and fed to a Pipeline in blocks of 256, with the servers named through
identity's Resolver as the exporter does. What is timed is this process's CPU (utime+stime),
so other load on the machine inflates it far less than it inflates a rate; the best of
`--repeat` passes is printed. Record a capture of the traffic to price with, e.g.:

    dumpcap -i lo -f 'tcp port 8080' -P -w /tmp/load.pcap    (while wrk runs)

Frames the kernel filter would not pass (bare ACKs, other ports) are left out first.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from exporter.capture.frames import LINKTYPE_ETHERNET, decode_frame_reason, wanted
from exporter.config import DEFAULT_MAX_SERVERS, DEFAULT_POD_LOGS
from exporter.core.flows import Limits
from exporter.core.model import Segment
from exporter.core.routes import RouteMapper
from exporter.identity.resolver import Resolver
from exporter.metrics import HttpMetrics
from exporter.pipeline import Pipeline

BLOCK = 256  # frames per read, about what one ring block holds at full load


def _frames(path: Path, port: int) -> list[tuple[int, bytes]]:
    # First: exporter.capture.pcap quiets the warning pypacker logs when ppcap loads.
    import exporter.capture.pcap  # noqa: F401, I001
    from pypacker import ppcap

    kept = []
    reader = ppcap.Reader(filename=str(path))
    try:
        for ts_ns, frame in reader:
            frame = bytes(frame)
            got = decode_frame_reason(frame, int(ts_ns), len(frame), LINKTYPE_ETHERNET)
            if type(got) is Segment and wanted(got, (port,)):
                kept.append((int(ts_ns), frame))
    finally:
        reader.close()
    return kept


def _one_pass(blocks: list[list[tuple[int, bytes]]], port: int) -> tuple[float, int]:
    pipeline = Pipeline([port], RouteMapper(), HttpMetrics(), Limits(), hint_skips=True)
    pod_logs = Path(DEFAULT_POD_LOGS)
    resolver = Resolver(pod_logs=pod_logs, container_logs=pod_logs.parent / "containers",
                        max_entries=DEFAULT_MAX_SERVERS)
    pipeline.identify = lambda ip, server_port: resolver.identify(ip, server_port).labels()
    decode = decode_frame_reason
    started = time.process_time()
    for block in blocks:
        segments = []
        for ts_ns, frame in block:
            got = decode(frame, ts_ns, len(frame), LINKTYPE_ETHERNET)
            if type(got) is Segment:
                segments.append(got)
        pipeline.feed(segments)
        pipeline.tracker.take_skip_hints()
        pipeline.tracker.take_encrypted_hints()
    return time.process_time() - started, pipeline.exchanges


@click.command()
@click.argument("capture", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--port", type=click.IntRange(1, 65535), required=True, help="The server port in the capture.")
@click.option("--repeat", type=click.IntRange(1, 100), default=5, show_default=True, help="Passes; the best is kept.")
def main(capture: Path, port: int, repeat: int) -> None:
    """Print the user-space path's CPU per exchange on CAPTURE (a classic pcap of Ethernet or lo frames)."""
    frames = _frames(capture, port)
    blocks = [frames[i:i + BLOCK] for i in range(0, len(frames), BLOCK)]
    best, exchanges = min(_one_pass(blocks, port) for _ in range(repeat))
    if not exchanges:
        raise click.ClickException(f"no exchange on port {port} in {capture}")
    click.echo(f"{capture.name}: {len(frames)} frames, {exchanges} exchanges, "
               f"{1e6 * best / exchanges:.2f} µs CPU per exchange (best of {repeat})")


if __name__ == "__main__":
    sys.exit(main())
