"""`slo report`: the table Reliably users know, from a running exporter or from Prometheus.

Sources:
- `--from URL`: the exporter's `/api/v1/slo` (SloRuntime.snapshot), which carries the
  last five window results of each objective;
- `--prometheus URL --slo FILE`: each objective evaluated now and at the four previous
  trend steps, through PromQL.

Formats: table (rich), text, markdown, json, yaml. JSON and YAML keep the Reliably CLI's
shape, `{timestamp, services: [{name, service_levels: [...]}]}`. An objective without
data shows `—` (null in JSON/YAML), never 0%.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import yaml
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from exporter.bridge.indicator import rfc3339
from exporter.errors import ExporterError, QueryError
from exporter.slo.evaluate import Result, format_coverage
from exporter.slo.manifest import Objective, format_duration
from exporter.slo.promql import PromQLSource

FORMATS = ("table", "json", "yaml", "markdown", "text")
TREND_LENGTH = 5
NO_DATA = "—"
MET, NOT_MET = "✅", "❌"
TREND_MET, TREND_NOT_MET = "✓", "✕"


class ReportSourceError(ExporterError):
    """The exporter's /api/v1/slo could not be read."""


@dataclass(frozen=True, slots=True)
class ReportLine:
    service: str
    name: str
    category: str
    objective_percent: float
    window_seconds: float
    actual: float | None  # percent over the window; None: no data
    window_from: str | None
    window_to: str | None
    trend: tuple[bool | None, ...]  # met per result, oldest first, current last
    coverage: float | None = None  # observed part of the window, 0..1; None: not known (Prometheus)

    @property
    def met(self) -> bool | None:
        if self.actual is None:
            return None
        return self.actual >= self.objective_percent - 1e-9

    @property
    def delta(self) -> float | None:
        return None if self.actual is None else round(self.actual - self.objective_percent, 10)

    @property
    def type(self) -> str:
        return self.category.title()


# -- sources -------------------------------------------------------------------------------


def snapshot_url(base: str) -> str:
    base = base.rstrip("/")
    return base if base.endswith("/api/v1/slo") else f"{base}/api/v1/slo"


def fetch_snapshot(base: str, *, timeout_s: float = 5.0, transport: httpx.BaseTransport | None = None) -> Any:
    url = snapshot_url(base)
    try:
        with httpx.Client(timeout=timeout_s, transport=transport) as client:
            response = client.get(url)
    except httpx.TimeoutException as exc:
        raise ReportSourceError(f"the exporter at {url} did not answer within {timeout_s:g}s") from exc
    except httpx.TransportError as exc:
        raise ReportSourceError(f"cannot reach the exporter at {url}: {type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise ReportSourceError(f"{url} answered {response.status_code}; is the exporter running with --slo?")
    try:
        return response.json()
    except ValueError as exc:
        raise ReportSourceError(f"{url} did not answer with JSON") from exc


def _ratio(raw: Any) -> float | None:
    return float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else None


def _percent(raw: Any) -> float | None:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    return None


def lines_from_snapshot(snapshot: Any, only: Iterable[Objective] | None = None) -> list[ReportLine]:
    """Report lines from SloRuntime.snapshot(); `only` keeps the objectives of a manifest."""
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("objectives"), list):
        raise ReportSourceError("the SLO snapshot has no objectives list; is this an ebpf-slo-exporter?")
    wanted = {(o.service, o.name) for o in only} if only is not None else None
    lines = []
    for entry in snapshot["objectives"]:
        if not isinstance(entry, dict):
            continue
        if wanted is not None and (entry.get("service"), entry.get("name")) not in wanted:
            continue
        current = entry.get("current") if isinstance(entry.get("current"), dict) else None
        history = [h for h in entry.get("history") or [] if isinstance(h, dict)]
        trend = tuple(h.get("met") if isinstance(h.get("met"), bool) else None for h in history)
        lines.append(
            ReportLine(
                service=str(entry.get("service", "default")),
                name=str(entry.get("name", "")),
                category=str(entry.get("category", "")),
                objective_percent=float(entry.get("objective_percent", 0.0)),
                window_seconds=float(entry.get("window_seconds", 0.0)),
                actual=_percent(current.get("sli_percent")) if current else None,
                window_from=str(current["from"]) if current else None,
                window_to=str(current["to"]) if current else None,
                trend=trend[-TREND_LENGTH:],
                coverage=_ratio(current.get("coverage")) if current else None,
            )
        )
    return lines


