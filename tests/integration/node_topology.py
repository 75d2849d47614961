"""bench/netns.py's node, plus what the tests run in it: a logging server per pod, clients."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.netns import Node as BaseNode
from bench.netns import Pod as BasePod
from tests.integration.harness import REPO


@dataclass
class Pod(BasePod):
    server: subprocess.Popen[bytes] | None = None
    log: Path | None = None


@dataclass
class Node(BaseNode):
    pods: dict[str, Pod] = field(default_factory=dict)  # type: ignore[assignment]

    def add_pod(self, name: str, index: int) -> Pod:
        base = super().add_pod(name, index)
        pod = Pod(base.name, base.link, base.address)
        self.pods[name] = pod
        return pod

    def serve(self, pod: Pod, port: int, log: Path, name: str = "") -> None:
        """tests/integration/ns_server.py inside the pod's namespace; `name` its process name."""
        pod.log = log
        argv = pod.wrap([sys.executable, "-m", "tests.integration.ns_server", str(port), str(log)])
        if name:
            argv.append(name)
        pod.server = subprocess.Popen(argv, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})

    def in_pod(self, pod: BasePod, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(pod.wrap(argv), capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})

    def close(self) -> None:
        for pod in self.pods.values():
            if isinstance(pod, Pod) and pod.server is not None and pod.server.poll() is None:
                pod.server.terminate()
                try:
                    pod.server.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pod.server.kill()
                    pod.server.wait()
        super().close()
