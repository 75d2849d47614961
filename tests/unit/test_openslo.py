"""OpenSLO v1 input: documents mapped onto Objective, evaluated embedded exactly like the
Reliably manifest they mirror, and every unsupported field refused with one line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.core.model import Exchange
from exporter.errors import ConfigError
from exporter.slo.evaluate import Evaluator
from exporter.slo.manifest import load_manifest, parse_manifest
from exporter.slo.promql import queries

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "openslo.yaml"
FIXTURES = REPO / "tests" / "fixtures" / "openslo"
S = 1_000_000_000


def test_example_maps_onto_objectives() -> None:
    availability, latency = load_manifest(EXAMPLE)
    assert (availability.name, availability.service, availability.category) == (
        "search-availability", "web-shop", "availability")
    assert availability.good_status_classes == ("1xx", "2xx", "3xx", "4xx")  # bad: [5xx]
    assert (availability.route, availability.objective_percent, availability.window_seconds) == ("/", 99.0, 30 * 86400)
    assert availability.selector == {"category": "availability", "path": "/"}
    assert (latency.category, latency.latency_target_seconds, latency.objective_percent) == ("latency", 0.15, 99.5)
    assert latency.selector == {"category": "latency", "latency_target": "150ms", "path": "/"}
    assert latency.slug == "web_shop_search_latency"


def test_openslo_and_reliably_count_the_same_exchanges() -> None:
    """The OpenSLO example states the Reliably demo's objectives; on the same exchanges both
    give the same good and total counts."""
    reliably = load_manifest(REPO / "examples" / "reliably.yaml")
    openslo = load_manifest(EXAMPLE)
    evaluators = [Evaluator(objectives, 10, start_s=1000) for objectives in (reliably, openslo)]
    for i in range(100):
        end = round((1000 + i * 0.09) * S)
        ms = 150 if i % 10 == 0 else (151 if i % 25 == 0 else 5)  # exactly on target is good
        status = 503 if i % 20 == 3 else (404 if i % 7 == 0 else 200)
        for route in ("/", "/other"):
            for ev in evaluators:
                ev.observe(Exchange("GET", route, status, end - ms * 1_000_000, end, 0, 0, 80), route, end)
    reliably_latency, reliably_availability = evaluators[0].close(1010)
    openslo_availability, openslo_latency = evaluators[1].close(1010)
    for ours, theirs in ((openslo_latency, reliably_latency), (openslo_availability, reliably_availability)):
        assert (ours.interval.good, ours.interval.total) == (theirs.interval.good, theirs.interval.total)
    assert (openslo_latency.interval.good, openslo_latency.interval.total) == (98, 100)  # 25 and 75: 151 ms
    assert (openslo_availability.interval.good, openslo_availability.interval.total) == (95, 100)


def test_openslo_example_shape_with_our_metric_source() -> None:
    (objective,) = load_manifest(FIXTURES / "occurrences-search.yaml")
    assert (objective.name, objective.route, objective.latency_target_seconds) == ("search-slo", "/search", 0.5)
    assert (objective.window_seconds, objective.objective_percent) == (14 * 86400, 99.0)


def test_prometheus_ratios_become_promql() -> None:
    good_total, bad_total = load_manifest(FIXTURES / "prometheus.yaml")
    assert good_total.promql is not None and bad_total.promql is not None
    assert good_total.category == "ratio" and good_total.objective_percent == 99.5
    assert good_total.promql.render("1h") == (
        'sum(increase(http_server_request_duration_seconds_count{http_response_status_code=~"2.."}[1h]))',
        "sum(increase(http_server_request_duration_seconds_count[1h]))",
    )
    total = "sum(rate(http_server_request_duration_seconds_count[1h]))"
    bad = 'sum(rate(http_server_request_duration_seconds_count{http_response_status_code=~"5.."}[1h]))'
    assert bad_total.promql.render("1h") == (f"({total}) - ({bad})", total)
    # The one query builder (slo/query.py) sums each side and reads a missing good series as 0.
    assert queries(bad_total, "1h") == (f"sum(({total}) - ({bad})) or vector(0)", f"sum({total})")


def test_reliably_and_openslo_documents_mix_in_one_file() -> None:
    text = (REPO / "examples" / "reliably.yaml").read_text() + "---\n" + EXAMPLE.read_text()
    assert [o.name for o in parse_manifest(text)][-2:] == ["search-availability", "search-latency"]


SLO_HEAD = """apiVersion: openslo/v1
kind: SLO
metadata: {name: s}
spec:
  service: shop
