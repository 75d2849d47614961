"""End to end, HTTP/2 and gRPC: the real filter on lo (IPv4 and IPv6), real servers and clients.

- gRPC: a grpcio server with a generic handler (bytes in, bytes out: no protoc) records every
  call it handles, per method and status code; that record is the oracle for
  rpc_server_duration_seconds and for the HTTP series of the same streams. Unary and
  server-streaming calls, NOT_FOUND and INTERNAL, a deadline exceeded, and many concurrent
  calls multiplexed on one channel; known server delays must land in the right buckets.
- nginx with an h2c listener (prior knowledge), driven by h2load with concurrent streams and
  by curl --http2-prior-knowledge; nginx's access log is the oracle, per method/status/route.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.harness import ExporterProcess, counts_by_key, free_port, self_metric
from tests.integration.nginx_conf import nginx_config

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to attach a BPF filter")

SERVICE = "demo.v1.Echo"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Recorder:
    """The server's own record: (method, status code name) → calls handled."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()

    def record(self, method: str, code: grpc.StatusCode) -> None:
        with self.lock:
            self.calls[(method, code.name)] += 1


def handlers(recorder: Recorder) -> grpc.GenericRpcHandler:
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        recorder.record("Unary", grpc.StatusCode.OK)
        return b"echo:" + request

    def delay(request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(int(request) / 1000)
        recorder.record("Delay", grpc.StatusCode.OK)
        return b"slept"

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request)):
            yield b"m%d" % i
        recorder.record("Stream", grpc.StatusCode.OK)

    def missing(request: bytes, context: grpc.ServicerContext) -> bytes:
        recorder.record("Lookup", grpc.StatusCode.NOT_FOUND)
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    def broken(request: bytes, context: grpc.ServicerContext) -> bytes:
        recorder.record("Broken", grpc.StatusCode.INTERNAL)
        context.abort(grpc.StatusCode.INTERNAL, "it broke")

    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(0.5)
        recorder.record("Slow", grpc.StatusCode.DEADLINE_EXCEEDED if not context.is_active() else grpc.StatusCode.OK)
        return b"too late"

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Delay": grpc.unary_unary_rpc_method_handler(delay),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Lookup": grpc.unary_unary_rpc_method_handler(missing),
        "Broken": grpc.unary_unary_rpc_method_handler(broken),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
    })


@contextmanager
def grpc_server(host: str) -> Iterator[tuple[int, Recorder]]:
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handlers(recorder),))
    port = server.add_insecure_port(f"[{host}]:0" if ":" in host else f"{host}:0")
    server.start()
    try:
        yield port, recorder
    finally:
        server.stop(grace=None)


def rpc_counts(samples: Samples, port: int) -> collections.Counter[tuple[str, str, str]]:
    """(service, method, status code) → calls, from rpc_server_duration_seconds_count."""
    counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for (name, labels), value in samples.items():
        label = dict(labels)
        if name == "rpc_server_duration_seconds_count" and label["server_port"] == str(port):
            assert label["rpc_system"] == "grpc"
            counts[(label["rpc_service"], label["rpc_method"], label["rpc_grpc_status_code"])] += int(value)
    return counts


def bucket(samples: Samples, port: int, method: str, le: str) -> float:
    total = 0.0
    for (name, labels), value in samples.items():
        label = dict(labels)
        if (name == "rpc_server_duration_seconds_bucket" and label["server_port"] == str(port)
                and label["rpc_method"] == method and label["le"] == le):
            total += value
    return total


def wait_for_rpcs(exporter: ExporterProcess, port: int, expected: int, timeout: float = 15.0) -> Samples:
    deadline = time.monotonic() + timeout
    samples = exporter.scrape()
    while time.monotonic() < deadline and sum(rpc_counts(samples, port).values()) < expected:
        time.sleep(0.1)
        samples = exporter.scrape()
    time.sleep(0.3)  # anything beyond `expected` would be a double count
    return exporter.scrape()


