"""Generated rules through the real promtool: `check rules`, then `test rules` with synthetic series.

The alert scenarios use the availability objective of tests/fixtures/rules/rich.yaml
(99.9 % over 30d: budget 0.001, factors 14.4 / 6 / 3 / 1). Traffic is 1000 requests a
minute for 6h, so every window from 6h up has seen the same steady error ratio; a steady
burn rate b then fires exactly the alerts whose factor is below b. promtool compares the
alerts' labels and annotations exactly, so the expected annotations come from the rendered
rule with `$value` filled in.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.slo.manifest import load_manifest
from exporter.slo.rules import ALERT_NAME, render_rules

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "reliably.yaml"
RICH = ROOT / "tests" / "fixtures" / "rules" / "rich.yaml"
COMMITTED = ROOT / "docker" / "prometheus" / "rules" / "slo.rules.yml"

AVAILABILITY = 'http_server_request_duration_seconds_count{http_route="/api", server_port="8080"'
LONG = {"1h": "5m", "6h": "30m", "1d": "2h", "3d": "6h"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: `make setup` installs Debian's prometheus package")
    return path


def _run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("manifest", [EXAMPLE, RICH], ids=["example", "rich"])
def test_promtool_check_rules_accepts_the_generated_file(promtool, tmp_path, manifest):
    rules = tmp_path / "slo.rules.yml"
    rules.write_text(render_rules(load_manifest(manifest), job_selector='job="ebpf-slo-exporter"'))
    result = _run([promtool, "check", "rules", str(rules)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_committed_compose_rule_file_is_a_fresh_render_and_valid(promtool):
    assert COMMITTED.read_text() == render_rules(load_manifest(EXAMPLE)), (
        "docker/prometheus/rules/slo.rules.yml is stale: regenerate it with "
        "`ebpf-slo-exporter slo rules --slo examples/reliably.yaml "
        "--output docker/prometheus/rules/slo.rules.yml`"
    )
    result = _run([promtool, "check", "rules", str(COMMITTED)])
    assert result.returncode == 0, result.stdout + result.stderr


def _steady(ok_per_min: float, errors_per_min: float, minutes: int = 360) -> list[dict[str, str]]:
    return [
        {
            "series": AVAILABILITY + ', http_response_status_code="200"}',
            "values": f"0+{ok_per_min}x{minutes}",
        },
        {
            "series": AVAILABILITY + ', http_response_status_code="503"}',
            "values": f"0+{errors_per_min}x{minutes}",
        },
    ]


def _expected_alerts(rules_text: str, firing: dict[str, float]) -> list[dict[str, Any]]:
    """The alerts promtool must report: long window -> burn rate shown in the description."""
    alerts = {
        r["labels"]["long_window"]: r
        for g in yaml.safe_load(rules_text)["groups"]
        for r in g["rules"]
        if r.get("alert") == ALERT_NAME and r["labels"]["slo"] == "shop_api_availability"
    }
    expected = []
    for long_window, burn in firing.items():
        rule = alerts[long_window]
        description = rule["annotations"]["description"].replace(
            '{{ $value | printf "%.2f" }}', f"{burn:.2f}"
        )
        expected.append(
            {
                "exp_labels": dict(rule["labels"]),
                "exp_annotations": {**rule["annotations"], "description": description},
            }
        )
    return expected


def _approx(expr: str, labels: str, value: float, eval_time: str) -> dict[str, Any]:
    """promtool compares floats exactly; compare the value in units of 1e-4 instead."""
    return {
        "expr": f"round(({expr}) * 10000)",
        "eval_time": eval_time,
        "exp_samples": [{"labels": labels, "value": round(value * 10000)}],
    }


def _write_test(tmp_path: Path, tests: list[dict[str, Any]]) -> Path:
    rules = tmp_path / "slo.rules.yml"
    rules.write_text(render_rules(load_manifest(RICH)))
    spec = {"rule_files": [rules.name], "evaluation_interval": "1m", "tests": tests}
    path = tmp_path / "slo.test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False, width=1000))
    return path


def _promtool_test(promtool: str, path: Path) -> None:
    result = _run([promtool, "test", "rules", path.name], cwd=path.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# (errors per 1000 requests, burn rate, long windows of the alerts that fire)
STEADY = [
    pytest.param(20, 20.0, ["1h", "6h", "1d", "3d"], id="burn-20-fires-all-four"),
    pytest.param(8, 8.0, ["6h", "1d", "3d"], id="burn-8-page-1h-does-not-fire"),
    pytest.param(4, 4.0, ["1d", "3d"], id="burn-4-no-page"),
    pytest.param(2, 2.0, ["3d"], id="burn-2-only-the-slow-ticket"),
    pytest.param(0.5, 0.5, [], id="burn-0.5-within-budget-nothing-fires"),
]


@pytest.mark.parametrize(("errors", "burn", "firing"), STEADY)
def test_steady_burn_rate_fires_exactly_the_alerts_whose_factor_it_exceeds(
    promtool, tmp_path, errors, burn, firing
):
    rules_text = render_rules(load_manifest(RICH))
    test = {
        "interval": "1m",
        "input_series": _steady(1000 - errors, errors),
        "alert_rule_test": [
            {
                "eval_time": "6h",
                "alertname": ALERT_NAME,
                "exp_alerts": _expected_alerts(rules_text, {w: burn for w in firing}),
            }
        ],
        "promql_expr_test": [
            _approx(
                'slo:burn_rate:ratio_rate1h{slo="shop_api_availability"}',
                '{slo="shop_api_availability", service="shop", category="availability"}',
                burn,
                "6h",
            )
        ],
    }
    _promtool_test(promtool, _write_test(tmp_path, [test]))


def _counter(per_minute: list[float]) -> str:
    """promtool values for a counter that grows by per_minute[i] during minute i, starting at 0."""
    values, total = ["0"], 0.0
    for increment in per_minute:
        total += increment
        values.append(f"{total:g}")
    return " ".join(values)


def test_short_window_stops_a_page_once_the_burst_is_over(promtool, tmp_path):
    """6h clean at 1000 requests a minute, then 5 minutes with 300 errors a minute, then clean.

    At the end of the burst the 1h page fires (1h burn 1500/60000/0.001 = 25, 5m burn 300)
    but the 6h page does not (6h burn 1500/360000/0.001 = 4.17 < 6). Ten minutes later the
    1h window is still over 14.4 but the 5m window is clean, so the page resolves: the short
    window is what stops stale pages. The tickets fire on the same burst because this
    history is only about 6h long (so the 1d and 3d windows hold the burst in ~6h of traffic).
    """
    bad = [0.0] * 360 + [300.0] * 5 + [0.0] * 15
    ok = [1000.0 - b for b in bad]
    rules_text = render_rules(load_manifest(RICH))
    burst_end = {"1h": 1500 / 60_000 / 0.001, "1d": 1500 / 365_000 / 0.001, "3d": 1500 / 365_000 / 0.001}
    later = {"1d": 1500 / 375_000 / 0.001, "3d": 1500 / 375_000 / 0.001}
    test = {
        "interval": "1m",
        "input_series": [
            {"series": AVAILABILITY + ', http_response_status_code="200"}', "values": _counter(ok)},
            {"series": AVAILABILITY + ', http_response_status_code="500"}', "values": _counter(bad)},
        ],
        "alert_rule_test": [
            {
                "eval_time": "6h5m",
                "alertname": ALERT_NAME,
                "exp_alerts": _expected_alerts(rules_text, burst_end),
            },
            {
                "eval_time": "6h15m",
                "alertname": ALERT_NAME,
                "exp_alerts": _expected_alerts(rules_text, later),
            },
        ],
    }
    _promtool_test(promtool, _write_test(tmp_path, [test]))


def test_no_traffic_records_no_nan_and_fires_nothing(promtool, tmp_path):
    """Two kinds of silence: series that never existed, and counters that stopped moving."""
    empty_records = [
        f'slo:{kind}{{slo="{slo}"}}'
        for slo in ("shop_api_availability", "shop_api_latency_under_1s", "shop_checkout_jobs_succeed")
        for kind in (
            "sli_error:ratio_rate5m",
            "sli_error:ratio_rate1h",
            "sli_error:ratio_rate3d",
            "burn_rate:ratio_rate5m",
            "burn_rate:ratio_rate1h",
            "error_budget_remaining:ratio",
            "sli_error:ratio_period",
        )
    ]

    def case(series: list[dict[str, str]]) -> dict[str, Any]:
        return {
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [{"eval_time": "2h", "alertname": ALERT_NAME, "exp_alerts": []}],
            "promql_expr_test": [
                *({"expr": expr, "eval_time": "2h", "exp_samples": []} for expr in empty_records),
                # Only the constant objective and budget of each objective are recorded: no NaN anywhere.
                {
                    "expr": 'count({__name__=~"slo:.+"})',
                    "eval_time": "2h",
                    "exp_samples": [{"labels": "{}", "value": 6}],
                },
                _approx(
                    'slo:objective:ratio{slo="shop_api_availability"}',
                    '{slo="shop_api_availability", service="shop", category="availability", window="30d"}',
                    0.999,
                    "2h",
                ),
            ],
        }

    flat = [
        {"series": AVAILABILITY + ', http_response_status_code="200"}', "values": "500+0x120"},
        {"series": AVAILABILITY + ', http_response_status_code="500"}', "values": "20+0x120"},
        {
            "series": "http_server_request_duration_seconds_bucket"
            '{http_route="/api", server_port="8080", le="1.0"}',
            "values": "400+0x120",
        },
        {"series": 'checkout_jobs_total{outcome="success"}', "values": "10+0x120"},
    ]
    # A placeholder series: promtool needs at least one input series per test.
    nothing = [{"series": 'unrelated_metric{job="x"}', "values": "1+0x120"}]
    _promtool_test(promtool, _write_test(tmp_path, [case(nothing), case(flat)]))


def test_traffic_that_stops_leaves_short_windows_empty_and_long_ones_intact(promtool, tmp_path):
    ok = "0+980x120 117600+0x30"
    bad = "0+20x120 2400+0x30"
    test = {
        "interval": "1m",
        "input_series": [
            {"series": AVAILABILITY + ', http_response_status_code="200"}', "values": ok},
            {"series": AVAILABILITY + ', http_response_status_code="500"}', "values": bad},
        ],
        "promql_expr_test": [
            {
                "expr": 'slo:sli_error:ratio_rate5m{slo="shop_api_availability"}',
                "eval_time": "2h20m",
                "exp_samples": [],
            },
            _approx(
                'slo:sli_error:ratio_rate1d{slo="shop_api_availability"}',
                '{slo="shop_api_availability", service="shop", category="availability"}',
                0.02,
                "2h20m",
            ),
        ],
        # 1h burn is 20 but the 5m window has no traffic: the page stays quiet.
        "alert_rule_test": [
            {
                "eval_time": "2h20m",
                "alertname": ALERT_NAME,
                "exp_alerts": _expected_alerts(
                    render_rules(load_manifest(RICH)), {"6h": 20.0, "1d": 20.0, "3d": 20.0}
                ),
            }
        ],
    }
    _promtool_test(promtool, _write_test(tmp_path, [test]))


def test_latency_counts_both_le_spellings_and_promql_objective_records_its_ratio(promtool, tmp_path):
    """One latency series spelled the Prometheus 2 way (le="1"), one the Prometheus 3 way (le="1.0")."""
    base = (
        'http_server_request_duration_seconds_{kind}{{http_route="/api", server_port="8080", '
        'http_request_method="{method}"{le}}}'
    )
    series = [
        {"series": base.format(kind="bucket", method="GET", le=', le="1"'), "values": "0+95x60"},
        {"series": base.format(kind="count", method="GET", le=""), "values": "0+100x60"},
        {"series": base.format(kind="bucket", method="POST", le=', le="1.0"'), "values": "0+99x60"},
        {"series": base.format(kind="count", method="POST", le=""), "values": "0+100x60"},
        {"series": 'checkout_jobs_total{outcome="success"}', "values": "0+90x60"},
        {"series": 'checkout_jobs_total{outcome="failure"}', "values": "0+10x60"},
    ]
    test = {
        "interval": "1m",
        "input_series": series,
        "promql_expr_test": [
            _approx(
                'slo:sli_error:ratio_rate30m{slo="shop_api_latency_under_1s"}',
                '{slo="shop_api_latency_under_1s", service="shop", category="latency"}',
                0.03,
                "1h",
            ),
            _approx(
                'slo:burn_rate:ratio_rate1h{slo="shop_checkout_jobs_succeed"}',
                '{slo="shop_checkout_jobs_succeed", service="shop", category="jobs"}',
                2,
                "1h",
            ),
            _approx(
                'slo:error_budget_remaining:ratio{slo="shop_checkout_jobs_succeed"}',
                '{slo="shop_checkout_jobs_succeed", service="shop", category="jobs", window="1w"}',
                -1,
                "1h",
            ),
        ],
    }
    _promtool_test(promtool, _write_test(tmp_path, [test]))


def test_two_services_on_one_route_get_their_own_sli_and_page(promtool, tmp_path):
    """Two pods of different services answer on the same port and route (node-wide capture):
    the rules keep them apart by service_name, so the failing one pages and the healthy one
    reads 0, instead of one blended ratio that hides the outage."""
    def service(name: str, ok: float, errors: float) -> list[dict[str, str]]:
        series = AVAILABILITY + f', service_name="{name}"'
        return [{"series": series + ', http_response_status_code="200"}', "values": f"0+{ok}x360"},
                {"series": series + ', http_response_status_code="503"}', "values": f"0+{errors}x360"}]

    labels = 'slo="shop_api_availability", service="shop", category="availability"'
    test = {
        "interval": "1m",
        "input_series": service("cart", 980, 20) + service("search", 1000, 0),
        "promql_expr_test": [
            _approx(f'slo:burn_rate:ratio_rate1h{{{labels}, service_name="cart"}}',
                    f'{{{labels}, service_name="cart"}}', 20.0, "6h"),
            _approx(f'slo:burn_rate:ratio_rate1h{{{labels}, service_name="search"}}',
                    f'{{{labels}, service_name="search"}}', 0.0, "6h"),
            {"expr": f'count(ALERTS{{alertname="{ALERT_NAME}", alertstate="firing", service_name="cart"}})',
             "eval_time": "6h", "exp_samples": [{"labels": "{}", "value": 4}]},
            {"expr": f'ALERTS{{alertname="{ALERT_NAME}", service_name="search"}}', "eval_time": "6h",
             "exp_samples": []},
        ],
    }
    _promtool_test(promtool, _write_test(tmp_path, [test]))


EXPORTER_RULES = ROOT / "docker" / "prometheus" / "rules" / "exporter.rules.yml"


def test_exporter_losing_data_alert_fires_after_five_minutes_of_degraded(promtool, tmp_path):
    assert _run([promtool, "check", "rules", str(EXPORTER_RULES)]).returncode == 0
    shutil.copy(EXPORTER_RULES, tmp_path / "exporter.rules.yml")
    degraded = 'ebpf_slo_exporter_degraded{instance="node-a:9640", reason="%s"}'
    expected = {
        "exp_labels": {"instance": "node-a:9640", "reason": "kernel_drops", "severity": "warning"},
        "exp_annotations": {
            "summary": "ebpf-slo-exporter on node-a:9640 is losing data: kernel_drops",
            "description": "For 5 minutes the exporter has kept losing data (kernel_drops): its HTTP metrics "
            "and SLIs undercount by what that loss counter shows. /healthz on the exporter says how much was "
            "lost in its window; the README's /healthz section names each reason's counter.",
        },
    }
    tests = {
        "rule_files": ["exporter.rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": degraded % "kernel_drops", "values": "0x5 1x10"},  # degraded from minute 6
                {"series": degraded % "tls_events_lost", "values": "0x15"},
            ],
            "alert_rule_test": [
                {"eval_time": "9m", "alertname": "EbpfSloExporterLosingData", "exp_alerts": []},  # pending
                {"eval_time": "12m", "alertname": "EbpfSloExporterLosingData", "exp_alerts": [expected]},
            ],
        }],
    }
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    result = _run([promtool, "test", "rules", "tests.yml"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