"""
OWN_THRESHOLD = """  indicator:
    metadata: {name: i}
    spec:
      thresholdMetric:
        metricSource: {type: ebpf-slo-exporter, spec: {path: /}}
"""
ROLLING = "  timeWindow: [{duration: 30d, isRolling: true}]\n"
OCCURRENCES = "  budgetingMethod: Occurrences\n"
LTE = "  objectives: [{op: lte, value: 0.2, target: 0.99}]\n"
WHERE = "<slo> document 1 (SLO 's'): "


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SLO_HEAD + OWN_THRESHOLD + ROLLING + "  budgetingMethod: Timeslices\n" + LTE,
         WHERE + "spec.budgetingMethod 'Timeslices' is not supported; only Occurrences is"),
        (SLO_HEAD + OWN_THRESHOLD + ROLLING + "  budgetingMethod: RatioTimeslices\n" + LTE,
         WHERE + "spec.budgetingMethod 'RatioTimeslices' is not supported; only Occurrences is"),
        (SLO_HEAD + OWN_THRESHOLD + "  timeWindow: [{duration: 1M, calendar: {startTime: 2024-01-01 00:00:00, "
         "timeZone: UTC}}]\n" + OCCURRENCES + LTE,
         WHERE + "spec.timeWindow[0].calendar: calendar windows are not supported; use isRolling: true"),
        (SLO_HEAD + OWN_THRESHOLD + ROLLING + OCCURRENCES + LTE + "  alertPolicies: [{alertPolicyRef: p}]\n",
         WHERE + "spec.alertPolicies is not supported; generate alerts with `slo rules`"),
        (SLO_HEAD + OWN_THRESHOLD + ROLLING + OCCURRENCES
         + "  objectives: [{op: lte, value: 0.2, target: 0.99, timeSliceTarget: 0.9}]\n",
         WHERE + "spec.objectives[0].timeSliceTarget is for Timeslices, which is not supported"),
        (SLO_HEAD + OWN_THRESHOLD + ROLLING + OCCURRENCES + "  objectives: [{op: gte, value: 0.2, target: 0.99}]\n",
         WHERE + "spec.objectives[0].op is 'gte'; a latency threshold takes lte or lt "
                 "(good requests are at most `value` seconds)"),
        (SLO_HEAD + "  indicatorRef: nowhere\n" + ROLLING + OCCURRENCES + LTE,
         WHERE + "spec.indicatorRef 'nowhere' names no kind: SLI in this file"),
        (SLO_HEAD + OWN_THRESHOLD.replace("ebpf-slo-exporter", "Any") + ROLLING + OCCURRENCES + LTE,
         WHERE + "spec.indicator.spec.thresholdMetric.metricSource.type is 'Any'; "
                 "supported: Prometheus, ebpf-slo-exporter"),
        (SLO_HEAD + OWN_THRESHOLD.replace("ebpf-slo-exporter", "Prometheus") + ROLLING + OCCURRENCES + LTE,
         WHERE + "spec.indicator.spec.thresholdMetric.metricSource: a thresholdMetric on Prometheus queries "
                 "is not supported (events need a histogram); use type ebpf-slo-exporter or a ratioMetric"),
        (SLO_HEAD + "  indicator:\n    metadata: {name: i}\n    spec:\n      ratioMetric:\n        rawType: success\n"
         "        raw: {metricSource: {type: Prometheus, spec: {query: x}}}\n" + ROLLING + OCCURRENCES
         + "  objectives: [{target: 0.9}]\n",
         WHERE + "spec.indicator.spec.ratioMetric.raw: precomputed ratios are not supported; "
                 "give good (or bad) and total"),
        (SLO_HEAD + "  indicator:\n    metadata: {name: i}\n    spec:\n      ratioMetric:\n        counter: true\n"
         "        good: {metricSource: {type: Prometheus, spec: {query: 'sum(rate(x[5m]))'}}}\n"
         "        total: {metricSource: {type: Prometheus, spec: {query: y}}}\n" + ROLLING + OCCURRENCES
         + "  objectives: [{target: 0.9}]\n",
         WHERE + "spec.indicator.spec.ratioMetric.good.metricSource.spec.query: 'sum(rate(x[5m]))' is not a "
                 "plain counter selector; write the whole ratio part with {{window}}, e.g. sum(rate(x[{{window}}]))"),
        (SLO_HEAD + OWN_THRESHOLD + ROLLING + OCCURRENCES + "  objectives: [{op: lte, value: 0.2, target: 1.5}]\n",
         WHERE + "spec.objectives[0].target must be above 0 and at most 1, got 1.5"),
        ("apiVersion: openslo/v1\nkind: AlertPolicy\nmetadata: {name: p}\nspec: {}\n",
         "<slo> document 1 (AlertPolicy 'p'): kind 'AlertPolicy' is not supported in OpenSLO input; "
         "use SLO, SLI, Service, DataSource (alerts come from `slo rules`)"),
        ("apiVersion: openslo/v1alpha\nkind: SLO\nmetadata: {name: s}\nspec: {}\n",
         "<slo> document 1: apiVersion is 'openslo/v1alpha'; of OpenSLO only openslo/v1 is supported"),
        ("apiVersion: openslo/v1\nkind: Service\nmetadata: {name: shop}\nspec: {}\n---\n"
         + SLO_HEAD.replace("shop", "other") + OWN_THRESHOLD + ROLLING + OCCURRENCES + LTE,
         "<slo> document 2 (SLO 's'): spec.service 'other' names no kind: Service in this file"),
    ],
)
def test_unsupported_fields_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_manifest(text)
    assert str(error.value) == message
    assert "\n" not in str(error.value)


def test_thresholds_with_several_objectives_are_refused() -> None:
    text = SLO_HEAD + OWN_THRESHOLD + ROLLING + OCCURRENCES + "  objectives: [{op: lte, value: 0.2, target: 0.9}, " \
        "{op: lte, value: 0.5, target: 0.99}]\n"
    with pytest.raises(ConfigError, match="a thresholdMetric SLO takes exactly one objective"):
        parse_manifest(text)


def test_ratio_with_several_targets_gives_one_objective_each() -> None:
    text = SLO_HEAD + (
        "  indicator:\n    metadata: {name: i}\n    spec:\n      ratioMetric:\n"
        "        good: {metricSource: {type: ebpf-slo-exporter, spec: {statusClasses: [2xx]}}}\n"
        "        total: {metricSource: {type: ebpf-slo-exporter}}\n"
    ) + ROLLING + OCCURRENCES + (
        "  objectives: [{displayName: gold, target: 0.999}, {displayName: silver, target: 0.99}]\n")
    gold, silver = parse_manifest(text)
    assert (gold.name, gold.objective_percent, gold.good_status_classes) == ("s gold", 99.9, ("2xx",))
    assert (silver.name, silver.objective_percent) == ("s silver", 99.0)


def test_run_leaves_promql_ratios_to_prometheus(caplog: pytest.LogCaptureFixture) -> None:
    from exporter.cli import _embedded_objectives

    mixed = load_manifest(EXAMPLE) + load_manifest(FIXTURES / "prometheus.yaml")
    assert [o.name for o in _embedded_objectives(mixed, "f.yaml")] == ["search-availability", "search-latency"]
    assert caplog.messages == ["not evaluated in process (PromQL ratios; use `bridge --prometheus` or "
                               "`slo report --prometheus`): shop-good-total, shop-bad-total"]
    with pytest.raises(ConfigError) as error:
        _embedded_objectives(load_manifest(FIXTURES / "prometheus.yaml"), "p.yaml")
    assert str(error.value) == ("p.yaml: every objective is a PromQL ratio, which needs Prometheus; "
                                "run `ebpf-slo-exporter bridge --slo p.yaml --prometheus URL` instead")
