"""bench/soak.py: the incremental log counter and the soak rows, without a load."""

from __future__ import annotations

from pathlib import Path

from bench.scrape import Scrape
from bench.soak import LogCounter, SoakSample, soak_rows


def test_log_counter_counts_only_complete_lines_and_reads_each_byte_once(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    counter = LogCounter(log)
    assert counter.count() == 0  # nginx has not created it yet
    log.write_bytes(b"200 /a 2 OK\n200 /b 2 O")
    assert counter.count() == 1  # the second line is still being written
    with log.open("ab") as out:
        out.write(b"K\n500 /c 5 OK\n")
    assert counter.count() == 3
    assert counter.count() == 3


def scrape(requests: float, fast: float, drops: float = 0, agg: float = 2) -> Scrape:
    return Scrape(requests=requests, duration_sum_s=0.0, exchanges=requests, kernel_drops=drops, packets=0,
                  fast_path_exchanges=fast, fast_path_aggregates=agg)


def test_soak_rows_give_counts_since_the_start_and_the_share_per_interval() -> None:
    before = scrape(10, 10)
    samples = [SoakSample(0.0, 0, scrape(10, 10), 60.0),
               SoakSample(30.0, 1000, scrape(1010, 1010), 61.0),
               SoakSample(60.0, 1990, scrape(2010, 1510, drops=3), 61.5)]
    rows = soak_rows(samples, before)
    assert [(r["t"], r["logged"], r["counted"], r["gap"], r["share"], r["drops"], r["rss"], r["agg"])
            for r in rows] == [
        (0.0, 0, 0, 0, None, 0, 60.0, 2),
        (30.0, 1000, 1000, 0, 1.0, 0, 61.0, 2),
        (60.0, 1990, 2000, 10, 0.5, 3, 61.5, 2),
    ]
