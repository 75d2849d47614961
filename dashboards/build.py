"""Writes the three Grafana dashboards in this folder from one description: `python3 dashboards/build.py`.

The JSON files are committed (Grafana imports or provisions them as they are); this script
is their source, so metric names come from exporter/metrics.py and recording-rule names
from exporter/slo/rules.py instead of being typed twice. tests/unit/test_dashboards.py
fails when a committed file differs from what this script writes.

Every dashboard has a `datasource` variable of type prometheus and no `__inputs`, so the
same file works for "Import" in the UI and for file provisioning. Panels and their targets
point at `${datasource}`.

The Reliably bridge's metrics (push outcomes, spool depth) exist only when pushing is on;
their queries end in `or on() vector(0)` so the panel shows 0 instead of "No data". Every
other query is left unguarded, so a renamed metric shows up as "No data" (and fails
tests/integration/test_ecosystem_prometheus.py) instead of a silent zero.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(HERE.parent))

from exporter.metrics import (  # noqa: E402
    HTTP_DURATION,
    HTTP_REQUEST_BODY,
    HTTP_RESPONSE_BODY,
    SELF,
)
from exporter.slo.rules import ALERT_NAME, STANDARD_WINDOWS  # noqa: E402

SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


# ---------------------------------------------------------------- building blocks


def datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
    }


def query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    """A multi-value label_values variable whose All is `.*` (so `=~"$name"` matches everything)."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "current": {},
        "hide": 0,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "options": [],
        "refresh": 2,  # on time range change
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
    }


def target(expr: str, legend: str = "__auto", ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {
        "datasource": DATASOURCE,
        "refId": ref,
        "expr": expr,
        "legendFormat": legend,
        "range": True,
        "instant": False,
        "editorMode": "code",
        **extra,
    }


def instant(expr: str, ref: str, legend: str = "__auto") -> dict[str, Any]:
    return target(expr, legend, ref, range=False, instant=True, format="table")


def timeseries(
    title: str,
    targets: list[dict[str, Any]],
    unit: str,
    description: str = "",
    stack: bool = False,
    **defaults: Any,
) -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": _refs(targets),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {
                    "drawStyle": "line",
                    "lineWidth": 1,
                    "fillOpacity": 10,
                    "showPoints": "never",
                    "spanNulls": False,
                    "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                },
                **defaults,
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(
    title: str,
    targets: list[dict[str, Any]],
    unit: str,
    description: str = "",
    thresholds: list[dict[str, Any]] | None = None,
    **defaults: Any,
) -> dict[str, Any]:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": _refs(targets),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "thresholds": {
                    "mode": "absolute",
                    "steps": thresholds or [{"color": "green", "value": None}],
                },
                **defaults,
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        },
    }