CODE_NUMBER = {code.name: str(code.value[0]) for code in grpc.StatusCode}


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_grpc_calls_match_the_servers_record(host: str) -> None:
    with grpc_server(host) as (port, recorder), \
            ExporterProcess("--interface", "lo", "--port", str(port)) as exporter:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        with grpc.insecure_channel(target) as channel:
            def call(method: str, request: bytes, timeout: float = 10.0) -> Any:
                return channel.unary_unary(f"/{SERVICE}/{method}")(request, timeout=timeout)

            for i in range(20):
                assert call("Unary", b"%d" % i) == b"echo:%d" % i
            streamed = list(channel.unary_stream(f"/{SERVICE}/Stream")(b"5", timeout=10))
            assert len(streamed) == 5
            for _ in range(3):
                assert len(list(channel.unary_stream(f"/{SERVICE}/Stream")(b"40", timeout=10))) == 40
            for method, code in (("Lookup", grpc.StatusCode.NOT_FOUND), ("Broken", grpc.StatusCode.INTERNAL)):
                for _ in range(4):
                    with pytest.raises(grpc.RpcError) as raised:
                        call(method, b"x")
                    assert raised.value.code() == code
            with pytest.raises(grpc.RpcError) as raised:
                call("Slow", b"x", timeout=0.2)
            assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # Many concurrent calls multiplexed on this one channel (one TCP connection).
            pending = [channel.unary_unary(f"/{SERVICE}/Unary").future(b"c%d" % i, timeout=20) for i in range(300)]
            assert [p.result() for p in pending] == [b"echo:c%d" % i for i in range(300)]
            # Known delays: 120 ms calls never finish under 0.1 s, and not past 0.25 s here.
            for _ in range(5):
                assert call("Delay", b"120") == b"slept"
            time.sleep(0.6)  # the Slow handler finishes and records
        samples = wait_for_rpcs(exporter, port, sum(recorder.calls.values()))

    record = recorder.calls
    assert self_metric(samples, "kernel_drops_total") == 0, "the capture ring overflowed: counts cannot be exact"
    # 300 calls in flight on one channel: grpcio's server sets no stream limit, and under load
    # they are all open at once; the per-connection cap must hold them.
    assert self_metric(samples, "http2_caps_hit_total", cap="streams") == 0
    assert record[("Slow", "DEADLINE_EXCEEDED")] == 1
    expected = collections.Counter({(SERVICE, method, CODE_NUMBER[code]): n for (method, code), n in record.items()
                                    if method != "Slow"})
    got = rpc_counts(samples, port)
    # The deadline: the client resets the stream; grpc core may first send grpc-status 4 itself.
    slow = {key: n for key, n in got.items() if key[1] == "Slow"}
    assert sum(slow.values()) == 1 and next(iter(slow))[2] in ("4", "reset"), slow
    # What the exporter says of its own parsing, shown if a count is off.
    diagnostics = {name + str(dict(labels)): value for (name, labels), value in samples.items()
                   if value and any(part in name for part in ("http2_", "parse_errors", "out_of_order", "flows_"))}
    assert {key: n for key, n in got.items() if key[1] != "Slow"} == dict(expected), diagnostics
    # The same streams on the HTTP series, as HTTP/2: every call is a POST.
    http = counts_by_key(samples, port)
    assert sum(http.values()) == sum(record.values())
    assert http[("POST", "200", f"/{SERVICE}/Unary")] == record[("Unary", "OK")]
    assert bucket(samples, port, "Delay", "0.1") == 0
    assert bucket(samples, port, "Delay", "0.25") == 5
    assert bucket(samples, port, "Unary", "+Inf") == record[("Unary", "OK")]
    versions = {dict(labels)["network_protocol_version"] for (name, labels) in samples
                if name == "http_server_request_duration_seconds_count"}
    assert versions == {"2"}
    assert self_metric(samples, "http2_connections_total", how="prior_knowledge") == 1
    assert self_metric(samples, "http2_undecodable_streams_total") == 0
    for reason in ("bad_preface", "bad_frame", "bad_header_block", "truncated"):
        assert self_metric(samples, "http2_parse_errors_total", reason=reason) == 0
    assert self_metric(samples, "parse_errors_total", reason="not_http") == 0


# -- nginx h2c ----------------------------------------------------------------------------

NGINX_SERVER = """
listen {listen} http2;
root {root}/www;
location = / {{ return 200 "ok"; }}
location = /missing {{ return 404; }}
location = /fail {{ return 503 "down"; }}
location /files/ {{ }}
"""


