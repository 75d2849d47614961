"""Real Prometheus for tests: the Debian `prometheus` binary on a free loopback port.

    with ExpositionServer(registry) as target, PrometheusServer([target.address]) as prom:
        prom.wait_for("up", lambda v: v == 1)
        prom.query("sum(rate(x[10s]))")        # the /api/v1/query `data` dict

Skips the test when the binary is missing. The TSDB lives in a temporary directory removed
on exit. Other tests (the lead's end-to-end run) can point it at the real exporter's port.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import start_http_server

from tests.integration.harness import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


class ExpositionServer:
    """Serves a prometheus_client registry on 127.0.0.1:<free port>/metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.port = 0
        self._server: Any = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> ExpositionServer:
        self._server, _ = start_http_server(0, addr="127.0.0.1", registry=self.registry)
        self.port = self._server.server_address[1]
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class PrometheusServer:
    def __init__(
        self,
        targets: list[str],
        *,
        scrape_interval: str = "1s",
        job: str = "ebpf-slo-exporter",
        binary: str = PROMETHEUS,
        ready_timeout_s: float = 30.0,
        rules_text: str | None = None,
    ) -> None:
        self.targets = targets
        self.scrape_interval = scrape_interval
        self.job = job
        self.binary = binary
        self.ready_timeout_s = ready_timeout_s
        self.rules_text = rules_text
        self.port = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._http = httpx.Client(timeout=10.0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        if not Path(self.binary).exists():
            pytest.skip(f"Prometheus binary {self.binary} not installed (apt-get install prometheus)")
        self._dir = tempfile.TemporaryDirectory(prefix="prom-test-")
        work = Path(self._dir.name)
        config = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "scrape_configs": [{"job_name": self.job, "static_configs": [{"targets": self.targets}]}],
        }
        if self.rules_text is not None:
            (work / "slo.rules.yml").write_text(self.rules_text)
            config["rule_files"] = ["slo.rules.yml"]
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self._log = open(work / "prometheus.log", "wb")  # closed in stop()
        self._process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_tail()}")
            try:
                if self._http.get(f"{self.url}/-/ready").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prometheus not ready after {self.ready_timeout_s}s")

    def log_tail(self, lines: int = 20) -> str:
        if self._dir is None:
            return ""
        text = (Path(self._dir.name) / "prometheus.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
            self._log.close()
        self._http.close()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def answer(self, expr: str, at: float | None = None) -> dict[str, Any]:
        """The whole /api/v1/query envelope, errors included (a rejected query is an answer too)."""
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        payload: dict[str, Any] = self._http.get(f"{self.url}/api/v1/query", params=params).json()
        return payload

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        payload = self.answer(expr, at)
        if payload.get("status") != "success":
            raise AssertionError(f"query {expr!r} failed: {payload}")
        data: dict[str, Any] = payload["data"]
        return data

    def value(self, expr: str, at: float | None = None) -> float | None:
        result = self.query(expr, at)["result"]
        return float(result[0]["value"][1]) if result else None

    def wait_for(
        self, expr: str, predicate: Callable[[float | None], bool], timeout_s: float = 30.0
    ) -> float | None:
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            value = self.value(expr)
            if predicate(value):
                return value
            time.sleep(0.2)
        raise AssertionError(f"{expr} never satisfied the condition; last value {value}")
