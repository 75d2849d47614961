"""Good/total event counts in clock-aligned buckets: the storage under embedded SLO evaluation.

Pure: no clock, no I/O. Time is an integer bucket index, `index = t_ns // bucket_ns`, so
bucket `k` covers `[k * bucket, (k + 1) * bucket)` of CLOCK_REALTIME, aligned to epoch
multiples. Every event lands in exactly one bucket, the one its own timestamp says: an event
that arrives while an interval is being closed is not lost at the edge, and an idle gap does
not shift anything because nothing is relative to "the last event".

`BucketRing`: a fixed `array` of slots, reused modulo its length, so `add` allocates
nothing. The ring remembers the newest bucket it has seen (`head`) and zeroes the slots
between the old and the new head when it moves on, so every slot in the last `slots`
buckets is valid by construction and a sum is two C-level slice sums, never a Python loop
over the window. An event older than the ring's span is refused (`add` returns False and the
caller counts it).

`WindowCounts`: one objective's counts. Windows up to `FINE_MAX_S` (1 hour) are one fine
ring and exact to the bucket. Longer windows (28d, 30d) keep a fine ring only for the
recent part (one coarse bucket, the open interval and its grace) and a coarse ring of
`COARSE_TARGET_S` (5 minute) buckets for the rest: a 30-day window at 10 s buckets is
8,640 coarse slots plus 40 fine ones, about 140 kB, instead of 259,200 fine slots in lists
(about 6 MB). Every event is counted in both rings, so the coarse sums are exact; what is
coarse is the window's older edge: a long window starts at the first coarse boundary at or
after `end - window`, so it spans between `window - 5m` and `window`, and `window_sum`
says which start it used.

`WindowCounts` also remembers which stretches of time the exporter was observing
(`periods`), so the covered part of a window can be told apart from a window that merely
saw no traffic: after a restart, the downtime is not covered.
"""

from __future__ import annotations

import base64
import math
import sys
import zlib
from array import array
from collections.abc import Iterable
from typing import Any

MIN_BUCKET_S = 1
MAX_BUCKET_S = 10
FINE_MAX_S = 3600  # windows up to this are exact to the bucket
COARSE_TARGET_S = 300  # the older edge of longer windows moves in steps of about this
MAX_PERIODS = 64  # observed stretches kept per objective (one per restart); oldest dropped first


def choose_bucket_seconds(push_interval_s: int, windows_s: Iterable[float]) -> int:
    """The bucket size: the largest whole second in 1..10 dividing the push interval and every window.

    Dividing both keeps push intervals and windows exact unions of buckets, so no edge is
    ever estimated. Windows that are not whole seconds are rounded up for this purpose.
    A 10 s push interval with 1m windows gives 10 s buckets; 10 s with a 15 s window gives 5 s.
    """
    if push_interval_s < 1 or push_interval_s != int(push_interval_s):
        raise ValueError("the push interval must be a whole number of seconds, at least 1s")
    common = int(push_interval_s)
    for window in windows_s:
        common = math.gcd(common, max(1, math.ceil(window)))
    return max(d for d in range(MIN_BUCKET_S, MAX_BUCKET_S + 1) if common % d == 0)


def slots_needed(window_s: float, push_interval_s: float, grace_s: float, bucket_s: int) -> int:
    """Buckets a ring keeps: the window (or one push interval if longer), plus the still-open
    interval and its grace period, plus one bucket of clock skew either side."""
    span = max(window_s, push_interval_s)
    return math.ceil(span / bucket_s) + math.ceil((push_interval_s + grace_s) / bucket_s) + 2


def _encode(values: array[int]) -> str:
    # Mostly zeros (idle buckets): zlib makes a 30-day ring a few kB on disk.
    return base64.b64encode(zlib.compress(values.tobytes(), 1)).decode("ascii")


def _decode(text: Any, length: int, byteorder: str) -> array[int]:
    if not isinstance(text, str):
        raise ValueError("bucket counts must be a base64 string")
    values = array("q")
    # Bounded: a hand-made file cannot inflate into more than the ring it claims to fill.
    inflater = zlib.decompressobj()
    raw = inflater.decompress(base64.b64decode(text, validate=True), 8 * length + 1)
    if len(raw) != 8 * length or inflater.unconsumed_tail:
        raise ValueError(f"bucket counts do not fill the ring's {length} slots")
    values.frombytes(raw)
    if byteorder != sys.byteorder:
        values.byteswap()
    return values


