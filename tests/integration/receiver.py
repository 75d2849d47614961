"""A real local HTTP endpoint standing in for Reliably: records every request, fails on demand.

with Receiver() as rx:
    rx.script(500, 500)          # the next two requests get 500, then 200 again
    rx.script((429, {"Retry-After": "1"}))
    rx.hang_next()               # the next request waits until released or stopped
    rx.stop(); rx.start()        # unreachable in between, same port after
    rx.requests                  # [Recorded(method, path, headers, body), ...]
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float  # time.monotonic() when it arrived


class Receiver:
    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.requests: list[Recorded] = []
        self._script: list[tuple[int, dict[str, str], str]] = []
        self._hang = 0
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.echo_headers = False  # answer errors with the request headers in the body (a leaky server)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, *responses: int | tuple[int, dict[str, str]] | tuple[int, dict[str, str], str]) -> None:
        """Answers for the next requests: a status, (status, headers) or (status, headers, body)."""
        with self._lock:
            for response in responses:
                if isinstance(response, int):
                    self._script.append((response, {}, ""))
                elif len(response) == 2:
                    self._script.append((response[0], response[1], ""))
                else:
                    self._script.append(response)

    def hang_next(self, count: int = 1) -> None:
        with self._lock:
            self._hang += count
            self._released.clear()

    def release(self) -> None:
        self._released.set()

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[Recorded]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.requests) >= count:
                    return list(self.requests)
            time.sleep(0.01)
        raise AssertionError(f"expected {count} requests, got {len(self.requests)}: {self.requests}")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body: Any = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                with receiver._lock:
                    receiver.requests.append(
                        Recorded(self.command, self.path, dict(self.headers.items()), body, time.monotonic())
                    )
                    hang = receiver._hang > 0
                    if hang:
                        receiver._hang -= 1
                    status, headers, text = receiver._script.pop(0) if receiver._script else (200, {}, "")
                if hang:
                    receiver._released.wait(30)
                if status >= 400 and receiver.echo_headers:
                    text = json.dumps(dict(self.headers.items()))
                payload = (text or json.dumps({"ok": status < 400})).encode()
                try:
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the client gave up (timeout): nothing to answer

            do_PUT = do_POST = do_GET = _handle

        return Handler

    def start(self) -> Receiver:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
