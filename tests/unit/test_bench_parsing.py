"""The bench's pure parts: wrk reports, /metrics and /proc parsing, medians, tables."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from bench.h2load import parse_h2load
from bench.nginx import logged_by_status_route
from bench.report import (
    Column,
    Table,
    fmt_completeness,
    fmt_int,
    fmt_ratio,
    median,
    median_rows,
    render_markdown,
)
from bench.runner import Load, route_mismatch
from bench.scrape import CLK_TCK, parse_proc, parse_scrape
from bench.wrk import (
    COOKIE_BYTES,
    churn_script,
    paced_script,
    parse_duration_s,
    parse_wrk,
    realistic_script,
)

WRK_PLAIN = """\
Running 5s test @ http://127.0.0.1:8080/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   409.46us  137.67us   5.44ms   89.96%
    Req/Sec    78.12k     3.60k   83.64k    80.00%
  388623 requests in 5.00s, 57.44MB read
Requests/sec:  77705.99
Transfer/sec:     11.48MB"""

WRK_ERRORS = """\
Running 20s test @ http://127.0.0.1:8080/
  1 threads and 10000 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   195.12ms   35.01ms    1.99s    91.02%
    Req/Sec    48.51k     5.02k   56.20k    75.00%
  Latency Distribution
     50%  190.00ms
     75%  200.00ms
     90%  210.00ms
     99%  400.00ms
  965432 requests in 20.01s, 140.10MB read
  Socket errors: connect 1017, read 12, write 3, timeout 44
  Non-2xx or 3xx responses: 7
Requests/sec:  48247.35
Transfer/sec:      7.00MB
"""

WRK_SECONDS = """\
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.50s   250.00ms    2.00s    70.00%
    Req/Sec     1.00      0.00     1.00    100.00%
  10 requests in 1.00m, 1.00KB read