def _refs(targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for index, item in enumerate(targets):
        item["refId"] = chr(ord("A") + index)
    return targets


def layout(panels: list[tuple[dict[str, Any], int, int]]) -> list[dict[str, Any]]:
    """(panel, width, height) in reading order -> panels with ids and a flowing 24-column grid."""
    x = y = row_height = 0
    placed = []
    for index, (panel, width, height) in enumerate(panels, start=1):
        if x + width > 24:
            x, y, row_height = 0, y + row_height, 0
        panel["id"] = index
        panel["gridPos"] = {"h": height, "w": width, "x": x, "y": y}
        x += width
        row_height = max(row_height, height)
        placed.append(panel)
    return placed


def dashboard(
    uid: str,
    title: str,
    tags: list[str],
    description: str,
    variables: list[dict[str, Any]],
    panels: list[tuple[dict[str, Any], int, int]],
    time_from: str = "now-1h",
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["ebpf-slo-exporter", *tags],
        "editable": True,
        "graphTooltip": 1,
        "timezone": "browser",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "10s",
        "time": {"from": time_from, "to": "now"},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [
            {
                "title": "ebpf-slo-exporter",
                "type": "dashboards",
                "tags": ["ebpf-slo-exporter"],
                "asDropdown": True,
                "includeVars": False,
                "keepTime": True,
            }
        ],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": [datasource_variable(), *variables]},
        "panels": layout(panels),
    }


# ---------------------------------------------------------------- HTTP overview

# service_name and k8s_pod_name come from identity/; a series without them (a server not
# named) still matches the `.*` of "All", since Prometheus reads a missing label as "".
HTTP_FILTER = ('instance=~"$instance", service_name=~"$service", k8s_pod_name=~"$pod", server_port=~"$port", '
               'http_route=~"$route"')


def _http(suffix: str, extra: str = "", metric: str = HTTP_DURATION) -> str:
    matchers = HTTP_FILTER + (f", {extra}" if extra else "")
    return f"{metric}_{suffix}{{{matchers}}}"


def _p95_body(metric: str) -> str:
    bucket = _http("bucket", metric=metric)
    return f"histogram_quantile(0.95, sum by (le) (rate({bucket}[$__rate_interval])))"


def http_overview() -> dict[str, Any]:
    count, bucket = _http("count"), _http("bucket")
    errors = _http("count", 'http_response_status_code=~"5.."')
    rate_all = f"sum(rate({count}[$__rate_interval]))"
    quantiles = [
        target(
            f"histogram_quantile({q}, sum by (le) (rate({bucket}[$__rate_interval])))", f"p{round(q * 100)}"
        )
        for q in (0.5, 0.95, 0.99)
    ]
    by_route_errors = (
        f"(sum by (http_route) (rate({errors}[$__rate_interval]))"
        f" or sum by (http_route) (rate({count}[$__rate_interval])) * 0)"
        f" / (sum by (http_route) (rate({count}[$__rate_interval])) > 0)"
    )
    top_routes = [
        instant(f"topk(10, sum by (http_route) (rate({count}[$__range])))", "A"),
        instant(
            f"(sum by (http_route) (rate({errors}[$__range]))"
            f" or sum by (http_route) (rate({count}[$__range])) * 0)"
            f" / (sum by (http_route) (rate({count}[$__range])) > 0)",
            "B",
        ),
        instant(f"histogram_quantile(0.95, sum by (http_route, le) (rate({bucket}[$__range])))", "C"),
    ]
    table = {
        "type": "table",
        "title": "Top routes over the time range",
        "description": "Busiest 10 routes: request rate, 5xx ratio and p95 latency over the "
        "dashboard's range.",
        "datasource": DATASOURCE,
        "targets": _refs(top_routes),
        "transformations": [
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True},
                    "renameByName": {
                        "http_route": "Route",
                        "Value #A": "Requests/s",
                        "Value #B": "5xx ratio",
                        "Value #C": "p95 latency",
                    },
                },
            },
            {"id": "sortBy", "options": {"sort": [{"field": "Requests/s", "desc": True}]}},
        ],
        "fieldConfig": {
            "defaults": {"custom": {"align": "auto", "cellOptions": {"type": "auto"}}},
            "overrides": [
                {
                    "matcher": {"id": "byName", "options": "Requests/s"},
                    "properties": [{"id": "unit", "value": "reqps"}],
                },
                {
                    "matcher": {"id": "byName", "options": "5xx ratio"},
                    "properties": [{"id": "unit", "value": "percentunit"}],
                },
                {
                    "matcher": {"id": "byName", "options": "p95 latency"},
                    "properties": [{"id": "unit", "value": "s"}],
                },
            ],
        },
        "options": {
            "showHeader": True,
            "cellHeight": "sm",
            "footer": {"show": False, "reducer": ["sum"], "fields": ""},
        },
    }
    heatmap = {
        "type": "heatmap",
        "title": "Latency distribution",
        "description": "Requests per second in each duration bucket (the exporter's histogram, "
        "not a calculation).",
        "datasource": DATASOURCE,
        "targets": _refs(
            [target(f"sum by (le) (rate({bucket}[$__rate_interval]))", "{{le}}", format="heatmap")]
        ),
        "fieldConfig": {
            "defaults": {
                "custom": {
                    "hideFrom": {"legend": False, "tooltip": False, "viz": False},
                    "scaleDistribution": {"type": "linear"},
                }
            },
            "overrides": [],
        },
        "options": {
            "calculate": False,
            "yAxis": {"axisPlacement": "left", "unit": "s", "reverse": False},
            "rowsFrame": {"layout": "le"},
            "color": {
                "mode": "scheme",
                "scheme": "Oranges",
                "fill": "dark-orange",
                "scale": "exponential",
                "exponent": 0.5,
                "steps": 64,
                "reverse": False,
            },
            "cellGap": 1,
            "filterValues": {"le": 1e-9},
            "legend": {"show": True},
            "tooltip": {"mode": "single", "yHistogram": True, "showColorScale": False},
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
        },
    }
    variables = [
        query_variable("instance", "Instance", f"label_values({HTTP_DURATION}_count, instance)"),
        query_variable(
            "service",
            "Service",
            f'label_values({HTTP_DURATION}_count{{instance=~"$instance"}}, service_name)',
        ),
        query_variable(
            "pod",
            "Pod",
            f'label_values({HTTP_DURATION}_count{{instance=~"$instance", service_name=~"$service"}}, k8s_pod_name)',
        ),
        query_variable(
            "port",
            "Server port",
            f'label_values({HTTP_DURATION}_count{{instance=~"$instance", service_name=~"$service", '
            f'k8s_pod_name=~"$pod"}}, server_port)',
        ),
        query_variable(
            "route",
            "Route",
            f'label_values({HTTP_DURATION}_count{{instance=~"$instance", service_name=~"$service", '
            f'k8s_pod_name=~"$pod", server_port=~"$port"}}, http_route)',
        ),
    ]
    body = [
        target(_p95_body(HTTP_REQUEST_BODY), "request p95"),
        target(_p95_body(HTTP_RESPONSE_BODY), "response p95"),
    ]
    panels = [
        (stat("Requests per second", [target(rate_all, "req/s")], "reqps"), 6, 4),
        (
            stat(
                "5xx ratio",
                [target(f"(sum(rate({errors}[$__rate_interval])) or vector(0)) / ({rate_all} > 0)", "5xx")],
                "percentunit",
                thresholds=[
                    {"color": "green", "value": None},
                    {"color": "orange", "value": 0.01},
                    {"color": "red", "value": 0.05},
                ],
            ),
            6,
            4,
        ),
        (stat("p95 latency", [quantiles[1] | {"legendFormat": "p95"}], "s"), 6, 4),
        (
            stat(
                "Active routes",
                [
                    target(
                        f"count(count by (http_route) (rate({count}[$__rate_interval]) > 0)) "
                        f"or on() vector(0)",
                        "routes",
                    )
                ],
                "none",
                description="Routes that saw at least one request in the last rate interval.",
            ),
            6,
            4,
        ),
        (
            timeseries(
                "Request rate by route and status",
                [
                    target(
                        f"sum by (http_route, http_response_status_code) (rate({count}[$__rate_interval]))",
                        "{{http_route}} {{http_response_status_code}}",
                    )
                ],
                "reqps",
                stack=True,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "5xx ratio by route", [target(by_route_errors, "{{http_route}}")], "percentunit", min=0
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Latency p50 / p95 / p99",
                quantiles,
                "s",
                description="histogram_quantile over sum by (le): interpolated inside a bucket, "
                "so a quantile is only as exact as the bucket bounds around it.",
            ),
            12,
            8,
        ),
        (heatmap, 12, 8),
        (table, 16, 8),
        (timeseries("Body size p95", body, "bytes"), 8, 8),
    ]
    return dashboard(
        "ebpf-slo-http",
        "HTTP overview (eBPF)",
        ["http", "red"],
        "Rate, errors and duration of HTTP traffic seen on the wire by ebpf-slo-exporter.",
        variables,
        panels,
    )


