"""A threaded HTTPS server for the TLS capture tests, run by Debian's /usr/bin/python3.

Its `ssl` module uses the system libssl, so its plaintext passes the exporter's uprobes.
Each answered request is appended to the access log, the tests' oracle, as
"METHOD PATH STATUS" (path without its query), after the response is written.

    python3 tls_server.py PORT CERT KEY ACCESS_LOG [nodelay]

`nodelay` sets TCP_NODELAY on each connection; without it Nagle holds a response's last
segment until the client ACKs the one before (its delayed ACK: ~40 ms on Linux).

Routes: /ok, /big?n=BYTES (Content-Length), /chunked?n=CHUNKS&size=BYTES,
/slow?ms=MS (and /slow/ANYTHING?ms=MS), /nocontent (204), /notmodified (304), /missing (404), /boom (500), and /exit,
where the whole server exits after reading the request.
"""

from __future__ import annotations

import http.server
import os
import ssl
import sys
import threading
import time
import urllib.parse


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    log_lock = threading.Lock()
    log_path = ""

    def log_message(self, format: str, *args: object) -> None:
        pass  # the access log below is the oracle; stderr stays quiet

    def _record(self, status: int) -> None:
        path = urllib.parse.urlsplit(self.path).path
        with self.log_lock, open(self.log_path, "a", encoding="ascii") as log:
            log.write(f"{self.command} {path} {status}\n")

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status not in (204, 304):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(body)
        self.wfile.flush()

    def _handle(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if url.path == "/exit":
            os._exit(3)  # the process dies mid-exchange: no response, no log line, no close()
        if url.path == "/ok":
            self._send(200, b"ok\n")
        elif url.path == "/big":
            self._send(200, b"x" * int(query.get("n", "100000")))
        elif url.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if self.command != "HEAD":
                size = int(query.get("size", "1000"))
                for _ in range(int(query.get("n", "5"))):
                    self.wfile.write(b"%x\r\n%s\r\n" % (size, b"c" * size))
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            self._record(200)
            return
        elif url.path == "/slow" or url.path.startswith("/slow/"):
            time.sleep(int(query.get("ms", "100")) / 1000)
            self._send(200, b"slow\n")
        elif url.path == "/nocontent":
            self._send(204, b"")
        elif url.path == "/notmodified":
            self._send(304, b"")
        elif url.path == "/boom":
            self._send(500, b"boom\n")
        else:
            self._send(404, b"missing\n")
            self._record(404)
            return
        self._record({"/nocontent": 204, "/notmodified": 304, "/boom": 500}.get(url.path, 200))

    do_GET = do_HEAD = do_POST = _handle


def main() -> None:
    port, cert, key, log_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    Handler.log_path = log_path
    Handler.disable_nagle_algorithm = sys.argv[5:] == ["nodelay"]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