Requests/sec:      0.17
"""


def test_plain_report() -> None:
    result = parse_wrk(WRK_PLAIN)
    assert result.requests == 388623
    assert result.duration_s == pytest.approx(5.0)
    assert result.requests_per_s == pytest.approx(77705.99)
    assert result.latency_mean_s == pytest.approx(409.46e-6)
    assert result.latency_stdev_s == pytest.approx(137.67e-6)
    assert result.latency_max_s == pytest.approx(5.44e-3)
    assert result.socket_errors == 0
    assert result.non_2xx == 0


def test_socket_errors_and_latency_distribution() -> None:
    result = parse_wrk(WRK_ERRORS)
    assert result.requests == 965432
    assert result.requests_per_s == pytest.approx(48247.35)
    assert result.latency_mean_s == pytest.approx(0.19512)
    assert result.latency_max_s == pytest.approx(1.99)
    errors = (result.connect_errors, result.read_errors, result.write_errors, result.timeouts)
    assert errors == (1017, 12, 3, 44)
    assert result.socket_errors == 1076
    assert result.non_2xx == 7


def test_seconds_and_minutes() -> None:
    result = parse_wrk(WRK_SECONDS)
    assert result.latency_mean_s == pytest.approx(1.5)
    assert result.latency_stdev_s == pytest.approx(0.25)
    assert result.duration_s == pytest.approx(60.0)
    assert result.requests_per_s == pytest.approx(0.17)


@pytest.mark.parametrize(("value", "unit", "seconds"), [
    ("409.46", "us", 409.46e-6), ("1.82", "ms", 1.82e-3), ("2.00", "s", 2.0), ("1.5", "m", 90.0),
])
def test_duration_units(value: str, unit: str, seconds: float) -> None:
    assert parse_duration_s(value, unit) == pytest.approx(seconds)


def test_unknown_unit_and_missing_lines() -> None:
    with pytest.raises(ValueError, match="unit"):
        parse_duration_s("1", "ns")
    with pytest.raises(ValueError, match="Requests/sec"):
        parse_wrk("unable to connect to 127.0.0.1:8080 Connection refused\n")


def test_no_latency_line_when_nothing_completed() -> None:
    result = parse_wrk("  0 requests in 1.00s, 0.00B read\nRequests/sec:      0.00\n")
    assert result.requests == 0
    assert math.isnan(result.latency_mean_s)


def test_lua_scripts() -> None:
    assert "return 20" in paced_script(100, 2)  # 2 connections at 50/s each: one every 20 ms
    assert "return 1\n" in paced_script(1e6, 1)  # never below wrk's 1 ms granularity
    assert "n % 100 == 0" in churn_script(100)
    with pytest.raises(ValueError):
        paced_script(0, 1)
    with pytest.raises(ValueError):
        churn_script(0)


def _series(suffix: str, status: str, route: str, port: int, value: float) -> str:
    labels = (f'http_request_method="GET",http_response_status_code="{status}",'
              f'http_route="{route}",server_port="{port}"')
    return f"http_server_request_duration_seconds_{suffix}{{{labels}}} {value}"


SCRAPE = "\n".join([
    "# HELP http_server_request_duration_seconds Duration of HTTP server requests.",
    "# TYPE http_server_request_duration_seconds histogram",
    _series("count", "200", "/", 8080, 10.0),
    _series("sum", "200", "/", 8080, 0.5),
    _series("count", "404", "/x", 8080, 2.0),
    _series("sum", "404", "/x", 8080, 0.1),
    _series("count", "200", "/", 9090, 99.0),
    _series("sum", "200", "/", 9090, 9.0),
    "# HELP ebpf_slo_exporter_exchanges_total HTTP exchanges rebuilt.",
    "# TYPE ebpf_slo_exporter_exchanges_total counter",
    "ebpf_slo_exporter_exchanges_total 111.0",
    "# HELP ebpf_slo_exporter_kernel_drops_total Frames the kernel dropped.",
    "# TYPE ebpf_slo_exporter_kernel_drops_total counter",
    "ebpf_slo_exporter_kernel_drops_total 3.0",
    "# TYPE ebpf_slo_exporter_filter_packets_total counter",
    'ebpf_slo_exporter_filter_packets_total{verdict="pass"} 5.0',
    "",
])


def test_scrape_counts_one_port() -> None:
    scrape = parse_scrape(SCRAPE, 8080)
    assert scrape.by_status_route == {("200", "/"): 10.0, ("404", "/x"): 2.0}
    assert scrape.requests == 12
    assert scrape.duration_sum_s == pytest.approx(0.6)
    assert scrape.exchanges == 111
    assert scrape.kernel_drops == 3
    assert scrape.packets is None
    assert parse_scrape(SCRAPE, 7).requests == 0


def test_proc_parsing_survives_spaces_in_the_name() -> None:
    fields = ["S", "1", "2", "3", "0", "-1", "4194560", "10", "0", "0", "0", "250", "50"] + ["0"] * 30
    stat = "1234 (python -m x) " + " ".join(fields)
    status = "Name:\tpython\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n"
    sample = parse_proc(stat, status)
    assert sample.cpu_s == pytest.approx(300 / CLK_TCK)
    assert sample.hwm_mb == pytest.approx(200.0)
    assert sample.rss_mb == pytest.approx(100.0)


def test_median_skips_missing_values() -> None:
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 2, 3]) == 2.5
    assert median([None, 5.0, float("nan")]) == 5.0
    assert median([None, None]) is None


def test_median_rows_are_column_wise_per_group() -> None:
    rows = [
        {"config": "baseline", "rps": 100.0, "cpu_us": None},
        {"config": "exporter", "rps": 50.0, "cpu_us": 3.0},
        {"config": "baseline", "rps": 300.0, "cpu_us": None},
        {"config": "exporter", "rps": 70.0, "cpu_us": 1.0},
        {"config": "baseline", "rps": 200.0, "cpu_us": None},
        {"config": "exporter", "rps": 60.0, "cpu_us": 2.0},
    ]
    medians = median_rows(rows, "config", ["rps", "cpu_us"])
    assert [m["config"] for m in medians] == ["baseline", "exporter"]
    assert medians[0]["rps"] == 200.0 and medians[0]["cpu_us"] is None and medians[0]["runs"] == 3
    assert medians[1]["rps"] == 60.0 and medians[1]["cpu_us"] == 2.0


def test_markdown_table() -> None:
    table = Table("title", [Column("config", "config", align="left"), Column("req/s", "rps", fmt_int),
                            Column("ratio", "ratio", fmt_ratio), Column("complete", "c", fmt_completeness)],
                  [{"config": "baseline", "rps": 81234.4, "ratio": None, "c": None},
                   {"config": "exporter", "rps": 70000.0, "ratio": 0.8617, "c": 0.99995}], note="a note")
    assert render_markdown(table).splitlines() == [
        "**title**",
        "",
        "| config   |  req/s | ratio | complete |",
        "|----------|-------:|------:|---------:|",
        "| baseline | 81,234 |   n/a |      n/a |",
        "| exporter | 70,000 | 86.2% |  99.995% |",
        "",
        "a note",
    ]


def test_completeness_keeps_the_digits_that_matter() -> None:
    assert fmt_completeness(0.99995) == "99.995%"
    assert fmt_completeness(1.0) == "100.000%"
    assert fmt_completeness(0.1248) == "12.48%"
    assert fmt_completeness(None) == "n/a"


H2LOAD = """\
starting benchmark...
spawning thread #0: 4 total client(s). 4 total requests
Application protocol: h2c

