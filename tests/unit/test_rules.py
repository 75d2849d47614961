"""The rule generator without Prometheus: expressions, factors, labels, the CLI command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from exporter.errors import ConfigError
from exporter.slo.manifest import load_manifest, parse_manifest
from exporter.slo.rules import (
    ALERT_NAME,
    BURN_RATE_ALERTS,
    STANDARD_WINDOWS,
    burn_rate_factor,
    le_regex,
    render_rules,
    rules_command,
    sli_error_expr,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "reliably.yaml"
RICH = ROOT / "tests" / "fixtures" / "rules" / "rich.yaml"
DAY = 86400.0


def _rules(text: str) -> list[dict]:
    return [rule for group in yaml.safe_load(text)["groups"] for rule in group["rules"]]


@pytest.mark.parametrize(
    ("bound", "matches", "rejects"),
    [
        (0.15, ["0.15", "0.150"], ["0.1", "0.155", "0x15", "1.5"]),
        (1.0, ["1", "1.0", "1.00", "1.000"], ["10", "1.01", "0.1"]),
        (0.005, ["0.005"], ["0.0050x", "0.05"]),
        (2.5, ["2.5", "2.50"], ["25", "2"]),
        (10.0, ["10", "10.0"], ["1", "100"]),
    ],
)
def test_le_regex_matches_every_spelling_of_the_bound_and_nothing_else(bound, matches, rejects):
    pattern = re.compile(le_regex(bound))  # Prometheus anchors its regexes: fullmatch
    for text in matches:
        assert pattern.fullmatch(text), text
    for text in rejects:
        assert not pattern.fullmatch(text), text


@pytest.mark.parametrize(
    ("period_days", "expected"),
    [
        (30, [14.4, 6.0, 3.0, 1.0]),  # the SRE workbook's table
        (28, [13.44, 5.6, 2.8, 1.0]),  # 0.1 * 28 / 3 = 0.93 floors to 1
        (7, [3.36, 1.4, 1.0, 1.0]),
        (1 / 1440, [1.0, 1.0, 1.0, 1.0]),  # the demo's 1m period: every factor floors at 1
    ],
)
def test_burn_rate_factor_scales_with_the_period_and_floors_at_one(period_days, expected):
    assert [burn_rate_factor(a, period_days * DAY) for a in BURN_RATE_ALERTS] == pytest.approx(expected)


def test_example_manifest_records_every_standard_window_plus_its_short_period():
    rules = _rules(render_rules(load_manifest(EXAMPLE)))
    records = [r["record"] for r in rules if "record" in r]
    for window in (*STANDARD_WINDOWS, "1m"):
        assert records.count(f"slo:sli_error:ratio_rate{window}") == 2  # one per objective
        assert records.count(f"slo:burn_rate:ratio_rate{window}") == 2
    for name in (
        "slo:objective:ratio",
        "slo:error_budget:ratio",
        "slo:error_budget_remaining:ratio",
        "slo:sli_error:ratio_period",
    ):
        assert records.count(name) == 2
    alerts = [r for r in rules if "alert" in r]
    assert len(alerts) == 8 and {a["alert"] for a in alerts} == {ALERT_NAME}
    assert all(" > 1\n" in a["expr"] for a in alerts)  # period 1m: factor floored at 1


def test_labels_follow_level_metric_operation_and_carry_slo_and_service():
    objective = load_manifest(EXAMPLE)[0]
    rules = _rules(render_rules([objective]))
    for rule in rules:
        assert rule["labels"]["slo"] == objective.slug
        assert rule["labels"]["service"] == "ebpf-2021-demo"
        assert rule["labels"]["category"] == "latency"
        if "record" in rule:
            assert re.fullmatch(r"slo:[a-z_]+:[a-z_0-9]+", rule["record"])
    period = next(r for r in rules if r.get("record") == "slo:objective:ratio")
    assert period["expr"] == "vector(0.995)" and period["labels"]["window"] == "1m"


def test_latency_sli_is_a_ratio_of_sums_with_the_le_regex_and_a_zero_traffic_guard():
    objective = load_manifest(EXAMPLE)[0]
    expr = sli_error_expr(objective, "5m")
    # One SLI per service by default: two services behind one route never share a ratio.
    assert expr == (
        "1 - (sum by (service_name) (rate(http_server_request_duration_seconds_bucket"
        '{http_route="/", le=~"0\\\\.15|0\\\\.150"}[5m]))'
        ' / (sum by (service_name) (rate(http_server_request_duration_seconds_count{http_route="/"}[5m])) > 0))'
    )


def test_availability_counts_the_classes_that_are_not_good_and_guards_a_missing_error_series():
    objective = load_manifest(EXAMPLE)[1]
    expr = sli_error_expr(objective, "1h", job_selector='job="ebpf"')
    total = 'sum by (service_name) (rate(http_server_request_duration_seconds_count{job="ebpf", http_route="/"}[1h]))'
    # A service without errors reads 0, per service: `0 * total`, not an unlabelled vector(0).
    assert expr == (
        '(sum by (service_name) (rate(http_server_request_duration_seconds_count{job="ebpf", http_route="/", '
        f'http_response_status_code=~"5.."}}[1h])) or 0 * {total}) / ({total} > 0)'
    )
    strict = parse_manifest(
        EXAMPLE.read_text().replace(
            "path: /\n  objectivePercent: 99", "path: /\n  goodStatusClasses: [2xx]\n  objectivePercent: 99"
        )
    )
    assert 'http_response_status_code=~"1..|3..|4..|5.."' in sli_error_expr(strict[1], "5m")


def test_port_filter_and_promql_objective_with_window_substituted():
    objectives = load_manifest(RICH)
    assert 'server_port="8080"' in sli_error_expr(objectives[0], "5m")
    expr = sli_error_expr(objectives[2], "3d")
    assert expr == (
        '1 - ((sum(sum(rate(checkout_jobs_total{outcome="success"}[3d]))) or vector(0))'
        " / (sum(sum(rate(checkout_jobs_total[3d]))) > 0))"
    )
    assert "{{window}}" not in render_rules(objectives)


def test_alerts_carry_severity_windows_and_annotations():
    objective = load_manifest(RICH)[0]
    alerts = [
        r
        for r in _rules(render_rules([objective], runbook_url="https://runbooks.example/{slo}"))
        if "alert" in r
    ]
    assert [
        (a["labels"]["severity"], a["labels"]["long_window"], a["labels"]["short_window"]) for a in alerts
    ] == [
        ("page", "1h", "5m"),
        ("page", "6h", "30m"),
        ("ticket", "1d", "2h"),
        ("ticket", "3d", "6h"),
    ]
    first = alerts[0]
    assert first["expr"] == (
        'slo:burn_rate:ratio_rate1h{slo="shop_api_availability"} > 14.4\nand\n'
        'slo:burn_rate:ratio_rate5m{slo="shop_api_availability"} > 14.4'
    )
    assert first["annotations"]["runbook_url"] == "https://runbooks.example/shop_api_availability"
    assert "99.9%" in first["annotations"]["description"] and "$value" in first["annotations"]["description"]
    assert first["annotations"]["summary"]


def test_period_equal_to_a_standard_window_is_not_recorded_twice():
    text = RICH.read_text().replace("window: 7d", "window: 3d")
    records = [r["record"] for r in _rules(render_rules(parse_manifest(text)[2:])) if "record" in r]
    assert records.count("slo:sli_error:ratio_rate3d") == 1


def test_a_100_percent_objective_still_renders_finite_rules():
    text = EXAMPLE.read_text().replace("objectivePercent: 99.5", "objectivePercent: 100")
    rules = _rules(render_rules(parse_manifest(text)[:1]))
    assert "/ 1e-09" in next(r for r in rules if r.get("record") == "slo:burn_rate:ratio_rate5m")["expr"]


def test_bad_job_selector_and_empty_manifest_are_config_errors():
    with pytest.raises(ConfigError, match="label matchers"):
        render_rules(load_manifest(EXAMPLE), job_selector="ebpf")
    with pytest.raises(ConfigError, match="no objectives"):
        render_rules([])
    assert render_rules(load_manifest(EXAMPLE), job_selector='job="a", instance=~"b.*"')


def test_rules_command_writes_stdout_or_a_file(tmp_path):
    runner = CliRunner()
    result = runner.invoke(rules_command, ["--slo", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert result.output == render_rules(load_manifest(EXAMPLE))
    target = tmp_path / "rules.yml"
    result = runner.invoke(
        rules_command,
        ["--slo", str(EXAMPLE), "--output", str(target), "--job-selector", 'job="ebpf-slo-exporter"'],
    )
    assert result.exit_code == 0 and result.output == ""
    assert 'job="ebpf-slo-exporter"' in target.read_text()


def test_rules_command_reports_a_bad_manifest_in_one_line(tmp_path):
    result = CliRunner().invoke(rules_command, ["--slo", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1
    assert "cannot read SLO file" in result.output and "Traceback" not in result.output


def test_an_objective_on_a_service_name_narrows_its_rules_and_queries() -> None:
    from exporter.slo.promql import queries

    [objective] = parse_manifest("""
