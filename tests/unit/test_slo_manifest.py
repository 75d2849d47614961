"""The Reliably manifest: the 2021 demo's file unchanged, and one plain line for each mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.errors import ConfigError
from exporter.slo.manifest import format_duration, load_manifest, parse_duration, parse_manifest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "reliably.yaml"


def test_demo_manifest_loads_unchanged() -> None:
    latency, availability = load_manifest(EXAMPLE)
    assert latency.name == "99% of the responses are under 150ms"
    assert latency.service == "ebpf-2021-demo"
    assert latency.selector == {
        "category": "latency",
        "path": "/",
        "percentile": "100",
        "latency_target": "150ms",
    }
    assert (latency.objective_percent, latency.window_seconds, latency.latency_target_seconds) == (
        99.5,
        60.0,
        0.15,
    )
    assert (latency.route, latency.port, latency.category) == ("/", None, "latency")
    assert availability.category == "availability"
    assert availability.good_status_classes == ("1xx", "2xx", "3xx", "4xx")
    assert availability.objective_percent == 99.0


def doc(spec: str, labels: str = "{name: n, service: s}") -> str:
    return f"kind: Objective\nmetadata: {{labels: {labels}}}\nspec:\n{spec}"


AVAIL = "  indicatorSelector: {category: availability, path: /}\n  objectivePercent: 99\n  window: 1m\n"
LAT = (
    "  indicatorSelector: {category: latency, latency_target: 150ms}\n  objectivePercent: 99\n  window: 1m\n"
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "<slo>: no objectives found (expected documents of kind: Objective)"),
        ("kind: Indicator\n", "<slo> document 1: kind is 'Indicator'; only kind: Objective is supported"),
        ("- a\n", "<slo> document 1: expected a mapping with apiVersion, kind, metadata and spec"),
        (
            doc(AVAIL, "{service: s}"),
            "<slo> document 1: metadata.labels.name is required (the objective's title)",
        ),
        (
            doc(AVAIL.replace("99", "0")),
            "<slo> document 1 ('n'): spec.objectivePercent must be a number above 0 and at most 100, got 0",
        ),
        (
            doc(AVAIL.replace("99", "'99'")),
            "<slo> document 1 ('n'): spec.objectivePercent must be a number above 0 and at most 100, "
            "got '99'",
        ),
        (
            doc(AVAIL.replace("1m", "soon")),
            "<slo> document 1 ('n'): spec.window: 'soon' is not a duration like 150ms, 10s, 5m, 1h or 30d",
        ),
        (
            doc(AVAIL.replace("1m", "500ms")),
            "<slo> document 1 ('n'): spec.window must be at least 1s, got '500ms'",
        ),
        (
            doc(AVAIL.replace("1m", "1500ms")),
            "<slo> document 1 ('n'): spec.window must be a whole number of seconds, got '1500ms'",
        ),
        (
            doc(AVAIL.replace("availability", "throughput")),
            "<slo> document 1 ('n'): indicatorSelector.category is 'throughput'; "
            "use latency or availability, "
            "or give spec.promql with good and total queries",
        ),
        (
            doc(LAT.replace(", latency_target: 150ms", "")),
            "<slo> document 1 ('n'): a latency objective needs indicatorSelector.latency_target, e.g. 150ms",
        ),
        (
            doc(LAT.replace("150ms", "fast")),
            "<slo> document 1 ('n'): latency_target: 'fast' is not a duration like 150ms, 10s, 5m, 1h or 30d",
        ),
        (
            doc(AVAIL + "  goodStatusClasses: [2xx, 6xx]\n"),
            "<slo> document 1 ('n'): spec.goodStatusClasses has '6xx'; use 1xx, 2xx, 3xx, 4xx or 5xx",
        ),
        (
            doc(AVAIL + "  goodStatusClasses: 2xx\n"),
            "<slo> document 1 ('n'): spec.goodStatusClasses must be a list such as [2xx, 3xx]",
        ),
        (
            doc(LAT + "  goodStatusClasses: [2xx]\n"),
            "<slo> document 1 ('n'): spec.goodStatusClasses applies to availability objectives only",
        ),
        (
            doc(AVAIL.replace("path: /", "path: api")),
            "<slo> document 1 ('n'): indicatorSelector.path 'api' must be an http_route starting with /",
        ),
        (
            doc(AVAIL.replace("path: /", "port: '99999'")),
            "<slo> document 1 ('n'): indicatorSelector port '99999' is not a TCP port",
        ),
        (
            doc(AVAIL + "  promql: {good: x}\n"),
            "<slo> document 1 ('n'): spec.promql needs both good and total queries",
        ),
        (
            doc(AVAIL + "  promql: {good: [x], total: y}\n"),
            "<slo> document 1 ('n'): spec.promql.good must be a PromQL string",
        ),
        (doc(AVAIL) + "\n---\n" + doc(AVAIL), "<slo>: objective 'n' of service 's' is defined twice"),
        ("kind: [", "<slo> line 1: not valid YAML (expected the node content, but found '<stream end>')"),
    ],
)
def test_each_mistake_is_one_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_manifest(text)
    assert str(caught.value) == message
    assert "\n" not in str(caught.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^cannot read SLO file .*nope.yaml: No such file or directory$"):
        load_manifest(tmp_path / "nope.yaml")


def test_promql_objective_with_any_category() -> None:
    (objective,) = parse_manifest(
        doc(
            "  indicatorSelector: {category: freshness}\n  objectivePercent: 99.9\n  window: 30d\n"
            "  promql: {good: 'sum(rate(good[{{window}}]))', total: 'sum(rate(all[{{window}}]))'}\n"
        )
    )
    assert objective.promql is not None
    assert objective.promql.render("30d") == ("sum(rate(good[30d]))", "sum(rate(all[30d]))")


@pytest.mark.parametrize(
    ("text", "seconds"), [("150ms", 0.15), ("10s", 10), ("1m", 60), ("1h30m", 5400), ("30d", 2592000)]
)
def test_durations_round_trip(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds
