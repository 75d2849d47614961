"""One measured run: a fresh nginx, optionally a capture process (the seed or the exporter),
one wrk load, then the counts settle and everything the run started is stopped.

Measurement choices, stated once:
- **Requests** is the number of lines in nginx's access log: what the server answered.
  wrk's own total misses the requests in flight when it stops.
- **Completeness** is requests counted by the capture ÷ requests.
- **CPU** is utime+stime of the capture process from /proc/<pid>/stat, from just before
  wrk starts until the capture has gone idle after it ends (so a backlog it works off
  after the load is included), ÷ requests. 10 ms tick resolution. The BPF filter itself
  runs in softirq context and is charged to whoever sent the packet (nginx or wrk), not
  to the capture process; the `nginx CPU` column shows that side.
- **Peak RSS** is VmHWM of the capture process at the end of the run.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.h2load import parse_h2load
from bench.netns import Pod
from bench.nginx import Nginx
from bench.procs import BenchError, Child, Children, wait_until
from bench.scrape import CLK_TCK, Scrape, fetch_scrape, read_proc
from bench.soak import LogCounter, SoakSample
from bench.wrk import WrkResult, parse_wrk

__all__ = ["CONFIGS", "REPO", "Load", "Placement", "RunResult", "Runner"]

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("baseline", "seed", "exporter", "no-tls", "userspace", "traps", "tap")
# The exporter with --no-fast-path: every exchange rebuilt in user space from the segments the
# filter passes, the path that pipelining, chunked bodies and the heads the kernel hands over take.
# Without the TLS probes: they run in every process on the machine that uses libssl, and
# whatever else speaks TLS there would be charged to the path measured here.
USERSPACE_ARGS = ("--no-fast-path", "--no-tls")
# no-tls: the exporter's defaults less the TLS probes, to price them on clear-text traffic.
CONFIG_ARGS = {"exporter": (), "no-tls": ("--no-tls",), "userspace": USERSPACE_ARGS}
# Configurations that hold a bare hook and count nothing, to price the hook itself: the module run.
HOLDERS = {"traps": "bench.tls_traps_only",  # empty programs where the exporter probes libssl
           "tap": "bench.null_tap"}  # a packet socket on lo whose filter drops every packet
READY_TIMEOUT_S = 90.0  # BCC compiles C at start: seconds, not minutes
SETTLE_TIMEOUT_S = 20.0
IDLE_CPU_S = 0.02  # under this much CPU in IDLE_WINDOW_S the capture process counts as idle
IDLE_WINDOW_S = 0.5


@dataclass(frozen=True)
class Load:
    duration_s: float
    connections: int
    threads: int = 1
    path: str = "/"
    script: str | None = None  # Lua for wrk -s
    label: str = ""
    # HTTP/2: > 0 drives nginx's h2c listener with h2load -m this many streams per connection.
    h2_streams: int = 0
    h2_rps: float = 0.0  # h2load --rps, requests per second per connection (0: unpaced)
    # HTTP/1.1 from h2load --h1 (paced with h2_rps): these paths in turn, each request with these
    # headers. Where wrk would format each browser head in Lua (the userspace scenario's paced rows).
    h1_paths: tuple[str, ...] = ()
    h1_headers: tuple[str, ...] = ()
    h1_pipeline: int = 1  # h2load --h1 -m: requests in flight per connection, pipelined when > 1

    @property
    def tool(self) -> str:
        return "h2load" if self.h2_streams or self.h1_paths else "wrk"
    error_responses: bool = False  # the load asks for some 5xx on purpose (realistic scenario)

    def argv(self, wrk: str, url: str, script_path: Path | None) -> list[str]:
        """The client's command line; `script_path`: wrk's Lua, or h2load's file of URIs (h1_paths)."""
        if self.h1_paths:
            argv = [wrk, "--h1", f"-t{self.threads}", f"-c{self.connections}", f"-m{self.h1_pipeline}",
                    f"-D{self.duration_s:g}", "-i", str(script_path),
                    *(arg for header in self.h1_headers for arg in ("-H", header))]
            return [*argv, f"--rps={self.h2_rps:g}"] if self.h2_rps else argv
        if self.h2_streams:
            argv = [wrk, f"-t{self.threads}", f"-c{self.connections}", f"-m{self.h2_streams}",
                    f"-D{self.duration_s:g}"]
            if self.h2_rps:
                argv.append(f"--rps={self.h2_rps:g}")
            return [*argv, url]
        argv = [wrk, f"-t{self.threads}", f"-c{self.connections}", f"-d{self.duration_s:g}s", "--latency"]
        if script_path is not None:
            argv += ["-s", str(script_path)]
        return [*argv, url]