finished in 5.00s, 18070.40 req/s, 1.02MB/s
requests: 90352 total, 90352 started, 90342 done, 90342 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 90342 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 5.12MB (5367543) total, 1.05MB (1097411) headers (space savings 93.46%), 176.45KB (180684) data
                     min         max         mean         sd        +/- sd
time for request:       71us     35.32ms      1.72ms      2.76ms    78.50%
time for connect:      244us       476us       345us       118us    66.67%
"""


def test_h2load_report() -> None:
    result = parse_h2load(H2LOAD)
    assert (result.requests, result.duration_s, result.requests_per_s) == (90342, 5.0, 18070.40)
    assert result.latency_mean_s == pytest.approx(0.00172) and result.latency_max_s == pytest.approx(0.03532)
    assert result.non_2xx == 0 and result.socket_errors == 0
    failing = H2LOAD.replace("0 4xx, 0 5xx", "7 4xx, 3 5xx").replace("0 errored, 0 timeout", "2 errored, 1 timeout")
    assert parse_h2load(failing).non_2xx == 10 and parse_h2load(failing).socket_errors == 3
    with pytest.raises(ValueError, match="h2load output"):
        parse_h2load("nothing")
def test_realistic_script_sends_browser_sized_heads() -> None:
    script = realistic_script(ids=100_000)
    assert "math.random(0, 99999)" in script
    cookie = re.search(r'\["Cookie"\] = "([^"]*)"', script)
    assert cookie is not None and len(cookie.group(1)) == COOKIE_BYTES
    assert '["sec-ch-ua"]' in script and '["User-Agent"]' in script  # both name cases
    with pytest.raises(ValueError):
        realistic_script(ids=0)


def test_h2load_h1_load_reads_its_uris_from_a_file_and_sends_the_headers() -> None:
    load = Load(10, 250, 1, h1_paths=("/api/items/7",), h1_headers=("Cookie: c=1", "sec-ch-ua-mobile: ?0"),
                h2_rps=200)
    assert load.tool == "h2load"
    assert load.argv("h2load", "http://127.0.0.1:1/", Path("/w/load1.uris")) == [
        "h2load", "--h1", "-t1", "-c250", "-m1", "-D10", "-i", "/w/load1.uris", "-H", "Cookie: c=1",
        "-H", "sec-ch-ua-mobile: ?0", "--rps=200"]
    assert Load(10, 32).tool == "wrk"
    pipelined = Load(10, 32, 1, h1_paths=("/a",), h1_pipeline=8)
    assert pipelined.argv("h2load", "http://127.0.0.1:1/", Path("/w/u"))[:5] == ["h2load", "--h1", "-t1", "-c32", "-m8"]


def test_user_space_rate_is_counted_less_kernel_exchanges_per_second_of_load() -> None:
    from bench.runner import RunResult
    from bench.wrk import WrkResult

    wrk = WrkResult(requests=1000, duration_s=4.0, requests_per_s=250.0, latency_mean_s=0.001,
                    latency_stdev_s=0.0, latency_max_s=0.002)
    assert RunResult("userspace", "x", wrk=wrk, logged=1000, counted=1000.0).row()["user_rate"] == 250.0
    assert RunResult("exporter", "x", wrk=wrk, logged=1000, counted=1000.0,
                     fast_exchanges=600.0).row()["user_rate"] == 100.0


def test_nginx_log_per_status_and_route() -> None:
    lines = [b"200 /api/items/17 2 OK\n", b"500 /api/items/1700 5 OK\n", b"200 /api/items/18 2 OK\n",
             b"200 /api/items/19 0 \n",  # cut at wrk's exit: no whole exchange
             b"404 /api/items/x1 0 OK\n", b"200 / 2 OK\n"]
    assert logged_by_status_route(lines) == {
        ("200", "/api/items/{id}"): 2, ("500", "/api/items/{id}"): 1, ("404", "/api/items/x1"): 1, ("200", "/"): 1}


def test_route_mismatch_sums_every_series() -> None:
    logged = {("200", "/a"): 10, ("500", "/a"): 2}
    assert route_mismatch(logged, {("200", "/a"): 10.0, ("500", "/a"): 2.0}) == 0
    assert route_mismatch(logged, {("200", "/a"): 11.0, ("500", "/b"): 2.0}) == 1 + 2 + 2