class BucketRing:
    """Good and total counts per bucket index for one objective, in `slots` reusable slots."""

    __slots__ = ("_good", "_total", "head", "slots")

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("a bucket ring needs at least one slot")
        self.slots = slots
        self.head = -1  # the newest bucket index seen; -1: none yet
        self._good = array("q", bytes(8 * slots))
        self._total = array("q", bytes(8 * slots))

    def add(self, index: int, good: bool) -> bool:
        """Count one event in bucket `index`. False when it is older than the ring's span."""
        return self.add_many(index, 1 if good else 0, 1)

    def add_many(self, index: int, good: int, total: int) -> bool:
        """Count `total` events, `good` of them good, in bucket `index` (kernel aggregates)."""
        if index > self.head:
            self._advance(index)
        elif index <= self.head - self.slots:
            return False
        slot = index % self.slots
        self._total[slot] += total
        self._good[slot] += good
        return True

    def _advance(self, index: int) -> None:
        """Zero the slots of buckets (head, index]: they held buckets a whole ring older."""
        if self.head < 0 or index - self.head >= self.slots:
            self._zero(0, self.slots)
        else:
            start, stop = (self.head + 1) % self.slots, (index % self.slots) + 1
            if start < stop:
                self._zero(start, stop)
            else:
                self._zero(start, self.slots)
                self._zero(0, stop)
        self.head = index

    def _zero(self, start: int, stop: int) -> None:
        blank = array("q", bytes(8 * (stop - start)))
        self._good[start:stop] = blank
        self._total[start:stop] = blank

    def sum(self, first: int, end: int) -> tuple[int, int]:
        """(good, total) over buckets `first <= index < end`; buckets no longer held count as empty."""
        first = max(first, end - self.slots, self.head - self.slots + 1)
        end = min(end, self.head + 1)
        if first >= end:
            return 0, 0
        start, stop = first % self.slots, end % self.slots
        if start < stop:
            return sum(self._good[start:stop]), sum(self._total[start:stop])
        # Wraps around the end of the arrays (or spans all of them when start == stop).
        return (sum(self._good[start:]) + sum(self._good[:stop]),
                sum(self._total[start:]) + sum(self._total[:stop]))

    def to_dict(self) -> dict[str, Any]:
        return {"slots": self.slots, "head": self.head, "good": _encode(self._good),
                "total": _encode(self._total)}

    def copy(self) -> BucketRing:
        twin = BucketRing.__new__(BucketRing)
        twin.slots, twin.head = self.slots, self.head
        twin._good, twin._total = array("q", self._good), array("q", self._total)
        return twin

    def load(self, raw: Any, byteorder: str) -> None:
        """Take counts saved by `to_dict`; ValueError (nothing changed) when they do not fit."""
        if not isinstance(raw, dict) or raw.get("slots") != self.slots:
            raise ValueError("the saved ring has another number of slots")
        head = raw.get("head")
        if not isinstance(head, int) or isinstance(head, bool) or head < -1:
            raise ValueError("the saved ring has no valid head")
        good = _decode(raw.get("good"), self.slots, byteorder)
        total = _decode(raw.get("total"), self.slots, byteorder)
        self.head, self._good, self._total = head, good, total


