"""`python -m tests.integration.ns_server PORT LOG [NAME]`: the harness' logging HTTP server,
run inside a test's network namespace, writing its own access log (the oracle) to LOG.

One line per answered request, `METHOD STATUS PATH`, flushed before the response goes out, so
the log is complete by the time the client has its answer. NAME becomes the process name
(/proc/<pid>/comm), as a real server binary's would be.
"""

from __future__ import annotations

import ctypes
import signal
import sys
import threading
from typing import Any

from tests.integration.harness import LoggingServer

PR_SET_NAME = 15


def main() -> None:
    port, log_path = int(sys.argv[1]), sys.argv[2]
    if len(sys.argv) > 3:
        ctypes.CDLL(None).prctl(PR_SET_NAME, sys.argv[3].encode()[:15], 0, 0, 0)
    log = open(log_path, "a", buffering=1, encoding="utf-8")
    lock = threading.Lock()

    class Server(LoggingServer):
        def record(self, method: str, status: int, path: str) -> None:
            with lock:
                log.write(f"{method} {status} {path}\n")

    server = Server("0.0.0.0", port)

    def stop(*_: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()
    server.server_close()
    log.close()


if __name__ == "__main__":
    main()
