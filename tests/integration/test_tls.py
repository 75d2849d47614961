"""End to end for HTTPS: the real uprobes on the system libssl, real TLS servers with their own logs.

Two servers terminate TLS with Debian's OpenSSL: a threaded Python server (/usr/bin/python3,
tests/integration/tls_server.py) and nginx-light. Each writes an access log; the exporter's
counts per (method, status, route), all labelled url_scheme="https", must equal it exactly.
The clients (curl, Python's http.client, raw ssl sockets) use the same libssl, so every
test also checks that their side of the connection is never counted.
"""

from __future__ import annotations

import collections
import http.client
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from exporter.capture.ringbuf import records_of
from exporter.capture.tls import (
    KIND_CLOSE,
    KIND_OPEN,
    KIND_READ,
    KIND_WRITE,
    TlsCapture,
    TlsEvent,
    decode_event,
    decode_open,
    find_libraries,
)
from tests.integration.harness import REPO, ExporterProcess, counts_by_key, free_port, self_metric
from tests.integration.nginx_conf import nginx_config

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to attach uprobes")

SYSTEM_PYTHON = "/usr/bin/python3"  # its _ssl links the system libssl.so.3
SERVER = REPO / "tests" / "integration" / "tls_server.py"
BUCKETS = "0.01,0.1,0.25,0.5,1"

Counts = collections.Counter[tuple[str, str, str]]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    directory = tmp_path_factory.mktemp("tls-cert")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    for path in (directory, cert, key):
        path.chmod(0o755 if path.is_dir() else 0o644)  # nginx's master reads them as root; fine either way
    return cert, key


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def read_log(path: Path) -> Counts:
    """(method, status, path) per logged request; nginx's lines say "OK" when the response was
    sent whole, and one that was not (the client reset the connection) was never answered."""
    counts: Counts = collections.Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) == 3 or fields[3] == "OK":
                counts[(fields[0], fields[2], fields[1])] += 1
    return counts


