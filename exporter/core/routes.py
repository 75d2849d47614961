"""Request target → `http_route` label, with a hard cap on how many routes exist.

A route comes from the first configured pattern that matches (`/api/items/{id}`: a
`{name}` segment matches any one non-empty segment, other segments match exactly, a single
trailing slash is ignored), else from a heuristic that keeps the path's shape and replaces
the segments that look like identifiers with `{id}`:

- all digits (`/orders/1234`);
- a UUID, with or without dashes;
- hex of 16 characters or more (hashes, object ids);
- 16 characters or more mixing letters and digits (tokens, base64url);
- anything longer than 64 characters (no route is named with such a word).

Normal words stay (`/api/v2/users`). Only the first 8 segments are kept; a deeper path ends
in `/{rest}`, and so does a route that would pass 256 characters. Targets that are not
paths (`*`, CONNECT's `host:port`) are kept as they are, within the same length cap.

Once a port has `max_routes_per_port` distinct routes, any new one becomes the overflow
route and `overflowed` counts it: a scan of random URLs cannot blow up the series count.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from exporter.config import DEFAULT_MAX_ROUTES_PER_PORT
from exporter.core.http1 import normalise_target

__all__ = ["MAX_ROUTE_CHARS", "MAX_ROUTE_SEGMENTS", "RouteMapper", "normalise_target"]

MAX_ROUTE_SEGMENTS = 8
MAX_ROUTE_CHARS = 256
_REST = "{rest}"
_ID = "{id}"
_LONG_SEGMENT = 64
_CACHE_ENTRIES = 4096  # target → heuristic route, cleared when full

_UUID = re.compile(r"[0-9A-Fa-f]{8}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{12}")
_LONG_HEX = re.compile(r"[0-9A-Fa-f]{16,}")
_HAS_DIGIT = re.compile(r"[0-9]")
_HAS_LETTER = re.compile(r"[A-Za-z]")
_PLACEHOLDER = re.compile(r"\{[^{}/]+\}")


def _is_identifier(segment: str) -> bool:
    if segment.isdigit() and segment.isascii():
        return True
    size = len(segment)
    if size < 16:
        return False
    if size > _LONG_SEGMENT:
        return True
    if _UUID.fullmatch(segment) or _LONG_HEX.fullmatch(segment):
        return True
    return _HAS_DIGIT.search(segment) is not None and _HAS_LETTER.search(segment) is not None


def heuristic_route(path: str) -> str:
    """The route for a path no pattern matched (see the module docstring)."""
    if not path.startswith("/"):
        return path if len(path) <= MAX_ROUTE_CHARS else path[: MAX_ROUTE_CHARS - len(_REST)] + _REST
    segments = path[1:].split("/", MAX_ROUTE_SEGMENTS)
    cut = len(segments) > MAX_ROUTE_SEGMENTS
    if cut:
        del segments[MAX_ROUTE_SEGMENTS:]
    # Most segments are short words or numbers, decided here without a call: ASCII digits are an
    # identifier, any other segment under 16 characters is not (_is_identifier's first two rules).
    shaped = [_ID if segment.isdigit() and segment.isascii()
              else segment if len(segment) < 16 else _ID if _is_identifier(segment) else segment
              for segment in segments]
    route = "/" + "/".join(shaped)
    if cut or len(route) > MAX_ROUTE_CHARS:
        while shaped and len("/" + "/".join(shaped)) + len(_REST) + 1 > MAX_ROUTE_CHARS:
            shaped.pop()
        route = "/" + "/".join([*shaped, _REST])
    return route


class RouteMapper:
    """Maps (server port, target) to a bounded set of route labels per port."""

    __slots__ = ("_cache", "_digits_are_ids", "_max_routes", "_overflow_route", "_patterns", "_routes", "overflowed")

    def __init__(
        self,
        patterns: Sequence[str] = (),
        max_routes_per_port: int = DEFAULT_MAX_ROUTES_PER_PORT,
        overflow_route: str = "/{overflow}",
    ) -> None:
        if max_routes_per_port <= 0:
            raise ValueError(f"max_routes_per_port must be positive, got {max_routes_per_port}.")
        # Patterns by segment count, in the order given: the first match wins.
        self._patterns: dict[int, list[tuple[str, tuple[str | None, ...]]]] = {}
        for pattern in patterns:
            if not pattern.startswith("/"):
                raise ValueError(f"A route pattern must start with '/', got {pattern!r}.")
            parts = tuple(None if _PLACEHOLDER.fullmatch(part) else part for part in _path_segments(pattern))
            self._patterns.setdefault(len(parts), []).append((pattern, parts))
        self._max_routes = max_routes_per_port
        self._overflow_route = overflow_route
        self._routes: dict[int, set[str]] = {}
        self._cache: dict[str, str] = {}
        self.overflowed = 0
        # Targets that differ only in a last segment of digits then have one route, cached once.
        self._digits_are_ids = self.identifiers_are_ids()

    def identifiers_are_ids(self) -> bool:
        """Whether writing every path segment the heuristic takes for an identifier as `{id}`
        leaves every route as it is.

        The heuristic makes such a segment `{id}` and keeps a literal `{id}`; a pattern's
        placeholder matches both. Only a pattern with a literal segment of an identifier's shape
        (`/v/2024/report`, a pinned hash) tells the two apart. The kernel fast path keys its
        aggregates this way when this holds, so random ids do not fill its map.
        """
        return not any(
            part is not None and _is_identifier(part)
            for patterns in self._patterns.values() for _, parts in patterns for part in parts
        )

    def route(self, server_port: int, target: str) -> str:
        route = self._cache.get(target)
        if route is None:
            if self._digits_are_ids:
                # `/items/<random id>`, the usual miss: cached as `/items/0`, which has its route when
                # identifiers are ids (a pattern's placeholder takes both, the heuristic makes both
                # `{id}`), so the cache is not flooded and the path is not shaped again.
                last = target.rfind("/") + 1
                if last and target[last:].isdigit() and target[last:].isascii():
                    target = target[:last] + "0"
                    route = self._cache.get(target)
            if route is None:
                route = self._shape(target)
                if len(self._cache) >= _CACHE_ENTRIES:
                    self._cache.clear()
                self._cache[target] = route
        known = self._routes.get(server_port)
        if known is None:
            known = self._routes[server_port] = set()
        if route in known:
            return route
        if len(known) >= self._max_routes:
            self.overflowed += 1
            return self._overflow_route
        known.add(route)
        return route

    def _shape(self, target: str) -> str:
        path = normalise_target(target)
        if path.startswith("/") and self._patterns:
            segments = _path_segments(path)
            for pattern, parts in self._patterns.get(len(segments), ()):
                if all(
                    segment if part is None else segment == part
                    for part, segment in zip(parts, segments, strict=True)
                ):
                    return pattern
        return heuristic_route(path)


def _path_segments(path: str) -> list[str]:
    """Segments of an absolute path, one trailing slash ignored (`/a/b/` → [a, b])."""
    if path == "/":
        return []
    if path.endswith("/"):
        path = path[:-1]
    return path[1:].split("/")
