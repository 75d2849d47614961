"""The one retry policy: capped exponential backoff, with "equal jitter" where it is wanted.

Used by everything that tries again: the pusher (Reliably), the interval scheduler (an
interval its source could not evaluate), the PromQL source's short in-call retries and
`slo sync`. A server's `Retry-After` wins over it where one is given (the callers decide).

    delay(n) = min(max_s, base_s * 2^(n-1))           without jitter
    delay(n) = half of that fixed + half random        with jitter (the default)

Half fixed, half random spreads the retries of many exporters out without ever coming back
sooner than half the step.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from exporter.config import DEFAULT_BACKOFF_BASE_S, DEFAULT_BACKOFF_MAX_S


@dataclass(frozen=True, slots=True)
class Backoff:
    base_s: float = DEFAULT_BACKOFF_BASE_S
    max_s: float = DEFAULT_BACKOFF_MAX_S
    jitter: Callable[[], float] | None = field(default=random.random, compare=False)

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure in a row (1 for the first)."""
        step = min(self.max_s, self.base_s * (2 ** max(0, failures - 1)))
        if self.jitter is None:
            return float(step)
        return float(step / 2 + step / 2 * self.jitter())