def line_from_results(objective: Objective, results: list[Result]) -> ReportLine:
    """A line from results oldest first; the last is the current one."""
    current = results[-1] if results else None
    return ReportLine(
        service=objective.service,
        name=objective.name,
        category=objective.category,
        objective_percent=objective.objective_percent,
        window_seconds=objective.window_seconds,
        actual=current.percent if current else None,
        window_from=rfc3339(current.start_s) if current else None,
        window_to=rfc3339(current.end_s) if current else None,
        trend=tuple(r.met for r in results[-TREND_LENGTH:]),
        coverage=current.coverage if current else None,
    )


def lines_from_prometheus(
    objectives: list[Objective], source: PromQLSource, at: float, trend_step_s: float
) -> list[ReportLine]:
    """Each objective over its window, now and at the previous trend steps (oldest first)."""
    lines = []
    for objective in objectives:
        times = [at - trend_step_s * k for k in range(TREND_LENGTH - 1, -1, -1)]
        lines.append(line_from_results(objective, [source.evaluate(objective, t) for t in times]))
    return lines


# -- formats -------------------------------------------------------------------------------


def _grouped(lines: list[ReportLine]) -> list[tuple[str, list[ReportLine]]]:
    groups: dict[str, list[ReportLine]] = {}
    for line in lines:
        groups.setdefault(line.service, []).append(line)
    return list(groups.items())


def fmt_current(line: ReportLine) -> str:
    return NO_DATA if line.actual is None else f"{line.actual:.2f}%"


def fmt_objective(percent: float) -> str:
    return f"{percent:g}%"


def fmt_icon(line: ReportLine, pad: bool = False) -> str:
    """✅, ❌, or — for no data (padded to the emoji's two columns when aligning a table)."""
    met = line.met
    if met is None:
        return NO_DATA + " " if pad else NO_DATA
    return MET if met else NOT_MET


def fmt_coverage(line: ReportLine) -> str:
    """The observed part of the window: `100%`, `0.02%` (a young or restarted window), `—`."""
    return format_coverage(line.coverage)


def _shows_coverage(lines: list[ReportLine]) -> bool:
    # Known only for the exporter's own windows; a Prometheus report keeps its old columns.
    return any(line.coverage is not None for line in lines)


def fmt_trend(line: ReportLine) -> str:
    return " ".join(NO_DATA if t is None else (TREND_MET if t else TREND_NOT_MET) for t in line.trend)


