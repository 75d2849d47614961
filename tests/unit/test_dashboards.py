"""The Grafana dashboards: structure Grafana needs, variables, and PromQL that promtool accepts."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

from exporter.metrics import HTTP_DURATION, HTTP_REQUEST_BODY, HTTP_RESPONSE_BODY, RPC_DURATION, SELF
from exporter.slo.manifest import load_manifest
from exporter.slo.rules import ALERT_NAME, render_rules
from tests.dashboards_queries import DASHBOARDS_DIR, all_dashboard_queries, panel_queries, substitute

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["http-overview.json", "slo.json", "exporter-health.json"]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SELF_METRICS = {
    "packets_received_total",
    "kernel_drops_total",
    "parse_errors_total",
    "unmatched_responses_total",
    "requests_without_response_total",
    "flows_active",
    "flows_evicted_total",
    "route_overflow_total",
    "slo_push_total",
    "slo_spool_indicators",
    "filter_attached",
    "filter_packets_total",
    "exchanges_total",
    "degraded",
}


def _load(name: str) -> dict[str, Any]:
    return json.loads((DASHBOARDS_DIR / name).read_text(encoding="utf-8"))


def _build_module() -> Any:
    spec = importlib.util.spec_from_file_location("dashboards_build", DASHBOARDS_DIR / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_committed_dashboard_is_what_build_py_writes(name):
    assert (DASHBOARDS_DIR / name).read_text(encoding="utf-8") == _build_module().render(name), (
        f"dashboards/{name} is stale: run `python3 dashboards/build.py`"
    )


@pytest.mark.parametrize("name", NAMES)
def test_committed_dashboard_decodes_through_the_sdk_models_unchanged(name):
    """Every field is one the SDK's typed models know, with a value of the right type:
    decoding the file into grafana_foundation_sdk's Dashboard and encoding it again gives
    the same JSON (a field the models drop, or a misspelt one, would not survive)."""
    register_default_plugins()  # panel options and targets decode into their plugin's typed models
    raw = _load(name)
    decoded = Dashboard.from_json(raw)
    assert json.loads(json.dumps(decoded, cls=JSONEncoder)) == raw
    assert decoded.uid == raw["uid"] and len(decoded.panels or []) == len(raw["panels"])


@pytest.mark.parametrize("name", NAMES)
def test_dashboard_has_what_import_and_provisioning_need(name):
    board = _load(name)
    assert board["schemaVersion"] >= 39
    assert (
        board["uid"] and len(board["uid"]) <= 40 and board["title"] and "ebpf-slo-exporter" in board["tags"]
    )
    assert "__inputs" not in board and "id" not in board  # provisioning and import both assign the id
    variables = board["templating"]["list"]
    datasource = [v for v in variables if v["name"] == "datasource"]
    assert datasource and datasource[0]["type"] == "datasource" and datasource[0]["query"] == "prometheus"
    for variable in variables:
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE
            assert variable["query"].startswith("label_values(")  # the SDK's model has no `definition`
            assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"


@pytest.mark.parametrize("name", NAMES)
def test_every_panel_has_the_templated_datasource_targets_a_unique_id_and_a_place(name):
    panels = _load(name)["panels"]
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        if panel["type"] == "row":  # a section header: no query of its own, the full width
            assert panel["gridPos"]["w"] == 24 and panel["gridPos"]["h"] == 1 and not panel.get("targets")
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for item in panel["targets"]:
            assert item["datasource"] == DATASOURCE and item["expr"].strip(), panel["title"]
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y"))
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_http_overview_has_the_filter_variables_and_the_red_panels():
    board = _load("http-overview.json")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"datasource", "instance", "service", "pod", "port", "route", "scheme", "protocol"} <= variables.keys()
    assert "service_name" in variables["service"]["query"] and "k8s_pod_name" in variables["pod"]["query"]
    assert (
        "server_port" in variables["port"]["query"] and "http_route" in variables["route"]["query"]
    )
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(f"histogram_quantile({quantile}, sum by (le) (" in e for e in exprs)
    assert {p["type"] for p in board["panels"]} >= {"heatmap", "table", "timeseries", "stat", "row"}
    for expr in exprs:
        if HTTP_DURATION in expr or "body_size" in expr:
            for matcher in (
                'instance=~"$instance"',
                'service_name=~"$service"',
                'k8s_pod_name=~"$pod"',
                'server_port=~"$port"',
                'http_route=~"$route"',
                'url_scheme=~"$scheme"',
                'network_protocol_version=~"$protocol"',
            ):
                assert matcher in expr


def test_http_overview_has_a_grpc_row_on_the_rpc_histogram():
    board = _load("http-overview.json")
    titles = [p["title"] for p in board["panels"]]
    row = titles.index("gRPC")
    assert board["panels"][row]["type"] == "row"
    grpc = board["panels"][row + 1 :]
    assert [p["title"] for p in grpc] == [
        "gRPC calls by method and status code",
        "gRPC server error ratio by method",
        "gRPC latency p95 by method",
    ]
    exprs = [t["expr"] for p in grpc for t in p["targets"]]
    assert all(RPC_DURATION in e and 'instance=~"$instance"' in e and 'server_port=~"$port"' in e for e in exprs)
    assert 'rpc_grpc_status_code=~"2|4|12|13|14|15|reset|missing"' in exprs[1]
    assert all(p["gridPos"]["y"] > board["panels"][row]["gridPos"]["y"] for p in grpc)


def test_every_query_names_a_metric_the_exporter_or_the_rules_produce():
    rules = yaml.safe_load(render_rules(load_manifest(ROOT / "examples" / "reliably.yaml")))
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    known = (
        recorded
        | {"ALERTS"}
        | {
            f"{base}_{suffix}"
            for base in (HTTP_DURATION, HTTP_REQUEST_BODY, HTTP_RESPONSE_BODY, RPC_DURATION)
            for suffix in ("bucket", "count", "sum")
        }
        | {f"{SELF}_{name}" for name in SELF_METRICS}
    )
    functions = {
        "sum",
        "rate",
        "by",
        "or",
        "on",
        "vector",
        "histogram_quantile",
        "topk",
        "count",
        "max",
        "le",
        "instance",
        "http_route",
        "http_response_status_code",
        "reason",
        "outcome",
        "verdict",
        "rpc_service",
        "rpc_method",
        "rpc_grpc_status_code",
    }
    for query in all_dashboard_queries():
        text = re.sub(r'"[^"]*"', '""', query.expr)  # drop label values
        text = re.sub(r"\{[^}]*\}", "{}", text)  # drop matchers
        text = re.sub(r"\[[^\]]*\]", "", text)  # drop range selectors
        names = {n for n in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text) if n not in functions}
        assert names <= known, f"{query.name}: unknown {sorted(names - known)}"
    alert_queries = [q for q in all_dashboard_queries() if "ALERTS{" in q.raw]
    assert alert_queries and all(f'alertname="{ALERT_NAME}"' in q.raw for q in alert_queries)


def test_query_extraction_substitutes_every_form_of_variable():
    values = {"a": "x|y", "__rate_interval": "2m"}
    assert substitute('m{l=~"$a", k=~"${a}", j=~"${a:regex}", i=~"[[a]]"}[$__rate_interval]', values) == (
        'm{l=~"x|y", k=~"x|y", j=~"x|y", i=~"x|y"}[2m]'
    )
    with pytest.raises(KeyError, match="nope"):
        substitute('m{l=~"$nope"}', values)
    queries = panel_queries(DASHBOARDS_DIR / "http-overview.json", {"route": "/api"}, rate_interval="30s")
    assert all("$" not in q.expr and "[[" not in q.expr for q in queries)
    assert any('http_route=~"/api"' in q.expr and "[30s]" in q.expr for q in queries)
    assert any("[300s]" in q.expr for q in queries)  # $__range
    empty = [q.name for q in all_dashboard_queries() if q.may_be_empty]
    assert empty == ["ebpf-slo-slo/8 'Burn-rate alerts firing' A"]


def test_every_query_is_valid_promql_for_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: `make setup` installs Debian's prometheus package")
    queries = all_dashboard_queries()
    rules = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [
                    {"record": f"dashboard:query_{i}:check", "expr": q.expr} for i, q in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(yaml.safe_dump(rules, width=1000))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
