"""Reliably objective manifests: multi-document YAML of `kind: Objective`, parsed and validated.
Documents of `apiVersion: openslo/v1` in the same file go to `openslo.py`.

The file format is Reliably's own (`reliably slo sync` reads the same file), so a user's
existing `reliably.yaml` works unchanged. Two extension fields are ours, both optional:

- `spec.goodStatusClasses: [2xx, 3xx, 4xx]` for availability objectives (default: every
  class except 5xx);
- `spec.promql: {good: "...", total: "..."}` for ratios evaluated by Prometheus; `{{window}}`
  in either query is replaced with the evaluation window (`5m`, `30d`, …);
- `spec.grpcBadStatusCodes: [UNKNOWN, INTERNAL, 14, reset]` for availability objectives
  that select gRPC (default: OTel's server errors, plus a stream reset or a response with no
  grpc-status, see `DEFAULT_GRPC_BAD_CODES`).

`indicatorSelector.rpc_service` / `rpc_method` select gRPC calls (rpc_server_duration_seconds):
such an objective counts only gRPC streams, and its availability is judged on the gRPC status
code rather than the HTTP status class.

Every problem is a `ConfigError` with one line that names the document and the field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from exporter.errors import ConfigError
from exporter.metrics import GRPC_BAD_CODES, GRPC_NON_NUMERIC

API_VERSION = "reliably.com/v1"
CATEGORIES = ("latency", "availability")
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
DEFAULT_GOOD_CLASSES = ("1xx", "2xx", "3xx", "4xx")
# gRPC status codes by name, as rpc.grpc.status_code carries them (numbers, as text).
GRPC_CODES = {
    "OK": "0", "CANCELLED": "1", "UNKNOWN": "2", "INVALID_ARGUMENT": "3", "DEADLINE_EXCEEDED": "4",
    "NOT_FOUND": "5", "ALREADY_EXISTS": "6", "PERMISSION_DENIED": "7", "RESOURCE_EXHAUSTED": "8",
    "FAILED_PRECONDITION": "9", "ABORTED": "10", "OUT_OF_RANGE": "11", "UNIMPLEMENTED": "12", "INTERNAL": "13",
    "UNAVAILABLE": "14", "DATA_LOSS": "15", "UNAUTHENTICATED": "16",
}
# OTel's server errors plus our two non-numeric values (metrics.py owns both lists).
DEFAULT_GRPC_BAD_CODES = GRPC_BAD_CODES

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """`150ms`, `10s`, `1m`, `1h30m`, `30d` → seconds. Raises ValueError with a plain sentence."""
    cleaned = str(text).strip()
    if not cleaned:
        raise ValueError("empty duration")
    position = 0
    seconds = 0.0
    for match in _DURATION_PART.finditer(cleaned):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(cleaned) or position == 0:
        raise ValueError(f"{text!r} is not a duration like 150ms, 10s, 5m, 1h or 30d")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds → the shortest Prometheus duration (`5m`, `1h`, `30d`, `150ms`)."""
    if seconds < 1 or seconds != int(seconds):
        return f"{round(seconds * 1000)}ms"
    whole = int(seconds)
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


@dataclass(frozen=True, slots=True)
class PromQLRatio:
    good: str
    total: str

    def render(self, window: str) -> tuple[str, str]:
        return self.good.replace("{{window}}", window), self.total.replace("{{window}}", window)


@dataclass(frozen=True, slots=True)
class Objective:
    name: str
    service: str
    labels: dict[str, str]
    selector: dict[str, str]  # indicatorSelector: the labels every pushed indicator carries
    objective_percent: float
    window_seconds: float
    window_text: str
    category: str  # "latency", "availability", or any category when promql is given
    latency_target_seconds: float | None = None
    route: str | None = None  # from selector `path`
    port: int | None = None  # from selector `port` / `server_port`
    service_name: str | None = None  # from selector `service_name`: the server's identity label
    good_status_classes: tuple[str, ...] = DEFAULT_GOOD_CLASSES
    promql: PromQLRatio | None = None
    rpc_service: str | None = None  # from selector `rpc_service`: gRPC calls only
    rpc_method: str | None = None  # from selector `rpc_method`
    grpc_bad_codes: tuple[str, ...] = DEFAULT_GRPC_BAD_CODES  # rpc status codes that are bad (availability)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def objective_ratio(self) -> float:
        return self.objective_percent / 100.0

    @property
    def slug(self) -> str:
        """A stable identifier for rule names and URLs: lowercase, `_`-separated."""
        return re.sub(r"[^a-z0-9]+", "_", f"{self.service} {self.name}".lower()).strip("_")