# ---------------------------------------------------------------- SLO

SLO_FILTER = 'service=~"$service", slo=~"$slo"'
ALERTS_FIRING = f'ALERTS{{alertname="{ALERT_NAME}", alertstate="firing", {SLO_FILTER}}}'


def slo_dashboard() -> dict[str, Any]:
    variables = [
        query_variable("service", "Service", "label_values(slo:objective:ratio, service)"),
        query_variable("slo", "SLO", 'label_values(slo:objective:ratio{service=~"$service"}, slo)'),
    ]
    burn_targets = [
        target(f"slo:burn_rate:ratio_rate{w}{{{SLO_FILTER}}}", f"{{{{slo}}}} {w}") for w in STANDARD_WINDOWS
    ]
    alert_table = {
        "type": "table",
        "title": "Burn-rate alerts firing",
        "description": f"{ALERT_NAME} alerts from the generated rules that are firing now. "
        "Empty when all is well.",
        "datasource": DATASOURCE,
        "targets": _refs([instant(ALERTS_FIRING, "A")]),
        "transformations": [
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True, "Value": True, "__name__": True, "alertstate": True},
                    "renameByName": {},
                },
            }
        ],
        "fieldConfig": {
            "defaults": {"custom": {"align": "auto", "cellOptions": {"type": "auto"}}},
            "overrides": [],
        },
        "options": {
            "showHeader": True,
            "cellHeight": "sm",
            "footer": {"show": False, "reducer": ["sum"], "fields": ""},
        },
    }
    panels = [
        (
            stat(
                "SLI over the SLO period",
                [target(f"1 - slo:sli_error:ratio_period{{{SLO_FILTER}}}", "{{slo}}")],
                "percentunit",
                description="Share of good events over each objective's own period (its window).",
                decimals=3,
            ),
            8,
            5,
        ),
        (
            stat(
                "Error budget remaining",
                [target(f"slo:error_budget_remaining:ratio{{{SLO_FILTER}}}", "{{slo}}")],
                "percentunit",
                description="1 - errors / budget over the period. Below 0: the objective is missed.",
                thresholds=[
                    {"color": "red", "value": None},
                    {"color": "orange", "value": 0},
                    {"color": "green", "value": 0.25},
                ],
                decimals=1,
            ),
            8,
            5,
        ),
        (
            stat(
                "Alerts firing",
                [target(f"count({ALERTS_FIRING}) or on() vector(0)", "firing")],
                "none",
                thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 1}],
            ),
            8,
            5,
        ),
        (
            timeseries(
                "SLI vs objective",
                [
                    target(f"1 - slo:sli_error:ratio_period{{{SLO_FILTER}}}", "{{slo}} SLI ({{window}})"),
                    target(f"slo:objective:ratio{{{SLO_FILTER}}}", "{{slo}} objective"),
                ],
                "percentunit",
                description="Dips in the SLI below the objective line are spent budget.",
            ),
            12,
            9,
        ),
        (
            timeseries(
                "Error budget remaining",
                [target(f"slo:error_budget_remaining:ratio{{{SLO_FILTER}}}", "{{slo}}")],
                "percentunit",
            ),
            12,
            9,
        ),
        (
            timeseries(
                "Burn rate by window",
                burn_targets,
                "none",
                description="Error ratio over each window divided by the budget. 1 spends exactly the "
                "budget over the period; the alerts page at 14.4 (1h and 5m) and 6 (6h and 30m) "
                "on a 30d period.",
            ),
            16,
            9,
        ),
        (
            timeseries(
                "SLI error ratio, 5m",
                [target(f"slo:sli_error:ratio_rate5m{{{SLO_FILTER}}}", "{{slo}}")],
                "percentunit",
            ),
            8,
            9,
        ),
        (alert_table, 24, 6),
    ]
    return dashboard(
        "ebpf-slo-slo",
        "SLOs (eBPF)",
        ["slo"],
        "Objectives from the Reliably manifest, through the rules of `ebpf-slo-exporter slo rules`.",
        variables,
        panels,
        time_from="now-6h",
    )


