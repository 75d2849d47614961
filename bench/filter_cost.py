"""The socket filter's run time per packet shape, from a capture: `python -m bench.filter_cost FILE --port N`.

Live, the filter's cost shows only as a total (`python -m bench --filter-stats`: BPF run time ÷
requests), and other load on the machine moves it. This replays every TCP frame of a pcap or
pcapng file on the server's port through the real, loaded bpf/http_filter.c with
BPF_PROG_TEST_RUN, in the capture's order, the fast path on and ids keyed as `{id}` (as the
exporter runs it on lo), and sums the run time the kernel measured for each frame (the
program and its tail calls; one clock read of overhead each). It prints nanoseconds per frame
for each shape (client data, server data, no payload) and per exchange the kernel completed.
Each pass loads the filter afresh, so its flow state starts empty as at the exporter's start;
the least of `--passes` passes is kept.

`--compare OTHER.c` (repeatable) loads another version of the C file (e.g. `git show main:bpf/http_filter.c
> /tmp/main.c`; its maps must have this tree's layouts) beside this one, and each frame runs
through every version in turn (the first one rotating from frame to frame), so that other
load on the machine falls on all alike (bench/results/2026-12-01/filtercost4-under-load.md:
a tree's lead of ~0.1 us held in every pass, where whole passes of each tree in turn drifted
by 0.2 us and hid it). A BPF_PROG_TEST_RUN skb is linear and its
socket is none: on lo, a segment TCP wrote from pages is not, so live figures run somewhat
higher; compare trees, not absolute numbers.

`--tls` marks every connection of the capture as TLS before each pass, as user space does once
it sees a connection's first bytes are a TLS record (HttpFilter.drop_tls, both directions): the
filter then drops their payload and keeps their wire times (tls_wire.h), and "client data" and
"server data" are the costs per encrypted segment. `--record https` writes such a capture:
dumpcap on lo while wrk loads nginx over HTTPS.

`--record realistic` first writes FILE: dumpcap on lo while wrk sends the realistic
scenario's browser heads to nginx (needs root, nginx, wrk and dumpcap).

    python -m bench.filter_cost /tmp/real.pcapng --record realistic --duration 2
    python -m bench.filter_cost /tmp/real.pcapng --port 40123 --compare /tmp/main.c
    python -m bench.filter_cost /tmp/https.pcapng --record https --duration 2 --tls
"""

from __future__ import annotations

import collections
from pathlib import Path

import click

from bench.procs import BenchError
from bench.replay_cost import record_https, record_realistic
from exporter.capture.bpf import FAST_COUNTER_NAMES, HttpFilter
from exporter.capture.bpfsys import timed_test_run
from exporter.capture.frames import LINKTYPE_ETHERNET, decode_frame_reason
from exporter.capture.pcap import read_frames
from exporter.core.model import Segment
from exporter.errors import CaptureError

SHAPES = ("client data", "server data", "no payload")


Flow = tuple[str, int, str, int]  # client ip, client port, server ip, server port


def load(path: Path, port: int) -> list[tuple[str, bytes, Flow]]:
    """(shape, Ethernet frame, connection) of every TCP frame to or from `port`, in the capture's order."""
    frames: list[tuple[str, bytes, Flow]] = []
    for ts_ns, data, wire_len, linktype in read_frames(path):
        if linktype != LINKTYPE_ETHERNET:
            raise click.ClickException(f"{path}: link type {linktype}, this tool replays Ethernet frames (lo)")
        got = decode_frame_reason(data, ts_ns, wire_len, linktype)
        if type(got) is not Segment:
            continue
        if got.dst_port == port:
            shape = "client data" if got.payload_len else "no payload"
            flow = (got.src_ip, got.src_port, got.dst_ip, got.dst_port)
        elif got.src_port == port:
            shape = "server data" if got.payload_len else "no payload"
            flow = (got.dst_ip, got.dst_port, got.src_ip, got.src_port)
        else:
            continue
        frames.append((shape, data, flow))
    return frames


