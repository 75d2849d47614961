"""OpenSLO v1 documents (`apiVersion: openslo/v1`) mapped onto the same `Objective` as
Reliably manifests, so they evaluate embedded or through Prometheus, generate rules and push
indicators exactly alike. `manifest.parse_manifest` dispatches here on `apiVersion`.

Kinds read: `SLO` (with an inline `indicator` or an `indicatorRef` to a `kind: SLI`),
`SLI`, `Service` (checked, then only a name) and `DataSource` (its `type`, for
`metricSourceRef`). One `Objective` per entry of an SLO's `objectives`.

Indicators:

- `ratioMetric` with `good`+`total` or `bad`+`total`, each a `metricSource` of
  - `type: Prometheus` with `spec.query`: with `counter: true` a plain selector such as
    `http_requests_total{code=~"5.."}` becomes `sum(increase(<selector>[<window>]))`; any
    query may instead carry the window itself as `{{window}}` (Sloth's `{{.window}}` too);
    `bad` becomes `good = total - bad`;
  - `type: ebpf-slo-exporter`, a selector over this exporter's own metrics:
    `spec: {path: /api/items/{id}, port: 8080, statusClasses: [2xx, 3xx]}`; good (or bad)
    and total must select the same path and port, and differ only in `statusClasses`;
    this is an availability objective;
- `thresholdMetric` with `type: ebpf-slo-exporter` (`spec: {path, port}`): the request
  duration in seconds, compared with the objective's `op: lte` (or `lt`: durations are
  nanoseconds, the two differ only on the exact bound) and `value`; a latency objective.

Budgeting: `Occurrences` over one rolling `timeWindow` (`isRolling: true`). Everything
else (`Timeslices`, `RatioTimeslices`, calendar windows, `alertPolicies`, `raw` ratios,
threshold queries on other sources) is refused with one line naming the field, as a
ConfigError, like every other manifest problem.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from exporter.errors import ConfigError
from exporter.slo.manifest import (
    DEFAULT_GOOD_CLASSES,
    STATUS_CLASSES,
    Objective,
    PromQLRatio,
    format_duration,
    parse_duration,
)

API_VERSION = "openslo/v1"
OWN_SOURCE = "ebpf-slo-exporter"
PROMETHEUS = "prometheus"
KINDS = ("SLO", "SLI", "Service", "DataSource")
RATIO_CATEGORY = "ratio"  # the category (Reliably indicator label) of a PromQL ratio
_SELECTOR = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})?$", re.DOTALL)


def is_openslo(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("apiVersion") == API_VERSION


def parse_documents(documents: Iterable[tuple[str, Any]]) -> list[Objective]:
    """Objectives from `(where, document)` pairs, all of apiVersion openslo/v1."""
    slis: dict[str, tuple[str, dict[str, Any]]] = {}
    sources: dict[str, str] = {}
    services: set[str] = set()
    slos: list[tuple[str, dict[str, Any]]] = []
    for where, doc in documents:
        kind = doc.get("kind")
        metadata = _mapping(doc.get("metadata"), f"{where}: metadata")
        name = metadata.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: metadata.name is required")
        where = f"{where} ({kind} {name!r})"
        spec = _mapping(doc.get("spec"), f"{where}: spec")
        if kind == "SLO":
            slos.append((where, doc))
        elif kind == "SLI":
            slis[name] = (where, spec)
        elif kind == "Service":
            services.add(name)
        elif kind == "DataSource":
            sources[name] = str(spec.get("type", "")).lower()
        else:
            raise ConfigError(
                f"{where}: kind {kind!r} is not supported in OpenSLO input; use {', '.join(KINDS)} "
                f"(alerts come from `slo rules`)"
            )
    if not slos:
        raise ConfigError("no kind: SLO found among the OpenSLO documents")
    objectives: list[Objective] = []
    for where, doc in slos:
        objectives.extend(_parse_slo(where, doc, slis, sources, services))
    return objectives


def _parse_slo(where: str, doc: dict[str, Any], slis: dict[str, tuple[str, dict[str, Any]]],
               sources: dict[str, str], services: set[str]) -> list[Objective]:
    metadata = doc["metadata"]
    spec = doc["spec"]
    name = str(metadata["name"])
    service = spec.get("service")
    if not isinstance(service, str) or not service:
        raise ConfigError(f"{where}: spec.service is required (the name of a kind: Service)")
    if services and service not in services:
        raise ConfigError(f"{where}: spec.service {service!r} names no kind: Service in this file")
    if spec.get("alertPolicies"):
        raise ConfigError(f"{where}: spec.alertPolicies is not supported; generate alerts with `slo rules`")
    method = spec.get("budgetingMethod")
    if method != "Occurrences":
        raise ConfigError(f"{where}: spec.budgetingMethod {method!r} is not supported; only Occurrences is")
    window_seconds, window_text = _window(spec.get("timeWindow"), where)

    if "indicator" in spec and "indicatorRef" in spec:
        raise ConfigError(f"{where}: give spec.indicator or spec.indicatorRef, not both")
    if "indicatorRef" in spec:
        ref = spec["indicatorRef"]
        if ref not in slis:
            raise ConfigError(f"{where}: spec.indicatorRef {ref!r} names no kind: SLI in this file")
        sli_where, sli_spec = slis[ref]
        sli_field = f"{sli_where}: spec"
    elif "indicator" in spec:
        indicator = _mapping(spec["indicator"], f"{where}: spec.indicator")
        sli_spec = _mapping(indicator.get("spec"), f"{where}: spec.indicator.spec")
        sli_field = f"{where}: spec.indicator.spec"
    else:
        raise ConfigError(f"{where}: spec.indicator or spec.indicatorRef is required")

    raw_objectives = spec.get("objectives")
    if not isinstance(raw_objectives, list) or not raw_objectives:
        raise ConfigError(f"{where}: spec.objectives must list at least one target")
    if "thresholdMetric" in sli_spec and len(raw_objectives) != 1:
        raise ConfigError(f"{where}: spec.objectives: a thresholdMetric SLO takes exactly one objective")

    out = []
    for position, raw in enumerate(raw_objectives):
        field = f"spec.objectives[{position}]"
        item = _mapping(raw, f"{where}: {field}")
        for unsupported in ("timeSliceTarget", "timeSliceWindow"):
            if unsupported in item:
                raise ConfigError(f"{where}: {field}.{unsupported} is for Timeslices, which is not supported")
        percent = _target_percent(item, f"{where}: {field}")
        title = name
        if len(raw_objectives) > 1:
            title = f"{name} {item.get('name') or item.get('displayName') or position + 1}"
        base = {"name": title, "service": service, "objective_percent": percent,
                "window_seconds": window_seconds, "window_text": window_text,
                "labels": {"name": title, "service": service}}
        if "thresholdMetric" in sli_spec:
            out.append(_threshold(sli_spec["thresholdMetric"], item, base, f"{sli_field}.thresholdMetric",
                                  f"{where}: {field}", sources))
        elif "ratioMetric" in sli_spec:
            out.append(_ratio(sli_spec["ratioMetric"], base, f"{sli_field}.ratioMetric", sources))
        else:
            raise ConfigError(f"{sli_field}: needs ratioMetric or thresholdMetric")
    return out


def _window(raw: Any, where: str) -> tuple[float, str]:
    if not isinstance(raw, list) or len(raw) != 1 or not isinstance(raw[0], dict):
        raise ConfigError(f"{where}: spec.timeWindow must list exactly one window, e.g. - duration: 30d")
    window = raw[0]
    if "calendar" in window or window.get("isRolling") is False:
        raise ConfigError(f"{where}: spec.timeWindow[0].calendar: calendar windows are not supported; "
                          f"use isRolling: true")
    if window.get("isRolling") is not True:
        raise ConfigError(f"{where}: spec.timeWindow[0].isRolling must be true")
    text = str(window.get("duration", ""))
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: spec.timeWindow[0].duration: {exc}") from exc
    if seconds < 1 or seconds != int(seconds):
        raise ConfigError(f"{where}: spec.timeWindow[0].duration must be whole seconds, at least 1s")
    return seconds, text


def _target_percent(item: dict[str, Any], where: str) -> float:
    if "target" in item and "targetPercent" in item:
        raise ConfigError(f"{where}: give target or targetPercent, not both")
    if "target" in item:
        value, scale, field = item["target"], 100.0, "target"
    elif "targetPercent" in item:
        value, scale, field = item["targetPercent"], 1.0, "targetPercent"
    else:
        raise ConfigError(f"{where}: target (0..1) or targetPercent (0..100) is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) * scale <= 100:
        raise ConfigError(f"{where}.{field} must be above 0 and at most {100 / scale:g}, got {value!r}")
    return round(float(value) * scale, 10)


def _source(raw: Any, where: str, sources: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """(type, spec) of a `metricSource`, its type lowercased, resolved through a DataSource."""
    metric_source = _mapping(raw, where)
    kind = metric_source.get("type")
    ref = metric_source.get("metricSourceRef")
    if kind is None and ref is not None:
        if ref not in sources:
            raise ConfigError(f"{where}.metricSourceRef {ref!r} names no kind: DataSource in this file")
        kind = sources[ref]
    kind_text = str(kind or "").lower()
    if kind_text not in (PROMETHEUS, OWN_SOURCE):
        raise ConfigError(f"{where}.type is {kind!r}; supported: Prometheus, {OWN_SOURCE}")
    return kind_text, _mapping(metric_source.get("spec") or {}, f"{where}.spec")


def _own_selector(spec: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(spec) - {"path", "port", "statusClasses"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a field of {OWN_SOURCE}; use path, port, statusClasses")
    path = spec.get("path")
    if path is not None and (not isinstance(path, str) or not path.startswith("/")):
        raise ConfigError(f"{where}.path {path!r} must be an http_route starting with /")
    port = spec.get("port")
    if port is not None and (isinstance(port, bool) or not str(port).isdigit() or not 0 < int(port) < 65536):
        raise ConfigError(f"{where}.port {port!r} is not a TCP port")
    classes = spec.get("statusClasses")
    if classes is not None:
        if not isinstance(classes, list) or not classes:
            raise ConfigError(f"{where}.statusClasses must be a list such as [2xx, 3xx]")
        bad = [c for c in (str(c).lower() for c in classes) if c not in STATUS_CLASSES]
        if bad:
            raise ConfigError(f"{where}.statusClasses has {bad[0]!r}; use 1xx, 2xx, 3xx, 4xx or 5xx")
    return {"path": path, "port": int(port) if port is not None else None,
            "classes": tuple(str(c).lower() for c in classes) if classes is not None else None}


def _threshold(raw: Any, item: dict[str, Any], base: dict[str, Any], where: str, objective_where: str,
               sources: dict[str, str]) -> Objective:
    metric = _mapping(raw, where)
    kind, spec = _source(metric.get("metricSource"), f"{where}.metricSource", sources)
    if kind != OWN_SOURCE:
        raise ConfigError(f"{where}.metricSource: a thresholdMetric on Prometheus queries is not supported "
                          f"(events need a histogram); use type {OWN_SOURCE} or a ratioMetric")
    selector = _own_selector(spec, f"{where}.metricSource.spec")
    if selector["classes"] is not None:
        raise ConfigError(f"{where}.metricSource.spec.statusClasses applies to ratioMetric only")
    op = item.get("op")
    if op not in ("lte", "lt"):
        raise ConfigError(f"{objective_where}.op is {op!r}; a latency threshold takes lte or lt "
                          f"(good requests are at most `value` seconds)")
    value = item.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{objective_where}.value must be the latency bound in seconds, above 0, got {value!r}")
    target = float(value)
    indicator = {"category": "latency", "latency_target": format_duration(target)}
    return _objective(base, "latency", selector, indicator, latency_target_seconds=target)


def _ratio(raw: Any, base: dict[str, Any], where: str, sources: dict[str, str]) -> Objective:
    metric = _mapping(raw, where)
    if "raw" in metric or "rawType" in metric:
        raise ConfigError(f"{where}.raw: precomputed ratios are not supported; give good (or bad) and total")
    if ("good" in metric) == ("bad" in metric) or "total" not in metric:
        raise ConfigError(f"{where}: give total and exactly one of good or bad")
    part = "good" if "good" in metric else "bad"
    counter = metric.get("counter", True)
    numerator = _source(_mapping(metric[part], f"{where}.{part}").get("metricSource"),
                        f"{where}.{part}.metricSource", sources)
    total = _source(_mapping(metric["total"], f"{where}.total").get("metricSource"),
                    f"{where}.total.metricSource", sources)
    if numerator[0] != total[0]:
        raise ConfigError(f"{where}: {part} and total must use the same metricSource type")
    if numerator[0] == PROMETHEUS:
        part_query = _query(numerator[1], counter, f"{where}.{part}.metricSource.spec.query")
        total_query = _query(total[1], counter, f"{where}.total.metricSource.spec.query")
        good_query = part_query if part == "good" else f"({total_query}) - ({part_query})"
        return _objective(base, RATIO_CATEGORY, {"path": None, "port": None, "classes": None},
                          {"category": RATIO_CATEGORY}, promql=PromQLRatio(good_query, total_query))
    part_selector = _own_selector(numerator[1], f"{where}.{part}.metricSource.spec")
    total_selector = _own_selector(total[1], f"{where}.total.metricSource.spec")
    for key in ("path", "port"):
        if part_selector[key] != total_selector[key]:
            raise ConfigError(f"{where}: {part} and total must select the same {key}")
    if total_selector["classes"] is not None:
        raise ConfigError(f"{where}.total.metricSource.spec.statusClasses: total counts every class; "
                          f"leave it out")
    classes = part_selector["classes"]
    if classes is None:
        raise ConfigError(f"{where}.{part}.metricSource.spec.statusClasses is required, e.g. [5xx]")
    good = classes if part == "good" else tuple(c for c in STATUS_CLASSES if c not in classes)
    if not good:
        raise ConfigError(f"{where}.{part}.metricSource.spec.statusClasses leaves no good class")
    return _objective(base, "availability", part_selector, {"category": "availability"}, good_classes=good)


def _query(spec: dict[str, Any], counter: Any, where: str) -> str:
    query = spec.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ConfigError(f"{where} must be a PromQL string")
    query = query.strip().replace("{{.window}}", "{{window}}").replace("{{ .window }}", "{{window}}")
    if "{{window}}" in query:
        return query
    if counter is not True:
        raise ConfigError(f"{where}: with counter: false the query must carry its own window as {{{{window}}}}")
    if not _SELECTOR.match(query):
        raise ConfigError(f"{where}: {query!r} is not a plain counter selector; "
                          f"write the whole ratio part with {{{{window}}}}, e.g. sum(rate(x[{{{{window}}}}]))")
    return f"sum(increase({query}[{{{{window}}}}]))"


def _objective(base: dict[str, Any], category: str, selector: dict[str, Any], indicator: dict[str, str],
               *, latency_target_seconds: float | None = None, good_classes: tuple[str, ...] | None = None,
               promql: PromQLRatio | None = None) -> Objective:
    # The indicator selector is what each pushed Reliably indicator carries: the category,
    # and the narrowing, as a Reliably manifest would write them.
    labels = dict(indicator)
    if selector["path"] is not None:
        labels["path"] = selector["path"]
    if selector["port"] is not None:
        labels["port"] = str(selector["port"])
    return Objective(
        name=base["name"],
        service=base["service"],
        labels=base["labels"],
        selector=labels,
        objective_percent=base["objective_percent"],
        window_seconds=base["window_seconds"],
        window_text=base["window_text"],
        category=category,
        latency_target_seconds=latency_target_seconds,
        route=selector["path"],
        port=selector["port"],
        good_status_classes=good_classes or DEFAULT_GOOD_CLASSES,
        promql=promql,
        extra={"source": API_VERSION},
    )


def _mapping(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping")
    return raw
