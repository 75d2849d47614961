"""Good/total event counts in clock-aligned buckets: the storage under embedded SLO evaluation.

Pure: no clock, no I/O. Time is an integer bucket index, `index = t_ns // bucket_ns`, so
bucket `k` covers `[k * bucket, (k + 1) * bucket)` of CLOCK_REALTIME, aligned to epoch
multiples. Every event lands in exactly one bucket, the one its own timestamp says: an event
that arrives while an interval is being closed is not lost at the edge, and an idle gap does
not shift anything because nothing is relative to "the last event".

Each objective has one `BucketRing`: a fixed array of slots, reused modulo its length, so
`add` allocates nothing and memory is bounded by the longest window the ring must cover.
A slot remembers which bucket index it holds; a slot holding an older index is stale and is
reset when a newer bucket needs it, a slot holding a newer index means the event is too old
to be kept (`add` returns False and the caller counts it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

MIN_BUCKET_S = 1
MAX_BUCKET_S = 10


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


class BucketRing:
    """Good and total counts per bucket index for one objective, in `slots` reusable slots."""

    __slots__ = ("_good", "_index", "_total", "slots")

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("a bucket ring needs at least one slot")
        self.slots = slots
        self._index = [-1] * slots  # the bucket index each slot holds; -1: never used
        self._good = [0] * slots
        self._total = [0] * slots

    def add(self, index: int, good: bool) -> bool:
        """Count one event in bucket `index`. False when the slot already holds a newer bucket."""
        return self.add_many(index, 1 if good else 0, 1)

    def add_many(self, index: int, good: int, total: int) -> bool:
        """Count `total` events, `good` of them good, in bucket `index` (kernel aggregates)."""
        slot = index % self.slots
        held = self._index[slot]
        if held != index:
            if held > index:
                return False
            self._index[slot] = index
            self._good[slot] = 0
            self._total[slot] = 0
        self._total[slot] += total
        self._good[slot] += good
        return True

    def sum(self, first: int, end: int) -> tuple[int, int]:
        """(good, total) over buckets `first <= index < end`; buckets no longer held count as empty."""
        good = total = 0
        for index in range(max(first, end - self.slots), end):
            slot = index % self.slots
            if self._index[slot] == index:
                good += self._good[slot]
                total += self._total[slot]
        return good, total
