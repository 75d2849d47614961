"""`slo report` formatting: exact output in every format, and reading the exporter's snapshot."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from exporter.core.model import Exchange
from exporter.errors import ExporterError
from exporter.slo.evaluate import Result
from exporter.slo.manifest import load_manifest
from exporter.slo.report import (
    ReportLine,
    line_from_results,
    lines_from_snapshot,
    render,
    render_markdown,
    render_table,
    render_text,
    report_document,
    snapshot_url,
    to_string,
)
from exporter.slo.runtime import SloRuntime

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "reliably.yaml"

LINES = [
    ReportLine(
        "ebpf-2021-demo",
        "99% of the responses are under 150ms",
        "latency",
        99.5,
        60,
        98.9912,
        "2021-06-01T12:00:00Z",
        "2021-06-01T12:01:00Z",
        (False, False, False, True, False),
    ),
    ReportLine(
        "ebpf-2021-demo",
        "99% of the responses to our users are in the 2xx class",
        "availability",
        99.0,
        60,
        None,
        None,
        None,
        (True, None),
    ),
    ReportLine(
        "shop",
        "checkout | fast",
        "latency",
        99.9,
        30 * 86400,
        100.0,
        "2021-05-02T12:01:00Z",
        "2021-06-01T12:01:00Z",
        (True,),
    ),
]
NOW = 1622548870.0  # 2021-06-01T12:01:10Z


def test_table() -> None:
    assert to_string(render(LINES, "table", NOW)) == (
        "                                                             Current  Objective  / Time Window  Type"
        "          Trend\n"
        "  Service #1: ebpf-2021-demo\n"
        "  ❌ 99% of the responses are under 150ms                     98.99%      99.5%  / 1m           "
        "Latency       ✕ ✕ ✕ ✓ ✕\n"
        "  —  99% of the responses to our users are in the 2xx class        —        99%  / 1m           "
        "Availability  ✓ —\n"
        "  Service #2: shop\n"
        "  ✅ checkout | fast                                         100.00%      99.9%  / 30d          "
        "Latency       ✓\n"
    )


def test_text() -> None:
    assert render(LINES, "text", NOW) == (
        "Service #1: ebpf-2021-demo\n"
        "  ❌ 99% of the responses are under 150ms: 98.99% of 99.5% / 1m (Latency, not met) trend ✕ ✕ ✕ ✓ ✕\n"
        "  — 99% of the responses to our users are in the 2xx class: — of 99% / 1m (Availability, no data) "
        "trend ✓ —\n"
        "Service #2: shop\n"
        "  ✅ checkout | fast: 100.00% of 99.9% / 30d (Latency, met) trend ✓\n"
    )


def test_markdown_escapes_pipes() -> None:
    assert render(LINES, "markdown", NOW) == (
        "| | Service | Objective | Current | Target | / Time Window | Type | Trend |\n"
        "|---|---|---|---:|---:|---|---|---|\n"
        "| ❌ | ebpf-2021-demo | 99% of the responses are under 150ms | 98.99% | 99.5% | 1m | Latency | "
        "✕ ✕ ✕ ✓ ✕ |\n"
        "| — | ebpf-2021-demo | 99% of the responses to our users are in the 2xx class | — | 99% | 1m | "
        "Availability | ✓ — |\n"
        "| ✅ | shop | checkout \\| fast | 100.00% | 99.9% | 30d | Latency | ✓ |\n"
    )


EXPECTED_DOCUMENT = {
    "timestamp": "2021-06-01T12:01:10Z",
    "services": [
        {
            "name": "ebpf-2021-demo",
            "service_levels": [
                {
                    "name": "99% of the responses are under 150ms",
                    "type": "Latency",
                    "objective": 99.5,
                    "period": "1m",
                    "result": {"actual": 98.9912, "delta": -0.5088, "slo_is_met": False},
                    "window": {"from": "2021-06-01T12:00:00Z", "to": "2021-06-01T12:01:00Z"},
                },
                {
                    "name": "99% of the responses to our users are in the 2xx class",
                    "type": "Availability",
                    "objective": 99.0,
                    "period": "1m",
                    "result": {"actual": None, "delta": None, "slo_is_met": None},
                    "window": {"from": None, "to": None},
                },
            ],
        },
        {
            "name": "shop",
            "service_levels": [
                {
                    "name": "checkout | fast",
                    "type": "Latency",
                    "objective": 99.9,
                    "period": "30d",
                    "result": {"actual": 100.0, "delta": 0.1, "slo_is_met": True},
                    "window": {"from": "2021-05-02T12:01:00Z", "to": "2021-06-01T12:01:00Z"},
                },
            ],
        },
    ],
}


def test_json_keeps_the_reliably_shape() -> None:
    text = render(LINES, "json", NOW)
    assert isinstance(text, str)
    assert json.loads(text) == EXPECTED_DOCUMENT
    assert '"actual": null' in text  # no data is null, never 0


def test_yaml_keeps_the_reliably_shape() -> None:
    text = render(LINES, "yaml", NOW)
    assert isinstance(text, str)
    assert yaml.safe_load(text) == EXPECTED_DOCUMENT
    assert text.startswith("timestamp: '2021-06-01T12:01:10Z'\nservices:\n- name: ebpf-2021-demo\n")


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        render(LINES, "csv", NOW)


def test_lines_from_results_use_the_last_five_oldest_first() -> None:
    objective = load_manifest(EXAMPLE)[0]
    results = [
        Result(t - 60, t, good, 100, 0.995)
        for t, good in [(10, 100), (20, 99), (30, 100), (40, 0), (50, 100), (60, 99)]
    ]
    results.append(Result(10, 70, 0, 0, 0.995))
    line = line_from_results(objective, results[:-1])
    assert line.trend == (False, True, False, True, False)
    assert line.actual == 99.0
    assert (line.window_from, line.window_to) == ("1970-01-01T00:00:00Z", "1970-01-01T00:01:00Z")
    empty = line_from_results(objective, results)
    assert empty.actual is None and empty.met is None and empty.trend[-1] is None


def test_lines_from_a_runtime_snapshot() -> None:
    now = [1003.0]
    runtime = SloRuntime(load_manifest(EXAMPLE), wall_clock=lambda: now[0])
    for i in range(100):
        end = round((1003 + i * 0.05) * 1e9)
        status = 500 if i < 2 else 200
        runtime.observe(Exchange("GET", "/", status, end - 1_000_000, end, 0, 0, 8000), "/")
    now[0] = 1012.0
    runtime.tick()
    snapshot = json.loads(json.dumps(runtime.snapshot()))  # as it comes over HTTP
    latency, availability = lines_from_snapshot(snapshot)
    assert latency == ReportLine(
        "ebpf-2021-demo",
        "99% of the responses are under 150ms",
        "latency",
        99.5,
        60.0,
        100.0,
        "1970-01-01T00:15:50Z",
        "1970-01-01T00:16:50Z",
        (True,),
        coverage=7 / 60,  # started at 1003: 7 s of the minute were observed
    )
    assert (availability.actual, availability.met, availability.trend) == (98.0, False, (False,))
    only = lines_from_snapshot(snapshot, load_manifest(EXAMPLE)[1:])
    assert [line.name for line in only] == [availability.name]


def test_snapshot_that_is_not_ours() -> None:
    with pytest.raises(ExporterError, match="no objectives list"):
        lines_from_snapshot({"status": "success"})


@pytest.mark.parametrize(
    ("base", "url"),
    [
        ("http://127.0.0.1:9640", "http://127.0.0.1:9640/api/v1/slo"),
        ("http://127.0.0.1:9640/", "http://127.0.0.1:9640/api/v1/slo"),
        ("http://h/api/v1/slo", "http://h/api/v1/slo"),
    ],
)
def test_snapshot_url(base: str, url: str) -> None:
    assert snapshot_url(base) == url


def test_document_for_nothing() -> None:
    assert report_document([], NOW) == {"timestamp": "2021-06-01T12:01:10Z", "services": []}


def test_watch_refreshes_until_ctrl_c_and_shows_errors() -> None:
    import io

    from rich.console import Console

    from exporter.slo.report import watch

    frames: Iterator[str | Exception] = iter(
        ["first frame\n", ExporterError("exporter went away"), "third frame\n"]
    )
    sleeps: list[float] = []

    def produce() -> str:
        item = next(frames)
        if isinstance(item, Exception):
            raise item
        return item

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    out = io.StringIO()
    watch(Console(file=out, width=100, force_terminal=True, color_system=None), produce, sleep=sleep)
    assert sleeps == [3.0, 3.0, 3.0]
    text = out.getvalue()
    assert "first frame" in text
    assert "error: exporter went away (retrying every 3s)" in text
    assert "third frame" in text


def test_partial_window_is_shown_as_partial_in_every_format() -> None:
    young = ReportLine("shop", "fast", "latency", 99.9, 2592000.0, 100.0, "a", "b", (True,), coverage=40 / 2592000)
    full = ReportLine("shop", "up", "availability", 99.0, 60.0, 99.5, "c", "d", (True,), coverage=1.0)
    assert render_text([young, full]) == (
        "Service #1: shop\n"
        "  ✅ fast: 100.00% of 99.9% / 30d (Latency, met, <0.01% of the window observed) trend ✓\n"
        "  ✅ up: 99.50% of 99% / 1m (Availability, met, 100% of the window observed) trend ✓\n"
    )
    table = to_string(render_table([young, full]))
    assert table.splitlines()[0].split() == ["Current", "Objective", "/", "Time", "Window", "Type", "Trend",
                                             "Observed"]
    assert table.splitlines()[2].split()[-2:] == ["✓", "<0.01%"]
    assert render_markdown([young]).splitlines()[2].endswith("| ✓ | <0.01% |")
    document = report_document([young], 0)
    assert document["services"][0]["service_levels"][0]["window"] == {"from": "a", "to": "b",
                                                                        "coverage": 40 / 2592000}
