"""End to end: the real filter on lo, a real HTTP server with its own log, real clients.

Every count is compared with the server's own record, per (method, status, route).
"""

from __future__ import annotations

import collections
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.integration.harness import (
    REPO,
    ExporterProcess,
    counts_by_key,
    free_port,
    logging_server,
    self_metric,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to attach a BPF filter")

ROUTES = ["--route", "/status/{code}", "--route", "/delay/{ms}", "--route", "/bytes/{n}",
          "--route", "/chunked/{n}", "--route", "/close/{n}"]
KNOWN = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}


def expected_route(path: str) -> str:
    if "://" in path:  # the server logs a proxy absolute-form target as sent
        path = "/" + path.split("://", 1)[1].split("/", 1)[1]
    parts = path.split("?", 1)[0].strip("/").split("/")
    if len(parts) == 2 and parts[0] in ("status", "delay", "bytes", "chunked", "close"):
        return "/" + parts[0] + "/{" + {"status": "code", "delay": "ms"}.get(parts[0], "n") + "}"
    return path.split("?", 1)[0]


def expected_counts(log: collections.Counter[tuple[str, str, str]]) -> collections.Counter[tuple[str, str, str]]:
    out: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for (method, status, path), count in log.items():
        out[(method if method in KNOWN else "_OTHER", status, expected_route(path))] += count
    return out


