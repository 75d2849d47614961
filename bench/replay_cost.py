"""User-space CPU per exchange from a capture file, without kernel or load: `python -m bench.replay_cost FILE --port N`.

Live figures mix the exporter's Python with the kernel, the ring and whatever else shares the
cores. This holds the frames of a pcap or pcapng file in memory (only those the kernel filter
would pass: the watched port, payload or FIN/RST) and times this process's CPU (utime+stime),
which other load on the machine inflates far less than it inflates a rate. Two lines, each the
least of `--passes` passes:

- `pipeline`: the live path. The frames are decoded by capture/frames.py as the ring reader does
  and fed to a Pipeline in blocks of 256, servers named through identity's Resolver (one for
  all passes, so its cache is warm after the first, as in a running exporter), skip hints
  collected and taken.
- `tracker`: the flow Tracker alone, on segments decoded once beforehand (fed in the same blocks).

`--profile N` adds cProfile's top N functions of one more pipeline pass. Two trees compare
side by side on the same file when run from each worktree.

`--record h2` first writes FILE: dumpcap on lo while h2load drives nginx's h2c listener as the
h2 scenario does (4 connections, 10 streams each, paced at `--rate` streams/s); it needs root,
nginx, h2load and dumpcap, replaying needs none of them. `--record realistic` does the same with wrk
sending the realistic scenario's browser heads to nginx's HTTP/1.1 listener. For other traffic, record with e.g.
`dumpcap -i lo -f 'tcp port 8080' -w /tmp/load.pcapng` while wrk runs.

    python -m bench.replay_cost /tmp/h2.pcapng --record h2 --rate 20000 --duration 3
    python -m bench.replay_cost /tmp/h2.pcapng --port 40123 --profile 25
"""

from __future__ import annotations

import cProfile
import pstats
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import click

from bench.nginx import Nginx
from bench.procs import BenchError, Children, require_tools, wait_until
from bench.wrk import REALISTIC_IDS, realistic_script
from exporter.capture.frames import decode_frame_reason, wanted
from exporter.capture.pcap import Frame, read_frames
from exporter.config import DEFAULT_MAX_SERVERS, DEFAULT_POD_LOGS
from exporter.core.flows import Tracker
from exporter.core.model import Segment
from exporter.core.routes import RouteMapper
from exporter.errors import CaptureError
from exporter.identity.resolver import Resolver
from exporter.metrics import HttpMetrics
from exporter.pipeline import Pipeline

BLOCK = 256  # frames per read, about what one ring block holds at full load
H2_CONNECTIONS = 4
H2_STREAMS = 10


def record_h2(path: Path, rate: float, duration: float) -> int:
    """Capture h2load -> nginx h2c on lo into `path`; the server's port."""
    return _record(path, "h2load", duration, lambda url: [
        "-t1", f"-c{H2_CONNECTIONS}", f"-m{H2_STREAMS}", f"-D{duration:g}", f"--rps={rate / H2_CONNECTIONS:g}", url])


def record_realistic(path: Path, duration: float, connections: int = 32) -> int:
    """Capture wrk -> nginx on lo into `path`, with the realistic scenario's browser heads; the server's port."""
    script = path.with_suffix(".lua")
    script.write_text(realistic_script(REALISTIC_IDS))
    return _record(path, "wrk", duration, lambda url: [
        "-t1", f"-c{connections}", f"-d{duration:g}s", "-s", str(script), url])


def record_https(path: Path, duration: float, connections: int = 32) -> int:
    """Capture wrk -> nginx over HTTPS (keep-alive, `return 200`) on lo into `path`; the server's port."""
    return _record(path, "wrk", duration, lambda url: ["-t1", f"-c{connections}", f"-d{duration:g}s", url], tls=True)


def _record(path: Path, client: str, duration: float, argv: Callable[[str], list[str]], tls: bool = False) -> int:
    """dumpcap on lo while `client` (h2load: nginx's h2c listener; wrk: HTTP/1.1, over TLS with `tls`) loads
    nginx."""
    tools = require_tools(["nginx", client, "dumpcap"])
    with tempfile.TemporaryDirectory(prefix="replay-cost-") as tmp, Children(Path(tmp)) as children:
        nginx = Nginx(children, tools["nginx"], Path(tmp), http2=client == "h2load", tls=tls)
        nginx.start()
        dumpcap = children.start("dumpcap", [tools["dumpcap"], "-q", "-i", "lo", "-f", f"tcp port {nginx.port}",
                                             "-s", "0", "-B", "256", "-w", str(path)])
        if not wait_until(lambda: path.exists() and path.stat().st_size > 0, 10.0):
            raise BenchError(f"dumpcap did not start: {dumpcap.log_tail()}")
        time.sleep(0.5)
        load = children.start(client, [tools[client], *argv(nginx.url("/"))])
        if not wait_until(lambda: not load.alive(), duration + 30.0, 0.2):
            raise BenchError(f"{client} did not finish")
        time.sleep(0.5)  # the last ACKs and FINs
        children.stop(dumpcap)
        return nginx.port


_TRACEPARENT = b"traceparent: 00-"
_TRACE_IDS = 16 + 8  # bytes of the trace id and the parent id, written as hex


def new_traces(frames: Iterable[Frame], seed: int = 1) -> Iterator[Frame]:
    """The frames, each `traceparent` given new random trace and parent ids of the same length (TCP
    numbers stay right), as a browser or service with tracing sends: every head is unique."""
    draw = random.Random(seed).randbytes
    for ts_ns, frame, wire_len, linktype in frames:
        at = frame.find(_TRACEPARENT)
        if at >= 0:
            at += len(_TRACEPARENT)
            ids = draw(_TRACE_IDS).hex().encode()
            frame = frame[:at] + ids[:32] + b"-" + ids[32:] + frame[at + 49 :]
        yield ts_ns, frame, wire_len, linktype