# ---------------------------------------------------------------- exporter health

INSTANCE = 'instance=~"$instance"'


def _self(name: str) -> str:
    return f"{SELF}_{name}{{{INSTANCE}}}"


def _rate(name: str, by: str = "instance") -> str:
    return f"sum by ({by}) (rate({_self(name)}[$__rate_interval]))"


def exporter_health() -> dict[str, Any]:
    variables = [
        query_variable("instance", "Instance", f"label_values({SELF}_packets_received_total, instance)")
    ]
    attached = f"max by (instance) ({_self('filter_attached')})"
    panels = [
        (
            stat(
                "Socket filter attached",
                [target(attached, "{{instance}}")],
                "bool_yes_no",
                thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}],
            ),
            6,
            4,
        ),
        (
            stat(
                "Packets/s",
                [target(f"sum(rate({_self('packets_received_total')}[$__rate_interval]))", "packets/s")],
                "pps",
            ),
            6,
            4,
        ),
        (
            stat(
                "Kernel drops/s",
                [target(f"sum(rate({_self('kernel_drops_total')}[$__rate_interval]))", "drops/s")],
                "pps",
                thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 0.001}],
            ),
            6,
            4,
        ),
        (stat("Active flows", [target(f"sum({_self('flows_active')})", "flows")], "none"), 6, 4),
        (
            timeseries(
                "Packets received and dropped in the kernel",
                [
                    target(_rate("packets_received_total"), "{{instance}} received"),
                    target(_rate("kernel_drops_total"), "{{instance}} dropped"),
                ],
                "pps",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Parse errors by reason",
                [target(_rate("parse_errors_total", "reason"), "{{reason}}")],
                "ops",
                description="Bytes the HTTP parser could not make sense of, by reason.",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Unpaired messages",
                [
                    target(_rate("unmatched_responses_total"), "{{instance}} responses without a request"),
                    target(
                        _rate("requests_without_response_total"), "{{instance}} requests without a response"
                    ),
                ],
                "ops",
                description="Responses whose request was not seen (connection opened before the exporter) "
                "and requests that never got an answer before their flow ended.",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Flows",
                [
                    target(f"sum by (instance) ({_self('flows_active')})", "{{instance}} active"),
                    target(_rate("flows_evicted_total", "reason"), "evicted/s: {{reason}}"),
                ],
                "short",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Kernel filter verdicts",
                [
                    target(
                        f"sum by (verdict) (rate({_self('filter_packets_total')}[$__rate_interval]))",
                        "{{verdict}}",
                    )
                ],
                "pps",
                description="What the socket filter did with each packet: most should die in the kernel "
                "(other ports, no payload, loopback duplicates); only `kept` reaches user space.",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "HTTP exchanges rebuilt",
                [target(_rate("exchanges_total"), "{{instance}}")],
                "ops",
                description="Request/response pairs the exporter reassembled and counted.",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Route cardinality overflow",
                [target(_rate("route_overflow_total"), "{{instance}}")],
                "ops",
                description="Requests folded into the overflow route because the route cap was reached.",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Reliably pushes by outcome",
                [target(f"{_rate('slo_push_total', 'outcome')} or on() vector(0)", "{{outcome}}")],
                "ops",
                description="Indicator pushes to Reliably. Zero when the bridge is not configured.",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Spooled indicators",
                [
                    target(
                        f"sum by (instance) ({_self('slo_spool_indicators')}) or on() vector(0)",
                        "{{instance}}",
                    )
                ],
                "none",
                description="Indicators waiting for the Reliably endpoint. Growing: pushes are failing.",
            ),
            8,
            8,
        ),
    ]
    return dashboard(
        "ebpf-slo-health",
        "ebpf-slo-exporter health",
        ["health"],
        "Is the exporter seeing everything? Kernel drops, parser errors, unpaired messages, caps.",
        variables,
        panels,
    )


DASHBOARDS = {
    "http-overview.json": http_overview,
    "slo.json": slo_dashboard,
    "exporter-health.json": exporter_health,
}


def render(name: str) -> str:
    return json.dumps(DASHBOARDS[name](), indent=2) + "\n"


def main() -> None:
    for name in DASHBOARDS:
        (HERE / name).write_text(render(name), encoding="utf-8")
        print(f"wrote dashboards/{name}")


if __name__ == "__main__":
    main()
