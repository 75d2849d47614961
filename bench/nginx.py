"""The server under load: Debian's nginx-light with a config of our own, in a temp dir.

- `worker_processes 1`: on this 2-core machine one core goes to nginx and one to wrk;
  the exporter (or the seed) has no core of its own and competes with both, as an agent
  does on a busy host. Nothing is pinned.
- The access log is the truth for completeness: one line per request nginx answered.
  It is buffered (64 KB, flushed every second) so that logging costs nginx little;
  `count_requests()` waits for the flush.
- `/` answers `200 ok`; `/1k`, `/100k`, `/1m` serve files of 1 KB, 100 KB and 1 MB.
- `tls=True` (the tls scenario): the same server over HTTPS, with a self-signed certificate
  made at start with the openssl command (TLS 1.3, nginx's default ciphers).
- `/api/items/<id>` (the realistic scenario) answers `200 ok`, and `500 error` when the id
  ends in 00 or 50: 2 % of uniformly random ids.
- Each log line is `$status $uri $body_bytes_sent $request_completion`, so counts can be
  compared per (status, route), not only in total.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from bench.procs import BenchError, Child, Children, wait_until

__all__ = ["BODY_PATHS", "ITEM_ROUTE", "Nginx", "free_port", "logged_by_status_route"]

BODY_PATHS = {"2B": "/", "1KB": "/1k", "100KB": "/100k", "1MB": "/1m"}
_BODY_FILES = {"1k": 1024, "100k": 100 * 1024, "1m": 1024 * 1024}
FLUSH_S = 1.0
ITEM_PREFIX = "/api/items/"
ITEM_ROUTE = "/api/items/{id}"  # what the route heuristic makes of ITEM_PREFIX + digits

_CONFIG = """\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {root}/nginx.pid;
error_log {root}/error.log warn;

events {{
    worker_connections {connections};
    multi_accept on;
}}

