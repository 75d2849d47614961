"""`python -m bench`: the load benchmark behind `make bench`. See bench/__init__.py."""

from __future__ import annotations

import datetime
import math
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from bench.netns import Node
from bench.nginx import BODY_PATHS, ITEM_PREFIX
from bench.procs import BenchError, Children, require_tools
from bench.report import (
    Column,
    Table,
    fmt,
    fmt_completeness,
    fmt_int,
    fmt_ms,
    fmt_ratio,
    fmt_us,
    median_rows,
    render_markdown,
    render_rich,
)
from bench.runner import CONFIGS, REPO, Load, Placement, Runner, RunResult, run_quiet
from bench.soak import soak_table
from bench.wrk import REALISTIC_IDS, browser_headers, churn_script, paced_script, realistic_script
from exporter.capture.bpfsys import enable_run_time_stats
from exporter.capture.tls import find_libraries

SCENARIOS = ("red", "realistic", "realistic-soak", "size", "rate", "conns", "soak", "h2", "node", "tls", "userspace")
DEFAULT_DURATION = {"red": 20.0, "realistic": 20.0, "realistic-soak": 600.0, "size": 10.0, "rate": 20.0,
                    "conns": 20.0, "soak": 600.0, "h2": 10.0, "node": 20.0, "tls": 10.0, "userspace": 10.0}
SIDE_BY_SIDE = ("baseline", "exporter")
DEFAULT_CONFIGS = {"red": ("baseline", "seed", "exporter"), "realistic": SIDE_BY_SIDE,
                   "realistic-soak": ("exporter",), "size": SIDE_BY_SIDE, "rate": ("exporter",),
                   "conns": SIDE_BY_SIDE, "soak": ("exporter",), "h2": SIDE_BY_SIDE, "node": SIDE_BY_SIDE,
                   "tls": ("baseline", "traps", "exporter"), "userspace": ("userspace",)}
H2_STREAMS = 10  # h2load -m: concurrent streams per connection
H2_CONNECTIONS = 4
H2_RATES = "5000,20000"
USERSPACE_RATES = "20000,35000,50000"
USERSPACE_RPS_PER_CONNECTION = 200  # h2load --h1 -m1: one request in flight per connection
PIPELINE_DEPTH = 8
TLS_NOTE = """\
nginx terminates TLS (self-signed certificate, TLS 1.3) and wrk speaks HTTPS with keep-alive; the exporter
counts through its uprobes on libssl (url_scheme="https"). Unless --client-on-probed-libssl, wrk loads a
private copy of libssl (LD_LIBRARY_PATH; checked in its maps), as a client on another machine would not run
through the server's probes: uprobes on the system's file fire in every process that maps it. TLS events
via fallback are events the ring refused and its fallback ring took (in order, none lost); TLS events lost
are those both refused, a gap for the parser. With --filter-stats, "uprobes CPU" is the run
time the kernel measured for the TLS programs (the SSL_read/SSL_write entry and return probes and the
SSL_free probe), ÷ requests; it is charged to nginx (and to wrk with --client-on-probed-libssl), not to the
exporter. "traps" holds empty programs at the same places and nothing else: what nginx keeps there is the
ceiling that the uprobes' traps alone leave, whatever the programs and the exporter cost."""
NOTE = """\
Requests are lines in nginx's access log; completeness is requests counted by the capture ÷ those.
"Cut at wrk's exit" are logged requests whose response nginx never finished sending (wrk resets its
open connections when it stops); the wire never carries their end, so the exporter does not count
them as exchanges (it counts them in requests_without_response_total) and they bound completeness.
Capture CPU is utime+stime of the seed or exporter process from wrk's start until it is idle after
the load, ÷ requests (the BPF filter runs in softirq and is charged to nginx and wrk instead).
Peak RSS is the exporter's VmHWM; RSS at end is VmRSS after the load. BCC compiles the filter with
clang in a helper process that exits once the filter is loaded: its peak is the loader column, for
the first seconds only. Other load is CPU used during the load by processes outside the run, in cores: above
~0.1, something else shared the 2 cores and the run is noisy. Medians are column-wise."""
SHUFFLE_SEED = 20261130  # the shuffled order is the same from one invocation to the next
SOAK_SAMPLE_S = 10.0
REALISTIC_SOAK_SAMPLE_S = 30.0
SOAK_CLOSE_EVERY = 100
CONNS = 10_000
NUMERIC = ("machine_us", "user_rate", "kernel_share", "route_mismatch",
           "rps", "ratio", "completeness", "drops", "cpu_us", "rss_mb", "rss_end_mb", "loader_mb", "filter_us",
           "nginx_cpu_us", "other_cores", "logged", "unfinished", "counted",
           "socket_errors", "wrk_latency_s", "capture_latency_s", "probes_us", "tls_lost", "tls_fallback")