@contextmanager
def python_server(certificate: tuple[Path, Path], log: Path, nodelay: bool = False) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([SYSTEM_PYTHON, str(SERVER), str(port), str(certificate[0]), str(certificate[1]),
                             str(log), *(["nodelay"] if nodelay else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready", "the TLS test server did not start"
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        proc.stdout.close()


NGINX_SERVER = """
listen 127.0.0.1:{port} ssl{http2};
ssl_certificate {cert};
ssl_certificate_key {key};
root {root}/www;
location = /ok {{ return 200 "ok\\n"; }}
location = /nocontent {{ return 204; }}
location = /notmodified {{ return 304; }}
location = /boom {{ return 500 "boom\\n"; }}
location /files/ {{ }}
"""


@contextmanager
def nginx_server(certificate: tuple[Path, Path], http2: bool = False) -> Iterator[tuple[int, Path]]:
    """nginx in a directory of its own under /tmp: its worker runs as an unprivileged user and must
    reach the files, which pytest's private (0700) tmp_path would not let it. `http2`: the
    listener offers h2 by ALPN (nginx 1.22's `listen ... ssl http2`)."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="ebpf-slo-tls-nginx-"))
    root.chmod(0o755)
    try:
        with _nginx(binary, port, root, certificate, http2) as log:
            yield port, log
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def _nginx(binary: str, port: int, root: Path, certificate: tuple[Path, Path], http2: bool) -> Iterator[Path]:
    (root / "tmp").mkdir(parents=True)
    files = root / "www" / "files"
    files.mkdir(parents=True)
    for name, size in (("small", 1024), ("medium", 100 * 1024), ("large", 1024 * 1024)):
        (files / name).write_bytes(b"n" * size)
    for path in (root / "www", files, *files.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    conf = root / "nginx.conf"
    server = NGINX_SERVER.format(root=root, port=port, cert=certificate[0], key=certificate[1],
                                 http2=" http2" if http2 else "")
    conf.write_text(nginx_config(root, log_format="$request_method $uri $status $request_completion",
                                 workers=2, server=server))
    proc = subprocess.Popen([binary, "-p", str(root), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start: {(root / 'error.log').read_text()}") from None
                time.sleep(0.1)
        yield root / "access.log"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def unfinished(log: Path) -> int:
    """nginx's lines for requests whose response it could not send whole."""
    return sum(1 for line in log.read_text().splitlines() if line.split()[3:] != ["OK"])


def https(port: int, requests: list[tuple[str, str]], body: bytes | None = None) -> list[int]:
    """Requests on one keep-alive connection; returns the statuses."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=client_context(), timeout=10)
    statuses = []
    try:
        for method, path in requests:
            conn.request(method, path, body=body if method == "POST" else None)
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        conn.close()
    return statuses


def small_reads(port: int, path: str) -> int:
    """One request whose response the client reads 7 bytes at a time; returns the bytes read."""
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with client_context().wrap_socket(raw) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            received = bytearray()
            while chunk := sock.recv(7):
                received += chunk
    assert received.startswith(b"HTTP/1.1 200 "), bytes(received[:400])
    return len(received)


def abrupt(port: int, path: str, after_s: float = 0.2) -> None:
    """Send a request and reset the connection `after_s` later without reading the answer."""
    with client_context().wrap_socket(socket.create_connection(("127.0.0.1", port))) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(after_s)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST


def curl(*urls: str) -> None:
    """One curl process, one keep-alive connection for all its URLs."""
    args = ["curl", "-sk"]
    for url in urls:
        args += [url, "-o", "/dev/null"]
    subprocess.run(args, check=True, capture_output=True, timeout=30)


def wait_for_log(path: Path, expected: int, timeout: float = 10.0) -> Counts:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = read_log(path)
        if sum(counts.values()) >= expected:
            return counts
        time.sleep(0.1)
    return read_log(path)


def https_counts(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], port: int) -> Counts:
    for (name, labels), value in samples.items():
        if name == "http_server_request_duration_seconds_count" and value and dict(labels)["server_port"] == str(port):
            assert dict(labels)["url_scheme"] == "https", labels
    return counts_by_key(samples, port)


def test_python_https_server_counts_match_its_log(certificate: tuple[Path, Path], tmp_path: Path) -> None:
    log, other_log = tmp_path / "access.log", tmp_path / "other.log"
    with python_server(certificate, log) as port, python_server(certificate, other_log) as other_port:
        # Opened before the exporter starts: its server thread is already blocked in SSL_read, so
        # the first request after the start is missed (its response is an unmatched one); the
        # connection is counted from the next message on.
        early = http.client.HTTPSConnection("127.0.0.1", port, context=client_context(), timeout=10)
        early.request("GET", "/ok")
        early.getresponse().read()
        before = read_log(log)
        with ExporterProcess("--interface", "lo", "--port", str(port), "--duration-buckets", BUCKETS) as exporter:
            early.request("GET", "/warmup")  # the missed one: /warmup is 404 and logged as such
            early.getresponse().read()
            for path in ("/ok", "/boom", "/nocontent"):
                early.request("GET", path)
                early.getresponse().read()
            early.close()

            mix = [("GET", "/ok"), ("HEAD", "/ok"), ("GET", "/nocontent"), ("GET", "/notmodified"),
                   ("GET", "/missing"), ("GET", "/boom"), ("POST", "/ok"), ("GET", "/big?n=1000000"),
                   ("GET", "/big?n=20000"), ("GET", "/chunked?n=40&size=3000"), ("HEAD", "/chunked")]
            assert https(port, mix * 3, body=b"p" * 50000)[:3] == [200, 200, 204]
            assert https(port, [("GET", "/slow?ms=150"), ("GET", "/slow?ms=150"), ("GET", "/slow?ms=300")])
            threads = [threading.Thread(target=https, args=(port, [("GET", "/ok"), ("GET", "/big?n=70000")] * 10))
                       for _ in range(6)]
            for thread in threads:
                thread.start()
            assert small_reads(port, "/big?n=30000") > 30000
            assert small_reads(port, "/chunked?n=5&size=100") > 500
            abrupt(port, "/slow?ms=400")  # reset before the answer: never logged, never counted
            curl(*[f"https://127.0.0.1:{port}/ok"] * 3, f"https://127.0.0.1:{port}/missing")
            for thread in threads:
                thread.join()
            # A TLS server on a port nobody watches, from the same clients: nothing of it counts.
            curl(*[f"https://127.0.0.1:{other_port}/ok"] * 4)
            assert https(other_port, [("GET", "/ok")] * 3) == [200] * 3

            served = read_log(log) - before
            wanted = sum(served.values())
            expected = served - Counts({("GET", "404", "/warmup"): 1})
            samples = exporter.wait_for_exchanges(sum(expected.values()))
    assert https_counts(samples, port) == expected
    assert self_metric(samples, "exchanges_total") == sum(expected.values())
    assert wanted == sum(expected.values()) + 1
    assert sum(read_log(other_log).values()) == 7
    assert self_metric(samples, "unmatched_responses_total") == 1  # the /warmup answer
    assert self_metric(samples, "tls_events_lost_total") == 0
    # Each 1 MB body is one SSL_write: sent by length either because the parser's skip hint
    # was in the kernel already, or because it is longer than the 128 KiB a call may copy.
    assert self_metric(samples, "tls_calls_truncated_total") + self_metric(samples, "tls_calls_skipped_total") >= 3
    assert self_metric(samples, "tls_calls_ignored_total") > 0  # the clients' own SSL calls
    # The socket filter saw the encrypted side of every connection to the port: never a parse error.
    for reason in ("bad_request_line", "bad_status_line", "not_http", "bad_header", "gap"):
        assert self_metric(samples, "parse_errors_total", reason=reason) == 0, reason
    assert self_metric(samples, "requests_without_response_total") == 1  # the reset one
    assert self_metric(samples, "encrypted_flows_total") == 13  # every connection to the port
    assert self_metric(samples, "filter_packets_total", verdict="dropped_tls") > 0  # their ciphertext
    # Known delays in the right buckets: 150 ms twice (0.1 < d <= 0.25), 300 ms once (0.25 < d <= 0.5).
    def bucket(le: str) -> float:
        wanted = {("http_request_method", "GET"), ("http_response_status_code", "200"), ("http_route", "/slow"),
                  ("network_protocol_version", "1.1"), ("server_port", str(port)), ("url_scheme", "https"),
                  ("le", le)}
        # One series for the route; the server's identity labels are not named here.
        [value] = [value for (name, labels), value in samples.items()
                   if name == "http_server_request_duration_seconds_bucket" and wanted <= set(labels)]
        return value
    assert (bucket("0.1"), bucket("0.25"), bucket("0.5")) == (0, 2, 3)


def test_nginx_https_counts_match_its_log(certificate: tuple[Path, Path]) -> None:
    with nginx_server(certificate) as (port, log):
        with ExporterProcess("--interface", "lo", "--port", str(port), "--route", "/files/{name}") as exporter:
            base = f"https://127.0.0.1:{port}"
            curl(f"{base}/ok", f"{base}/files/large", f"{base}/ok", f"{base}/missing", f"{base}/files/medium")
            mix = [("GET", "/ok"), ("HEAD", "/ok"), ("GET", "/nocontent"), ("GET", "/notmodified"),
                   ("GET", "/boom"), ("GET", "/files/small"), ("GET", "/files/medium"), ("GET", "/files/large"),
                   ("HEAD", "/files/large"), ("GET", "/nothing/here")]
            threads = [threading.Thread(target=https, args=(port, mix * 4)) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert small_reads(port, "/files/medium") > 100 * 1024
            abrupt(port, "/files/large")  # reset while nginx writes: logged without "OK"
            served = wait_for_log(log, 5 + 8 * 40 + 1)
            time.sleep(0.5)  # the reset one's line
            served = read_log(log)
            incomplete = unfinished(log)
            assert incomplete <= 1
            samples = exporter.wait_for_exchanges(sum(served.values()))
    expected: Counts = collections.Counter()
    for (method, status, path), count in served.items():
        expected[(method, status, "/files/{name}" if path.startswith("/files/") else path)] += count
    assert https_counts(samples, port) == expected
    assert self_metric(samples, "exchanges_total") == sum(expected.values())
    assert self_metric(samples, "tls_events_lost_total") == 0
    assert self_metric(samples, "unmatched_responses_total") == 0
    # The reset one, unless nginx had handed the whole answer to the socket first (then it is
    # logged "OK" and counted above).
    assert self_metric(samples, "requests_without_response_total") == incomplete
    for reason in ("bad_request_line", "bad_status_line", "not_http", "gap"):
        assert self_metric(samples, "parse_errors_total", reason=reason) == 0, reason


def test_nginx_h2_over_tls_counts_every_stream_as_https_http2(certificate: tuple[Path, Path]) -> None:
    """HTTP/2 negotiated by ALPN: the plaintext from the probes goes through the same HTTP/2
    decoder as h2c, so every stream is counted once, labelled https and version 2."""
    with nginx_server(certificate, http2=True) as (port, log):
        with ExporterProcess("--interface", "lo", "--port", str(port), "--route", "/files/{name}") as exporter:
            base = f"https://127.0.0.1:{port}"
            # curl: several requests on one h2 connection (ALPN h2), a large body among them.
            args = ["curl", "-sk", "--http2"]
            for path in ("/ok", "/files/large", "/boom", "/missing", "/nocontent", "/ok"):
                args += [f"{base}{path}", "-o", "/dev/null"]
            subprocess.run(args, check=True, capture_output=True, timeout=30)
            # h2load: 400 streams, 20 at a time on each of 2 connections.
            load = subprocess.run(["h2load", "-n", "400", "-c", "2", "-m", "20", f"{base}/ok"],
                                  capture_output=True, text=True, timeout=60, check=False)
            assert "400 done" in load.stdout and " 0 errored" in load.stdout, load.stdout
            served = wait_for_log(log, 406)
            samples = exporter.wait_for_exchanges(sum(served.values()))
    assert sum(served.values()) == 406
    expected: Counts = collections.Counter()
    for (method, status, path), count in served.items():
        expected[(method, status, "/files/{name}" if path.startswith("/files/") else path)] += count
    assert https_counts(samples, port) == expected
    versions = {dict(labels)["network_protocol_version"] for (name, labels), value in samples.items()
                if name == "http_server_request_duration_seconds_count" and value
                and dict(labels)["server_port"] == str(port)}
    assert versions == {"2"}
    assert self_metric(samples, "http2_connections_total", how="prior_knowledge") == 3
    assert self_metric(samples, "http2_undecodable_streams_total") == 0
    assert self_metric(samples, "tls_events_lost_total") == 0
    for reason in ("bad_request_line", "bad_status_line", "not_http", "gap"):
        assert self_metric(samples, "parse_errors_total", reason=reason) == 0, reason


def test_a_server_that_exits_mid_exchange_ends_its_connections(certificate: tuple[Path, Path],
                                                                tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    with python_server(certificate, log) as port:
        with ExporterProcess("--interface", "lo", "--port", str(port)) as exporter:
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=client_context(), timeout=10)
            conn.request("GET", "/ok")
            conn.getresponse().read()
            conn.request("GET", "/exit")
            with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
                conn.getresponse().read()
            conn.close()
            deadline = time.monotonic() + 10
            samples = exporter.scrape()
            while time.monotonic() < deadline and self_metric(samples, "requests_without_response_total") < 1:
                time.sleep(0.2)
                samples = exporter.scrape()
    assert https_counts(samples, port) == read_log(log) == Counts({("GET", "200", "/ok"): 1})
    # No close() was seen: the exporter noticed the process was gone and ended its connection.
    assert self_metric(samples, "requests_without_response_total") == 1
    assert self_metric(samples, "tls_connections_tracked") == 0


def test_user_keeps_counting_another_users_https_server(certificate: tuple[Path, Path], tmp_path: Path) -> None:
    """--user nobody after attach, the server root's: the kernel names its sockets (no /proc), and
    the once-a-second check for connections gone unseen must not end a connection whose
    /proc/<pid>/fd nobody may read. Each connection outlives a few of those checks."""
    log = tmp_path / "access.log"
    with python_server(certificate, log) as port, \
            ExporterProcess("--interface", "lo", "--port", str(port), "--user", "nobody") as exporter:
        exporter.wait_for_exchanges(0)
        requests = [("GET", "/ok"), ("GET", "/slow?ms=1500"), ("GET", "/missing"), ("GET", "/slow?ms=1500"),
                    ("GET", "/ok")]
        threads = [threading.Thread(target=https, args=(port, requests)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        served = wait_for_log(log, 10)
        samples = exporter.wait_for_exchanges(10)
    assert served == Counts({("GET", "200", "/ok"): 4, ("GET", "200", "/slow"): 4, ("GET", "404", "/missing"): 2})
    assert https_counts(samples, port) == served
    assert self_metric(samples, "requests_without_response_total") == 0


def test_a_library_whose_layout_cannot_be_measured_is_left_out_in_one_line(tmp_path: Path) -> None:
    """Not an OpenSSL (here: not even ELF): no offsets, so no probes on it; the others still attach."""
    from exporter.capture.tls import TlsProbes
    from exporter.errors import CaptureError

    bogus = tmp_path / "libssl.so.3"
    bogus.write_bytes(b"not a library")
    [system] = find_libraries()[:1]
    probes = TlsProbes([system, str(bogus)])
    try:
        assert probes.libraries == [system]
        [reason] = probes.unprobed
        assert reason.startswith(f"libssl {bogus}: could not find its SSL layout (") and "\n" not in reason
    finally:
        probes.close()
    with pytest.raises(CaptureError, match=f"^no libssl could be probed: libssl {bogus}: could not find"):
        TlsProbes([str(bogus)])


def test_no_tls_counts_nothing_and_a_missing_library_is_one_line(certificate: tuple[Path, Path],
                                                                        tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    with python_server(certificate, log) as port:
        with ExporterProcess("--interface", "lo", "--port", str(port), "--no-tls") as exporter:
            curl(*[f"https://127.0.0.1:{port}/ok"] * 3)
            assert sum(wait_for_log(log, 3).values()) == 3
            time.sleep(1.0)
            samples = exporter.scrape()
        assert https_counts(samples, port) == Counts()
        assert self_metric(samples, "tls_libraries_probed") == 0
        assert self_metric(samples, "encrypted_flows_total") == 1
        assert self_metric(samples, "parse_errors_total", reason="bad_request_line") == 0
    missing = tmp_path / "nowhere" / "libssl.so.3"
    result = subprocess.run([sys.executable, "-m", "exporter", "run", "--port", "1", "--libssl", str(missing)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"Invalid value for '--libssl': File '{missing}' does not exist." in result.stderr


ATTACH_PROBE = """
from exporter.capture.tls import TlsProbes, find_libraries
from exporter.errors import CaptureError
try:
    probes = TlsProbes(find_libraries())
except CaptureError as exc:
    print("refused:", exc)
else:
    print("attached:", ",".join(probes.libraries))
    probes.close()
"""


def attach_as_nobody(caps: list[str]) -> str:
    spec = ",".join(["-all", *(f"+{c}" for c in caps)])
    home = Path(tempfile.mkdtemp(prefix="ebpf-slo-home-"))
    home.chmod(0o777)
    try:
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", f"--inh-caps={spec}",
             f"--ambient-caps={spec}", f"--bounding-set={spec}", sys.executable, "-c", ATTACH_PROBE],
            cwd=REPO, capture_output=True, text=True, timeout=120,
            env={**os.environ, "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"})
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return result.stdout.strip()


def test_uprobes_need_cap_sys_admin_and_it_is_enough() -> None:
    """What preflight.TLS_CAPABILITIES says, measured: the capture's set cannot attach, SYS_ADMIN can."""
    assert attach_as_nobody(["sys_admin"]) == "attached: " + ",".join(sorted(find_libraries()))
    refused = attach_as_nobody(["bpf", "perfmon", "net_raw"])
    assert refused.startswith("refused: no uprobe could be attached to libssl"), refused


def body_sum(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], port: int, name: str,
             route: str) -> float:
    """The sum of one body size histogram over the route's series."""
    return sum(value for (metric, labels), value in samples.items()
               if metric == f"{name}_sum" and dict(labels)["server_port"] == str(port)
               and dict(labels)["http_route"] == route)


def test_a_stalled_exporter_trims_bodies_exactly_then_counts_what_the_full_ring_lost(
        certificate: tuple[Path, Path], tmp_path: Path) -> None:
    """The exporter stopped (SIGSTOP) while the server writes 1 MB bodies: no skip hint reaches the
    kernel, the backlog passes TLS_TRIM_BYTES and calls are cut to their first TLS_PREFIX bytes.
    Counts and body sizes stay exact (Content-Length bodies are only counted) and nothing is lost.
    Stalled again under 1 MB uploads until even trimmed calls overflow the ring: the loss is counted,
    never silent, and a connection opened afterwards is counted exactly again. The connection is
    known before each stall, so the client's own SSL calls already cost nothing in the kernel."""
    from exporter.capture.tls import RING_PAGES, TLS_PREFIX, TLS_TRIM_BYTES

    log = tmp_path / "access.log"
    conn = http.client.HTTPSConnection("127.0.0.1", 0, context=client_context(), timeout=10)

    def request(method: str, path: str, body: bytes | None = None) -> int:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        response.read()
        return response.status

    with python_server(certificate, log) as port, ExporterProcess("--interface", "lo", "--port", str(port)) as exporter:
        assert exporter.proc is not None
        conn.port = port
        assert request("GET", "/ok") == 200
        exporter.wait_for_exchanges(1)
        exporter.proc.send_signal(signal.SIGSTOP)
        try:
            # 24 x 1 MB, one SSL_write each: untrimmed each copies 128 KiB; past 2 MiB unread, 4 KiB.
            assert [request("GET", path) for path in ("/big?n=1000000", "/ok") * 24] == [200] * 48
        finally:
            exporter.proc.send_signal(signal.SIGCONT)
        served = wait_for_log(log, 49)
        samples = exporter.wait_for_exchanges(49)
        assert served == Counts({("GET", "200", "/big"): 24, ("GET", "200", "/ok"): 25})
        assert https_counts(samples, port) == served
        assert body_sum(samples, port, "http_server_response_body_size_bytes", "/big") == 24 * 1_000_000
        assert 24 * 128 * 1024 > TLS_TRIM_BYTES
        assert self_metric(samples, "tls_calls_trimmed_total") >= 24 - TLS_TRIM_BYTES // (128 * 1024)
        assert self_metric(samples, "tls_events_lost_total") == 0
        assert self_metric(samples, "parse_errors_total", reason="truncated") == 0

        exporter.proc.send_signal(signal.SIGSTOP)
        # 1 MB uploads read by the server in 16 KiB records: even at TLS_PREFIX each, half as much
        # again as the ring holds.
        uploads = 3 * RING_PAGES * 4096 // (2 * (1_000_000 // 16384) * TLS_PREFIX) + 1
        try:
            assert uploads * (1_000_000 // 16384) * TLS_PREFIX > RING_PAGES * 4096
            assert [request("POST", "/ok", b"u" * 1_000_000) for _ in range(uploads)] == [200] * uploads
        finally:
            exporter.proc.send_signal(signal.SIGCONT)
        conn.close()
        wait_for_log(log, 49 + uploads)
        time.sleep(1.0)  # the backlog read
        before = https_counts(exporter.scrape(), port)
        assert https(port, [("GET", "/ok")] * 5) == [200] * 5
        samples = exporter.wait_for_exchanges(sum(before.values()) + 5)
    assert self_metric(samples, "tls_events_lost_total") > 0
    # A full ring, and the probes say so: none of these was refused with room.
    assert self_metric(samples, "tls_events_lost_with_room_total") == 0
    assert self_metric(samples, "tls_loss_gaps_total") > 0  # the lost bytes, counted as a gap of known length
    counted = https_counts(samples, port)
    assert counted[("POST", "200", "/ok")] <= uploads
    assert counted - before == Counts({("GET", "200", "/ok"): 5})  # a new connection: exact again


def test_the_kernel_judges_each_connection_by_its_local_port_before_any_event(
        certificate: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real probes and TlsCapture, with the raw events recorded. nginx on the watched port with
    one connection opened before the probes attach: it is picked up at its next request, and its
    OPEN names the client's own address. curl on the same host and the same libssl (the client
    side: an ephemeral local port) and a TLS server on another port never produce an event, from
    their first call: the kernel drops them (tls_calls_ignored_total)."""
    seen: list[TlsEvent] = []
    curls: list[int] = []

    def run_curl(*urls: str) -> None:
        proc = subprocess.Popen(["curl", "-sk", *[arg for url in urls for arg in (url, "-o", "/dev/null")]])
        curls.append(proc.pid)
        assert proc.wait(30) == 0

    with nginx_server(certificate) as (port, log), python_server(certificate, tmp_path / "other.log") as other:
        early = http.client.HTTPSConnection("127.0.0.1", port, context=client_context(), timeout=10)
        early.request("GET", "/ok")
        early.getresponse().read()
        capture = TlsCapture([port], find_libraries()).open()
        assert capture.probes is not None
        read = capture.probes.read

        def recording(timeout_s: float) -> list[bytes]:
            spans = read(timeout_s)
            seen.extend(event for span in spans for event in map(decode_event, records_of(span)) if event is not None)
            return spans

        def drain() -> None:
            for _ in range(10):
                capture.read(0.05)

        monkeypatch.setattr(capture.probes, "read", recording)
        try:
            ignored_before = capture.counters()["ignored_calls"]
            run_curl(f"https://127.0.0.1:{other}/ok", f"https://127.0.0.1:{other}/missing")
            drain()
            assert seen == []  # the other service and its client: not one event
            assert capture.counters()["ignored_calls"] > ignored_before
            early.request("GET", "/nocontent")
            assert early.getresponse().status == 204
            early_port = early.sock.getsockname()[1]
            run_curl(f"https://127.0.0.1:{port}/ok", f"https://127.0.0.1:{port}/boom")
            early.close()
            served = wait_for_log(log, 4)
            drain()
            counters = capture.counters()
        finally:
            capture.close()
    assert sum(served.values()) == 4
    assert not {event.tgid for event in seen} & {*curls, os.getpid()}  # the clients' side: never an event
    assert counters["events"] == len(seen) and counters["lost"] == 0
    opens = [event for event in seen if event.kind == KIND_OPEN]
    ends = [decode_open(event.data) for event in opens]
    assert len(opens) == 2 and all(end is not None and end.local_port == port for end in ends)
    assert early_port in {end.peer_port for end in ends if end is not None}
    # Each connection: OPEN first, then its data in stream order, and a CLOSE (nginx's SSL_free) last.
    by_ssl: dict[tuple[int, int], list[TlsEvent]] = collections.defaultdict(list)
    for event in seen:
        by_ssl[(event.tgid, event.ssl)].append(event)
    assert len(by_ssl) == 2
    requests = {}
    for events in by_ssl.values():
        assert [events[0].kind, events[-1].kind] == [KIND_OPEN, KIND_CLOSE]
        assert {event.kind for event in events[1:-1]} == {KIND_READ, KIND_WRITE}
        peer = decode_open(events[0].data)
        assert peer is not None
        requests[peer.peer_port] = b"".join(event.data for event in events if event.kind == KIND_READ)
    # The early connection from its next request on; curl's both requests.
    early_requests = requests.pop(early_port)
    assert early_requests.startswith(b"GET /nocontent HTTP/1.1\r\n") and early_requests.count(b"HTTP/1.1\r\n") == 1
    [curl_requests] = requests.values()
    assert [line.split(b" ")[1] for line in curl_requests.split(b"\r\n") if line.startswith(b"GET ")] == [
        b"/ok", b"/boom"]


@pytest.mark.parametrize("every", [5, 97])
def test_events_the_ring_refuses_with_room_reach_user_space_through_the_fallback_in_order(
        certificate: tuple[Path, Path], tmp_path: Path, every: int) -> None:
    """A test build of the probes (-DTLS_TEST_REFUSE_EVERY) makes the main ring refuse one event
    in `every` at every try, with room, as its lock does now and then: each goes to the fallback
    ring, and the events after it follow it there until the ring's thread has taken them (OPENs
    and CLOSEs too; calls are trimmed while the fallback is half full). With 5 nearly all traffic
    goes through the fallback; with 97 it switches rings often. nginx (keep-alive, 1 MB bodies in 16 KiB writes) and the
    Python server (chunked bodies, uploads, a client reading 7 bytes at a time) under 8 concurrent
    connections: the exchanges a Tracker builds from TlsCapture's segments, per (method, status,
    route), equal the servers' logs exactly, none lost, and every forced refusal went to the
    fallback."""
    from exporter.capture.tls import TlsProbes
    from exporter.core.flows import Tracker
    from exporter.core.model import Exchange

    log = tmp_path / "python.log"
    with nginx_server(certificate) as (nginx_port, nginx_log), python_server(certificate, log) as python_port:
        capture = TlsCapture([nginx_port, python_port], find_libraries(), probes_factory=lambda libraries, ports:
                             TlsProbes(libraries, ports, test_cflags=(f"-DTLS_TEST_REFUSE_EVERY={every}",))).open()
        tracker = Tracker([nginx_port, python_port], hint_skips=True, scheme="https")
        exchanges: list[Exchange] = []
        stop = threading.Event()

        def follow() -> None:  # what the exporter's loop does with the TLS capture (app.py)
            while not stop.is_set():
                segments = capture.read(0.05)
                if segments:
                    exchanges.extend(tracker.feed_all(segments))
                    capture.apply_skip_hints(tracker.take_skip_hints())

        follower = threading.Thread(target=follow)
        follower.start()
        try:
            nginx_mix = [("GET", "/ok"), ("HEAD", "/ok"), ("GET", "/nocontent"), ("GET", "/notmodified"),
                         ("GET", "/boom"), ("GET", "/files/small"), ("GET", "/files/medium"),
                         ("GET", "/files/large"), ("HEAD", "/files/large"), ("GET", "/nothing/here")]
            python_mix = [("GET", "/chunked?n=40&size=3000"), ("GET", "/ok"), ("POST", "/ok"),
                          ("GET", "/big?n=200000"), ("HEAD", "/chunked")]
            threads = [threading.Thread(target=https, args=(nginx_port, nginx_mix * 4)) for _ in range(5)]
            threads += [threading.Thread(target=https, args=(python_port, python_mix * 4, b"p" * 20000))
                        for _ in range(3)]
            for thread in threads:
                thread.start()
            curl(*[f"https://127.0.0.1:{nginx_port}/files/medium"] * 3)
            assert small_reads(python_port, "/chunked?n=5&size=100") > 500
            for thread in threads:
                thread.join()
            served = wait_for_log(nginx_log, 5 * 40 + 3) + wait_for_log(log, 3 * 20 + 1)
            deadline = time.monotonic() + 15
            while len(exchanges) < sum(served.values()) and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            stop.set()
            follower.join()
            counters = capture.counters()
            capture.close()
    assert sum(served.values()) == 5 * 40 + 3 + 3 * 20 + 1
    expected: Counts = collections.Counter()
    for (method, status, path), count in served.items():
        expected[(method, status, "/files/{name}" if path.startswith("/files/") else path)] += count
    got: Counts = collections.Counter(
        (e.method, str(e.status), "/files/{name}" if e.target.startswith("/files/") else e.target) for e in exchanges)
    assert got == expected
    assert counters["lost"] == 0
    assert counters["fallback"] == counters["refused_for_test"] > 0
    assert counters["fallback_following"] > 0
    assert tracker.stats.parse_errors["gap"] == 0
    assert tracker.stats.unmatched_responses == 0