@dataclass
class RunResult:
    config: str
    label: str
    wrk: WrkResult | None = None
    logged: int = 0
    unfinished: int = 0  # of `logged`: responses cut off when wrk exits
    counted: float | None = None
    kernel_drops: float | None = None
    cpu_s: float | None = None
    hwm_mb: float | None = None
    rss_end_mb: float | None = None
    loader_mb: float | None = None  # peak RSS of the exporter's BPF loader process, gone after start
    filter_s: float | None = None  # BPF run time of the capture's filter during the load (--filter-stats)
    probes_s: float | None = None  # BPF run time of the TLS uprobes and tracepoints (--filter-stats)
    tls_lost: float | None = None  # TLS events lost between kernel and exporter during the load
    tls_fallback: float | None = None  # TLS events the ring refused and the fallback ring took
    nginx_cpu_s: float | None = None
    other_cores: float | None = None  # CPU used by processes outside this run, in cores, during the load
    capture_latency_mean_s: float | None = None
    # Busy CPU of the whole machine (/proc/stat, softirq included) during the load, plus what the
    # capture process spent working off its backlog after it: the filter's softirq cost shows here.
    machine_cpu_s: float | None = None
    fast_exchanges: float | None = None  # exchanges aggregated by the kernel fast path
    logged_by_route: dict[tuple[str, str], int] = field(default_factory=dict)  # nginx, finished only
    counted_by_route: dict[tuple[str, str], float] = field(default_factory=dict)  # exporter
    rss_samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds into load, MB)
    soak_samples: list[SoakSample] = field(default_factory=list)  # the realistic-soak scenario
    soak_before: Scrape | None = None  # the exporter's /metrics before the load
    error: str = ""

    def row(self, baseline_rps: float | None = None) -> dict[str, float | int | str | None]:
        rps = self.wrk.requests_per_s if self.wrk else None
        # Exchanges rebuilt in user space per second of load: counted, less what the kernel aggregated.
        user_rate = ((self.counted - (self.fast_exchanges or 0.0)) / self.wrk.duration_s
                     if self.wrk and self.wrk.duration_s and self.counted is not None else None)
        def per_request(seconds: float | None) -> float | None:
            return None if seconds is None or not self.logged else 1e6 * seconds / self.logged

        return {
            "config": self.config,
            "label": self.label,
            "rps": rps,
            "ratio": rps / baseline_rps if rps and baseline_rps else None,
            "completeness": self.counted / self.logged if self.counted is not None and self.logged else None,
            "drops": self.kernel_drops,
            "cpu_us": per_request(self.cpu_s),
            "rss_mb": self.hwm_mb,
            "rss_end_mb": self.rss_end_mb,
            "loader_mb": self.loader_mb,
            "filter_us": per_request(self.filter_s),
            "probes_us": per_request(self.probes_s),
            "tls_lost": self.tls_lost,
            "tls_fallback": self.tls_fallback,
            "nginx_cpu_us": per_request(self.nginx_cpu_s),
            "other_cores": self.other_cores,
            "logged": self.logged,
            "unfinished": self.unfinished,
            "counted": self.counted,
            "socket_errors": self.wrk.socket_errors if self.wrk else None,
            "wrk_latency_s": self.wrk.latency_mean_s if self.wrk else None,
            "capture_latency_s": self.capture_latency_mean_s,
            "machine_us": per_request(self.machine_cpu_s),
            "user_rate": user_rate,
            "kernel_share": (self.fast_exchanges / self.counted
                             if self.fast_exchanges is not None and self.counted else None),
            "route_mismatch": route_mismatch(self.logged_by_route, self.counted_by_route)
            if self.counted is not None and self.logged_by_route else None,
            "error": self.error,
        }


