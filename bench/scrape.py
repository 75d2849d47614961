"""What the bench reads from the exporter's /metrics and from /proc. Parsing is pure."""

from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from exporter.metrics import (
    HTTP_DURATION,
    SELF,
    SELF_EXCHANGES_TOTAL,
    SELF_FAST_PATH_AGGREGATES,
    SELF_FAST_PATH_EXCHANGES_TOTAL,
    SELF_KERNEL_DROPS_TOTAL,
    SELF_PACKETS_RECEIVED_TOTAL,
    SELF_TLS_EVENTS_FALLBACK_TOTAL,
    SELF_TLS_EVENTS_LOST_TOTAL,
)

__all__ = ["CLK_TCK", "ProcSample", "Scrape", "fetch_scrape", "parse_scrape", "read_proc"]

DURATION = HTTP_DURATION
PREFIX = SELF + "_"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Scrape:
    requests: float  # sum of http_server_request_duration_seconds_count for the port
    duration_sum_s: float  # sum of http_server_request_duration_seconds_sum for the port
    exchanges: float | None
    kernel_drops: float | None
    packets: float | None
    tls_lost: float | None = None  # TLS events the ring buffer had no room for
    tls_fallback: float | None = None  # TLS events the ring refused, taken by the fallback ring
    fast_path_exchanges: float | None = None
    fast_path_aggregates: float | None = None  # keys in the kernel's aggregate map
    # request count per (http_response_status_code, http_route) for the port
    by_status_route: dict[tuple[str, str], float] = field(default_factory=dict)


def parse_scrape(text: str, port: int) -> Scrape:
    count = total = 0.0
    self_metrics: dict[str, float] = {}
    by_status_route: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(DURATION) and sample.labels.get("server_port") == str(port):
                if sample.name == DURATION + "_count":
                    count += sample.value
                    key = (sample.labels.get("http_response_status_code", ""), sample.labels.get("http_route", ""))
                    by_status_route[key] = by_status_route.get(key, 0.0) + sample.value
                elif sample.name == DURATION + "_sum":
                    total += sample.value
            elif sample.name.startswith(PREFIX) and not sample.labels:
                self_metrics[sample.name[len(PREFIX):]] = sample.value
    return Scrape(
        requests=count,
        duration_sum_s=total,
        exchanges=self_metrics.get(SELF_EXCHANGES_TOTAL),
        kernel_drops=self_metrics.get(SELF_KERNEL_DROPS_TOTAL),
        packets=self_metrics.get(SELF_PACKETS_RECEIVED_TOTAL),
        tls_lost=self_metrics.get(SELF_TLS_EVENTS_LOST_TOTAL),
        tls_fallback=self_metrics.get(SELF_TLS_EVENTS_FALLBACK_TOTAL),
        fast_path_exchanges=self_metrics.get(SELF_FAST_PATH_EXCHANGES_TOTAL),
        fast_path_aggregates=self_metrics.get(SELF_FAST_PATH_AGGREGATES),
        by_status_route=by_status_route,
    )


def fetch_scrape(listen: str, port: int, timeout_s: float = 5.0) -> Scrape:
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=timeout_s) as response:
        return parse_scrape(response.read().decode(), port)


@dataclass(frozen=True)
class ProcSample:
    cpu_s: float  # utime + stime of the process (all its threads), seconds
    rss_mb: float  # VmRSS
    hwm_mb: float  # VmHWM: peak RSS


def parse_proc(stat: str, status: str) -> ProcSample:
    # /proc/<pid>/stat: the command name is in parentheses and may hold spaces; fields after it.
    fields = stat[stat.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    kb = {}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            kb[key] = int(rest.split()[0])
    return ProcSample((utime + stime) / CLK_TCK, kb.get("VmRSS", 0) / 1024, kb.get("VmHWM", 0) / 1024)


def read_proc(pid: int) -> ProcSample:
    with open(f"/proc/{pid}/stat") as stat, open(f"/proc/{pid}/status") as status:
        return parse_proc(stat.read(), status.read())