@contextmanager
def nginx_h2c(host: str) -> Iterator[tuple[int, Path]]:
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="h2c-nginx-"))
    (root / "tmp").mkdir()
    (root / "www" / "files").mkdir(parents=True)
    (root / "www" / "files" / "20k").write_bytes(b"x" * 20_000)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    (root / "nginx.conf").write_text(nginx_config(root, log_format="$request_method $status $uri $server_protocol",
                                                  master=False, server=NGINX_SERVER.format(root=root, listen=listen)))
    proc = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(root / "nginx.conf"),
                             "-e", str(root / "error.log")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(root / 'error.log').read_text()}")
            if subprocess.run(["curl", "-s", "-o", "/dev/null", "--http2-prior-knowledge",
                               f"http://{listen}/ready-probe"], check=False).returncode == 0:
                break
            time.sleep(0.1)
        yield port, root
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def access_log(root: Path) -> collections.Counter[tuple[str, str, str]]:
    counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for line in (root / "access.log").read_text().splitlines():
        method, status, uri, protocol = line.split(" ")
        assert protocol == "HTTP/2.0", line
        counts[(method, status, uri)] += 1
    return counts


@pytest.mark.parametrize(("host", "fast_path"), [("127.0.0.1", "--fast-path"), ("::1", "--fast-path"),
                                                 ("127.0.0.1", "--no-fast-path")])
def test_nginx_h2c_matches_access_log(host: str, fast_path: str) -> None:
    with nginx_h2c(host) as (port, root):
        (root / "access.log").write_text("")  # the readiness probe does not count
        listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        with ExporterProcess("--interface", "lo", "--port", str(port), fast_path, "--route", "/files/{name}") \
                as exporter:
            base = f"http://{listen}"
            # h2load 1.52 sends an IPv6 :authority without brackets, which nginx answers 400
            # before it logs the method: name the host instead.
            h2load = subprocess.run(
                ["h2load", "-n", "3000", "-c", "3", "-m", "20", "-H", ":authority: localhost", f"{base}/",
                 f"{base}/missing", f"{base}/fail", f"{base}/files/20k"],
                capture_output=True, text=True, timeout=120, check=True)
            assert "3000 done" in h2load.stdout and " 0 errored" in h2load.stdout, h2load.stdout
            for args in (["-X", "POST", "--data-binary", "hello", f"{base}/?q=1"], [f"{base}/missing?x"],
                         ["-X", "DELETE", f"{base}/fail"], ["-I", f"{base}/"]):
                # curl may exit 92 on the POST: nginx answers without reading the body, then resets
                # the stream (after END_STREAM, so the exchange is complete). The log is the oracle.
                subprocess.run(["curl", "-s", "-o", "/dev/null", "--http2-prior-knowledge", *args],
                               check=False, timeout=20)
            time.sleep(0.5)
            log = access_log(root)
            total = sum(log.values())
            assert total == 3004
            samples = exporter.wait_for_exchanges(total, timeout=30)
    assert self_metric(samples, "kernel_drops_total") == 0, "the capture ring overflowed: counts cannot be exact"
    expected = collections.Counter({
        (method, status, "/files/{name}" if uri.startswith("/files/") else uri): n
        for (method, status, uri), n in log.items()})
    assert counts_by_key(samples, port) == expected
    assert self_metric(samples, "http2_connections_total", how="prior_knowledge") == 3 + 4
    assert self_metric(samples, "http2_undecodable_streams_total") == 0
    assert sum(self_metric(samples, "http2_streams_dropped_total", reason=r)
               for r in ("lost", "cap", "goaway", "closed")) == 0
    assert self_metric(samples, "parse_errors_total", reason="not_http") == 0
    # The kernel's fast path handed every h2c connection over ("PRI" is no HTTP/1 method) and
    # was never told to cut an HTTP/2 body: frame headers sit anywhere in the DATA.
    if fast_path == "--fast-path":
        assert ("ebpf_slo_exporter_fast_path_exchanges_total", ()) in samples
        assert self_metric(samples, "fast_path_exchanges_total") == 0
    assert ("ebpf_slo_exporter_filter_packets_total", (("verdict", "truncated_body_skip"),)) in samples
    assert self_metric(samples, "filter_packets_total", verdict="truncated_body_skip") == 0
    # 20 KB bodies (two DATA frames each, cut anywhere by TCP): every byte is counted.
    size_sum = sum(value for (name, labels), value in samples.items()
                   if name == "http_server_response_body_size_bytes_sum" and dict(labels)["http_route"] ==
                   "/files/{name}")
    assert size_sum == 20_000 * expected[("GET", "200", "/files/{name}")]


