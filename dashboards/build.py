"""Writes the three Grafana dashboards in this folder: `python3 dashboards/build.py`.

The dashboards are built with grafana-foundation-sdk, Grafana Labs' typed builders, so a
misspelt option or a panel field of the wrong type fails here, not silently in Grafana.
The JSON files are committed (Grafana imports or provisions them as they are); this script
is their source. Metric names come from exporter/metrics.py, recording-rule names from
exporter/slo/rules.py, and label matchers, quoting and status regexes from
exporter/slo/query.py (the builder the bridge and `slo rules` use), instead of being typed
twice. tests/unit/test_dashboards.py fails when a committed file differs from what this
script writes, and decodes every file back through the SDK's models.

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
from collections.abc import Callable, Sequence
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import heatmap as heatmap_builders
from grafana_foundation_sdk.builders import prometheus as prometheus_builders
from grafana_foundation_sdk.builders import stat as stat_builders
from grafana_foundation_sdk.builders import table as table_builders
from grafana_foundation_sdk.builders import timeseries as timeseries_builders
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dashboard_models
from grafana_foundation_sdk.models import heatmap as heatmap_models
from grafana_foundation_sdk.models import prometheus as prometheus_models

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(HERE.parent))

from exporter.metrics import (  # noqa: E402
    HTTP_DURATION,
    HTTP_REQUEST_BODY,
    HTTP_RESPONSE_BODY,
    RPC_DURATION,
    SELF,
    SELF_DEGRADED,
    SELF_EXCHANGES_TOTAL,
    SELF_FILTER_ATTACHED,
    SELF_FILTER_PACKETS_TOTAL,
    SELF_FLOWS_ACTIVE,
    SELF_FLOWS_EVICTED_TOTAL,
    SELF_KERNEL_DROPS_TOTAL,
    SELF_PACKETS_RECEIVED_TOTAL,
    SELF_PARSE_ERRORS_TOTAL,
    SELF_REQUESTS_WITHOUT_RESPONSE_TOTAL,
    SELF_ROUTE_OVERFLOW_TOTAL,
    SELF_SLO_PUSH_TOTAL,
    SELF_SLO_SPOOL_INDICATORS,
    SELF_UNMATCHED_RESPONSES_TOTAL,
)
from exporter.slo.query import (  # noqa: E402
    grpc_server_error_regex,
    quote,
    selector,
    status_classes_regex,
)
from exporter.slo.rules import ALERT_NAME, STANDARD_WINDOWS  # noqa: E402

# The SDK's models default to schemaVersion 36; the panels it writes are the current
# shapes, so say so and spare Grafana migrations written for older JSON.
SCHEMA_VERSION = 39
DATASOURCE = dashboard_models.DataSourceRef(type_val="prometheus", uid="${datasource}")
TAG = "ebpf-slo-exporter"

Query = prometheus_builders.Dataquery
Panel = (
    timeseries_builders.Panel | stat_builders.Panel | table_builders.Panel | heatmap_builders.Panel
)


# ---------------------------------------------------------------- building blocks


def match(label: str, variable: str) -> str:
    """A regex matcher on a multi-value variable (its All is `.*`)."""
    return f"{label}=~{quote('$' + variable)}"


def datasource_variable() -> dashboard_builders.DatasourceVariable:
    return dashboard_builders.DatasourceVariable("datasource").label("Data source").type("prometheus")


def query_variable(name: str, label: str, query: str) -> dashboard_builders.QueryVariable:
    """A multi-value label_values variable whose All is `.*` (so `=~"$name"` matches everything)."""
    return (
        dashboard_builders.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .include_all(True)
        .all_value(".*")
        .multi(True)
        .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard_models.VariableSort.ALPHABETICAL_ASC)
    )


def target(expr: str, legend: str = "__auto") -> Query:
    return (
        Query()
        .datasource(DATASOURCE)
        .expr(expr)
        .legend_format(legend)
        .range()
        .editor_mode(prometheus_models.QueryEditorMode.CODE)
    )


def instant(expr: str, legend: str = "__auto") -> Query:
    return (
        Query()
        .datasource(DATASOURCE)
        .expr(expr)
        .legend_format(legend)
        .instant()
        .format(prometheus_models.PromQueryFormat.TABLE)
        .editor_mode(prometheus_models.QueryEditorMode.CODE)
    )


def _with_targets(panel: Panel, targets: Sequence[Query]) -> None:
    for index, item in enumerate(targets):
        panel.with_target(item.ref_id(chr(ord("A") + index)))


def thresholds(*steps: tuple[str, float | None]) -> dashboard_builders.ThresholdsConfig:
    return (
        dashboard_builders.ThresholdsConfig()
        .mode(dashboard_models.ThresholdsMode.ABSOLUTE)
        .steps([dashboard_models.Threshold(value=value, color=color) for color, value in steps])
    )


def timeseries(
    title: str,
    targets: Sequence[Query],
    unit: str,
    description: str = "",
    stack: bool = False,
    minimum: float | None = None,
) -> timeseries_builders.Panel:
    panel = (
        timeseries_builders.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .draw_style(common_models.GraphDrawStyle.LINE)
        .line_width(1)
        .fill_opacity(10)
        .show_points(common_models.VisibilityMode.NEVER)
        .span_nulls(False)
        .stacking(
            common_builders.StackingConfig()
            .mode(common_models.StackingMode.NORMAL if stack else common_models.StackingMode.NONE)
            .group("A")
        )
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common_models.LegendDisplayMode.LIST)
            .placement(common_models.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs([])
        )
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(common_models.TooltipDisplayMode.MULTI)
            .sort(common_models.SortOrder.DESCENDING)
        )
    )
    if minimum is not None:
        panel.min(minimum)
    _with_targets(panel, targets)
    return panel


def stat(
    title: str,
    targets: Sequence[Query],
    unit: str,
    description: str = "",
    steps: Sequence[tuple[str, float | None]] = (("green", None),),
    decimals: float | None = None,
) -> stat_builders.Panel:
    panel = (
        stat_builders.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .thresholds(thresholds(*steps))
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
        .color_mode(common_models.BigValueColorMode.VALUE)
        .graph_mode(common_models.BigValueGraphMode.AREA)
        .justify_mode(common_models.BigValueJustifyMode.AUTO)
        .orientation(common_models.VizOrientation.AUTO)
        .text_mode(common_models.BigValueTextMode.AUTO)
    )
    if decimals is not None:
        panel.decimals(decimals)
    _with_targets(panel, targets)
    return panel


def table(title: str, description: str, targets: Sequence[Query]) -> table_builders.Panel:
    panel = (
        table_builders.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .show_header(True)
        .cell_height(common_models.TableCellHeight.SM)
        .footer(common_builders.TableFooterOptions().show(False).reducer(["sum"]).fields([]))
    )
    _with_targets(panel, targets)
    return panel


def transformation(kind: str, options: dict[str, object]) -> dashboard_models.DataTransformerConfig:
    return dashboard_models.DataTransformerConfig(id_val=kind, options=options)


def unit_by_name(field: str, unit: str) -> tuple[str, list[dashboard_models.DynamicConfigValue]]:
    return field, [dashboard_models.DynamicConfigValue(id_val="unit", value=unit)]


Placed = tuple[Panel, int, int]  # (panel, width, height) in reading order


def dashboard(
    uid: str,
    title: str,
    tags: list[str],
    description: str,
    variables: Sequence[dashboard_builders.QueryVariable],
    sections: Sequence[tuple[str | None, Sequence[Placed]]],
    time_from: str = "now-1h",
) -> dashboard_models.Dashboard:
    """Panels flow over the 24-column grid in reading order; a named section starts a row.

    An empty annotation list: Grafana adds its built-in "Annotations & Alerts" to every
    dashboard (the SDK's model has no `builtIn` flag to write it the way Grafana does)."""
    board = (
        dashboard_builders.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG, *tags])
        .editable()
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .timezone("browser")
        .version(1)
        .refresh("10s")
        .time(time_from, "now")
        .fiscal_year_start_month(0)
        .live_now(False)
        .week_start("")
        .link(
            dashboard_builders.DashboardLink(TAG)
            .type(dashboard_models.DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(True)
            .include_vars(False)
            .keep_time(True)
        )
        .annotations([])
        .with_variable(datasource_variable())
    )
    for variable in variables:
        board.with_variable(variable)
    panel_id = 0
    for row_title, placed in sections:
        if row_title is not None:
            panel_id += 1
            board.with_row(dashboard_builders.Row(row_title).id(panel_id))
        for panel, width, height in placed:
            panel_id += 1
            board.with_panel(panel.id(panel_id).span(width).height(height))
    built = board.build()
    built.schema_version = SCHEMA_VERSION
    return built


