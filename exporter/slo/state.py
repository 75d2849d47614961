"""The SLO windows on disk: one file, `windows.json`, under `--state-dir`, so a restart or an
upgrade keeps the 30 days the windows hold.

Writes are atomic (temporary file, fsync, rename, fsync of the directory: the spool's own
`atomic_write`), so a SIGKILL leaves either the previous file or the new one, never a torn
one. A file that cannot be read back (a full disk, a hand edit, another program's file) is
moved aside as `windows.json.corrupt`, counted, and logged on one line; the exporter then
starts with empty windows. Which objectives may take saved counts is the evaluator's
business (`Evaluator.restore`, keyed by a hash of each objective); this module only moves
bytes, and `WindowPersistence` ties the two together for the runtime: restore at start,
save when due and at stop, and report on it (JSON and self-metrics).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exporter.bridge.indicator import rfc3339
from exporter.bridge.spool import atomic_write
from exporter.errors import ConfigError
from exporter.metrics import (
    SELF_SLO_STATE_DISCARDED_OBJECTIVES,
    SELF_SLO_STATE_QUARANTINED_TOTAL,
    SELF_SLO_STATE_RESTORE_GAP_SECONDS,
    SELF_SLO_STATE_RESTORED_OBJECTIVES,
    SELF_SLO_STATE_SAVES_TOTAL,
    SelfSample,
)
from exporter.slo.evaluate import Evaluator, Restored

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


class WindowPersistence:
    """The evaluator's windows restored from, and saved to, one StateStore. The runtime calls
    `save_if_due` after closing intervals and `save` at stop; the clock is the runtime's."""

    def __init__(self, store: StateStore, evaluator: Evaluator, clock: Callable[[], float],
                 save_every_s: float) -> None:
        self.store = store
        self.evaluator = evaluator
        self.save_every_s = save_every_s
        self._clock = clock
        self.restored = Restored(None, 0, 0)
        self.restore_gap_s = 0.0
        raw = store.load()
        if raw is not None:
            self.restored = evaluator.restore(raw)
            if self.restored.saved_at_s is None:
                store.quarantine("not a saved SLO window state")
        saved_at = self.restored.saved_at_s
        if saved_at is not None:
            # Time between the last save and this start was not observed: a clean stop
            # loses only the downtime, a SIGKILL also what was counted since the last save.
            self.restore_gap_s = max(0.0, evaluator.start_s - saved_at)
            log.info("SLO windows restored from %s: %d objectives (%d saved ones discarded: "
                     "definition changed or gone), %.0fs since the last save not observed",
                     store.path, self.restored.restored, self.restored.discarded, self.restore_gap_s)
        store.last_save_s = evaluator.start_s

    @property
    def directory(self) -> Path:
        return self.store.directory

    def save(self) -> bool:
        now = self._clock()
        return self.store.save(self.evaluator.export_state(now), now)

    def save_if_due(self) -> None:
        if self._clock() >= (self.store.last_save_s or 0.0) + self.save_every_s:
            self.save()

    def json(self) -> dict[str, Any]:
        last = self.store.last_save_s
        return {
            "saved": True,
            "path": str(self.store.path),
            "save_interval_seconds": self.save_every_s,
            "last_save": rfc3339(last) if last is not None else None,
            "restored_objectives": self.restored.restored,
            "restore_gap_seconds": self.restore_gap_s,
        }

    def self_samples(self) -> list[SelfSample]:
        store = self.store
        saves_help = "Saves of the SLO windows to --state-dir, by outcome."
        return [
            *(SelfSample(SELF_SLO_STATE_SAVES_TOTAL, "counter", saves_help, float(count), (("outcome", outcome),))
              for outcome, count in store.saves.items()),
            SelfSample(SELF_SLO_STATE_QUARANTINED_TOTAL, "counter",
                       "Unreadable SLO state files moved aside as *.corrupt (the windows started empty).",
                       float(store.quarantined)),
            SelfSample(SELF_SLO_STATE_RESTORED_OBJECTIVES, "gauge",
                       "Objectives whose windows were restored from the saved state at start.",
                       float(self.restored.restored)),
            SelfSample(SELF_SLO_STATE_DISCARDED_OBJECTIVES, "gauge",
                       "Saved objectives not restored at start: definition changed, removed or unreadable.",
                       float(self.restored.discarded)),
            SelfSample(SELF_SLO_STATE_RESTORE_GAP_SECONDS, "gauge",
                       "Seconds between the last save and this start that no window observed "
                       "(downtime; after a SIGKILL also what was counted since the last save).",
                       self.restore_gap_s),
        ]
