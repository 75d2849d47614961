"""The frame of the integration tests' nginx configs, so that each test writes only what it tests.

nginx runs in the foreground with its pid, error log, access log and temp files under one
directory of the test's own. A test gives its access log's format (the oracle its counts are
checked against) and the lines of its `server` block.
"""

from __future__ import annotations

from pathlib import Path

_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_config(root: Path, *, log_format: str, server: str, workers: int = 1, master: bool = True,
                 user_root: bool = False, worker_connections: int = 1024) -> str:
    """nginx.conf text. `user_root`: workers stay root (a netns test's nginx reads root-owned files);
    `master=False` keeps one process, whose exit ends the server."""
    temp_paths = "".join(f"    {kind}_temp_path {root}/tmp;\n" for kind in _TEMP_PATHS)
    server_lines = "".join(f"        {line.strip()}\n" for line in server.strip().splitlines())
    return (
        "daemon off;\n"
        f"master_process {'on' if master else 'off'};\n"
        f"worker_processes {workers};\n"
        + ("user root;\n" if user_root else "")
        + f"pid {root}/nginx.pid;\n"
        f"error_log {root}/error.log warn;\n"
        f"events {{ worker_connections {worker_connections}; }}\n"
        "http {\n"
        f"    log_format oracle '{log_format}';\n"
        f"    access_log {root}/access.log oracle;\n"
        f"{temp_paths}"
        "    keepalive_requests 100000;\n"
        "    default_type text/plain;\n"
        "    server {\n"
        f"{server_lines}"
        "    }\n"
        "}\n"
    )