def merge_periods(periods: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(p for p in periods if p[1] > p[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class WindowCounts:
    """One objective's counts: a fine ring, and for long windows a coarse ring; plus the
    stretches of time that were observed (coverage)."""

    __slots__ = ("bucket_s", "coarse", "fine", "per_coarse", "periods", "periods_dropped", "window_buckets")

    def __init__(self, window_s: float, push_interval_s: float, grace_s: float, bucket_s: int) -> None:
        self.bucket_s = bucket_s
        self.window_buckets = math.ceil(window_s / bucket_s)
        self.periods: list[tuple[float, float]] = []  # [start_s, end_s) observed, oldest first
        self.periods_dropped = 0
        if window_s <= FINE_MAX_S:
            self.per_coarse = 0
            self.coarse: BucketRing | None = None
            self.fine = BucketRing(slots_needed(window_s, push_interval_s, grace_s, bucket_s))
        else:
            self.per_coarse = max(1, COARSE_TARGET_S // bucket_s)
            coarse_s = self.per_coarse * bucket_s
            # The fine ring holds the part of the window newer than the last coarse boundary.
            self.fine = BucketRing(slots_needed(coarse_s, push_interval_s, grace_s, bucket_s))
            self.coarse = BucketRing(math.ceil(window_s / coarse_s) + 2)

    @property
    def retention(self) -> int:
        """How many fine buckets back an event can still be counted."""
        if self.coarse is None:
            return self.fine.slots
        return self.coarse.slots * self.per_coarse

    @property
    def edge_seconds(self) -> int:
        """The granularity of the window's older edge: a bucket, or a coarse bucket."""
        return self.bucket_s * (self.per_coarse or 1)

    def add_many(self, index: int, good: int, total: int) -> bool:
        counted = self.fine.add_many(index, good, total)
        if self.coarse is not None:
            counted = self.coarse.add_many(index // self.per_coarse, good, total) or counted
        return counted

    def add(self, index: int, good: bool) -> bool:
        return self.add_many(index, 1 if good else 0, 1)

    def interval_sum(self, first: int, end: int) -> tuple[int, int]:
        """(good, total) over fine buckets [first, end): a push interval, always recent."""
        return self.fine.sum(first, end)

    def window_sum(self, end: int) -> tuple[int, int, int]:
        """(first bucket, good, total) of the window ending before bucket `end`."""
        first = end - self.window_buckets
        if self.coarse is None:
            return (first, *self.fine.sum(first, end))
        coarse_first = -(-first // self.per_coarse)  # the first whole coarse bucket
        coarse_end = end // self.per_coarse
        good, total = self.coarse.sum(coarse_first, coarse_end)
        tail_good, tail_total = self.fine.sum(coarse_end * self.per_coarse, end)
        return coarse_first * self.per_coarse, good + tail_good, total + tail_total

    # -- coverage ------------------------------------------------------------------------

    def begin(self, at_s: float) -> None:
        """A new observed stretch starts (process start)."""
        self.periods.append((at_s, at_s))
        if len(self.periods) > MAX_PERIODS:
            # Dropping the oldest understates coverage, never overstates it.
            self.periods.pop(0)
            self.periods_dropped += 1

    def observed_until(self, at_s: float) -> None:
        """The current stretch reaches `at_s` (an interval closed, or the state was saved)."""
        if not self.periods:
            self.begin(at_s)
        start, end = self.periods[-1]
        self.periods[-1] = (start, max(end, at_s))
        # Stretches older than anything the rings hold say nothing any more.
        horizon = at_s - self.retention * self.bucket_s
        while len(self.periods) > 1 and self.periods[0][1] <= horizon:
            self.periods.pop(0)

    def covered_seconds(self, start_s: float, end_s: float) -> float:
        return sum(max(0.0, min(end, end_s) - max(start, start_s))
                   for start, end in merge_periods(self.periods))

    # -- state ---------------------------------------------------------------------------

    def layout(self) -> dict[str, int]:
        return {"bucket_s": self.bucket_s, "fine": self.fine.slots, "per_coarse": self.per_coarse,
                "coarse": self.coarse.slots if self.coarse is not None else 0}

    def copy(self) -> WindowCounts:
        """A copy to encode outside the caller's lock (copying arrays takes microseconds,
        compressing them milliseconds)."""
        twin = WindowCounts.__new__(WindowCounts)
        twin.bucket_s, twin.window_buckets, twin.per_coarse = self.bucket_s, self.window_buckets, self.per_coarse
        twin.fine = self.fine.copy()
        twin.coarse = self.coarse.copy() if self.coarse is not None else None
        twin.periods, twin.periods_dropped = list(self.periods), self.periods_dropped
        return twin

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout(),
            "fine": self.fine.to_dict(),
            "coarse": self.coarse.to_dict() if self.coarse is not None else None,
            "periods": [list(p) for p in self.periods],
        }

    def load(self, raw: Any, byteorder: str) -> None:
        """Take saved counts and stretches; ValueError (nothing changed) when they do not fit."""
        if not isinstance(raw, dict) or raw.get("layout") != self.layout():
            raise ValueError("the saved window has another layout (bucket size or window changed)")
        periods_raw = raw.get("periods")
        if not isinstance(periods_raw, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) for v in p)
            for p in periods_raw
        ):
            raise ValueError("the saved observed periods are not a list of [start, end] pairs")
        fine = BucketRing(self.fine.slots)
        fine.load(raw.get("fine"), byteorder)
        coarse = None
        if self.coarse is not None:
            coarse = BucketRing(self.coarse.slots)
            coarse.load(raw.get("coarse"), byteorder)
        self.fine, self.coarse = fine, coarse
        self.periods = [(float(a), float(b)) for a, b in periods_raw][-MAX_PERIODS:]
