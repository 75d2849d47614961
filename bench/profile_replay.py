"""`python -m bench.profile_replay FILE --port PORT`: user-space CPU per exchange, from a capture file.

Live figures (`python -m bench --scenario h2`) mix the exporter's Python with the kernel, the
ring and whatever else shares the cores. This replays a pcap or pcapng through the same
`Pipeline` that `ebpf-slo-exporter replay` uses, with the segments decoded once beforehand,
and prints process CPU time per exchange (the least of `--passes` passes) for the whole
Pipeline and for the flow Tracker alone. Two trees compare side by side on the same file
(run it from each worktree). `--profile N` adds cProfile's top N functions of one more pass.

`--record h2` first writes FILE: dumpcap on lo while h2load drives nginx's h2c listener as
the h2 scenario does (4 connections, 10 streams each, paced at `--rate` streams/s).
Needs root, nginx, h2load and dumpcap for that; replaying needs none of them.

    python -m bench.profile_replay /tmp/h2.pcapng --record h2 --rate 20000 --duration 3
    python -m bench.profile_replay /tmp/h2.pcapng --port 40123 --profile 25
"""

from __future__ import annotations

import cProfile
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click

from bench.nginx import Nginx
from bench.procs import BenchError, Children, require_tools, wait_until
from exporter.capture.pcap import read_capture
from exporter.core.flows import Tracker
from exporter.core.model import Segment
from exporter.core.routes import RouteMapper
from exporter.errors import CaptureError
from exporter.metrics import HttpMetrics
from exporter.pipeline import Pipeline

H2_CONNECTIONS = 4
H2_STREAMS = 10


def record_h2(path: Path, rate: float, duration: float) -> int:
    """Capture h2load -> nginx h2c on lo into `path`; the server's port."""
    tools = require_tools(["nginx", "h2load", "dumpcap"])
    with tempfile.TemporaryDirectory(prefix="replay-cost-") as tmp, Children(Path(tmp)) as children:
        nginx = Nginx(children, tools["nginx"], Path(tmp), http2=True)
        nginx.start()
        dumpcap = children.start("dumpcap", [tools["dumpcap"], "-q", "-i", "lo", "-f", f"tcp port {nginx.port}",
                                             "-s", "0", "-B", "128", "-w", str(path)])
        if not wait_until(lambda: path.exists() and path.stat().st_size > 0, 10.0):
            raise BenchError(f"dumpcap did not start: {dumpcap.log_tail()}")
        time.sleep(0.5)
        h2load = children.start("h2load", [tools["h2load"], "-t1", f"-c{H2_CONNECTIONS}", f"-m{H2_STREAMS}",
                                           f"-D{duration:g}", f"--rps={rate / H2_CONNECTIONS:g}", nginx.url("/")])
        if not wait_until(lambda: not h2load.alive(), duration + 30.0, 0.2):
            raise BenchError("h2load did not finish")
        time.sleep(0.5)  # the last ACKs and FINs
        children.stop(dumpcap)
        return nginx.port


def cpu_per_exchange(run: Callable[[], int], passes: int) -> tuple[float, int]:
    """(least CPU seconds of a pass, exchanges of a pass)."""
    best = float("inf")
    exchanges = 0
    for _ in range(passes):
        start = time.process_time()
        exchanges = run()
        best = min(best, time.process_time() - start)
    return best, exchanges


@click.command()
@click.argument("capture", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--port", type=click.IntRange(1, 65535), help="The server's port (with --record: printed).")
@click.option("--record", type=click.Choice(["h2"]), help="Write CAPTURE first (see above).")
@click.option("--rate", default=20000.0, show_default=True, type=click.FloatRange(1), help="--record: streams/s.")
@click.option("--duration", default=3.0, show_default=True, type=click.FloatRange(1, 60),
              help="--record: seconds of load.")
@click.option("--passes", default=5, show_default=True, type=click.IntRange(1, 100))
@click.option("--profile", "top", default=0, type=click.IntRange(0, 200), help="Also print cProfile's top N.")
def main(capture: Path, port: int | None, record: str | None, rate: float, duration: float, passes: int,
         top: int) -> None:
    """Replay CAPTURE through the exporter's core and print CPU µs per exchange."""
    try:
        if record:
            port = record_h2(capture, rate, duration)
            click.echo(f"recorded {capture} (server port {port})")
        if port is None:
            raise click.UsageError("--port is required to replay")
        segments: list[Segment] = list(read_capture(capture, [port]))
    except (BenchError, CaptureError) as exc:
        raise click.ClickException(str(exc)) from exc
    ports = (port,)

    def pipeline() -> int:
        pipe = Pipeline(ports, RouteMapper((), max_routes_per_port=100), HttpMetrics())
        pipe.feed(segments)
        pipe.flush()
        return pipe.exchanges

    def tracker() -> int:
        flows = Tracker(ports)
        feed = flows.feed
        done = 0
        for segment in segments:
            done += len(feed(segment))
        return done + len(flows.flush())

    for name, run in (("pipeline", pipeline), ("tracker", tracker)):
        seconds, exchanges = cpu_per_exchange(run, passes)
        if not exchanges:
            raise click.ClickException(f"no exchanges on port {port} in {capture}")
        click.echo(f"{name:8}  {seconds / exchanges * 1e6:7.2f} µs/exchange  ({exchanges:,} exchanges, "
                   f"{len(segments) / exchanges:.2f} segments each, least of {passes} passes)")
    if top:
        profile = cProfile.Profile()
        profile.runcall(pipeline)
        pstats.Stats(profile).sort_stats("tottime").print_stats(top)


if __name__ == "__main__":
    main()