def load(path: Path, port: int, unique_traces: bool = False) -> tuple[list[Frame], list[Segment]]:
    """The frames the kernel filter would pass, and their segments (see `new_traces`)."""
    frames: list[Frame] = []
    segments: list[Segment] = []
    for frame in new_traces(read_frames(path)) if unique_traces else read_frames(path):
        got = decode_frame_reason(frame[1], frame[0], frame[2], frame[3])
        if type(got) is Segment and wanted(got, (port,)):
            frames.append(frame)
            segments.append(got)
    return frames, segments


def pipeline_pass(blocks: list[list[Frame]], port: int, resolver: Resolver) -> Callable[[], int]:
    """A pass that decodes and feeds the frames as the live path does; it returns the exchanges."""
    pipeline = Pipeline([port], RouteMapper(), HttpMetrics(), hint_skips=True)
    pipeline.identify = lambda ip, server_port: resolver.identify(ip, server_port).labels()
    tracker = pipeline.tracker

    def run() -> int:
        decode = decode_frame_reason
        for block in blocks:
            segments = []
            for ts_ns, frame, wire_len, linktype in block:
                got = decode(frame, ts_ns, wire_len, linktype)
                if type(got) is Segment:
                    segments.append(got)
            pipeline.feed(segments)
            tracker.take_skip_hints()
            tracker.take_encrypted_hints()
        pipeline.flush()
        return pipeline.exchanges

    return run


def tracker_pass(segments: list[Segment], port: int) -> Callable[[], int]:
    """A pass that feeds the segments to a Tracker alone, in blocks as the pipeline does; it returns the exchanges."""
    flows = Tracker((port,))
    blocks = [segments[i:i + BLOCK] for i in range(0, len(segments), BLOCK)]

    def run() -> int:
        feed_all = flows.feed_all
        done = 0
        for block in blocks:
            done += len(feed_all(block))
        return done + len(flows.flush())

    return run


def print_profile(run: Callable[[], int], top: int) -> None:
    """cProfile's top `top` functions of one more pass, by their own time."""
    profile = cProfile.Profile()
    profile.runcall(run)
    pstats.Stats(profile).sort_stats("tottime").print_stats(top)


def least_cpu(prepare: Callable[[], Callable[[], int]], passes: int) -> tuple[float, int]:
    """(least CPU seconds of a pass, exchanges of a pass); `prepare` builds a pass, untimed."""
    best = float("inf")
    exchanges = 0
    for _ in range(passes):
        run = prepare()
        start = time.process_time()
        exchanges = run()
        best = min(best, time.process_time() - start)
    return best, exchanges


@click.command()
@click.argument("capture", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--port", type=click.IntRange(1, 65535), help="The server's port (with --record: printed).")
@click.option("--record", type=click.Choice(["h2", "realistic"]),
              help="Write CAPTURE first (h2load -> nginx h2c, or wrk's browser heads -> nginx; see above).")
@click.option("--rate", default=20000.0, show_default=True, type=click.FloatRange(1),
              help="--record h2: streams/s.")
@click.option("--duration", default=3.0, show_default=True, type=click.FloatRange(1, 60),
              help="--record: seconds of load.")
@click.option("--passes", default=5, show_default=True, type=click.IntRange(1, 100), help="The least is kept.")
@click.option("--profile", "top", default=0, type=click.IntRange(0, 200),
              help="Also print cProfile's top N functions of a pipeline pass.")
@click.option("--new-traces", "unique_traces", is_flag=True,
              help="Give every traceparent new random ids first (same length): unique heads, as with tracing.")
def main(capture: Path, port: int | None, record: str | None, rate: float, duration: float, passes: int,
         top: int, unique_traces: bool) -> None:
    """Replay CAPTURE (pcap or pcapng) through the exporter's user-space path; print CPU µs per exchange."""
    try:
        if record:
            port = record_h2(capture, rate, duration) if record == "h2" else record_realistic(capture, duration)
            click.echo(f"recorded {capture} (server port {port})")
        if port is None:
            raise click.UsageError("--port is required to replay")
        frames, segments = load(capture, port, unique_traces)
    except (BenchError, CaptureError) as exc:
        raise click.ClickException(str(exc)) from exc
    if not frames:
        raise click.ClickException(f"no frames on port {port} in {capture}")
    blocks = [frames[i:i + BLOCK] for i in range(0, len(frames), BLOCK)]
    pod_logs = Path(DEFAULT_POD_LOGS)
    # One resolver for every pass, as the exporter keeps one: the server is looked up once,
    # then answered from its cache.
    resolver = Resolver(pod_logs=pod_logs, container_logs=pod_logs.parent / "containers",
                        max_entries=DEFAULT_MAX_SERVERS)
    server_port = port
    passes_of: dict[str, Callable[[], Callable[[], int]]] = {
        "pipeline": lambda: pipeline_pass(blocks, server_port, resolver),
        "tracker": lambda: tracker_pass(segments, server_port),
    }
    click.echo(f"{capture.name}: {len(frames):,} frames kept on port {port}")
    for name, prepare in passes_of.items():
        seconds, exchanges = least_cpu(prepare, passes)
        if not exchanges:
            raise click.ClickException(f"no exchanges on port {port} in {capture}")
        click.echo(f"{name:8}  {seconds / exchanges * 1e6:7.2f} µs/exchange  ({exchanges:,} exchanges, "
                   f"{len(frames) / exchanges:.2f} frames each, least of {passes} passes)")
    if top:
        print_profile(passes_of["pipeline"](), top)

if __name__ == "__main__":
    main()