def one_pass(srcs: list[Path | None], port: int, frames: list[tuple[str, bytes, Flow]],
             tls: bool = False) -> list[tuple[dict[str, list[int]], int, int]]:
    """For each C file of `srcs` (None: this tree's), loaded afresh: ({shape: [frames, ns]}, exchanges
    completed in the kernel, frames passed up). Every frame runs through each in turn, the first
    rotating; `tls`: every connection marked TLS first."""
    filters: list[HttpFilter] = []
    try:
        for src in srcs:
            # link_header_len 0: BPF_PROG_TEST_RUN pulls the Ethernet header before a socket filter runs.
            bpf_filter = HttpFilter([port], loopback=False, link_header_len=0, fast_path=True, src_file=src,
                                    histogram_bounds=((0.001, 0.01, 0.1, 1.0), (100.0, 1000.0, 10000.0)))
            filters.append(bpf_filter)
            bpf_filter.set_route_ids(True)
            if tls:
                for client_ip, client_port, server_ip, server_port in {flow for _, _, flow in frames}:
                    bpf_filter.drop_tls(client_ip, client_port, server_ip, server_port)
                    bpf_filter.drop_tls(server_ip, server_port, client_ip, client_port)
        totals: list[dict[str, list[int]]] = [collections.defaultdict(lambda: [0, 0]) for _ in filters]
        passed = [0] * len(filters)
        fds = [f.fd for f in filters]
        n = len(fds)
        for i, (shape, data, _) in enumerate(frames):
            for j in range(n):
                k = (i + j) % n
                kept, ns = timed_test_run(fds[k], data)
                total = totals[k][shape]
                total[0] += 1
                total[1] += ns
                passed[k] += kept > 0
        return [(totals[k], filters[k].fast_counters()[FAST_COUNTER_NAMES[1]], passed[k]) for k in range(n)]
    finally:
        for bpf_filter in filters:
            bpf_filter.close()


@click.command()
@click.argument("capture", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--port", type=click.IntRange(1, 65535), help="The server's port (with --record: printed).")
@click.option("--record", type=click.Choice(["realistic", "https"]), help="Write CAPTURE first (see above).")
@click.option("--duration", default=2.0, show_default=True, type=click.FloatRange(1, 60),
              help="--record: seconds of load.")
@click.option("--compare", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Another http_filter.c, each frame run through it too (repeatable).")
@click.option("--passes", default=3, show_default=True, type=click.IntRange(1, 50), help="The least is kept.")
@click.option("--tls", is_flag=True, help="Mark every connection TLS first (see above).")
def main(capture: Path, port: int | None, record: str | None, duration: float, compare: tuple[Path, ...],
         passes: int, tls: bool) -> None:
    """Replay CAPTURE's frames through the loaded socket filter; print its run time per packet shape."""
    try:
        if record:
            port = (record_https if record == "https" else record_realistic)(capture, duration)
            click.echo(f"recorded {capture} (server port {port})")
        if port is None:
            raise click.UsageError("--port is required to replay")
        frames = load(capture, port)
        if not frames:
            raise click.ClickException(f"no frames on port {port} in {capture}")
        trees: dict[str, Path | None] = {"this tree": None}
        trees.update((str(other), other) for other in compare)
        best: dict[str, tuple[dict[str, list[int]], int, int]] = {}
        for _ in range(passes):
            for name, got in zip(trees, one_pass(list(trees.values()), port, frames, tls), strict=True):
                if name not in best or sum(t[1] for t in got[0].values()) < sum(t[1] for t in best[name][0].values()):
                    best[name] = got
    except (BenchError, CaptureError) as exc:
        raise click.ClickException(str(exc)) from exc
    counts = collections.Counter(shape for shape, _, _ in frames)
    click.echo(f"{capture.name}: {len(frames):,} frames on port {port} "
               f"({', '.join(f'{counts[s]:,} {s}' for s in SHAPES)}); least of {passes} passes")
    click.echo(f"{'filter':<24} " + " ".join(f"{s + ' ns':>16}" for s in SHAPES)
               + f" {'ns/exchange':>12} {'exchanges':>10} {'passed up':>10}")
    for name, (totals, exchanges, passed) in best.items():
        per_shape = [totals[s][1] / totals[s][0] if totals[s][0] else 0.0 for s in SHAPES]
        whole = sum(t[1] for t in totals.values())
        per_exchange = f"{whole / exchanges:12.0f}" if exchanges else f"{'n/a':>12}"
        click.echo(f"{name:<24} " + " ".join(f"{v:16.0f}" for v in per_shape)
                   + f" {per_exchange} {exchanges:10,} {passed:10,}")


if __name__ == "__main__":
    main()