# ---------------------------------------------------------------- HTTP overview

# service_name and k8s_pod_name come from identity/; a series without them (a server not
# named) still matches the `.*` of "All", since Prometheus reads a missing label as "".
HTTP_FILTER = [
    match("instance", "instance"),
    match("service_name", "service"),
    match("k8s_pod_name", "pod"),
    match("server_port", "port"),
    match("http_route", "route"),
    match("url_scheme", "scheme"),
    match("network_protocol_version", "protocol"),
]
ERRORS_5XX = f"http_response_status_code=~{quote(status_classes_regex(['5xx']))}"


def _http(suffix: str, extra: str = "", metric: str = HTTP_DURATION) -> str:
    return f"{metric}_{suffix}{selector([*HTTP_FILTER, *([extra] if extra else [])])}"


def _p95_body(metric: str) -> str:
    bucket = _http("bucket", metric=metric)
    return f"histogram_quantile(0.95, sum by (le) (rate({bucket}[$__rate_interval])))"


def _latency_heatmap(bucket: str) -> heatmap_builders.Panel:
    panel = (
        heatmap_builders.Panel()
        .title("Latency distribution")
        .description(
            "Requests per second in each duration bucket (the exporter's histogram, not a calculation)."
        )
        .datasource(DATASOURCE)
        .hide_from(common_builders.HideSeriesConfig().legend(False).tooltip(False).viz(False))
        .scale_distribution(common_builders.ScaleDistributionConfig().type(common_models.ScaleDistribution.LINEAR))
        .calculate(False)
        .y_axis(
            heatmap_builders.YAxisConfig()
            .axis_placement(common_models.AxisPlacement.LEFT)
            .unit("s")
            .reverse(False)
        )
        .rows_frame(heatmap_builders.RowsHeatmapOptions().layout(common_models.HeatmapCellLayout.LE))
        .color(
            heatmap_builders.HeatmapColorOptions()
            .mode(heatmap_models.HeatmapColorMode.SCHEME)
            .scheme("Oranges")
            .fill("dark-orange")
            .scale(heatmap_models.HeatmapColorScale.EXPONENTIAL)
            .exponent(0.5)
            .steps(64)
            .reverse(False)
        )
        .cell_gap(1)
        .filter_values(heatmap_builders.FilterValueRange().le(1e-9))
        .show_legend()
        .show_tooltip()
        .show_y_histogram()
        .exemplars_color("rgba(255,0,255,0.7)")
    )
    _with_targets(
        panel,
        [target(f"sum by (le) (rate({bucket}[$__rate_interval]))", "{{le}}").format(
            prometheus_models.PromQueryFormat.HEATMAP
        )],
    )
    return panel


