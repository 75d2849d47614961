"""The realistic soak: the realistic load for a long run, sampled every few seconds (SOAK_NOTE)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.report import Column, Table, fmt, fmt_completeness, fmt_int
from bench.scrape import Scrape

__all__ = ["SOAK_NOTE", "LogCounter", "SoakSample", "soak_rows", "soak_table"]

SOAK_NOTE = """\
Each sample takes, at one instant: nginx's access log so far (lines counted incrementally), the
exporter's /metrics (requests counted, exchanges aggregated in the kernel, kernel drops, keys in the
kernel's aggregate map) and its VmRSS. Kernel path share is fast_path_exchanges_total ÷
exchanges_total per interval, not cumulative, so a late slide shows. Counted - logged is bounded by
nginx's log buffer (64 KB, flushed every second) and the requests in flight, and must not drift; the
exact comparison, per (status, route), is the end-of-run table."""


class LogCounter:
    """Lines in a growing file, reading only what was appended since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._lines = 0

    def count(self) -> int:
        try:
            with self.path.open("rb") as log:
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:
            return 0
        complete = data.rfind(b"\n") + 1  # a line nginx is still writing is counted next time
        self._lines += data.count(b"\n", 0, complete)
        self._offset += complete
        return self._lines


@dataclass(frozen=True)
class SoakSample:
    seconds: float  # into the load
    logged: int  # nginx access log lines so far
    scrape: Scrape  # the exporter's /metrics at the same instant
    rss_mb: float


def soak_rows(samples: list[SoakSample], before: Scrape) -> list[dict[str, float | int | str | None]]:
    """One row per sample; counts since the load started (the exporter's minus `before`)."""
    rows: list[dict[str, float | int | str | None]] = []
    last_exchanges = last_fast = 0.0
    for sample in samples:
        scrape = sample.scrape
        counted = scrape.requests - before.requests
        # Share from two self-metrics read together: the histograms are read earlier in the scrape,
        # which at ~20,000 exchanges/s skews a per-interval ratio by a few tenths of a percent.
        exchanges = (scrape.exchanges or 0) - (before.exchanges or 0)
        fast = (scrape.fast_path_exchanges or 0) - (before.fast_path_exchanges or 0)
        interval = exchanges - last_exchanges
        rows.append({
            "t": sample.seconds,
            "logged": sample.logged,
            "counted": counted,
            "gap": counted - sample.logged,
            "share": (fast - last_fast) / interval if interval > 0 else None,
            "drops": (scrape.kernel_drops or 0) - (before.kernel_drops or 0),
            "rss": sample.rss_mb,
            "agg": scrape.fast_path_aggregates,
        })
        last_exchanges, last_fast = exchanges, fast
    return rows


def soak_table(title: str, samples: list[SoakSample], before: Scrape, every_s: float) -> Table:
    columns = [
        Column("s into load", "t", lambda v: f"{v:.0f}" if isinstance(v, float) else fmt(v)),
        Column("requests (nginx log)", "logged", fmt_int),
        Column("requests counted", "counted", fmt_int),
        Column("counted - logged", "gap", fmt_int),
        Column(f"kernel path share, last {every_s:g} s", "share", fmt_completeness),
        Column("kernel drops", "drops", fmt_int),
        Column("RSS MB", "rss", lambda v: fmt(v)),
        Column("aggregate map keys", "agg", fmt_int),
    ]
    table = Table(title, columns, soak_rows(samples, before))
    table.note = SOAK_NOTE
    return table