def render_table(lines: list[ReportLine]) -> Table:
    table = Table(box=None, show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("", no_wrap=True)
    table.add_column("Current", justify="right", no_wrap=True)
    table.add_column("Objective", justify="right", no_wrap=True)
    table.add_column("/ Time Window", no_wrap=True)
    table.add_column("Type", no_wrap=True)
    table.add_column("Trend", no_wrap=True)
    coverage = _shows_coverage(lines)
    if coverage:
        table.add_column("Observed", justify="right", no_wrap=True)
    for number, (service, members) in enumerate(_grouped(lines), start=1):
        table.add_row(Text(f"  Service #{number}: {service}", style="bold"))
        for line in members:
            cells = [
                f"  {fmt_icon(line, pad=True)} {line.name}",
                fmt_current(line),
                fmt_objective(line.objective_percent),
                f"/ {format_duration(line.window_seconds)}",
                line.type,
                fmt_trend(line),
            ]
            table.add_row(*cells, *([fmt_coverage(line)] if coverage else []))
    return table


def render_text(lines: list[ReportLine]) -> str:
    out = []
    for number, (service, members) in enumerate(_grouped(lines), start=1):
        out.append(f"Service #{number}: {service}")
        for line in members:
            state = {None: "no data", True: "met", False: "not met"}[line.met]
            observed = f", {fmt_coverage(line)} of the window observed" if line.coverage is not None else ""
            out.append(
                f"  {fmt_icon(line)} {line.name}: {fmt_current(line)} of "
                f"{fmt_objective(line.objective_percent)} / {format_duration(line.window_seconds)} "
                f"({line.type}, {state}{observed}) trend {fmt_trend(line) or NO_DATA}"
            )
    return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(lines: list[ReportLine]) -> str:
    coverage = _shows_coverage(lines)
    out = [
        "| | Service | Objective | Current | Target | / Time Window | Type | Trend |"
        + (" Observed |" if coverage else ""),
        "|---|---|---|---:|---:|---|---|---|" + ("---:|" if coverage else ""),
    ]
    for service, members in _grouped(lines):
        for line in members:
            out.append(
                f"| {fmt_icon(line)} | {_md(service)} | {_md(line.name)} | {fmt_current(line)} | "
                f"{fmt_objective(line.objective_percent)} | {format_duration(line.window_seconds)} | "
                f"{line.type} | {fmt_trend(line)} |" + (f" {fmt_coverage(line)} |" if coverage else "")
            )
    return "\n".join(out) + "\n"


def report_document(lines: list[ReportLine], timestamp: float) -> dict[str, Any]:
    """The Reliably CLI's JSON/YAML report shape, latest results only."""
    return {
        "timestamp": rfc3339(timestamp),
        "services": [
            {
                "name": service,
                "service_levels": [
                    {
                        "name": line.name,
                        "type": line.type,
                        "objective": line.objective_percent,
                        "period": format_duration(line.window_seconds),
                        "result": {"actual": line.actual, "delta": line.delta, "slo_is_met": line.met},
                        "window": {"from": line.window_from, "to": line.window_to,
                                   **({"coverage": line.coverage} if line.coverage is not None else {})},
                    }
                    for line in members
                ],
            }
            for service, members in _grouped(lines)
        ],
    }


def render(lines: list[ReportLine], fmt: str, timestamp: float) -> RenderableType:
    """A rich renderable (table) or a string (other formats)."""
    if fmt == "table":
        return render_table(lines)
    if fmt == "text":
        return render_text(lines)
    if fmt == "markdown":
        return render_markdown(lines)
    if fmt == "json":
        return json.dumps(report_document(lines, timestamp), indent=2, ensure_ascii=False) + "\n"
    if fmt == "yaml":
        return str(yaml.safe_dump(report_document(lines, timestamp), sort_keys=False, allow_unicode=True))
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def to_string(renderable: RenderableType, width: int = 140) -> str:
    """Plain text of a renderable, as a pipe or a test sees it."""
    if isinstance(renderable, str):
        return renderable
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False, highlight=False)
    console.print(renderable)
    # rich pads every cell to its column; trailing blanks say nothing to a reader or a diff.
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"


def print_report(console: Console, renderable: RenderableType) -> None:
    if isinstance(renderable, str) or not console.is_terminal:
        # Plain formats, and tables sent to a pipe, go out verbatim: no markup parsing, no
        # wrapping, no trailing padding.
        console.file.write(to_string(renderable, console.width))
        console.file.flush()
    else:
        console.print(renderable)


def watch(
    console: Console,
    produce: Callable[[], RenderableType],
    *,
    every_s: float = 3.0,
    sleep: Callable[[float], None] | None = None,
) -> None:
    """Refresh in place every `every_s` until Ctrl-C. A failing source shows its error and is retried."""
    import time

    from rich.live import Live

    pause = sleep or time.sleep

    def frame() -> RenderableType:
        try:
            renderable = produce()
        except (ExporterError, QueryError) as exc:
            return Text(f"error: {exc} (retrying every {every_s:g}s)")
        return Text(renderable) if isinstance(renderable, str) else renderable

    try:
        with Live(frame(), console=console, auto_refresh=False) as live:
            while True:
                pause(every_s)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        pass