def route_mismatch(logged: dict[tuple[str, str], int], counted: dict[tuple[str, str], float]) -> int:
    """Requests on which nginx's log and the exporter disagree, summed over (status, route) series:
    0 only when every series has exactly the logged count."""
    keys = set(logged) | set(counted)
    return int(sum(abs(logged.get(k, 0) - counted.get(k, 0.0)) for k in keys))


def _process_tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its direct children (nginx: master and workers)."""
    pids = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
    except OSError:
        pass
    total = 0.0
    for p in pids:
        try:
            total += read_proc(p).cpu_s
        except (OSError, ValueError):
            pass
    return total


@dataclass(frozen=True)
class Placement:
    """Where nginx, wrk and the capture run. Default: all on the host's lo. The node scenario puts
    nginx and wrk in two pods (bench/netns.py) and captures with an --interface pattern."""

    interface: str = "lo"
    server: Pod | None = None  # nginx in this pod's namespace, listening on its address
    client: Pod | None = None  # wrk in this pod's namespace


class Runner:
    def __init__(self, children: Children, tools: dict[str, str], workdir: Path,
                 filter_stats: bool = False, placement: Placement = Placement()) -> None:
        self.filter_stats = filter_stats  # the caller holds kernel BPF run time statistics on
        self.placement = placement
        self.tls = False  # nginx over HTTPS (the tls scenario)
        # The tls scenario's client loads a private copy of libssl (see _client_env): None = the system's.
        self.client_libssl_dir: Path | None = None
        self.children = children
        self.tools = tools
        self.workdir = workdir
        self._n = 0

    # -- captures -------------------------------------------------------------

    def _start_seed(self, port: int) -> Child:
        argv = [sys.executable, str(REPO / "bench" / "seed.py"), "--interface", "lo", "--port", str(port)]
        with open(self.workdir / f"seed.{self._n}.out", "wb") as stdout:
            child = self.children.start("seed", argv, cwd=REPO, stdout=stdout)
        return self._ready("seed", child)

    def _start_holder(self, name: str, module: str) -> Child:
        """A process that holds a bare hook (HOLDERS) until stopped."""
        child = self.children.start(name, [sys.executable, "-m", module], cwd=REPO)
        return self._ready(name, child)

    @staticmethod
    def _ready(name: str, child: Child) -> Child:
        ok = wait_until(lambda: not child.alive() or "ready" in _read(child.log_path), READY_TIMEOUT_S, 0.2)
        if not ok or not child.alive():
            raise BenchError(f"{name} did not start: {child.log_tail() or 'no output'}")
        return child

    def _start_exporter(self, port: int, listen: str, extra: tuple[str, ...] = ()) -> Child:
        argv = [sys.executable, "-m", "exporter", "run", "--interface", self.placement.interface,
                "--port", str(port), "--listen", listen, *extra]
        child = self.children.start("exporter", argv, cwd=REPO)

        def ready() -> bool:
            if not child.alive():
                return True
            try:
                import urllib.request

                with urllib.request.urlopen(f"http://{listen}/healthz", timeout=1) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        ok = wait_until(ready, READY_TIMEOUT_S, 0.2)
        if not child.alive():
            raise BenchError(f"exporter exited at start: {child.log_tail() or 'no output'}")
        if not ok:
            raise BenchError(f"exporter not ready within {READY_TIMEOUT_S:g} s: "
                             f"{child.log_tail() or 'no output'}")
        return child

    def private_client_libssl(self, library: str) -> None:
        """Have the load generator load a copy of `library` (another inode, so not probed).

        uprobes on a library file fire in every process that maps it. In production the clients
        of a TLS server run elsewhere; here wrk shares the machine and the system libssl, so
        without this each of its own SSL calls would pay a trap and the exporter's verdict, and
        the loss would be charged to the server's throughput."""
        self.client_libssl_dir = self.workdir / "client-libssl"
        self.client_libssl_dir.mkdir(exist_ok=True)
        shutil.copy(library, self.client_libssl_dir / Path(library).name)

    def _client_env(self) -> dict[str, str] | None:
        if self.client_libssl_dir is None:
            return None
        return {**os.environ, "LD_LIBRARY_PATH": str(self.client_libssl_dir)}

    # -- one run --------------------------------------------------------------

    def run(self, config: str, load: Load, rss_every_s: float | None = None,
            soak_every_s: float | None = None) -> RunResult:
        self._n += 1
        result = RunResult(config, load.label)
        server = self.placement.server
        nginx = Nginx(self.children, self.tools["nginx"], self.workdir / f"run{self._n}",
                      *((server.address, server.wrap) if server is not None else ()),
                      http2=bool(load.h2_streams), tls=self.tls)
        capture: Child | None = None
        try:
            nginx.start()
            listen = ""
            if config == "seed":
                capture = self._start_seed(nginx.port)
            elif config in HOLDERS:
                capture = self._start_holder(config, HOLDERS[config])
            elif config in CONFIG_ARGS:
                listen = f"127.0.0.1:{_free_port()}"
                capture = self._start_exporter(nginx.port, listen, CONFIG_ARGS[config])
            before: Scrape | None = fetch_scrape(listen, nginx.port) if listen else None

            assert nginx.child is not None
            nginx_cpu0 = _process_tree_cpu(nginx.child.pid)
            cpu0 = read_proc(capture.pid).cpu_s if capture else 0.0
            filter0 = _filter_run_time_s(capture.pid) if capture else 0.0
            probes0 = _filter_run_time_s(capture.pid, _TRACING_TYPES) if capture else 0.0
            machine0, own0, t0 = _machine_busy_s(), _own_cpu_s(), time.monotonic()
            soak = None
            if soak_every_s and capture is not None and listen:
                soak = self._soak_sampler(result, nginx, capture, listen, soak_every_s)
                result.soak_before = before
            result.wrk, result.rss_samples = self._wrk(load, nginx, capture, rss_every_s, soak)
            ours = (_process_tree_cpu(nginx.child.pid) - nginx_cpu0 + _own_cpu_s() - own0
                    + (read_proc(capture.pid).cpu_s - cpu0 if capture and capture.alive() else 0.0))
            machine_load_s = _machine_busy_s() - machine0
            result.other_cores = max(0.0, machine_load_s - ours) / (time.monotonic() - t0)
            result.machine_cpu_s = machine_load_s
            capture_cpu_at_end = read_proc(capture.pid).cpu_s if capture and capture.alive() else 0.0
            filter1 = _filter_run_time_s(capture.pid) if capture and capture.alive() else 0.0
            probes1 = _filter_run_time_s(capture.pid, _TRACING_TYPES) if capture and capture.alive() else 0.0
            if self.filter_stats and capture:
                result.filter_s = filter1 - filter0
                result.probes_s = probes1 - probes0
            result.logged = nginx.count_requests()  # waits for nginx's log flush
            result.unfinished = nginx.count_unfinished()
            result.nginx_cpu_s = _process_tree_cpu(nginx.child.pid) - nginx_cpu0
            if load.error_responses:
                result.logged_by_route = nginx.by_status_route()
            if config in HOLDERS:
                return result  # counts nothing; what it costs is charged to nginx and wrk
            if capture is None:
                return result
            if not capture.alive():
                raise BenchError(f"{config} died during the load: {capture.log_tail()}")
            _wait_idle(capture.pid)
            proc = read_proc(capture.pid)
            result.cpu_s = proc.cpu_s - cpu0
            result.machine_cpu_s = (result.machine_cpu_s or 0.0) + proc.cpu_s - capture_cpu_at_end  # backlog
            result.hwm_mb = proc.hwm_mb
            result.rss_end_mb = proc.rss_mb
            if config in CONFIG_ARGS:
                assert before is not None
                result.loader_mb = _loader_peak_mb(capture.log_path)
                after = _settled_scrape(listen, nginx.port, result.logged)
                result.counted = after.requests - before.requests
                result.kernel_drops = (after.kernel_drops or 0) - (before.kernel_drops or 0)
                if after.tls_lost is not None:
                    result.tls_lost = after.tls_lost - (before.tls_lost or 0)
                if after.tls_fallback is not None:
                    result.tls_fallback = after.tls_fallback - (before.tls_fallback or 0)
                if after.fast_path_exchanges is not None:
                    result.fast_exchanges = after.fast_path_exchanges - (before.fast_path_exchanges or 0)
                if load.error_responses:
                    result.counted_by_route = {
                        key: value - before.by_status_route.get(key, 0.0)
                        for key, value in after.by_status_route.items()
                        if value - before.by_status_route.get(key, 0.0)}
                if result.counted > 0:
                    seconds = after.duration_sum_s - before.duration_sum_s
                    result.capture_latency_mean_s = seconds / result.counted
            else:
                self.children.stop(capture)
                capture = None
                stats = _seed_stats(self.workdir / f"seed.{self._n}.out")
                result.counted = stats["requests"]
                result.kernel_drops = stats["kernel_drops"]
            return result
        finally:
            if capture is not None:
                self.children.stop(capture)
            nginx.stop()

    def _soak_sampler(self, result: RunResult, nginx: Nginx, capture: Child, listen: str,
                      every_s: float) -> Callable[[float], None]:
        """A callback for _wrk: every `every_s`, one SoakSample into `result` (bench/soak.py)."""
        log = LogCounter(nginx.access_log)
        due = [0.0]

        def sample(seconds: float) -> None:
            if seconds < due[0]:
                return
            due[0] += every_s
            try:
                scrape = fetch_scrape(listen, nginx.port)
            except OSError:
                return  # a scrape that timed out under load: the table shows the missing row
            result.soak_samples.append(SoakSample(seconds, log.count(), scrape, read_proc(capture.pid).rss_mb))
        return sample

    def _wrk(self, load: Load, nginx: Nginx, capture: Child | None, rss_every_s: float | None,
             progress: Callable[[float], None] | None = None) -> tuple[WrkResult, list[tuple[float, float]]]:
        script = None
        if load.script:
            script = self.workdir / f"load{self._n}.lua"
            script.write_text(load.script)
        elif load.h1_paths:
            script = self.workdir / f"load{self._n}.uris"
            script.write_text("".join(nginx.url(path) + "\n" for path in load.h1_paths))
        out = self.workdir / f"wrk.{self._n}.out"
        with open(out, "wb") as stdout:
            argv = load.argv(self.tools[load.tool], nginx.url(load.path), script)
            client = self.placement.client
            child = self.children.start(load.tool, client.wrap(argv) if client is not None else argv, stdout=stdout,
                                        env=self._client_env())
        deadline = time.monotonic() + load.duration_s + 30 + load.connections / 1000
        samples: list[tuple[float, float]] = []
        start = time.monotonic()
        next_sample = start
        self._client_mapped_private = False
        try:
            while child.proc.poll() is None:
                now = time.monotonic()
                if self.client_libssl_dir is not None and not self._client_mapped_private:
                    self._client_mapped_private = str(self.client_libssl_dir) in _read(Path(f"/proc/{child.pid}/maps"))
                if now > deadline:
                    raise BenchError(f"wrk still running {now - start:.0f} s into a "
                                     f"{load.duration_s:g} s load")
                if rss_every_s and capture is not None and now >= next_sample:
                    samples.append((now - start, read_proc(capture.pid).rss_mb))
                    next_sample += rss_every_s
                if progress is not None:
                    progress(now - start)
                time.sleep(0.05)
        finally:
            self.children.stop(child)
        text = out.read_text(errors="replace")
        if self.client_libssl_dir is not None and not self._client_mapped_private:
            raise BenchError(f"{load.tool} did not load the libssl copy in {self.client_libssl_dir}: "
                             "its probed calls would be charged to the server")
        if child.proc.returncode != 0:
            raise BenchError(f"{load.tool} failed (exit {child.proc.returncode}): "
                             f"{child.log_tail() or text[-200:]}")
        try:
            wrk = parse_h2load(text) if load.tool == "h2load" else parse_wrk(text)
        except ValueError as exc:
            raise BenchError(f"{exc}: {text[-200:]!r}") from None
        if wrk.non_2xx and not load.error_responses:
            raise BenchError(f"nginx answered {wrk.non_2xx} non-2xx/3xx responses to {nginx.url(load.path)}")
        if rss_every_s and capture is not None:
            samples.append((time.monotonic() - start, read_proc(capture.pid).rss_mb))
        return wrk, samples