def raw_exchange(host: str, port: int, payload: bytes, pieces: int = 1, responses: int = 1,
                 pause: float = 0.0) -> bytes:
    """Send `payload` in `pieces` separate segments and read until `responses` heads came back."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect((host, port))
        step = max(1, len(payload) // pieces)
        for start in range(0, len(payload), step):
            sock.sendall(payload[start:start + step])
            if pause:
                time.sleep(pause)
        sock.settimeout(5)
        received = b""
        while received.count(b"HTTP/1.1 ") - received.count(b"HTTP/1.1 100") < responses:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        time.sleep(0.05)
        return received


def mixed_traffic(host: str, port: int) -> int:
    """Keep-alive, every method, bodies, statuses, chunked, large, close-delimited; returns requests sent."""
    sent = 0
    conn = http.client.HTTPConnection(host, port, timeout=10)
    plan = [
        ("GET", "/", None), ("GET", "/?secret=hunter2", None), ("POST", "/items", b"a" * 5000),
        ("PUT", "/items", b"b" * 10), ("DELETE", "/items", None), ("PATCH", "/items", b"{}"),
        ("OPTIONS", "/", None), ("HEAD", "/bytes/100", None), ("GET", "/status/404", None),
        ("GET", "/status/500", None), ("GET", "/status/503", None), ("GET", "/status/204", None),
        ("GET", "/status/304", None), ("GET", "/chunked/50000", None), ("HEAD", "/chunked/10", None),
        ("GET", "/bytes/3000000", None), ("PURGE", "/cache", None), ("GET", "/status/201", None),
    ]
    for method, path, body in plan:
        conn.request(method, path, body=body)
        conn.getresponse().read()
        sent += 1
    conn.close()
    for _ in range(3):
        closing = http.client.HTTPConnection(host, port, timeout=10)
        closing.request("GET", "/close/20000")
        closing.getresponse().read()
        closing.close()
        sent += 1
    return sent


class RawConn:
    """One kept-alive connection driven byte by byte, with a minimal response reader."""

    def __init__(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(10)
        self.sock.connect((host, port))
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, method: str = "GET") -> int:
        """Read one final response (interim ones skipped); returns its status."""
        while True:
            status = int(self.file.readline().split()[1])
            headers = {}
            while (line := self.file.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            if status >= 200:
                break
        if method == "HEAD" or status in (204, 304):
            return status
        if headers.get("transfer-encoding") == "chunked":
            while (size := int(self.file.readline().split(b";")[0], 16)):
                self.file.read(size + 2)
            self.file.readline()
        elif "content-length" in headers:
            self.file.read(int(headers["content-length"]))
        else:
            self.file.read()  # close-delimited
        return status

    def get(self, path: str) -> int:
        self.send(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
        return self.response()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def handover_traffic(host: str, port: int) -> int:
    """Connections the kernel fast path takes first (a simple GET), then has to hand over; returns requests."""
    sent = 0

    def warm() -> RawConn:
        nonlocal sent
        conn = RawConn(host, port)
        conn.get("/warm")
        sent += 1
        return conn

    conn = warm()  # a second request while the first waits for its response
    conn.send(b"GET /delay/100 HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.03)
    conn.send(b"GET /status/201 HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.response(), conn.response()
    conn.close()
    sent += 2

    conn = warm()  # a second request while the first one's 3 MB body streams
    conn.send(b"GET /bytes/3000000 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert conn.file.readline().startswith(b"HTTP/1.1 200")
    while conn.file.readline() not in (b"\r\n", b""):
        pass
    conn.file.read(1000)  # a little of the body; the server then waits on a full socket
    time.sleep(0.05)
    conn.send(b"GET /status/202 HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.file.read(3_000_000 - 1000)
    conn.response()
    conn.close()
    sent += 2

    for path in ("/chunked/50000", "/close/20000"):  # framing the kernel leaves to user space
        conn = warm()
        conn.get(path)
        conn.close()
        sent += 1

    conn = warm()  # stays in the kernel: no body, 204, 304, a 3 MB Content-Length body
    conn.send(b"HEAD /bytes/100 HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.response("HEAD")
    for path in ("/status/204", "/status/304", "/bytes/3000000", "/status/503"):
        conn.get(path)
    conn.close()
    sent += 5

    requests_after_warm = [
        [b"GET /split/head HTTP/1.1\r\nHost: x\r\n", b"X-Pad: p\r\n\r\n"],  # a head over two segments
        [b"PURGE /cache HTTP/1.1\r\nHost: x\r\n\r\n"],  # unknown method
        [b"GET http://example.test/absolute/form?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"],  # absolute form
        [b"".join(b"GET /status/%d HTTP/1.1\r\nHost: x\r\n\r\n" % c for c in (200, 404, 500))],  # pipelined
    ]
    for pieces in requests_after_warm:
        conn = warm()
        for piece in pieces:
            conn.send(piece)
            time.sleep(0.02)
        responses = max(1, pieces[0].count(b" HTTP/1.1\r\n"))
        for _ in range(responses):
            conn.response()
        conn.close()
        sent += responses

    conn = warm()  # 100-continue
    conn.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    assert conn.file.readline().startswith(b"HTTP/1.1 100")
    conn.file.readline()
    conn.send(b"body")
    conn.response()
    conn.close()
    sent += 1

    # The client half-closes while its request waits. The pause keeps the FIN a segment
    # after the request's in the filter: on lo each packet waits in the backlog of the CPU
    # that sent it, so a sender moved between CPUs can have its FIN filtered first (then
    # the kernel takes the exchange itself, exactly, and no handover is counted).
    conn = warm()
    conn.send(b"GET /delay/50 HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.02)
    conn.sock.shutdown(socket.SHUT_WR)
    conn.response()
    conn.close()
    sent += 1

    conn = warm()  # a request and the FIN in one segment: the cork holds the data until shutdown
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    conn.send(b"GET /status/200 HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.sock.shutdown(socket.SHUT_WR)
    conn.response()
    conn.close()
    sent += 1
    return sent


MODES = {"fast": "--fast-path", "reference": "--no-fast-path"}


@contextmanager
def both_paths(port: int, *args: str) -> Iterator[dict[str, ExporterProcess]]:
    """The same capture twice at once: the kernel fast path and the user-space reference path."""
    procs = {mode: ExporterProcess("--interface", "lo", "--port", str(port), *args, flag)
             for mode, flag in MODES.items()}
    errors: list[BaseException] = []

    def start(proc: ExporterProcess) -> None:
        try:
            proc.start()
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(proc,)) for proc in procs.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        if errors:
            raise errors[0]
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def assert_same_histograms(fast: Samples, reference: Samples) -> None:
    """Counts and buckets equal; sums equal for sizes, within clock noise for durations."""
    def http(samples: Samples) -> Samples:
        return {key: value for key, value in samples.items() if key[0].startswith("http_server_")}

    fast, reference = http(fast), http(reference)
    assert fast.keys() == reference.keys()
    for key, value in reference.items():
        name = key[0]
        if name == "http_server_request_duration_seconds_sum":
            count = reference[("http_server_request_duration_seconds_count", key[1])]
            assert abs(fast[key] - value) <= 0.001 * count + 0.01 * value, key
        else:
            assert fast[key] == value, key


@pytest.fixture(params=["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def host(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_counts_equal_server_log(host: str) -> None:
    with logging_server(host) as server, both_paths(server.port, *ROUTES) as exporters:
        sent = mixed_traffic(host, server.port)
        # Pipelining: five requests in one segment, answered in order.
        pipelined = b"".join(b"GET /status/%d HTTP/1.1\r\nHost: x\r\n\r\n" % code for code in (200, 404, 200, 500, 201))
        raw_exchange(host, server.port, pipelined, responses=5)
        # A head split over many segments.
        raw_exchange(host, server.port, b"GET /split/head HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 300 + b"\r\n\r\n",
                     pieces=12, pause=0.01)
        # 100 Continue before the final response.
        raw_exchange(host, server.port, b"POST /upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 4\r\n\r\nbody", responses=1)
        # Proxy absolute form: recorded by its path.
        raw_exchange(host, server.port, b"GET http://example.test:80/absolute/form?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        sent += 5 + 3
        sent += handover_traffic(host, server.port)
        scraped = {mode: proc.wait_for_exchanges(sent) for mode, proc in exporters.items()}
    expected = expected_counts(server.log)
    assert sum(server.log.values()) == sent
    for mode, samples in scraped.items():
        assert self_metric(samples, "fast_path_busy_total") == 0, mode
        assert self_metric(samples, "fast_path_handover_map_full_total") == 0, mode
        assert self_metric(samples, "kernel_drops_total") == 0, mode
        assert counts_by_key(samples, server.port) == expected, (mode, {
            (name, labels): value for (name, labels), value in samples.items()
            if value and name.startswith(("ebpf_slo_exporter_fast_path", "ebpf_slo_exporter_parse_errors",
                                          "ebpf_slo_exporter_requests_without", "ebpf_slo_exporter_retrans",
                                          "ebpf_slo_exporter_out_of_order"))})
        assert self_metric(samples, "unmatched_responses_total") == 0, mode
        assert not any("hunter2" in value for (_, labels), _v in samples.items() for _, value in labels)
    fast = scraped["fast"]
    assert self_metric(fast, "fast_path_exchanges_total") >= 10
    for reason in ("pipelined", "response", "request", "close"):
        assert self_metric(fast, "fast_path_handovers_total", reason=reason) > 0, reason
    assert self_metric(fast, "fast_path_handovers_seeded_total") > 0
    assert_same_histograms(fast, scraped["reference"])


def test_fast_path_histograms_equal_the_reference_path(host: str) -> None:
    """Traffic the kernel takes almost all of: every histogram sample as the reference path has it."""
    with logging_server(host) as server, both_paths(server.port, *ROUTES) as exporters:
        conns = [RawConn(host, server.port) for _ in range(4)]
        sent = 0
        for i in range(60):
            conn = conns[i % len(conns)]
            path = ("/", f"/items?page={i}", f"/bytes/{i * 997 % 20000}", "/status/404",
                    "/status/204", f"/delay/{i % 3 * 10}")[i % 6]
            conn.get(path)
            sent += 1
        for conn in conns:
            conn.close()
        scraped = {mode: proc.wait_for_exchanges(sent) for mode, proc in exporters.items()}
    assert counts_by_key(scraped["reference"], server.port) == expected_counts(server.log)
    assert self_metric(scraped["fast"], "fast_path_exchanges_total") == sent
    assert self_metric(scraped["fast"], "packets_received_total") == 0
    assert_same_histograms(scraped["fast"], scraped["reference"])


def test_latency_lands_in_the_right_bucket_and_idle_time_is_not_counted(host: str) -> None:
    with logging_server(host) as server, both_paths(server.port, *ROUTES) as exporters:
        conn = http.client.HTTPConnection(host, server.port, timeout=10)
        for delay in (200, 600):
            conn.request("GET", f"/delay/{delay}")
            conn.getresponse().read()
        time.sleep(1.2)  # idle on a kept-alive connection: must not count as latency
        conn.request("GET", "/fast")
        conn.getresponse().read()
        conn.close()
        scraped = {mode: proc.wait_for_exchanges(3) for mode, proc in exporters.items()}

    for mode, samples in scraped.items():
        def bucket(route: str, le: str, samples: Samples = samples) -> float:
            wanted = {("http_request_method", "GET"), ("http_response_status_code", "200"),
                      ("http_route", route), ("le", le), ("server_port", str(server.port))}
            # One series per route here, whatever the labels not named (scheme, version, identity).
            [value] = [value for (name, labels), value in samples.items()
                       if name == "http_server_request_duration_seconds_bucket" and wanted <= set(labels)]
            return value

        assert bucket("/delay/{ms}", "0.15") == 0, mode
        assert bucket("/delay/{ms}", "0.25") == 1, mode
        assert bucket("/delay/{ms}", "0.5") == 1, mode
        assert bucket("/delay/{ms}", "0.75") == 2, mode
        assert bucket("/fast", "0.1") == 1, mode
    assert self_metric(scraped["fast"], "fast_path_exchanges_total") == 3


def test_sigterm_and_sigint_stop_within_a_second_on_a_silent_link() -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        exporter = ExporterProcess("--interface", "lo", "--port", str(free_port())).start()
        time.sleep(0.5)
        took = exporter.stop(sig)
        assert exporter.proc is not None and exporter.proc.returncode == 0, exporter.output
        assert took < 1.0, f"{sig!r} took {took:.2f}s"
        assert "Traceback" not in exporter.output


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--interface", "nosuch0", "--port", "80", "--listen", "127.0.0.1:0"], "no interface 'nosuch0'"),
        (["run", "--port", "99999"], "not a TCP port"),
        (["run", "--interface", "lo"], "give at least one --port"),
        (["run", "--port", "80", "--listen", "nonsense"], "listen address"),
        (["run", "--port", "80", "--config", "/nonexistent/config.yaml"], "cannot read config file"),
        (["run", "--port", "80", "--duration-buckets", "a,b"], "duration buckets"),
    ],
)
def test_user_mistakes_get_one_clear_line(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_listen_port_in_use_is_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = run_cli("run", "--port", "80", "--listen", f"127.0.0.1:{busy.getsockname()[1]}")
    assert result.returncode == 1
    assert "already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_file_is_one_line(tmp_path: os.PathLike[str]) -> None:
    config = os.path.join(tmp_path, "bad.yaml")
    with open(config, "w") as handle:
        handle.write("port: 8080\nfrobnicate: yes\n")
    result = run_cli("run", "--config", config)
    assert result.returncode == 1
    assert "unknown key 'frobnicate'" in result.stderr
    assert "Traceback" not in result.stderr


def test_without_privileges_names_the_fix() -> None:
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
         sys.executable, "-m", "exporter", "run", "--port", "80", "--listen", "127.0.0.1:0"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 1, result.stderr
    assert "error:" in result.stderr and ("root" in result.stderr or "CAP_" in result.stderr)
    assert "Traceback" not in result.stderr


class CraftedServer:
    """Answers `GET /v/<n>` with a header value of n bytes, and `GET /lf/<k>` with a bare LF k bytes
    into a value: the head shapes the kernel scan passes over a word at a time, or must stop at."""

    def __init__(self, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @staticmethod
    def response(path: str) -> bytes:
        kind, n = path.strip("/").split("/")
        if kind == "v":
            headers = b"X-V: " + b"v" * int(n) + b"\r\n"
        else:
            headers = b"X-V: " + b"a" * int(n) + b"\nX-W: " + b"b" * (16 - int(n)) + b"\r\n"
        return b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 2\r\n\r\nok"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as stream:
                while line := stream.readline():
                    path = line.split()[1].decode()
                    while stream.readline() not in (b"\r\n", b""):
                        pass
                    conn.sendall(self.response(path))

    def close(self) -> None:
        self.sock.close()


def test_kernel_scan_takes_every_value_length_and_stops_at_a_bare_lf(host: str) -> None:
    server = CraftedServer(host)
    try:
        with both_paths(server.port, "--route", "/v/{n}", "--route", "/lf/{k}") as exporters:
            conn = RawConn(host, server.port)
            lengths, offsets = range(0, 41), range(0, 17)
            for n in lengths:
                assert conn.get(f"/v/{n}") == 200
            conn.close()
            for k in offsets:  # the kernel hands the flow over at the bare LF: one connection each
                conn = RawConn(host, server.port)
                assert conn.get(f"/lf/{k}") == 200
                conn.close()
            sent = len(lengths) + len(offsets)
            scraped = {mode: proc.wait_for_exchanges(sent) for mode, proc in exporters.items()}
    finally:
        server.close()
    expected = {("GET", "200", "/v/{n}"): len(lengths), ("GET", "200", "/lf/{k}"): len(offsets)}
    for mode, samples in scraped.items():
        assert counts_by_key(samples, server.port) == expected, mode
    # Every clean head stayed in the kernel and no head with a bare LF did.
    assert self_metric(scraped["fast"], "fast_path_exchanges_total") == len(lengths)
    assert self_metric(scraped["fast"], "fast_path_handovers_total", reason="response") == len(offsets)
    assert_same_histograms(scraped["fast"], scraped["reference"])


def test_a_long_body_in_user_space_comes_up_cut_to_headers_and_counts_exactly(host: str) -> None:
    """--no-fast-path: once the parser knows a body's length, the filter drops its bytes unread."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    body, piece = 400_000, 10_000
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((host, 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with conn, conn.makefile("rb") as stream:
                for _ in range(2):
                    while stream.readline() not in (b"\r\n", b""):
                        pass
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % body)
                    for _ in range(body // piece):  # a slow download: the hint lands early in it
                        conn.sendall(b"b" * piece)
                        time.sleep(0.005)

        with ExporterProcess("--interface", "lo", "--port", str(port), "--no-fast-path") as exporter:
            thread = threading.Thread(target=serve, daemon=True)
            thread.start()
            client = RawConn(host, port)
            assert client.get("/download") == 200
            assert client.get("/download") == 200
            client.close()
            thread.join(10)
            samples = exporter.wait_for_exchanges(2)
    assert counts_by_key(samples, port) == {("GET", "200", "/download"): 2}
    sizes = sum(value for (name, labels), value in samples.items()
                if name == "http_server_response_body_size_bytes_sum" and ("server_port", str(port)) in labels)
    assert sizes == 2 * body
    assert self_metric(samples, "filter_packets_total", verdict="truncated_body_skip") > 0
    assert self_metric(samples, "parse_errors_total", reason="gap") == 0
