"""Every PromQL query of the Grafana dashboards, with Grafana's variables filled in.

Grafana substitutes `$var`, `${var}`, `${var:format}` and `[[var]]` before a query reaches
Prometheus, plus its own `$__rate_interval`, `$__interval`, `$__range` (and `_s`/`_ms`
forms). `panel_queries()` does the same, so a test can send each query to a real Prometheus
through /api/v1/query and check that it parses and returns data.

Defaults: a multi-value variable with "All" becomes its `allValue` (`.*` in these
dashboards); override any variable through `values`. A query that reads ALERTS without an
`or on() vector(0)` fallback may legitimately return nothing (no alert firing) and is
flagged `may_be_empty`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARDS_DIR = Path(__file__).resolve().parents[1] / "dashboards"

_VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\[\[(\w+)(?::(\w+))?\]\]|\$(\w+)")
_FORMATS = {None, "regex", "pipe", "raw", "csv", "text", "glob", "singlequote", "doublequote"}


@dataclass(frozen=True, slots=True)
class PanelQuery:
    dashboard: str  # the dashboard's uid
    panel_id: int
    panel_title: str
    ref_id: str
    raw: str  # as written in the dashboard
    expr: str  # variables substituted
    instant: bool
    may_be_empty: bool

    @property
    def name(self) -> str:
        return f"{self.dashboard}/{self.panel_id} {self.panel_title!r} {self.ref_id}"


def builtins(rate_interval: str = "1m", interval: str = "15s", range_seconds: int = 300) -> dict[str, str]:
    """Grafana's global variables, as it would set them for a dashboard showing `range_seconds`."""
    interval_seconds = _seconds(interval)
    return {
        "__rate_interval": rate_interval,
        "__interval": interval,
        "__interval_ms": str(int(interval_seconds * 1000)),
        "__range": f"{range_seconds}s",
        "__range_s": str(range_seconds),
        "__range_ms": str(range_seconds * 1000),
    }


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)", duration)
    if match is None:
        raise ValueError(f"{duration!r} is not a simple duration like 15s")
    return int(match.group(1)) * units[match.group(2)]


def variable_defaults(dashboard: Mapping[str, Any]) -> dict[str, str]:
    values: dict[str, str] = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "datasource":
            continue
        if variable.get("includeAll"):
            values[variable["name"]] = variable.get("allValue") or ".*"
        else:
            current = variable.get("current", {}).get("value")
            values[variable["name"]] = current if isinstance(current, str) else ".*"
    return values


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace every Grafana variable reference; an unknown variable is a KeyError naming it."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3) or match.group(5)
        fmt = match.group(2) or match.group(4)
        if fmt not in _FORMATS:
            raise KeyError(f"unsupported variable format ${{{name}:{fmt}}}")
        if name not in values:
            raise KeyError(f"variable ${name} is not defined by the dashboard")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def _panels(panels: list[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for panel in panels:
        if panel.get("type") == "row":
            yield from _panels(panel.get("panels", []))
        else:
            yield panel


def load(path: str | Path) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
    return board


def panel_queries(
    dashboard: Mapping[str, Any] | str | Path, values: Mapping[str, str] | None = None, **builtin_options: Any
) -> list[PanelQuery]:
    """Each target of each panel of one dashboard (a dict or a JSON file path)."""
    board = load(dashboard) if isinstance(dashboard, str | Path) else dashboard
    scope = {**builtins(**builtin_options), **variable_defaults(board), **(values or {})}
    queries = []
    for panel in _panels(board.get("panels", [])):
        for item in panel.get("targets", []):
            raw = item.get("expr", "")
            queries.append(
                PanelQuery(
                    dashboard=board.get("uid", "?"),
                    panel_id=panel.get("id", -1),
                    panel_title=panel.get("title", ""),
                    ref_id=item.get("refId", "?"),
                    raw=raw,
                    expr=substitute(raw, scope),
                    instant=bool(item.get("instant")),
                    may_be_empty="ALERTS{" in raw and "vector(0)" not in raw,
                )
            )
    return queries


def all_dashboard_queries(
    directory: str | Path = DASHBOARDS_DIR, values: Mapping[str, str] | None = None, **builtin_options: Any
) -> list[PanelQuery]:
    """Every query of every dashboard JSON file in `directory`, sorted by file name."""
    return [
        query
        for path in sorted(Path(directory).glob("*.json"))
        for query in panel_queries(path, values, **builtin_options)
    ]
