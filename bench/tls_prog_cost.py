"""The TLS probe programs' own run time, per program, against nginx over HTTPS:
`python -m bench.tls_prog_cost --baseline OLD.c [--seconds 5] [--rounds 3]` (root).

What `python -m bench --scenario tls --filter-stats` gives as one total ("uprobes CPU µs/req"),
split by program (entry probes, tls_return, tls_free) and compared between two versions of
bpf/tls_probes.c side by side: each round attaches the baseline file, then this tree's, to the
same nginx (worker_processes 1, TLS 1.3, `return 200 "ok"`) under the same wrk load (-t1 -c32,
keep-alive), with TlsCapture reading the ring as the exporter does. Per program: the kernel's
run_cnt and run_time_ns (BPF run time statistics, enabled while measuring) from the program fds
TlsProbes holds, over the load only. "ns/SSL call" is the run time of all the programs ÷ the
entry probes' runs: what one probed SSL call costs beyond its traps. Run time, not a rate: other
load on the machine moves it much less than it moves req/s.

`--anchor` also attaches the socket filter to lo for nginx's port, as the exporter does, and lets
this tree's probes read its wire times (TlsCapture.anchor_to): the probes' cost with the wire
anchoring at work (tls_probes.c, "Timing"). The baseline is never anchored; with `--baseline` this
tree's own file, the difference is what the anchoring adds (the probes make a watched connection's
tls_flows entries, read the filter's times at every write and at the first read of a turn).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import click

from bench.nginx import Nginx
from bench.procs import Children, require_tools
from bench.tls_trap_cost import uprobe_programs
from bench.wrk import parse_wrk
from exporter.capture.bpfsys import enable_run_time_stats
from exporter.capture.live import LiveCapture
from exporter.capture.tls import TlsCapture, TlsProbes, find_libraries, tls_source


def _name(prog_id: int) -> str:
    shown = subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True, text=True,
                           check=False).stdout
    # "123: kprobe  name tls_return  tag ..."; names are cut to 15 characters.
    words = shown.split()
    return words[words.index("name") + 1] if "name" in words else str(prog_id)


def _drain(capture: TlsCapture, stop: threading.Event) -> None:
    while not stop.is_set():
        capture.read(0.05)


def measure(src: Path, nginx: Nginx, wrk: str, seconds: float,
            anchor: LiveCapture | None = None) -> tuple[int, dict[str, dict[str, int]], dict[str, int]]:
    """wrk's requests, per program name the run statistics over the load, and the probes' counters;
    `anchor`: a capture whose filter's wire times the probes read."""
    capture = TlsCapture([nginx.port], find_libraries(),
                         probes_factory=lambda libraries, ports: TlsProbes(libraries, ports, src_file=src)).open()
    if anchor is not None:
        capture.anchor_to(anchor.bpf_filter.share_tls_flows())
        anchor.bpf_filter.use_tls_flows()
    stop = threading.Event()
    reader = threading.Thread(target=_drain, args=(capture, stop))
    reader.start()
    try:
        before = uprobe_programs(os.getpid())
        ran = subprocess.run([wrk, "-t1", "-c32", f"-d{seconds:g}s", nginx.url("/")], capture_output=True,
                             text=True, check=True)
        after = uprobe_programs(os.getpid())
        time.sleep(0.3)
    finally:
        stop.set()
        reader.join()
    counters = capture.probes.counters() if capture.probes is not None else {}
    capture.close()
    per_program: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for prog_id, stats in after.items():
        name = _name(prog_id)
        for key, value in stats.items():
            per_program[name][key] += value - before.get(prog_id, {}).get(key, 0)
    time.sleep(1.5)  # the previous probes detach in the background (tls.py)
    return parse_wrk(ran.stdout).requests, per_program, counters


@click.command()
@click.option("--baseline", "baseline", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="The tls_probes.c to compare with (e.g. `git show main:bpf/tls_probes.c`).")
@click.option("--candidate", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The tls_probes.c measured against the baseline [default: this tree's].")
@click.option("--seconds", default=5.0, show_default=True, help="wrk's duration per measurement.")
@click.option("--rounds", default=3, show_default=True, help="Alternations baseline/this tree.")
@click.option("--anchor", is_flag=True, help="The candidate reads the wire times of a socket filter on lo (see above).")
def main(baseline: Path, candidate: Path | None, seconds: float, rounds: int, anchor: bool) -> None:
    tools = require_tools(["nginx", "wrk"])
    variants = {"baseline": baseline, "candidate": candidate or tls_source()}
    per_call: dict[str, list[float]] = defaultdict(list)
    per_request: dict[str, list[float]] = defaultdict(list)
    stats_fd = enable_run_time_stats()
    try:
        with tempfile.TemporaryDirectory() as tmp, Children(Path(tmp)) as children:
            nginx = Nginx(children, tools["nginx"], Path(tmp), tls=True)
            nginx.start()
            wire = LiveCapture("lo", [nginx.port]).open() if anchor else None
            print("| round | variant | program | runs/req | ns/run | ns/req | recursion misses |")
            print("|---:|---|---|---:|---:|---:|---:|")
            try:
                for round_ in range(1, rounds + 1):
                    for variant, src in variants.items():
                        requests, programs, counters = measure(src, nginx, tools["wrk"], seconds,
                                                               wire if variant == "candidate" else None)
                        total_ns = sum(p["run_time_ns"] for p in programs.values())
                        # Every program but the return and SSL_free probes is an entry (names are cut to 15
                        # characters: tls_write_ex_en).
                        entries = sum(p["run_cnt"] for name, p in programs.items()
                                      if name not in ("tls_return", "tls_free"))
                        for name, p in sorted(programs.items()):
                            if not p["run_cnt"]:
                                continue
                            print(f"| {round_} | {variant} | {name} | {p['run_cnt'] / requests:.2f} | "
                                  f"{p['run_time_ns'] / p['run_cnt']:.0f} | {p['run_time_ns'] / requests:.0f} | "
                                  f"{p['recursion_misses']} |")
                        per_call[variant].append(total_ns / max(entries, 1))
                        per_request[variant].append(total_ns / requests)
                        print(f"| {round_} | {variant} | **all** ({requests} requests, {entries} SSL calls; lost "
                              f"{counters.get('lost')}, with room {counters.get('lost_with_room')}, "
                              f"retried {counters.get('retried')}; starts from the wire {counters.get('start_wire')}, "
                              f"ends {counters.get('end_wire')}) | "
                              f"{entries / requests:.2f} calls, {counters.get('calls', 0) / requests:.2f} with data | "
                              f"**{total_ns / max(entries, 1):.0f} ns/SSL call** | "
                              f"{total_ns / requests:.0f} | |")
            finally:
                if wire is not None:
                    wire.close()
    finally:
        os.close(stats_fd)
    print()
    # Per call and per request: nginx's calls per request vary with the load (more WANT_READ
    # returns when wrk's requests come late), and such calls cost less than those with data.
    for variant, values in per_call.items():
        print(f"{variant}: median {statistics.median(values):.0f} ns per SSL call "
              f"({', '.join(f'{v:.0f}' for v in values)}), {statistics.median(per_request[variant]):.0f} ns per "
              f"request ({', '.join(f'{v:.0f}' for v in per_request[variant])}), {len(values)} rounds")


if __name__ == "__main__":
    main()