http {{
    log_format bench '$status $uri $body_bytes_sent $request_completion';
    access_log {root}/access.log bench buffer=64k flush={flush}s;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp;
    scgi_temp_path {root}/tmp;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    sendfile on;
    tcp_nopush on;
    default_type text/plain;

    server {{
        listen {host}:{port}{http2} backlog=4096{ssl};{certificate}
        root {root}/www;
        location = / {{ return 200 "ok"; }}
        location = /ready {{ access_log off; return 200 "ready"; }}
        location /api/items/ {{ return 200 "ok"; }}
        location ~ "^/api/items/[0-9]*[05]0$" {{ return 500 "error"; }}
        location / {{ }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def render_config(root: Path, port: int, connections: int = 20000, nofile: int = 65536,
                  host: str = "127.0.0.1", http2: bool = False, tls: bool = False) -> str:
    """`http2`: the listener speaks HTTP/2 with prior knowledge (h2c; nginx 1.22's `listen ... http2`).
    `tls`: HTTPS with the certificate Nginx.start makes."""
    certificate = (f"\n        ssl_certificate {root}/cert.pem;\n        ssl_certificate_key {root}/key.pem;"
                   if tls else "")
    return _CONFIG.format(root=root, port=port, connections=connections, nofile=nofile, flush=int(FLUSH_S),
                          host=host, http2=" http2" if http2 else "", ssl=" ssl" if tls else "",
                          certificate=certificate)


class Nginx:
    def __init__(self, children: Children, binary: str, workdir: Path, host: str = "127.0.0.1",
                 wrap: Callable[[list[str]], list[str]] = list, http2: bool = False, tls: bool = False) -> None:
        self.http2 = http2
        self.tls = tls
        self.children = children
        self.binary = binary
        self.host = host  # the address it listens on (the node scenario: a pod's)
        self.wrap = wrap  # how its command line is started (the node scenario: in the pod's namespace)
        self.root = workdir / "nginx"
        self.port = free_port()
        self.child: Child | None = None

    @property
    def access_log(self) -> Path:
        return self.root / "access.log"

    def url(self, path: str = "/") -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}{path}"

    def start(self) -> None:
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        www = self.root / "www"
        www.mkdir(exist_ok=True)
        for name, size in _BODY_FILES.items():
            (www / name).write_bytes(b"x" * size)
            (www / name).chmod(0o644)
        # nginx's worker runs as an unprivileged user: it must be able to walk to the files.
        for directory in (www, *www.parents):
            if directory == Path("/tmp") or directory == directory.parent:
                break
            directory.chmod(directory.stat().st_mode | 0o055)
        if self.tls:
            made = subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                 "-keyout", str(self.root / "key.pem"), "-out", str(self.root / "cert.pem")],
                capture_output=True, text=True, check=False)
            if made.returncode != 0:
                raise BenchError(f"openssl could not make a certificate: {made.stderr.strip()[-200:]}")
        conf = self.root / "nginx.conf"
        conf.write_text(render_config(self.root, self.port, host=self.host, http2=self.http2, tls=self.tls))
        self.child = self.children.start("nginx", self.wrap([self.binary, "-p", str(self.root), "-c", str(conf)]))
        if not wait_until(self._answers, 10.0):
            tail = self.child.log_tail() or (self.root / "error.log").read_text(errors="replace")[-300:]
            raise BenchError(f"nginx did not start on {self.host}:{self.port}: {tail.strip()}")

    def _answers(self) -> bool:
        if self.child is not None and not self.child.alive():
            raise BenchError(f"nginx exited at start: {self.child.log_tail()}")
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as raw:
                sock = raw
                if self.http2:  # the client preface and an empty SETTINGS; nginx answers with its SETTINGS
                    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                    return sock.recv(9)[3:4] == b"\x04"
                if self.tls:
                    context = ssl.create_default_context()
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                    sock = context.wrap_socket(raw)
                sock.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return sock.recv(16).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def count_requests(self) -> int:
        """Lines in the access log, after nginx's buffer has been flushed (stable for a flush period)."""
        time.sleep(FLUSH_S + 0.2)
        last = -1
        for _ in range(20):
            now = self._lines()
            if now == last:
                return now
            last = now
            time.sleep(FLUSH_S / 2)
        return last

    def count_unfinished(self) -> int:
        """Logged requests whose response nginx did not finish sending: wrk's exit resets the
        connections it has in flight, and nginx logs those too ($request_completion empty)."""
        try:
            with open(self.access_log, "rb") as log:
                return sum(1 for line in log if not line.rstrip().endswith(b" OK"))
        except FileNotFoundError:
            return 0

    def by_status_route(self) -> dict[tuple[str, str], int]:
        """Finished requests of the log per (status, route): the oracle for per-series counts."""
        try:
            with open(self.access_log, "rb") as log:
                return logged_by_status_route(log)
        except FileNotFoundError:
            return {}

    def _lines(self) -> int:
        try:
            with open(self.access_log, "rb") as log:
                return sum(chunk.count(b"\n") for chunk in iter(lambda: log.read(1 << 20), b""))
        except FileNotFoundError:
            return 0

    def stop(self) -> None:
        if self.child is not None:
            self.children.stop(self.child)  # SIGTERM: nginx's fast shutdown, workers included
            self.child = None


def logged_by_status_route(lines: Iterable[bytes]) -> dict[tuple[str, str], int]:
    """Count `$status $uri $body_bytes_sent $request_completion` lines whose response was sent whole,
    per (status, route). The route is derived here, independently of the exporter: an item id
    (all digits after ITEM_PREFIX) is `{id}`, any other path is kept as it is."""
    counts: dict[tuple[str, str], int] = {}
    for line in lines:
        fields = line.split()
        if len(fields) != 4 or fields[3] != b"OK":
            continue  # cut at wrk's exit: never a whole exchange on the wire
        status, uri = fields[0].decode(), fields[1].decode("latin-1")
        rest = uri[len(ITEM_PREFIX):] if uri.startswith(ITEM_PREFIX) else ""
        route = ITEM_ROUTE if rest.isdigit() and rest.isascii() else uri
        counts[(status, route)] = counts.get((status, route), 0) + 1
    return counts