def _top_routes(count: str, errors: str, bucket: str) -> table_builders.Panel:
    panel = table(
        "Top routes over the time range",
        "Busiest 10 routes: request rate, 5xx ratio and p95 latency over the dashboard's range.",
        [
            instant(f"topk(10, sum by (http_route) (rate({count}[$__range])))"),
            instant(
                f"(sum by (http_route) (rate({errors}[$__range]))"
                f" or sum by (http_route) (rate({count}[$__range])) * 0)"
                f" / (sum by (http_route) (rate({count}[$__range])) > 0)"
            ),
            instant(f"histogram_quantile(0.95, sum by (http_route, le) (rate({bucket}[$__range])))"),
        ],
    )
    panel.with_transformation(transformation("merge", {}))
    panel.with_transformation(
        transformation(
            "organize",
            {
                "excludeByName": {"Time": True},
                "renameByName": {
                    "http_route": "Route",
                    "Value #A": "Requests/s",
                    "Value #B": "5xx ratio",
                    "Value #C": "p95 latency",
                },
            },
        )
    )
    panel.with_transformation(transformation("sortBy", {"sort": [{"field": "Requests/s", "desc": True}]}))
    for name, unit in (("Requests/s", "reqps"), ("5xx ratio", "percentunit"), ("p95 latency", "s")):
        panel.override_by_name(*unit_by_name(name, unit))
    return panel


RPC_FILTER = [match("instance", "instance"), match("server_port", "port")]
RPC_BY = "rpc_service, rpc_method"


