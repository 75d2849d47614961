"""The Reliably edge: one PUT per entity over httpx, its failures mapped once into PushError.

    PushError (exporter.errors)
    ├── PushRetryable   5xx, 429, timeouts, refused or reset connections: try again later
    └── PushRejected    any other 4xx: the endpoint will never take this body, do not resend

No message carries the token: httpx never puts headers in its exception texts, and response
snippets are scrubbed before they are logged.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any

import httpx

from exporter.bridge.settings import PushSettings
from exporter.errors import PushError

MAX_RETRY_AFTER_S = 300.0


class PushRetryable(PushError):
    def __init__(self, message: str, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason  # http_5xx, http_429, timeout, network
        self.retry_after_s = retry_after_s


class PushRejected(PushError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
        self.reason = "http_4xx"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), capped; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    delay = when.timestamp() - (time.time() if now is None else now)
    return min(max(0.0, delay), MAX_RETRY_AFTER_S)


class ReliablyClient:
    """PUTs entities to `{base}/entities/{org}/reliably.com/v1/{kind}`."""

    def __init__(self, settings: PushSettings, *, transport: httpx.BaseTransport | None = None) -> None:
        self.settings = settings
        self._http = httpx.Client(
            timeout=settings.timeout_s,
            transport=transport,
            headers={"Authorization": f"Bearer {settings.token}", "Content-Type": "application/json"},
        )

    def __repr__(self) -> str:
        return f"ReliablyClient({self.settings!r})"

    def put(self, kind: str, body: dict[str, Any]) -> None:
        url = self.settings.entity_url(kind)
        try:
            response = self._http.put(url, json=body)
        except httpx.TimeoutException as exc:
            raise PushRetryable(f"PUT {url} timed out after {self.settings.timeout_s:g}s", "timeout") from exc
        except httpx.TransportError as exc:
            raise PushRetryable(
                f"PUT {url} failed: {type(exc).__name__}: {self._scrub(str(exc))}", "network"
            ) from exc
        status = response.status_code
        if status < 300:
            return
        detail = self._scrub(response.text[:200].strip())
        message = f"PUT {url} answered {status}" + (f": {detail}" if detail else "")
        if status == 429:
            raise PushRetryable(message, "http_429", parse_retry_after(response.headers.get("Retry-After")))
        if status >= 500:
            raise PushRetryable(message, "http_5xx", parse_retry_after(response.headers.get("Retry-After")))
        raise PushRejected(message, status)

    def _scrub(self, text: str) -> str:
        token = self.settings.token
        return text.replace(token, "<redacted>") if token else text

    def close(self) -> None:
        self._http.close()
