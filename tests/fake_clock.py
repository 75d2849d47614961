"""The tests' wall clock: a callable returning `now`, which a test sets to move time."""

from __future__ import annotations


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