def _rpc(suffix: str, extra: str = "") -> str:
    return f"{RPC_DURATION}_{suffix}{selector([*RPC_FILTER, *([extra] if extra else [])])}"


def grpc_panels() -> list[Placed]:
    """The gRPC row: calls as OTel's rpc.server.duration (rpc_server_duration_seconds)."""
    count, bucket = _rpc("count"), _rpc("bucket")
    errors = _rpc("count", f"rpc_grpc_status_code=~{quote(grpc_server_error_regex())}")
    by_method = f"sum by ({RPC_BY}) (rate({count}[$__rate_interval]))"
    return [
        (
            timeseries(
                "gRPC calls by method and status code",
                [
                    target(
                        f"sum by ({RPC_BY}, rpc_grpc_status_code) (rate({count}[$__rate_interval]))",
                        "{{rpc_service}}/{{rpc_method}} {{rpc_grpc_status_code}}",
                    )
                ],
                "reqps",
                stack=True,
            ),
            8,
            8,
        ),
        (
            timeseries(
                "gRPC server error ratio by method",
                [
                    target(
                        f"(sum by ({RPC_BY}) (rate({errors}[$__rate_interval])) or {by_method} * 0)"
                        f" / ({by_method} > 0)",
                        "{{rpc_service}}/{{rpc_method}}",
                    )
                ],
                "percentunit",
                description="Calls ending in a status the server is to blame for: UNKNOWN, "
                "DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS (codes "
                f"{', '.join(grpc_server_error_regex().split('|'))}).",
                minimum=0,
            ),
            8,
            8,
        ),
        (
            timeseries(
                "gRPC latency p95 by method",
                [
                    target(
                        f"histogram_quantile(0.95, sum by ({RPC_BY}, le) (rate({bucket}[$__rate_interval])))",
                        "{{rpc_service}}/{{rpc_method}}",
                    )
                ],
                "s",
                description="First request byte to last response byte of each call (stream).",
            ),
            8,
            8,
        ),
    ]