def _machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / CLK_TCK


def _own_cpu_s() -> float:
    """CPU of the bench itself plus every child it has reaped (wrk, once it has exited)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime


_SOCKET_FILTER = frozenset({1})
_TRACING_TYPES = frozenset({2})  # BPF_PROG_TYPE_KPROBE: the TLS uprobes


def _filter_run_time_s(pid: int, prog_types: frozenset[int] = _SOCKET_FILTER) -> float:
    """Seconds the kernel spent running the BPF programs of these types this process holds (0 without
    statistics on): the socket filter by default, the TLS probes with _TRACING_TYPES."""
    total_ns = 0
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return 0.0
    for fd in fds:
        try:
            if os.readlink(fd) != "anon_inode:bpf-prog":
                continue
            info = dict(line.split(":", 1) for line in
                        Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines() if ":" in line)
            if int(info.get("prog_type", "-1")) in prog_types:
                total_ns += int(info.get("run_time_ns", "0"))
        except OSError:
            continue  # closed meanwhile
    return total_ns / 1e9


def _loader_peak_mb(log_path: Path) -> float | None:
    """The helper's peak as the exporter logs it at start ("... by a helper process (peak RSS N MB, ...")."""
    found = re.search(r"helper process \(peak RSS (\d+) MB", _read(log_path))
    return float(found.group(1)) if found else None


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _free_port() -> int:
    from bench.nginx import free_port

    return free_port()


def _wait_idle(pid: int) -> None:
    """Until the process burns under IDLE_CPU_S per IDLE_WINDOW_S: its backlog is worked off."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last = read_proc(pid).cpu_s
    while time.monotonic() < deadline:
        time.sleep(IDLE_WINDOW_S)
        now = read_proc(pid).cpu_s
        if now - last < IDLE_CPU_S:
            return
        last = now


def _settled_scrape(listen: str, port: int, expected: int) -> Scrape:
    """Scrape until the count reaches what nginx logged or stops moving for a second."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last = fetch_scrape(listen, port)
    while time.monotonic() < deadline and last.requests < expected:
        time.sleep(1.0)
        now = fetch_scrape(listen, port)
        if now.requests == last.requests:
            return now
        last = now
    return last


def _seed_stats(path: Path) -> dict[str, int]:
    for line in reversed(_read(path).splitlines()):
        if line.startswith("{"):
            stats: dict[str, int] = json.loads(line)
            return stats
    raise BenchError(f"the seed printed no counts on SIGTERM ({path})")


def nan_to_none(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def run_quiet(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (done.stdout + done.stderr).strip()
