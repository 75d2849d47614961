"""User-space CPU per HTTPS request, from recorded TLS events: `python -m bench.tls_replay_cost FILE`.

The live tls scenario's "capture CPU" mixes the exporter's Python with the ring, the kernel and
whatever shares the cores. This replays the TLS probes' ring records, recorded once, through the
exporter's own path and times this process's CPU (utime+stime), which other load inflates far
less than it inflates a rate. Each line is the least of `--passes` passes, ÷ exchanges:

- `capture`: TlsCapture.read alone (records -> Segments), batch by batch as the ring thread queued them.
- `pipeline`: the live path of app._feed_tls: TlsCapture.read, Pipeline.feed into an https
  Tracker (parse, routes, identity through one Resolver warm after the first pass, histograms),
  then the skip hints taken and handed to TlsCapture.apply_skip_hints.

The ring thread's copy out of the mmap (ringbuf.DrainedRing) is not in these: it is measured live,
in the `ring thread` line of `--record`, as CPU of that thread ÷ exchanges.
`--profile N` adds cProfile's top N functions of one more pipeline pass. Two trees compare side
by side on the same file when run from each worktree.

`--record` first writes FILE (root, nginx, wrk): nginx over HTTPS as the tls scenario runs it,
`wrk -t1 -c32` keep-alive for `--duration` s, the TLS probes attached as the exporter attaches
them (TlsCapture, nginx's port watched), every record the ring thread hands over kept in its batch.
The file: a `=I` server port, then per batch a `=I` record count and per record a `=I` length and
its bytes (struct tls_event, as tls.decode_event reads it).

    python -m bench.tls_replay_cost /tmp/tls.events --record --duration 3
    python -m bench.tls_replay_cost /tmp/tls.events --profile 25
"""

from __future__ import annotations

import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import click

from bench.nginx import Nginx
from bench.procs import BenchError, Children, require_tools, wait_until
from bench.replay_cost import least_cpu, print_profile
from exporter.capture.ringbuf import records_of, span_of
from exporter.capture.tls import COUNTER_NAMES, TlsCapture, TlsProbes, find_libraries
from exporter.config import DEFAULT_MAX_SERVERS, DEFAULT_POD_LOGS
from exporter.core.flows import Limits, Tracker
from exporter.core.routes import RouteMapper
from exporter.errors import CaptureError
from exporter.identity.resolver import Resolver
from exporter.metrics import HttpMetrics
from exporter.pipeline import Pipeline

_U32 = struct.Struct("=I")


