"""wrk: the command line we run, the Lua scripts that shape its load, and its report parsed.

Parsing is pure (text in, `WrkResult` out) so it is table-tested without wrk installed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["REALISTIC_IDS", "WrkResult", "churn_script", "paced_script", "parse_duration_s", "parse_wrk",
           "realistic_script"]

_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_COUNT_UNITS = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}

_LATENCY = re.compile(r"^\s*Latency\s+([\d.]+)(us|ms|s|m|h)\s+([\d.]+)(us|ms|s|m|h)\s+([\d.]+)(us|ms|s|m|h)",
                      re.MULTILINE)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_SOCKET_ERRORS = re.compile(
    r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.MULTILINE)
_NON_2XX = re.compile(r"^\s*Non-2xx or 3xx responses: (\d+)", re.MULTILINE)


@dataclass(frozen=True)
class WrkResult:
    requests: int  # completed responses wrk counted
    duration_s: float
    requests_per_s: float
    latency_mean_s: float
    latency_stdev_s: float
    latency_max_s: float
    connect_errors: int = 0
    read_errors: int = 0
    write_errors: int = 0
    timeouts: int = 0
    non_2xx: int = 0

    @property
    def socket_errors(self) -> int:
        return self.connect_errors + self.read_errors + self.write_errors + self.timeouts


def parse_duration_s(value: str, unit: str) -> float:
    """`('409.46', 'us')` → 0.00040946. Units are the ones wrk prints: us, ms, s, m, h."""
    try:
        return float(value) * _TIME_UNITS[unit]
    except KeyError:
        raise ValueError(f"unknown wrk time unit {unit!r}") from None


def parse_wrk(text: str) -> WrkResult:
    """Parse wrk's plain report. Raises ValueError naming what is missing."""
    total = _TOTAL.search(text)
    rps = _RPS.search(text)
    if total is None or rps is None:
        raise ValueError("wrk output has no 'N requests in' or 'Requests/sec:' line")
    latency = _LATENCY.search(text)
    if latency is not None:
        mean, stdev, peak = (parse_duration_s(latency.group(i), latency.group(i + 1)) for i in (1, 3, 5))
    else:  # wrk prints no latency line when no request completed
        mean = stdev = peak = float("nan")
    errors = _SOCKET_ERRORS.search(text)
    connect, read, write, timeout = (int(x) for x in errors.groups()) if errors else (0, 0, 0, 0)
    non_2xx = _NON_2XX.search(text)
    return WrkResult(
        requests=int(total.group(1)),
        duration_s=parse_duration_s(total.group(2), total.group(3)),
        requests_per_s=float(rps.group(1)),
        latency_mean_s=mean,
        latency_stdev_s=stdev,
        latency_max_s=peak,
        connect_errors=connect,
        read_errors=read,
        write_errors=write,
        timeouts=timeout,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def paced_script(rate_per_s: float, connections: int) -> str:
    """A wrk Lua script that holds each connection to `rate_per_s / connections` requests a second.

    wrk's `delay()` hook postpones the next request on a connection; wrk starts its
    latency clock when the request is written, so the pause is not counted as latency.
    The achieved rate is a little lower than asked (delay + latency per request), and
    the bench reports the rate wrk measured, not the one asked for.
    """
    if rate_per_s <= 0 or connections <= 0:
        raise ValueError("rate and connections must be positive")
    delay_ms = max(1, round(1000.0 * connections / rate_per_s))
    return f"function delay()\n  return {delay_ms}\nend\n"


def churn_script(close_every: int) -> str:
    """A wrk Lua script where every `close_every`-th request on a connection asks the server to
    close it, so wrk reconnects: connections come and go, as they do in production."""
    if close_every < 1:
        raise ValueError("close_every must be at least 1")
    return (
        "local n = 0\n"
        "local keep, close\n"
        "function init(args)\n"
        "  keep = wrk.format()\n"
        "  close = wrk.format(nil, nil, {[\"Connection\"] = \"close\"})\n"
        "end\n"
        "function request()\n"
        "  n = n + 1\n"
        f"  if n % {close_every} == 0 then return close end\n"
        "  return keep\n"
        "end\n"
    )


# What a browser's request to an API carries (Chromium 124 on Linux), with a 700-byte cookie.
# Header names in the case browsers send them: HTTP/1.1 title case and the lower-case
# client hints, so a case-sensitive match would be caught out.
_BROWSER_HEADERS: tuple[tuple[str, str], ...] = (
    ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                   "Chrome/124.0.0.0 Safari/537.36"),
    ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
               "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"),
    ("Accept-Language", "en-GB,en-US;q=0.9,en;q=0.8,fr;q=0.7"),
    ("Accept-Encoding", "gzip, deflate, br, zstd"),
    ("Referer", "http://127.0.0.1/app/dashboard?tab=items"),
    ("sec-ch-ua", '"Chromium";v="124", "Google Chrome";v="124", "Not-A.Brand";v="99"'),
    ("sec-ch-ua-mobile", "?0"),
    ("sec-ch-ua-platform", '"Linux"'),
    ("Sec-Fetch-Site", "same-origin"),
    ("Sec-Fetch-Mode", "cors"),
    ("Sec-Fetch-Dest", "empty"),
    ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
)
COOKIE_BYTES = 700
REALISTIC_IDS = 100_000  # distinct ids the realistic scenario's paths are drawn from


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def browser_headers() -> list[tuple[str, str]]:
    """The headers above and a COOKIE_BYTES cookie: ~1.3 KB of request head."""
    # A cookie that looks like one (name=value pairs of hex), deterministic for the same run.
    pairs: list[str] = []
    n = 0
    while len("; ".join(pairs)) < COOKIE_BYTES:
        pairs.append(f"c{n}={(n * 2654435761) & 0xFFFFFFFF:08x}{(n * 40503) & 0xFFFF:04x}")
        n += 1
    return [*_BROWSER_HEADERS, ("Cookie", "; ".join(pairs)[:COOKIE_BYTES])]


def realistic_script(ids: int = REALISTIC_IDS, seed: int = 1) -> str:
    """A wrk Lua script sending browser-sized heads (`browser_headers`) to `/api/items/<id>`,
    the id uniformly random in [0, ids)."""
    if ids < 1:
        raise ValueError("ids must be at least 1")
    table = ", ".join(f"[{_lua_string(name)}] = {_lua_string(value)}" for name, value in browser_headers())
    return (
        f"math.randomseed({seed})\n"
        f"local headers = {{{table}}}\n"
        "function request()\n"
        f"  return wrk.format(\"GET\", \"/api/items/\" .. math.random(0, {ids - 1}), headers)\n"
        "end\n"
    )