def http_overview() -> dashboard_models.Dashboard:
    count, bucket = _http("count"), _http("bucket")
    errors = _http("count", ERRORS_5XX)
    rate_all = f"sum(rate({count}[$__rate_interval]))"
    quantiles = [
        target(f"histogram_quantile({q}, sum by (le) (rate({bucket}[$__rate_interval])))", f"p{round(q * 100)}")
        for q in (0.5, 0.95, 0.99)
    ]
    p95 = target(f"histogram_quantile(0.95, sum by (le) (rate({bucket}[$__rate_interval])))", "p95")
    by_route_errors = (
        f"(sum by (http_route) (rate({errors}[$__rate_interval]))"
        f" or sum by (http_route) (rate({count}[$__rate_interval])) * 0)"
        f" / (sum by (http_route) (rate({count}[$__rate_interval])) > 0)"
    )
    # Each variable's choices narrowed by the variables before it.
    chain = [match("instance", "instance"), match("service_name", "service"), match("k8s_pod_name", "pod"),
             match("server_port", "port")]
    scoped, service_scoped, pod_scoped, port_scoped = (selector(chain[:n]) for n in (1, 2, 3, 4))
    variables = [
        query_variable("instance", "Instance", f"label_values({HTTP_DURATION}_count, instance)"),
        query_variable("service", "Service", f"label_values({HTTP_DURATION}_count{scoped}, service_name)"),
        query_variable("pod", "Pod", f"label_values({HTTP_DURATION}_count{service_scoped}, k8s_pod_name)"),
        query_variable("port", "Server port", f"label_values({HTTP_DURATION}_count{pod_scoped}, server_port)"),
        query_variable(
            "route",
            "Route",
            f"label_values({HTTP_DURATION}_count{port_scoped}, http_route)",
        ),
        query_variable("scheme", "Scheme", f"label_values({HTTP_DURATION}_count{scoped}, url_scheme)"),
        query_variable(
            "protocol", "HTTP version", f"label_values({HTTP_DURATION}_count{scoped}, network_protocol_version)"
        ),
    ]
    body = [
        target(_p95_body(HTTP_REQUEST_BODY), "request p95"),
        target(_p95_body(HTTP_RESPONSE_BODY), "response p95"),
    ]
    http: list[Placed] = [
        (stat("Requests per second", [target(rate_all, "req/s")], "reqps"), 6, 4),
        (
            stat(
                "5xx ratio",
                [target(f"(sum(rate({errors}[$__rate_interval])) or vector(0)) / ({rate_all} > 0)", "5xx")],
                "percentunit",
                steps=(("green", None), ("orange", 0.01), ("red", 0.05)),
            ),
            6,
            4,
        ),
        (stat("p95 latency", [p95], "s"), 6, 4),
        (
            stat(
                "Active routes",
                [
                    target(
                        f"count(count by (http_route) (rate({count}[$__rate_interval]) > 0)) or on() vector(0)",
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
            timeseries("5xx ratio by route", [target(by_route_errors, "{{http_route}}")], "percentunit", minimum=0),
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
        (_latency_heatmap(bucket), 12, 8),
        (_top_routes(count, errors, bucket), 16, 8),
        (timeseries("Body size p95", body, "bytes"), 8, 8),
    ]
    return dashboard(
        "ebpf-slo-http",
        "HTTP overview (eBPF)",
        ["http", "red"],
        "Rate, errors and duration of HTTP traffic seen on the wire by ebpf-slo-exporter.",
        variables,
        [(None, http), ("gRPC", grpc_panels())],
    )


# ---------------------------------------------------------------- SLO

SLO_FILTER = [match("service", "service"), match("slo", "slo")]
SLO = selector(SLO_FILTER)
ALERTS_FIRING = "ALERTS" + selector(
    [f"alertname={quote(ALERT_NAME)}", f"alertstate={quote('firing')}", *SLO_FILTER]
)


def _alert_table() -> table_builders.Panel:
    panel = table(
        "Burn-rate alerts firing",
        f"{ALERT_NAME} alerts from the generated rules that are firing now. Empty when all is well.",
        [instant(ALERTS_FIRING)],
    )
    panel.with_transformation(
        transformation(
            "organize",
            {
                "excludeByName": {"Time": True, "Value": True, "__name__": True, "alertstate": True},
                "renameByName": {},
            },
        )
    )
    return panel


def slo_dashboard() -> dashboard_models.Dashboard:
    variables = [
        query_variable("service", "Service", "label_values(slo:objective:ratio, service)"),
        query_variable(
            "slo", "SLO", f"label_values(slo:objective:ratio{selector([match('service', 'service')])}, slo)"
        ),
    ]
    burn = [target(f"slo:burn_rate:ratio_rate{w}{SLO}", f"{{{{slo}}}} {w}") for w in STANDARD_WINDOWS]
    panels: list[Placed] = [
        (
            stat(
                "SLI over the SLO period",
                [target(f"1 - slo:sli_error:ratio_period{SLO}", "{{slo}}")],
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
                [target(f"slo:error_budget_remaining:ratio{SLO}", "{{slo}}")],
                "percentunit",
                description="1 - errors / budget over the period. Below 0: the objective is missed.",
                steps=(("red", None), ("orange", 0), ("green", 0.25)),
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
                steps=(("green", None), ("red", 1)),
            ),
            8,
            5,
        ),
        (
            timeseries(
                "SLI vs objective",
                [
                    target(f"1 - slo:sli_error:ratio_period{SLO}", "{{slo}} SLI ({{window}})"),
                    target(f"slo:objective:ratio{SLO}", "{{slo}} objective"),
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
                [target(f"slo:error_budget_remaining:ratio{SLO}", "{{slo}}")],
                "percentunit",
            ),
            12,
            9,
        ),
        (
            timeseries(
                "Burn rate by window",
                burn,
                "none",
                description="Error ratio over each window divided by the budget. 1 spends exactly the "
                "budget over the period; the alerts page at 14.4 (1h and 5m) and 6 (6h and 30m) "
                "on a 30d period.",
            ),
            16,
            9,
        ),
        (
            timeseries("SLI error ratio, 5m", [target(f"slo:sli_error:ratio_rate5m{SLO}", "{{slo}}")], "percentunit"),
            8,
            9,
        ),
        (_alert_table(), 24, 6),
    ]
    return dashboard(
        "ebpf-slo-slo",
        "SLOs (eBPF)",
        ["slo"],
        "Objectives from the Reliably manifest, through the rules of `ebpf-slo-exporter slo rules`.",
        variables,
        [(None, panels)],
        time_from="now-6h",
    )


# ---------------------------------------------------------------- exporter health

INSTANCE = selector([match("instance", "instance")])


def _self(name: str) -> str:
    return f"{SELF}_{name}{INSTANCE}"


def _rate(name: str, by: str = "instance") -> str:
    return f"sum by ({by}) (rate({_self(name)}[$__rate_interval]))"


def exporter_health() -> dashboard_models.Dashboard:
    variables = [
        query_variable("instance", "Instance", f"label_values({SELF}_{SELF_PACKETS_RECEIVED_TOTAL}, instance)")
    ]
    panels: list[Placed] = [
        (
            stat(
                "Socket filter attached",
                [target(f"max by (instance) ({_self(SELF_FILTER_ATTACHED)})", "{{instance}}")],
                "bool_yes_no",
                steps=(("red", None), ("green", 1)),
            ),
            6,
            4,
        ),
        (
            stat(
                "Packets/s",
                [target(f"sum(rate({_self(SELF_PACKETS_RECEIVED_TOTAL)}[$__rate_interval]))", "packets/s")],
                "pps",
            ),
            6,
            4,
        ),
        (
            stat(
                "Kernel drops/s",
                [target(f"sum(rate({_self(SELF_KERNEL_DROPS_TOTAL)}[$__rate_interval]))", "drops/s")],
                "pps",
                steps=(("green", None), ("red", 0.001)),
            ),
            6,
            4,
        ),
        (stat("Active flows", [target(f"sum({_self(SELF_FLOWS_ACTIVE)})", "flows")], "none"), 6, 4),
        (
            timeseries(
                "Losing data (degraded), by reason",
                [target(f"max by (reason) ({_self(SELF_DEGRADED)})", "{{reason}}")],
                "short",
                description="1 while a loss counter of that reason rose within the exporter's "
                "--degraded-window (kernel drops, TLS events lost, a full table...): /healthz then says "
                "degraded with the same reasons. Counts are still true; what was lost is on its counter.",
            ),
            24,
            6,
        ),
        (
            timeseries(
                "Packets received and dropped in the kernel",
                [
                    target(_rate(SELF_PACKETS_RECEIVED_TOTAL), "{{instance}} received"),
                    target(_rate(SELF_KERNEL_DROPS_TOTAL), "{{instance}} dropped"),
                ],
                "pps",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Parse errors by reason",
                [target(_rate(SELF_PARSE_ERRORS_TOTAL, "reason"), "{{reason}}")],
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
                    target(_rate(SELF_UNMATCHED_RESPONSES_TOTAL), "{{instance}} responses without a request"),
                    target(
                        _rate(SELF_REQUESTS_WITHOUT_RESPONSE_TOTAL), "{{instance}} requests without a response"
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
                    target(f"sum by (instance) ({_self(SELF_FLOWS_ACTIVE)})", "{{instance}} active"),
                    target(_rate(SELF_FLOWS_EVICTED_TOTAL, "reason"), "evicted/s: {{reason}}"),
                ],
                "short",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Kernel filter verdicts",
                [target(_rate(SELF_FILTER_PACKETS_TOTAL, "verdict"), "{{verdict}}")],
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
                [target(_rate(SELF_EXCHANGES_TOTAL), "{{instance}}")],
                "ops",
                description="Request/response pairs the exporter reassembled and counted.",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Route cardinality overflow",
                [target(_rate(SELF_ROUTE_OVERFLOW_TOTAL), "{{instance}}")],
                "ops",
                description="Requests folded into the overflow route because the route cap was reached.",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Reliably pushes by outcome",
                [target(f"{_rate(SELF_SLO_PUSH_TOTAL, 'outcome')} or on() vector(0)", "{{outcome}}")],
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
                        f"sum by (instance) ({_self(SELF_SLO_SPOOL_INDICATORS)}) or on() vector(0)",
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
        [(None, panels)],
    )


DASHBOARDS: dict[str, Callable[[], dashboard_models.Dashboard]] = {
    "http-overview.json": http_overview,
    "slo.json": slo_dashboard,
    "exporter-health.json": exporter_health,
}


def render(name: str) -> str:
    return json.dumps(DASHBOARDS[name](), cls=JSONEncoder, indent=2) + "\n"


def main() -> None:
    for name in DASHBOARDS:
        (HERE / name).write_text(render(name), encoding="utf-8")
        print(f"wrote dashboards/{name}")


if __name__ == "__main__":
    main()