def record(path: Path, duration: float, connections: int = 32) -> tuple[int, int, float]:
    """Record the ring's batches while wrk loads nginx over HTTPS: (records, logged requests, ring
    thread CPU s)."""
    tools = require_tools(["nginx", "wrk"])
    batches: list[list[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="tls-replay-") as tmp, Children(Path(tmp)) as children:
        nginx = Nginx(children, tools["nginx"], Path(tmp), tls=True)
        nginx.start()
        capture = TlsCapture([nginx.port], find_libraries()).open()
        probes = capture.probes
        assert probes is not None
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set():
                batch = [record for span in probes.read(0.05) for record in records_of(span)]
                if batch:
                    batches.append(batch)

        reader = threading.Thread(target=drain, name="tls-record")
        reader.start()
        ring_started = probes.ring_thread_cpu_s()
        try:
            load = children.start("wrk", [tools["wrk"], "-t1", f"-c{connections}", f"-d{duration:g}s",
                                          nginx.url("/")])
            if not wait_until(lambda: not load.alive(), duration + 30.0, 0.2):
                raise BenchError("wrk did not finish")
            time.sleep(0.5)  # the last responses and SSL_frees
            probes.flush()
            time.sleep(0.2)
            ring_cpu_s = probes.ring_thread_cpu_s() - ring_started
        finally:
            stop.set()
            reader.join()
            lost = capture.counters()["lost"]
            capture.close()
        logged = nginx.count_requests()
        nginx.stop()
    if lost:
        raise BenchError(f"the ring lost {lost} events while recording: record again on a quieter machine")
    save(path, nginx.port, batches)
    return sum(map(len, batches)), logged, ring_cpu_s


def save(path: Path, port: int, batches: list[list[bytes]]) -> None:
    """Write batches of records (struct tls_event each) in the format `load` reads."""
    with open(path, "wb") as out:
        out.write(_U32.pack(port))
        for batch in batches:
            out.write(_U32.pack(len(batch)))
            for raw in batch:
                out.write(_U32.pack(len(raw)))
                out.write(raw)


def load(path: Path) -> tuple[int, list[list[bytes]]]:
    """(server port, batches of records) of a file `record` wrote."""
    data = path.read_bytes()
    port = _U32.unpack_from(data, 0)[0]
    at = _U32.size
    batches: list[list[bytes]] = []
    while at < len(data):
        count = _U32.unpack_from(data, at)[0]
        at += _U32.size
        batch = []
        for _ in range(count):
            length = _U32.unpack_from(data, at)[0]
            at += _U32.size
            batch.append(data[at:at + length])
            at += length
        batches.append(batch)
    return port, batches


class ReplayedProbes:
    """TlsProbes' reading side over recorded batches: one batch per read, laid out as the ring's
    span (ringbuf.span_of, untimed), skips kept as set."""

    def __init__(self, batches: Iterable[list[bytes]]) -> None:
        self._batches = [[span_of(batch)] for batch in batches]
        self._next = 0
        self.libraries: list[str] = []
        self.skips: dict[tuple[int, int, int], tuple[int, int] | None] = {}

    def read(self, timeout_s: float) -> list[bytes]:
        if self._next == len(self._batches):
            return []
        self._next += 1
        return self._batches[self._next - 1]

    def flush(self) -> None:
        pass

    def set_skip(self, tgid: int, ssl: int, conn: int, direction: int, stretch: tuple[int, int] | None) -> None:
        self.skips[(tgid, ssl, direction)] = stretch

    def forget(self, tgid: int, ssl: int) -> None:
        pass

    def counters(self) -> dict[str, int]:
        return dict.fromkeys(COUNTER_NAMES, 0)

    def close(self) -> None:
        pass


def _capture(batches: list[list[bytes]], port: int) -> TlsCapture:
    probes = ReplayedProbes(batches)

    def factory(libraries: list[str], ports: frozenset[int]) -> TlsProbes:
        return probes  # type: ignore[return-value]  # the reading side is all TlsCapture uses here

    return TlsCapture([port], [], realtime_offset_ns=lambda: 0, probes_factory=factory).open()


def capture_pass(batches: list[list[bytes]], port: int) -> Callable[[], int]:
    """A pass of TlsCapture.read alone; it returns the segments."""
    capture = _capture(batches, port)

    def run() -> int:
        return sum(len(capture.read(0)) for _ in batches)

    return run


def pipeline_pass(batches: list[list[bytes]], port: int, resolver: Resolver) -> Callable[[], int]:
    """A pass of the live path (app._feed_tls); it returns the exchanges."""
    capture = _capture(batches, port)
    pipeline = Pipeline([port], RouteMapper(), HttpMetrics())
    pipeline.identify = lambda ip, server_port: resolver.identify(ip, server_port).labels()
    tracker = pipeline.add_tracker(Tracker([port], Limits(), hint_skips=True, scheme="https"))

    def run() -> int:
        for _ in batches:
            segments = capture.read(0)
            if segments:
                pipeline.feed(segments, tracker)
                capture.apply_skip_hints(tracker.take_skip_hints())
        pipeline.flush()
        return pipeline.exchanges

    return run


@click.command()
@click.argument("events", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--record", "do_record", is_flag=True, help="Write EVENTS first (root, nginx, wrk; see above).")
@click.option("--duration", default=3.0, show_default=True, type=click.FloatRange(1, 60),
              help="--record: seconds of load.")
@click.option("--passes", default=5, show_default=True, type=click.IntRange(1, 100), help="The least is kept.")
@click.option("--profile", "top", default=0, type=click.IntRange(0, 200),
              help="Also print cProfile's top N functions of a pipeline pass.")
def main(events: Path, do_record: bool, duration: float, passes: int, top: int) -> None:
    """Replay EVENTS (TLS ring records) through the exporter's HTTPS path; print CPU µs per exchange."""
    ring_cpu_s = None
    try:
        if do_record:
            records, logged, ring_cpu_s = record(events, duration)
            click.echo(f"recorded {events}: {records:,} records, nginx logged {logged:,} requests")
        port, batches = load(events)
    except (BenchError, CaptureError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    records = sum(map(len, batches))
    if not records:
        raise click.ClickException(f"no records in {events}")
    pod_logs = Path(DEFAULT_POD_LOGS)
    resolver = Resolver(pod_logs=pod_logs, container_logs=pod_logs.parent / "containers",
                        max_entries=DEFAULT_MAX_SERVERS)
    _, exchanges = least_cpu(lambda: pipeline_pass(batches, port, resolver), 1)
    if not exchanges:
        raise click.ClickException(f"no exchanges in {events}")
    click.echo(f"{events.name}: {records:,} records in {len(batches):,} batches, {exchanges:,} exchanges "
               f"({records / exchanges:.2f} records each), port {port}")
    if ring_cpu_s is not None:
        click.echo(f"{'ring thread':12}  {ring_cpu_s / exchanges * 1e6:7.2f} µs/exchange  (live, while recording)")
    passes_of: dict[str, Callable[[], Callable[[], int]]] = {
        "capture": lambda: capture_pass(batches, port),
        "pipeline": lambda: pipeline_pass(batches, port, resolver),
    }
    for name, prepare in passes_of.items():
        seconds, _ = least_cpu(prepare, passes)
        click.echo(f"{name:12}  {seconds / exchanges * 1e6:7.2f} µs/exchange  (least of {passes} passes)")
    if top:
        print_profile(passes_of["pipeline"](), top)


if __name__ == "__main__":
    main()