COL_CONFIG = Column("config", "config", align="left")
COL_LABEL = Column("load", "label", align="left")
COL_RUN = Column("run", "run", fmt_int)
COL_RUNS = Column("runs", "runs", fmt_int)
COL_RPS = Column("server req/s", "rps", fmt_int)
COL_RATIO = Column("vs no capture", "ratio", fmt_ratio)
COL_COMPLETE = Column("completeness", "completeness", fmt_completeness)
COL_DROPS = Column("kernel drops", "drops", fmt_int)
COL_CPU = Column("capture CPU µs/req", "cpu_us", fmt_us)
COL_RSS = Column("peak RSS MB", "rss_mb", lambda v: fmt(v))
COL_RSS_END = Column("RSS MB at end", "rss_end_mb", lambda v: fmt(v))
COL_LOADER = Column("loader peak MB", "loader_mb", lambda v: fmt(v))
COL_FILTER = Column("filter CPU µs/req", "filter_us", fmt_us)
COL_PROBES = Column("uprobes CPU µs/req", "probes_us", fmt_us)
COL_TLS_LOST = Column("TLS events lost", "tls_lost", fmt_int)
COL_TLS_FALLBACK = Column("TLS events via fallback", "tls_fallback", fmt_int)
COL_NGINX = Column("nginx CPU µs/req", "nginx_cpu_us", fmt_us)
COL_OTHER = Column("other load (cores)", "other_cores", lambda v: fmt_us(v) if v is None else f"{v:.2f}")
COL_ERRORS = Column("wrk socket errors", "socket_errors", fmt_int)
COL_WRK_LAT = Column("wrk mean latency", "wrk_latency_s", fmt_ms)
COL_CAP_LAT = Column("exporter mean duration", "capture_latency_s", fmt_ms)
COL_REQUESTS = Column("requests (nginx log)", "logged", fmt_int)
COL_UNFINISHED = Column("cut at wrk's exit", "unfinished", fmt_int)
COL_COUNTED = Column("requests counted", "counted", fmt_int)
COL_MISMATCH = Column("off per (status, route)", "route_mismatch", fmt_int)
COL_SHARE = Column("kernel path share", "kernel_share", fmt_completeness)
COL_MACHINE = Column("machine CPU µs/req", "machine_us", fmt_us)
COL_USER_RATE = Column("user-space exchanges/s", "user_rate", fmt_int)
REALISTIC_NOTE = """\
Each request is a ~1.3 KB browser-like head (a 700-byte cookie, user agent, accept lists, client
hints, traceparent) for /api/items/<id>, the id uniformly random in [0, 100000); nginx answers 500 to
ids ending in 00 or 50 (2 %). Requests (nginx log) counts every logged line; off per (status, route)
sums |logged - counted| over the series, where nginx's side counts finished responses only and derives
the route itself (digits -> {id}): 0 means every series is exact. Kernel path share is
fast_path_exchanges_total ÷ requests counted. Machine CPU is the busy time of all CPUs in /proc/stat
(softirq included) during the load plus the exporter's backlog after it, ÷ requests: the filter's
softirq cost is in it, and so is anything else running on the machine (see other load). The order
of the configurations is shuffled in each round. "tap" holds a packet socket on lo, opened as the
exporter opens its own, whose filter returns 0 at once: its machine CPU over no capture is the price of
tapping the interface at all (the kernel's delivery to the socket and receive timestamps), which no
cheaper filter can lower."""
USERSPACE_NOTE = """\
The user-space path alone: the exporter runs with --no-fast-path (and --no-tls, so that other TLS
traffic on the machine is not charged to it), so every exchange is rebuilt in Python from the segments
the filter passes (what pipelining, chunked bodies and the heads the kernel hands over cost with the
fast path on). Paced rows hold h2load --h1 to the asked rate (--rps per connection, one request in
flight each) with ~1.3 KB browser heads (the realistic scenario's headers as -H) to 100,000 random ids
(a file of URIs each connection walks in turn); h2load, not wrk: wrk's Lua formatting each head capped
the paced rows at ~23,000/s (its delay() pacing too: ~19-22 µs of client CPU a request, h2load ~14,
measured under load). The rate comes out below the asked one when the machine cannot keep up. The
pipelined rows keep {depth} of the same requests in flight on each connection (h2load --h1 -m{depth}),
paced at the top rate and at full load: nginx, the client and the kernel then spend less per request.
User-space exchanges/s is requests counted ÷ the client's duration. Kernel drops are frames the filter
passed that found the packet ring full: the highest paced rate with 0 drops and 100 % completeness is
what this machine's user space sustains."""