kind: Objective
metadata: {labels: {name: checkout-ok, service: shop}}
spec:
  indicatorSelector: {category: availability, service_name: checkout}
  objectivePercent: 99
  window: 5m
""")
    assert 'service_name="checkout"' in sli_error_expr(objective, "5m")
    assert all('service_name="checkout"' in q for q in queries(objective))


GRPC_OBJECTIVES = """\
apiVersion: reliably.com/v1
kind: Objective
metadata: {labels: {name: greeter availability, service: greeter}}
spec:
  indicatorSelector: {category: availability, rpc_service: helloworld.Greeter, rpc_method: SayHello}
  objectivePercent: 99.9
  window: 30d
---
apiVersion: reliably.com/v1
kind: Objective
metadata: {labels: {name: greeter latency, service: greeter}}
spec:
  indicatorSelector: {category: latency, rpc_service: helloworld.Greeter, latency_target: 150ms,
                      service_name: greeter}
  objectivePercent: 99
  window: 30d
"""


def test_grpc_objectives_read_the_rpc_histogram_and_its_bad_codes():
    availability, latency = parse_manifest(GRPC_OBJECTIVES)
    narrowed = 'rpc_system="grpc", rpc_service="helloworld.Greeter", rpc_method="SayHello"'
    total = f"sum by (service_name) (rate(rpc_server_duration_seconds_count{{{narrowed}}}[5m]))"
    assert sli_error_expr(availability, "5m") == (
        f'(sum by (service_name) (rate(rpc_server_duration_seconds_count{{{narrowed}, '
        f'rpc_grpc_status_code=~"2|4|12|13|14|15|reset|missing"}}[5m])) or 0 * {total})'
        f" / ({total} > 0)"
    )
    scoped = 'rpc_system="grpc", rpc_service="helloworld.Greeter", service_name="greeter"'
    assert sli_error_expr(latency, "1h") == (
        f'1 - (sum(rate(rpc_server_duration_seconds_bucket{{{scoped}, le=~"0\\\\.15|0\\\\.150"}}[1h]))'
        f" / (sum(rate(rpc_server_duration_seconds_count{{{scoped}}}[1h])) > 0))"
    )


def test_slo_rules_as_a_prometheusrule_has_the_same_groups_and_the_given_labels(tmp_path):
    example = str(EXAMPLE)
    runner = CliRunner()
    plain = runner.invoke(rules_command, ["--slo", example])
    wrapped = runner.invoke(rules_command, ["--slo", example, "--format", "prometheusrule", "--namespace", "obs",
                                            "--label", "release=kube-prometheus-stack"])
    assert plain.exit_code == 0 and wrapped.exit_code == 0, plain.output + wrapped.output
    resource = yaml.safe_load(wrapped.output)
    assert (resource["apiVersion"], resource["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert resource["metadata"] == {
        "name": "ebpf-slo-exporter-slos", "namespace": "obs",
        "labels": {"app.kubernetes.io/name": "ebpf-slo-exporter", "release": "kube-prometheus-stack"},
    }
    assert resource["spec"]["groups"] == yaml.safe_load(plain.output)["groups"]
    assert wrapped.output.startswith("# Generated by `ebpf-slo-exporter slo rules`")


@pytest.mark.parametrize(("label", "message"), [
    ("release", "--label 'release' is not KEY=VALUE"),
    ("bad key=x", "is not a Kubernetes label"),
    ("release=-x", "is not a Kubernetes label"),
])
def test_a_malformed_label_is_one_line_naming_the_fix(label, message):
    example = str(EXAMPLE)
    result = CliRunner().invoke(rules_command, ["--slo", example, "--format", "prometheusrule", "--label", label])
    assert result.exit_code != 0
    assert message in result.output and "release=kube-prometheus-stack" in result.output
    assert "Traceback" not in result.output