def load_manifest(path: str | Path) -> list[Objective]:
    """Read a manifest file. Missing or unreadable files are a ConfigError, not a traceback."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read SLO file {path}: {exc.strerror}") from exc
    return parse_manifest(text, source=str(path))


def parse_manifest(text: str, source: str = "<slo>") -> list[Objective]:
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    if not documents:
        raise ConfigError(f"{source}: no objectives found (expected documents of kind: Objective)")
    # Dispatch on apiVersion: OpenSLO documents refer to each other (indicatorRef, Service),
    # so they are read together; Reliably objectives stand alone.
    from exporter.slo import openslo  # openslo builds on this module's types

    open_docs = [(f"{source} document {i + 1}", doc) for i, doc in enumerate(documents) if openslo.is_openslo(doc)]
    objectives = [
        _parse_objective(doc, f"{source} document {i + 1}")
        for i, doc in enumerate(documents)
        if not openslo.is_openslo(doc)
    ]
    if open_docs:
        objectives += openslo.parse_documents(open_docs)
    seen: set[tuple[str, str]] = set()
    for objective in objectives:
        key = (objective.service, objective.name)
        if key in seen:
            raise ConfigError(
                f"{source}: objective {objective.name!r} of service {objective.service!r} is defined twice"
            )
        seen.add(key)
    return objectives


def _parse_objective(doc: Any, where: str) -> Objective:
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping with apiVersion, kind, metadata and spec")
    if str(doc.get("apiVersion", "")).startswith("openslo/"):
        raise ConfigError(f"{where}: apiVersion is {doc.get('apiVersion')!r}; of OpenSLO only openslo/v1 is supported")
    if doc.get("kind") != "Objective":
        raise ConfigError(f"{where}: kind is {doc.get('kind')!r}; only kind: Objective is supported")
    if doc.get("apiVersion", API_VERSION) != API_VERSION:
        raise ConfigError(
            f"{where}: apiVersion is {doc.get('apiVersion')!r}; expected {API_VERSION} or openslo/v1"
        )
    metadata = doc.get("metadata") or {}
    spec = doc.get("spec")
    if not isinstance(metadata, dict) or not isinstance(spec, dict):
        raise ConfigError(f"{where}: metadata and spec must be mappings")
    labels = _string_map(metadata.get("labels") or {}, f"{where}: metadata.labels")
    name = labels.get("name") or str(metadata.get("name") or "")
    if not name:
        raise ConfigError(f"{where}: metadata.labels.name is required (the objective's title)")
    where = f"{where} ({name!r})"
    service = labels.get("service", "default")
    selector = _string_map(spec.get("indicatorSelector") or {}, f"{where}: spec.indicatorSelector")

    percent = spec.get("objectivePercent")
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 < float(percent) <= 100:
        raise ConfigError(
            f"{where}: spec.objectivePercent must be a number above 0 and at most 100, got {percent!r}"
        )

    window_text = str(spec.get("window", ""))
    try:
        window_seconds = parse_duration(window_text)
    except ValueError as exc:
        raise ConfigError(f"{where}: spec.window: {exc}") from exc
    if window_seconds < 1:
        raise ConfigError(f"{where}: spec.window must be at least 1s, got {window_text!r}")
    if window_seconds != int(window_seconds):
        # Windows are unions of clock-aligned buckets of whole seconds.
        raise ConfigError(f"{where}: spec.window must be a whole number of seconds, got {window_text!r}")

    promql = _parse_promql(spec.get("promql"), where)
    category = selector.get("category", "").lower()
    if promql is None and category not in CATEGORIES:
        raise ConfigError(
            f"{where}: indicatorSelector.category is {selector.get('category')!r}; "
            f"use latency or availability, or give spec.promql with good and total queries"
        )

    latency_target: float | None = None
    if category == "latency" and promql is None:
        raw_target = selector.get("latency_target")
        if not raw_target:
            raise ConfigError(
                f"{where}: a latency objective needs indicatorSelector.latency_target, e.g. 150ms"
            )
        try:
            latency_target = parse_duration(raw_target)
        except ValueError as exc:
            raise ConfigError(f"{where}: latency_target: {exc}") from exc
        if latency_target <= 0:
            raise ConfigError(f"{where}: latency_target must be above 0")

    good_classes: tuple[str, ...] = DEFAULT_GOOD_CLASSES
    if "goodStatusClasses" in spec:
        raw_classes = spec["goodStatusClasses"]
        if not isinstance(raw_classes, list) or not raw_classes:
            raise ConfigError(f"{where}: spec.goodStatusClasses must be a list such as [2xx, 3xx]")
        good_classes = tuple(str(c).lower() for c in raw_classes)
        bad = [c for c in good_classes if c not in STATUS_CLASSES]
        if bad:
            raise ConfigError(
                f"{where}: spec.goodStatusClasses has {bad[0]!r}; use 1xx, 2xx, 3xx, 4xx or 5xx"
            )
        if category != "availability" or promql is not None:
            raise ConfigError(f"{where}: spec.goodStatusClasses applies to availability objectives only")

    route = selector.get("path") or None
    if route is not None and not route.startswith("/"):
        raise ConfigError(f"{where}: indicatorSelector.path {route!r} must be an http_route starting with /")

    port: int | None = None
    raw_port = selector.get("port") or selector.get("server_port")
    if raw_port:
        if not raw_port.isdigit() or not 0 < int(raw_port) < 65536:
            raise ConfigError(f"{where}: indicatorSelector port {raw_port!r} is not a TCP port")
        port = int(raw_port)

    rpc_service = selector.get("rpc_service") or None
    rpc_method = selector.get("rpc_method") or None
    grpc_bad = _parse_grpc_codes(spec, where, category, promql, rpc_service or rpc_method)
    service_name = selector.get("service_name") or None

    return Objective(
        name=name,
        service=service,
        labels=labels,
        selector=selector,
        objective_percent=float(percent),
        window_seconds=window_seconds,
        window_text=window_text,
        category=category,
        latency_target_seconds=latency_target,
        route=route,
        port=port,
        service_name=service_name,
        good_status_classes=good_classes,
        promql=promql,
        rpc_service=rpc_service,
        rpc_method=rpc_method,
        grpc_bad_codes=grpc_bad,
    )


def _parse_grpc_codes(spec: dict[str, Any], where: str, category: str, promql: PromQLRatio | None,
                      selects_rpc: str | None) -> tuple[str, ...]:
    if "grpcBadStatusCodes" not in spec:
        return DEFAULT_GRPC_BAD_CODES
    if category != "availability" or promql is not None or not selects_rpc:
        raise ConfigError(f"{where}: spec.grpcBadStatusCodes applies to availability objectives that select "
                          f"gRPC (indicatorSelector.rpc_service or rpc_method) only")
    raw = spec["grpcBadStatusCodes"]
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: spec.grpcBadStatusCodes must be a list such as [UNKNOWN, INTERNAL, 14]")
    codes = []
    for item in raw:
        text = str(item).strip()
        code = GRPC_CODES.get(text.upper(), text if text in GRPC_CODES.values() or text in GRPC_NON_NUMERIC
                              else None)
        if code is None:
            raise ConfigError(f"{where}: spec.grpcBadStatusCodes has {text!r}; use a gRPC code name "
                              f"(UNAVAILABLE), its number (0-16), reset or missing")
        codes.append(code)
    return tuple(codes)


def _parse_promql(raw: Any, where: str) -> PromQLRatio | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw.get("good") or not raw.get("total"):
        raise ConfigError(f"{where}: spec.promql needs both good and total queries")
    for key in ("good", "total"):
        if not isinstance(raw[key], str):
            raise ConfigError(f"{where}: spec.promql.{key} must be a PromQL string")
    return PromQLRatio(good=str(raw["good"]), total=str(raw["total"]))


def _string_map(raw: Any, where: str) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of strings")
    return {str(k): str(v) for k, v in raw.items()}


def latency_targets(objectives: Iterable[Objective]) -> set[float]:
    """The bucket bounds the duration histogram needs so every latency SLI is exact."""
    return {o.latency_target_seconds for o in objectives if o.latency_target_seconds is not None}