def _machine() -> list[str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    head = run_quiet(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = run_quiet(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    load1, load5, _ = os.getloadavg()
    nginx_version = run_quiet(["nginx", "-v"]).removeprefix("nginx version: ")
    wrk_version = run_quiet(["wrk", "--version"]).splitlines()[0].split(" [")[0]
    h2load_version = (run_quiet(["h2load", "--version"]).splitlines() or ["?"])[0]
    return [
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- kernel: {platform.release()} (`uname -r`)",
        f"- CPU: {cpu}, nproc {len(os.sched_getaffinity(0))}",
        f"- tools: {nginx_version} (worker_processes 1), {wrk_version}, {h2load_version}",
        f"- repo: {head}{' with uncommitted changes' if dirty not in ('', '?') else ''}",
        f"- load average before the bench: {load1:.2f} {load5:.2f}",
        f"- command: `python -m bench {shlex.join(sys.argv[1:])}`",
    ]


class Bench:
    def __init__(self, runner: Runner, repeat: int, echo: Any) -> None:
        self.runner = runner
        self.repeat = repeat
        self.echo = echo
        self.errors: list[str] = []

    def interleaved(self, plan: Sequence[tuple[str, Load]], rss_every_s: float | None = None,
                    shuffle: bool = False, soak_every_s: float | None = None) -> list[dict[str, Any]]:
        """Run the plan `repeat` times, in plan order each time or shuffled; ratios against the same
        round's baseline."""
        rows: list[dict[str, Any]] = []
        order = random.Random(SHUFFLE_SEED)
        for round_no in range(1, self.repeat + 1):
            baseline: dict[str, float] = {}
            round_results: list[tuple[str, Load, RunResult]] = []
            steps = list(plan)
            if shuffle:
                order.shuffle(steps)
            for config, load in steps:
                what = f"{config} {load.label}".strip()
                streams = f" -m{load.h2_streams}" if load.h2_streams else ""
                self.echo(f"  run {round_no}/{self.repeat}: {what} "
                          f"({load.tool} -t{load.threads} -c{load.connections}{streams} -d{load.duration_s:g}s)")
                try:
                    result = self.runner.run(config, load, rss_every_s, soak_every_s)
                except BenchError as exc:
                    result = RunResult(config, load.label, error=str(exc))
                    self.errors.append(f"{config} {load.label} run {round_no}: {exc}")
                    self.echo(f"    failed: {exc}")
                if config == "baseline" and result.wrk is not None:
                    baseline[load.label] = result.wrk.requests_per_s
                round_results.append((config, load, result))
            for _config, load, result in round_results:
                row = result.row(baseline.get(load.label))
                row["run"] = round_no
                row["rss_samples"] = result.rss_samples  # type: ignore[assignment]
                row["soak_samples"] = result.soak_samples  # type: ignore[assignment]
                row["soak_before"] = result.soak_before  # type: ignore[assignment]
                rows.append(row)
        return rows


def _tables(title: str, rows: list[dict[str, Any]], columns: list[Column], repeat: int,
            group: str = "config") -> list[Table]:
    tables = []
    if repeat > 1:
        tables.append(Table(f"{title}: every run", [COL_RUN, *columns], rows))
    medians = median_rows(rows, group, NUMERIC)
    tables.append(Table(f"{title}: median of {repeat} run(s)" if repeat > 1 else title,
                        [*columns, COL_RUNS] if repeat > 1 else columns, medians))
    return tables


def _group_key(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row in rows:
        row["group"] = f"{row['label']} {row['config']}"
    return rows


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--scenario", type=click.Choice(SCENARIOS), default="red", show_default=True,
              help="red: the three configurations side by side; realistic: browser-sized heads to 100k "
                   "random ids, counts per (status, route) against nginx's log; realistic-soak: the same "
                   f"for 10 minutes, sampled every {REALISTIC_SOAK_SAMPLE_S:g} s (kernel path share, RSS, "
                   "aggregate map keys, counts against the log); size: response bodies "
                   "1 KB-1 MB; rate: low paced rates vs full load, with latency spot checks; conns: 10k "
                   "open connections; soak: RSS over a long run; h2: h2load against nginx h2c (HTTP/2 "
                   "streams), paced and unpaced; node: wrk through a veth and a bridge; tls: nginx over "
                   "HTTPS; userspace: the exporter with --no-fast-path at paced rates and pipelined, for "
                   "the user-space path's rate without drops and its CPU per exchange.")
@click.option("--duration", type=click.FloatRange(1, 86400),
              help="Seconds of load per run [default: 20; size 10; soak and realistic-soak 600].")
@click.option("--connections", type=click.IntRange(1, 60000), default=32, show_default=True,
              help="wrk -c (the conns scenario uses 10000).")
@click.option("--threads", type=click.IntRange(1, 64), default=1, show_default=True, help="wrk -t.")
@click.option("--repeat", type=click.IntRange(1, 100),
              help="Rounds of the configurations, interleaved; medians are reported [default: 3; "
                   "realistic-soak 1].")
@click.option("--configs", help="Comma-separated subset of baseline,seed,exporter,no-tls (the exporter with "
                                "--no-tls),userspace (with --no-fast-path),traps (tls only: empty programs "
                                "where the exporter probes libssl),tap (a packet socket on lo whose filter "
                                "drops every packet) [default: per scenario].")
@click.option("--rates", help="rate, h2 and userspace scenarios: paced request rates per second, compared with "
                              f"unpaced full load [default: rate 100,1000; h2 {H2_RATES}; userspace "
                              f"{USERSPACE_RATES}].")
@click.option("--markdown", is_flag=True,
              help="Print markdown tables (the default when stdout is not a terminal).")
@click.option("--keep-workdir", is_flag=True, help="Keep the temp dir with nginx, wrk and exporter logs.")
@click.option("--client-on-probed-libssl", is_flag=True,
              help="tls scenario: wrk loads the system's libssl, so the exporter's probes also trap the "
                   "client's calls (by default it loads a private copy, as a remote client would be).")
@click.option("--filter-stats", is_flag=True,
              help="Also measure the BPF filter's own CPU per request (kernel run time statistics; they add "
                   "two clock reads per filter run, so throughput is quoted without them).")
def main(scenario: str, duration: float | None, connections: int, threads: int, repeat: int | None,
         configs: str | None, rates: str | None, markdown: bool, keep_workdir: bool, client_on_probed_libssl: bool,
         filter_stats: bool) -> None:
    """Load benchmark: nginx on lo under wrk, with no capture, the 2021 seed design, and the exporter.

    Needs root (BPF), nginx and wrk (`make setup` installs them). Prints markdown tables
    that can be pasted into the README, with the date, machine and command.
    """
    markdown = markdown or not sys.stdout.isatty()
    duration = duration or DEFAULT_DURATION[scenario]
    repeat = repeat or (1 if scenario == "realistic-soak" else 3)
    chosen = tuple(c.strip() for c in configs.split(",")) if configs else DEFAULT_CONFIGS[scenario]
    unknown = set(chosen) - set(CONFIGS)
    if unknown:
        raise click.BadParameter(f"unknown configuration(s) {', '.join(sorted(unknown))}; "
                                 f"choose from {', '.join(CONFIGS)}", param_hint="--configs")
    if "traps" in chosen and scenario != "tls":
        raise click.BadParameter("traps prices the TLS probes: use it with --scenario tls", param_hint="--configs")
    if "tap" in chosen and scenario not in ("red", "realistic"):
        raise click.BadParameter("tap prices a packet socket on lo: use it with --scenario red or realistic",
                                 param_hint="--configs")
    if os.geteuid() != 0 and set(chosen) - {"baseline"}:
        raise BenchError("the seed and the exporter attach BPF filters: run as root (sudo make bench)")
    clients = {"h2": ["h2load"], "userspace": ["h2load", "wrk"]}.get(scenario, ["wrk"])
    tools = require_tools(["nginx", *clients])
    rates = rates or {"h2": H2_RATES, "userspace": USERSPACE_RATES}.get(scenario, "100,1000")
    if set(chosen) - {"baseline"}:
        _require_python_modules(["bcc", "pypacker"])

    def echo(line: str) -> None:
        click.echo(line, err=True)

    print_table = _printer(markdown)
    workdir = Path(tempfile.mkdtemp(prefix="ebpf-slo-bench-"))
    click.echo("\n".join(["## Benchmark", "", *_machine(), ""]))
    try:
        with Children(workdir) as children:
            stats_fd = enable_run_time_stats() if filter_stats else None
            node = Node(f"b{os.getpid() % 100:02d}", 200 + os.getpid() % 50) if scenario == "node" else None
            try:
                placement = Placement()
                if node is not None:
                    node.up()
                    server, client = node.add_pod("srv", 1), node.add_pod("cli", 2)
                    placement = Placement(node.link_glob, server, client)
                bench = Bench(Runner(children, tools, workdir, filter_stats, placement), repeat, echo)
                if scenario == "tls" and not client_on_probed_libssl:
                    bench.runner.private_client_libssl(find_libraries()[0])
                tables = _run_scenario(bench, scenario, chosen, duration, connections, threads, rates,
                                       filter_stats)
            finally:
                if stats_fd is not None:
                    os.close(stats_fd)
                if node is not None:
                    children.stop_all()  # nginx runs in a namespace about to go
                    node.close()
        for table in tables:
            print_table(table)
    finally:
        if keep_workdir:
            echo(f"logs kept in {workdir}")
        else:
            _rmtree(workdir)
    if bench.errors:
        raise BenchError(f"{len(bench.errors)} run(s) failed; first: {bench.errors[0]}")


def _run_scenario(bench: Bench, scenario: str, chosen: Sequence[str], duration: float, connections: int,
                  threads: int, rates: str, filter_stats: bool = False) -> list[Table]:
    main_columns = [COL_CONFIG, COL_RPS, COL_RATIO, COL_COMPLETE, COL_UNFINISHED, COL_DROPS, COL_CPU,
                    *([COL_FILTER] if filter_stats else []), COL_RSS, COL_RSS_END, COL_LOADER, COL_NGINX, COL_OTHER]
    if scenario == "node":
        load = Load(duration, connections, threads, label="pod to pod")
        rows = bench.interleaved([(c, load) for c in chosen])
        tables = _tables(f"nginx in one network namespace, wrk in another, through their veths and a bridge, "
                         f"all captured (--interface esxn<tag>*, fast path on), wrk -t{threads} -c{connections} "
                         f"-d{duration:g}s", rows, main_columns, bench.repeat)
        tables[-1].note = NOTE + "\nEvery segment crosses two captured interfaces; the filter keeps the copies of " \
            "the first (the client's veth) and drops the other (filter_packets_total{verdict=\"dropped_duplicate\"})."
        return tables
    if scenario == "red":
        load = Load(duration, connections, threads)
        rows = bench.interleaved([(c, load) for c in chosen])
        tables = _tables(f"nginx `return 200 \"ok\"` on lo, wrk -t{threads} -c{connections} -d{duration:g}s",
                         rows, main_columns, bench.repeat)
        tables[-1].note = NOTE
        return tables
    if scenario == "tls":
        bench.runner.tls = True
        load = Load(duration, connections, threads, label="https")
        rows = bench.interleaved([(c, load) for c in chosen])
        columns = [COL_CONFIG, COL_RPS, COL_RATIO, COL_COMPLETE, COL_UNFINISHED, COL_TLS_LOST, COL_TLS_FALLBACK,
                   COL_CPU, *([COL_FILTER, COL_PROBES] if filter_stats else []), COL_RSS, COL_NGINX, COL_OTHER]
        tables = _tables(f"nginx over HTTPS `return 200 \"ok\"` on lo, wrk -t{threads} -c{connections} "
                         f"-d{duration:g}s, keep-alive", rows, columns, bench.repeat)
        tables[-1].note = TLS_NOTE + "\n" + NOTE
        return tables
    if scenario in ("realistic", "realistic-soak"):
        load = Load(duration, connections, threads, script=realistic_script(REALISTIC_IDS),
                    label="realistic", error_responses=True)
        soak_every_s = REALISTIC_SOAK_SAMPLE_S if scenario == "realistic-soak" else None
        rows = bench.interleaved([(c, load) for c in chosen], shuffle=True, soak_every_s=soak_every_s)
        soak_tables = [
            soak_table(f"realistic soak, run {row['run']} ({row['config']}): sampled every {soak_every_s:g} s",
                       row["soak_samples"], row["soak_before"], soak_every_s)
            for row in rows if soak_every_s and row.get("soak_samples") and row.get("soak_before") is not None]
        columns = [COL_CONFIG, COL_RPS, COL_RATIO, COL_REQUESTS, COL_UNFINISHED, COL_COUNTED, COL_MISMATCH,
                   COL_SHARE, COL_DROPS, COL_MACHINE, COL_CPU, *([COL_FILTER] if filter_stats else []),
                   COL_RSS, COL_OTHER]
        tables = _tables(f"browser-sized heads to {REALISTIC_IDS} ids on lo, wrk -t{threads} -c{connections} "
                         f"-d{duration:g}s", rows, columns, bench.repeat)
        tables[-1].note = REALISTIC_NOTE
        return [*soak_tables, *tables]
    if scenario == "userspace":
        plan = []
        ids = random.Random(1)
        paths = tuple(f"{ITEM_PREFIX}{ids.randrange(REALISTIC_IDS)}" for _ in range(REALISTIC_IDS))
        headers = tuple(f"{name}: {value}" for name, value in browser_headers())
        for text in rates.split(","):
            rate = float(text)
            conns = max(connections, math.ceil(rate / USERSPACE_RPS_PER_CONNECTION))
            paced = Load(duration, conns, threads, label=f"paced {rate:g}/s", h1_paths=paths, h1_headers=headers,
                         h2_rps=rate / conns, error_responses=True)
            plan += [(c, paced) for c in chosen]
        # The same heads pipelined: several requests per segment, so the machine's cost per request
        # (nginx's, the client's, the kernel's) falls and the top rate is within its reach.
        top = max(float(text) for text in rates.split(","))
        pipelined = Load(duration, connections, threads, label=f"pipelined x{PIPELINE_DEPTH} {top:g}/s",
                         h1_paths=paths, h1_headers=headers, h1_pipeline=PIPELINE_DEPTH,
                         h2_rps=top / connections, error_responses=True)
        plan += [(c, pipelined) for c in chosen]
        plan += [(c, replace(pipelined, label=f"pipelined x{PIPELINE_DEPTH} full load", h2_rps=0.0))
                 for c in chosen]
        rows = _group_key(bench.interleaved(plan))
        columns = [Column("load", "label", align="left"), COL_CONFIG, COL_RPS, COL_USER_RATE, COL_REQUESTS,
                   COL_COUNTED, COL_COMPLETE, COL_UNFINISHED, COL_DROPS, COL_CPU, COL_NGINX, COL_MACHINE, COL_RSS,
                   COL_OTHER]
        tables = _tables(f"the user-space path (--no-fast-path) against its rate, h2load/wrk -t{threads} "
                         f"-d{duration:g}s", rows, columns, bench.repeat, group="group")
        tables[-1].note = USERSPACE_NOTE.format(depth=PIPELINE_DEPTH) + "\n" + NOTE
        return tables
    if scenario == "size":
        plan = [(c, Load(duration, connections, threads, path=path, label=size))
                for size, path in BODY_PATHS.items() for c in chosen]
        rows = _group_key(bench.interleaved(plan))
        return _tables(f"cost against response size, wrk -t{threads} -c{connections} -d{duration:g}s", rows,
                       [Column("body", "label", align="left"), *main_columns], bench.repeat, group="group")
    if scenario == "rate":
        plan = []
        for text in rates.split(","):
            rate = float(text)
            conns = min(connections, max(1, math.ceil(rate / 100)))
            paced = Load(duration, conns, 1, script=paced_script(rate, conns), label=f"paced {rate:g}/s")
            plan += [(c, paced) for c in chosen]
        plan += [(c, Load(duration, connections, threads, label="full load")) for c in chosen]
        rows = _group_key(bench.interleaved(plan))
        columns = [Column("rate", "label", align="left"), COL_CONFIG, COL_RPS, COL_COMPLETE, COL_DROPS,
                   COL_CPU, COL_CAP_LAT, COL_WRK_LAT]
        return _tables("cost and latency against request rate", rows, columns, bench.repeat, group="group")
    if scenario == "h2":
        conns = connections if connections != 32 else H2_CONNECTIONS
        plan = []
        for text in rates.split(","):
            rate = float(text)
            paced = Load(duration, conns, threads, label=f"paced {rate:g}/s", h2_streams=H2_STREAMS,
                         h2_rps=rate / conns)
            plan += [(c, paced) for c in chosen]
        plan += [(c, Load(duration, conns, threads, label="full load", h2_streams=H2_STREAMS)) for c in chosen]
        rows = _group_key(bench.interleaved(plan))
        columns = [Column("rate", "label", align="left"), COL_CONFIG, Column("server streams/s", "rps", fmt_int),
                   COL_COMPLETE, COL_UNFINISHED, COL_DROPS, Column("capture CPU µs/stream", "cpu_us", fmt_us),
                   COL_RSS, COL_NGINX, COL_OTHER]
        tables = _tables(f"HTTP/2: nginx h2c `return 200 \"ok\"`, h2load -t{threads} -c{conns} -m{H2_STREAMS} "
                         f"-D{duration:g}", rows, columns, bench.repeat, group="group")
        tables[-1].note = NOTE.replace("wrk", "h2load") + (
            "\nStreams are HTTP/2 requests (one per stream); \"vs no capture\" compares server streams/s.")
        return tables
    if scenario == "conns":
        conns = max(connections, CONNS) if connections != 32 else CONNS
        load = Load(duration, conns, threads, label=f"{conns} conns")
        rows = bench.interleaved([(c, load) for c in chosen])
        columns = [COL_CONFIG, COL_RPS, COL_RATIO, COL_COMPLETE, COL_UNFINISHED, COL_DROPS, COL_CPU, COL_RSS,
                   COL_RSS_END, COL_LOADER, COL_ERRORS]
        return _tables(f"{conns} concurrent connections, wrk -t{threads} -c{conns} -d{duration:g}s", rows,
                       columns, bench.repeat)
    # soak
    load = Load(duration, connections, threads, script=churn_script(SOAK_CLOSE_EVERY),
                label=f"soak, 1 in {SOAK_CLOSE_EVERY} requests closes its connection")
    rows = bench.interleaved([(c, load) for c in chosen], rss_every_s=SOAK_SAMPLE_S)
    for row in rows:
        samples = row.pop("rss_samples") or []
        mbs = [mb for _, mb in samples]
        row["rss_first"] = mbs[0] if mbs else None
        row["rss_last"] = mbs[-1] if mbs else None
        row["rss_max"] = max(mbs) if mbs else None
        row["samples"] = " ".join(f"{mb:.0f}" for mb in mbs)
    columns = [COL_CONFIG, COL_REQUESTS, COL_COMPLETE, COL_DROPS, COL_CPU,
               Column("RSS MB first", "rss_first", lambda v: fmt(v)),
               Column("RSS MB last", "rss_last", lambda v: fmt(v)),
               Column("RSS MB max", "rss_max", lambda v: fmt(v)), COL_RSS]
    table = Table(f"soak: {duration:g} s, wrk -t{threads} -c{connections}, 1 in {SOAK_CLOSE_EVERY} requests "
                  f"sends Connection: close; RSS sampled every {SOAK_SAMPLE_S:g} s", [COL_RUN, *columns],
                  rows)
    series = (f"run {r['run']} {r['config']}: {r['samples']}" for r in rows)
    table.note = "RSS samples (MB): " + " | ".join(series)
    return [table]


def _printer(markdown: bool) -> Any:
    if markdown:
        def show(table: Table) -> None:
            click.echo(render_markdown(table) + "\n")
        return show
    from rich.console import Console

    console = Console()

    def show_rich(table: Table) -> None:
        console.print(render_rich(table))
        console.print()
    return show_rich


def _require_python_modules(names: Sequence[str]) -> None:
    import importlib.util

    for name in names:
        if importlib.util.find_spec(name) is None:
            raise BenchError(f"Python module `{name}` not importable from {sys.executable}; run `make setup`")


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(argv: Sequence[str] | None = None) -> int:
    # A shell's background job starts with SIGINT ignored; the bench must still stop on it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        main.main(args=list(argv) if argv is not None else None, prog_name="python -m bench",
                  standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("bench: interrupted; every child process was stopped", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("bench: interrupted; every child process was stopped", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except BenchError as exc:
        click.echo(f"bench: error: {exc}", err=True)
        return 1
    except subprocess.SubprocessError as exc:
        click.echo(f"bench: error: {exc}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