def test_grpc_connection_opened_before_start_never_guesses() -> None:
    """A channel whose HPACK tables were filled before the exporter started: what is counted is
    exact, and every other call after the start is on the undecodable counter."""
    with grpc_server("127.0.0.1") as (port, recorder), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        lookup = channel.unary_unary(f"/{SERVICE}/Lookup")
        for i in range(10):  # before start: the client's and the server's encoders index their fields
            assert unary(b"%d" % i, timeout=10) == b"echo:%d" % i
        with ExporterProcess("--interface", "lo", "--port", str(port)) as exporter:
            before = sum(recorder.calls.values())
            for i in range(30):
                assert unary(b"%d" % i, timeout=10) == b"echo:%d" % i
            for _ in range(5):
                with pytest.raises(grpc.RpcError):
                    lookup(b"x", timeout=10)
            after = sum(recorder.calls.values()) - before
            assert after == 35
            deadline = time.monotonic() + 15
            samples = exporter.scrape()
            while time.monotonic() < deadline:
                counted = sum(rpc_counts(samples, port).values())
                if counted + self_metric(samples, "http2_undecodable_streams_total") >= after:
                    break
                time.sleep(0.1)
                samples = exporter.scrape()
            time.sleep(0.3)
            samples = exporter.scrape()
    assert self_metric(samples, "kernel_drops_total") == 0
    got = rpc_counts(samples, port)
    undecodable = self_metric(samples, "http2_undecodable_streams_total")
    assert sum(got.values()) + undecodable == after, (got, undecodable)
    # Whatever was counted is right: only the two methods and their true codes.
    assert set(got) <= {(SERVICE, "Unary", "0"), (SERVICE, "Lookup", "5")}, got
    assert got[(SERVICE, "Unary", "0")] <= 30 and got[(SERVICE, "Lookup", "5")] <= 5
    assert self_metric(samples, "http2_connections_total", how="mid_stream") == 1
    for reason in ("bad_preface", "bad_frame", "bad_header_block", "truncated"):
        assert self_metric(samples, "http2_parse_errors_total", reason=reason) == 0


# -- h2c upgrade ----------------------------------------------------------------------------


class UpgradeServer:
    """HTTP/1.1 → h2c via `Upgrade: h2c` (RFC 7540 §3.2) with the h2 state machine; logs what it answers."""

    def __init__(self, host: str) -> None:
        import socket

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.port = int(self.sock.getsockname()[1])
        self.log: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def answer(self, h2conn: Any, stream: int, method: str, path: str) -> None:
        status = 404 if path.startswith("/missing") else 200
        body = b"" if status == 404 else b"hello " * (len(path) + 1)
        h2conn.send_headers(stream, [(":status", str(status)), ("content-length", str(len(body)))],
                            end_stream=not body)
        if body:
            h2conn.send_data(stream, body, end_stream=True)
        with self.lock:
            self.log[(method, str(status), path.split("?", 1)[0])] += 1

    def handle(self, conn: Any) -> None:
        import h2.config
        import h2.connection
        import h2.events

        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ")
            headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
            h2conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
            h2conn.initiate_upgrade_connection(headers["http2-settings"])
            self.answer(h2conn, 1, method, path)
            conn.sendall(h2conn.data_to_send())
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                for event in h2conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        fields = {k.decode(): v.decode() for k, v in event.headers}
                        self.answer(h2conn, event.stream_id, fields[":method"], fields[":path"])
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        conn.sendall(h2conn.data_to_send())
                        return
                conn.sendall(h2conn.data_to_send())

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_h2c_upgrade_with_curl(host: str) -> None:
    server = UpgradeServer(host)
    try:
        with ExporterProcess("--interface", "lo", "--port", str(server.port)) as exporter:
            base = f"http://[{host}]:{server.port}" if ":" in host else f"http://{host}:{server.port}"
            # One curl, one connection: the first request upgrades (stream 1), the rest are streams 3, 5, 7.
            done = subprocess.run(["curl", "-s", "--http2", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null",
                                   "-o", "/dev/null", f"{base}/first?x=1", f"{base}/missing", f"{base}/a/b",
                                   f"{base}/first"], capture_output=True, timeout=20, check=False)
            assert done.returncode == 0, done.stderr
            assert sum(server.log.values()) == 4
            samples = exporter.wait_for_exchanges(4)
    finally:
        server.close()
    assert self_metric(samples, "kernel_drops_total") == 0
    assert counts_by_key(samples, server.port) == server.log
    assert self_metric(samples, "http2_connections_total", how="upgrade") == 1
    assert self_metric(samples, "parse_errors_total", reason="not_http") == 0
    versions = {dict(labels)["network_protocol_version"] for (name, labels) in samples
                if name == "http_server_request_duration_seconds_count"}
    assert versions == {"2"}  # the upgraded request too: it is answered on stream 1
