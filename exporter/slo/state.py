"""The SLO windows on disk: one file, `windows.json`, under `--state-dir`, so a restart or an
upgrade keeps the 30 days the windows hold.

Writes are atomic (temporary file, fsync, rename, fsync of the directory: the spool's own
`atomic_write`), so a SIGKILL leaves either the previous file or the new one, never a torn
one. A file that cannot be read back (a full disk, a hand edit, another program's file) is
moved aside as `windows.json.corrupt`, counted, and logged on one line; the exporter then
starts with empty windows. Which objectives may take saved counts is the evaluator's
business (`Evaluator.restore`, keyed by a hash of each objective); this module only moves
bytes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from exporter.bridge.spool import atomic_write
from exporter.errors import ConfigError

log = logging.getLogger("ebpf_slo_exporter.slo")

STATE_FILE = "windows.json"


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / STATE_FILE
        self.quarantined = 0
        self.saves = {"ok": 0, "error": 0}
        self.last_save_s: float | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the SLO state directory {self.directory}: {exc.strerror}; "
                f"pick a writable one with --state-dir"
            ) from exc
        for leftover in self.directory.glob(f".tmp-{STATE_FILE}"):
            leftover.unlink(missing_ok=True)  # a save that never reached its rename

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none (or it was unreadable and moved aside)."""
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self.quarantine(str(exc))
            return None
        if not isinstance(raw, dict):
            self.quarantine("not a JSON object")
            return None
        return raw

    def quarantine(self, why: str) -> None:
        self.quarantined += 1
        target = self.path.with_name(self.path.name + ".corrupt")
        log.warning("SLO state file %s is unreadable (%s); moved aside to %s, windows start empty",
                    self.path, why, target.name)
        with contextlib.suppress(OSError):
            os.replace(self.path, target)

    def save(self, state: dict[str, Any], now_s: float) -> bool:
        """Write the state atomically. False (logged, counted) when the disk refuses."""
        try:
            atomic_write(self.path, json.dumps(state, separators=(",", ":")).encode())
        except OSError as exc:
            self.saves["error"] += 1
            log.error("cannot save the SLO windows to %s: %s", self.path, exc.strerror)
            return False
        self.saves["ok"] += 1
        self.last_save_s = now_s
        return True
