"""Reliably indicators: one objective's percent over one closed push interval. Pure.

An indicator is immutable once its interval closes. Its id is derived from the objective
and the interval, so the spool can refuse a second copy and a resend after a crash carries
the same body (the PUT is idempotent on the receiving side).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any


def rfc3339(seconds: float) -> str:
    """Whole seconds in UTC, `2021-06-01T12:00:10Z`, the form the Reliably CLI sends."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(seconds)))


def indicator_id(objective_slug: str, from_s: int, to_s: int) -> str:
    return hashlib.sha256(f"{objective_slug}|{from_s}|{to_s}".encode()).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class Indicator:
    objective: str  # the objective's slug: which objective this belongs to
    selector: tuple[tuple[str, str], ...]  # the objective's indicatorSelector, sorted
    from_s: int
    to_s: int
    percent: float

    @property
    def id(self) -> str:
        return indicator_id(self.objective, self.from_s, self.to_s)

    def body(self) -> dict[str, Any]:
        """The PUT body: the selector's labels plus `from`/`to` (as the CLI's agent does)."""
        start, end = rfc3339(self.from_s), rfc3339(self.to_s)
        labels = dict(self.selector)
        labels["from"] = start
        labels["to"] = end
        return {"metadata": {"labels": labels}, "spec": {"from": start, "to": end, "percent": self.percent}}

    def to_json(self) -> dict[str, Any]:
        """The spool's record; `from_json` reads it back."""
        return {
            "id": self.id,
            "objective": self.objective,
            "selector": dict(self.selector),
            "from": self.from_s,
            "to": self.to_s,
            "percent": self.percent,
        }

    @classmethod
    def from_json(cls, raw: Any) -> Indicator:
        """Raises ValueError when the record is not one this module wrote."""
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        try:
            selector = raw["selector"]
            if not isinstance(selector, dict):
                raise ValueError("selector is not an object")
            percent = raw["percent"]
            if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 <= percent <= 100:
                raise ValueError("percent is not a number in 0..100")
            item = cls(
                objective=str(raw["objective"]),
                selector=tuple(sorted((str(k), str(v)) for k, v in selector.items())),
                from_s=int(raw["from"]),
                to_s=int(raw["to"]),
                percent=float(percent),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"missing or malformed field: {exc}") from exc
        if raw.get("id") != item.id:
            raise ValueError("id does not match its objective and interval")
        return item
