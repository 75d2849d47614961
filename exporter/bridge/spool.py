"""A bounded on-disk queue of indicators waiting to be sent, surviving restarts.

One file per indicator, `<seq>-<id>.json`, oldest first by sequence number. Each file and
the state file are written atomically (temporary file, fsync, rename, fsync of the
directory), so a crash leaves either the old or the new content, never half of one.

- Full spool: the oldest indicator is dropped and counted (`dropped`); the newest data is
  what a user looks at first.
- A file that cannot be read back (truncated by a full disk, edited by hand) is renamed to
  `*.corrupt`, counted (`quarantined`) and skipped; the exporter carries on.
- The same indicator id twice is refused: an indicator is immutable once its interval closed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from exporter.bridge.indicator import Indicator

log = logging.getLogger("ebpf_slo_exporter.spool")

DEFAULT_MAX_ITEMS = 10_000
STATE_FILE = "state.json"
SUFFIX = ".json"


def default_spool_dir(env: dict[str, str] | None = None) -> Path:
    environ = os.environ if env is None else env
    state = environ.get("XDG_STATE_HOME") or str(
        Path(environ.get("HOME") or Path.home()) / ".local" / "state"
    )
    return Path(state) / "ebpf-slo-exporter" / "spool"


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    # The rename itself is only durable once the directory entry is on disk.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, directory: Path, max_items: int = DEFAULT_MAX_ITEMS) -> None:
        if max_items < 1:
            raise ValueError("the spool must hold at least one indicator")
        self.directory = Path(directory)
        self.max_items = max_items
        self.dropped = 0
        self.quarantined = 0
        self._lock = threading.Lock()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._entries: list[tuple[int, str]] = []  # (seq, id), oldest first
        for leftover in self.directory.glob(".tmp-*"):
            leftover.unlink(missing_ok=True)  # a write that never reached its rename
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            if path.name == STATE_FILE:
                continue
            seq_text, _, ident = path.stem.partition("-")
            if not seq_text.isdigit() or not ident:
                self._quarantine(path, "unexpected file name")
                continue
            self._entries.append((int(seq_text), ident))
        self._entries.sort()
        self._ids = {ident for _, ident in self._entries}
        self._next_seq = self._entries[-1][0] + 1 if self._entries else 1
        while len(self._entries) > self.max_items:
            self._drop_oldest()

    def __len__(self) -> int:
        return len(self._entries)

    def _path(self, seq: int, ident: str) -> Path:
        return self.directory / f"{seq:016d}-{ident}{SUFFIX}"

    def _quarantine(self, path: Path, why: str) -> None:
        self.quarantined += 1
        target = path.with_name(path.name + ".corrupt")
        log.warning("spool file %s is unreadable (%s); moved aside to %s", path.name, why, target.name)
        with contextlib.suppress(OSError):
            os.replace(path, target)

    def _drop_oldest(self) -> None:
        seq, ident = self._entries.pop(0)
        self._ids.discard(ident)
        self.dropped += 1
        self._path(seq, ident).unlink(missing_ok=True)

    def put(self, indicator: Indicator) -> bool:
        """Store one indicator. False if one with the same id is already waiting."""
        ident = indicator.id
        with self._lock:
            if ident in self._ids:
                return False
            seq = self._next_seq
            self._next_seq += 1
            atomic_write(self._path(seq, ident), json.dumps(indicator.to_json(), sort_keys=True).encode())
            self._entries.append((seq, ident))
            self._ids.add(ident)
            if len(self._entries) > self.max_items:
                self._drop_oldest()
                log.warning("spool full (%d indicators): dropped the oldest", self.max_items)
            return True

    def peek(self) -> Indicator | None:
        """The oldest readable indicator; corrupt files met on the way are quarantined."""
        with self._lock:
            while self._entries:
                seq, ident = self._entries[0]
                path = self._path(seq, ident)
                try:
                    item = Indicator.from_json(json.loads(path.read_bytes()))
                    if item.id != ident:
                        raise ValueError("content does not match the file name")
                    return item
                except FileNotFoundError:
                    pass  # removed behind our back: nothing to send
                except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
                    self._quarantine(path, str(exc))
                self._entries.pop(0)
                self._ids.discard(ident)
            return None

    def remove(self, indicator: Indicator) -> None:
        ident = indicator.id
        with self._lock:
            for position, (seq, held) in enumerate(self._entries):
                if held == ident:
                    self._entries.pop(position)
                    self._ids.discard(ident)
                    self._path(seq, ident).unlink(missing_ok=True)
                    return

    def read_state(self) -> dict[str, Any]:
        path = self.directory / STATE_FILE
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            self._quarantine(path, str(exc))
            return {}
        return raw if isinstance(raw, dict) else {}

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write(self.directory / STATE_FILE, json.dumps(state, sort_keys=True).encode())
