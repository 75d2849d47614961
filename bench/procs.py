"""Child processes the bench starts, and the guarantee that it stops every one of them.

Each child runs in its own session (so a Ctrl-C at the terminal reaches only the bench,
which then stops the children in order) and gets PR_SET_PDEATHSIG=SIGTERM, so even a
SIGKILLed bench does not leave nginx or a BPF filter behind. Stopping is SIGTERM to the
child's whole process group (nginx's workers too), then SIGKILL after a grace period.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = ["NOFILE", "BenchError", "Children", "require_tools"]

NOFILE = 65536  # RLIMIT_NOFILE for children: wrk -c10000 and nginx need one fd per connection
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child between fork and exec only calls it


class BenchError(Exception):
    """A failure the bench reports as one line."""


def _child_setup(nofile: int) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec: keep it to syscalls
        try:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except Exception:
            pass
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        except (ValueError, OSError):
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    return setup


def require_tools(tools: Sequence[str]) -> dict[str, str]:
    """Absolute paths of the tools, or BenchError naming the first one missing."""
    found = {}
    for tool in tools:
        path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/local/sbin")
        if path is None:
            raise BenchError(f"`{tool}` not found; run `make setup` (it installs nginx-light and wrk)")
        found[tool] = path
    return found


class Child:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " / ".join(text[-lines:])

    def stop(self, grace_s: float = 5.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the child's process group, wait, escalate to SIGKILL. Returns the exit status."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        # Reap anything left in the group (nginx workers whose master died first).
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.returncode


class Children:
    """Starts children and stops all of them on exit, whatever the exit is."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._children: list[Child] = []
        self._started = 0

    def start(self, name: str, argv: Sequence[str], *, cwd: Path | None = None,
              stdout: IO[Any] | int | None = None, env: dict[str, str] | None = None,
              nofile: int = NOFILE) -> Child:
        self._started += 1
        log_path = self.workdir / f"{name}.{self._started}.log"
        log = open(log_path, "wb")
        try:
            proc = subprocess.Popen(
                list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                stdout=stdout if stdout is not None else log, stderr=log,
                start_new_session=True, preexec_fn=_child_setup(nofile),
            )
        except OSError as exc:
            log.close()
            raise BenchError(f"cannot start {name} ({argv[0]}): {exc.strerror}") from exc
        finally:
            if not log.closed:
                log.close()  # the child holds its own copy
        child = Child(name, proc, log_path)
        self._children.append(child)
        return child

    def stop(self, child: Child, grace_s: float = 5.0) -> int | None:
        status = child.stop(grace_s)
        if child in self._children:
            self._children.remove(child)
        return status

    def stop_all(self) -> None:
        while self._children:
            self.stop(self._children[-1], grace_s=3.0)

    def __enter__(self) -> Children:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # Ignore a second Ctrl-C while cleaning up: a half-stopped nginx is worse than a wait.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.stop_all()
        finally:
            signal.signal(signal.SIGINT, previous)


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
