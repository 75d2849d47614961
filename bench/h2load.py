"""h2load (nghttp2-client): the HTTP/2 load of the h2 scenario, and its report parsed.

Parsing is pure (text in, the same `WrkResult` the other scenarios use) so it is
table-tested without h2load installed.
"""

from __future__ import annotations

import re

from bench.wrk import WrkResult, parse_duration_s

__all__ = ["parse_h2load"]

_FINISHED = re.compile(r"^finished in ([\d.]+)(us|ms|s|m|h), ([\d.]+) req/s", re.MULTILINE)
_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
    r"(\d+) timeout", re.MULTILINE)
_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.MULTILINE)
_REQUEST_TIME = re.compile(
    r"^time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)",
    re.MULTILINE)


def parse_h2load(text: str) -> WrkResult:
    """Parse h2load's report. Raises ValueError naming what is missing."""
    finished = _FINISHED.search(text)
    requests = _REQUESTS.search(text)
    status = _STATUS.search(text)
    if finished is None or requests is None or status is None:
        raise ValueError("h2load output has no 'finished in', 'requests:' or 'status codes:' line")
    timing = _REQUEST_TIME.search(text)
    if timing is not None:
        peak, mean, stdev = (parse_duration_s(timing.group(i), timing.group(i + 1)) for i in (3, 5, 7))
    else:
        peak = mean = stdev = float("nan")
    done, errored, timeouts = int(requests.group(3)), int(requests.group(6)), int(requests.group(7))
    return WrkResult(
        requests=done,
        duration_s=parse_duration_s(finished.group(1), finished.group(2)),
        requests_per_s=float(finished.group(3)),
        latency_mean_s=mean,
        latency_stdev_s=stdev,
        latency_max_s=peak,
        read_errors=errored,
        timeouts=timeouts,
        non_2xx=int(status.group(3)) + int(status.group(4)),
    )
