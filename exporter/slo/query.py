"""The one PromQL builder: every query the bridge, `slo rules` and the dashboards send.

Pure text: no I/O. Three things are stated here once and nowhere else:

- **quoting** (`quote`): a PromQL double-quoted literal, escaping backslash, quote and newline;
- **the `le` matcher** (`le_regex`): every spelling of a bucket bound that a scrape may carry.
  Prometheus 3 rewrites `le="1"` to `le="1.0"` at ingestion while Prometheus 2 keeps what the
  target wrote, and other clients write `0.150` or `1e-05`; the regex accepts them all, so a
  rule and the bridge read the same bucket on either version;
- **the SLI** (`sli`): for each objective, its total events and *either* its good or its bad
  events, whichever the data states directly:

      latency       good  = sum(rate(<h>_bucket{<narrowing>, le=~"<bound spellings>"}[W]))
      availability  bad   = sum(rate(<h>_count{<narrowing>, status=~"<bad classes>"}[W])) or vector(0)
      promql        good  = sum(<manifest good>) or vector(0)      ({{window}} replaced by W)
                    total = sum(rate(<h>_count{<narrowing>}[W]))  (promql: sum(<manifest total>))

  The other side is derived in one place each: `error_ratio` for PromQL text (recording
  rules, dashboards) and `Sli.good_of` for numbers (the bridge). A missing error series
  (`or vector(0)`) counts as zero errors; an empty *total* is "no data"; an empty latency
  *good* with traffic means the histogram has no bucket at the target, an error.

Which histogram an objective reads (`histogram`) and how it narrows its series
(`narrowing`) live here alone: an objective on gRPC calls (`rpc_service`, `rpc_method`)
is a change to those two functions, and the bridge, the rules and the dashboards follow.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from exporter.metrics import GRPC_BAD_CODES, HTTP_DURATION, RPC_DURATION, format_bound
from exporter.slo.manifest import STATUS_CLASSES, Objective, format_duration

__all__ = [
    "PORT_LABEL",
    "ROUTE_LABEL",
    "SERVICE_NAME_LABEL",
    "STATUS_LABEL",
    "Sli",
    "error_ratio",
    "grpc_server_error_regex",
    "histogram",
    "job_matchers",
    "le_regex",
    "le_spellings",
    "narrowing",
    "number",
    "quote",
    "selector",
    "sli",
    "status_classes_regex",
]

STATUS_LABEL = "http_response_status_code"
ROUTE_LABEL = "http_route"
PORT_LABEL = "server_port"
SERVICE_NAME_LABEL = "service_name"
RPC_SYSTEM_LABEL = "rpc_system"
RPC_SERVICE_LABEL = "rpc_service"
RPC_METHOD_LABEL = "rpc_method"
GRPC_STATUS_LABEL = "rpc_grpc_status_code"

_MAX_DECIMALS = 3  # 0.15 -> 0.150; 1 -> 1.000: the widest padding clients are seen to write


def quote(value: str) -> str:
    """A PromQL double-quoted string literal (escapes backslash, quote, newline)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def number(value: float) -> str:
    """A float in a query: up to 10 significant digits, so 1 - 0.995 reads 0.005."""
    return format(value, ".10g")


def le_spellings(bound: float) -> list[str]:
    """Every way a bucket bound may be written in `le`, shortest first.

    Ours and Prometheus 3's (`format_bound`: `0.15`, `1.0`), the integer form of whole
    numbers (`1`, Prometheus 2 keeping what a Go client wrote), zero-padded decimals up to
    three places (`0.150`, `1.000`) and Go's shortest form (`1e-05`)."""
    canonical = format_bound(bound)
    forms = {canonical, f"{float(bound):g}"}
    if "e" not in canonical and "inf" not in canonical.lower():
        whole, _, fraction = canonical.partition(".")
        fraction = fraction.rstrip("0")
        if not fraction:
            forms.add(whole)
        for width in range(max(len(fraction), 1), _MAX_DECIMALS + 1):
            forms.add(f"{whole}.{fraction.ljust(width, '0')}")
    return sorted(forms, key=lambda s: (len(s), s))


def le_regex(bound: float) -> str:
    """The regex (for `le=~`) of `le_spellings`; Prometheus anchors it, so nothing else matches."""
    return "|".join(re.escape(s).replace("\\-", "-") for s in le_spellings(bound))


def selects_rpc(objective: Objective) -> bool:
    return objective.rpc_service is not None or objective.rpc_method is not None


def histogram(objective: Objective) -> tuple[str, str]:
    """(histogram, status label) an objective reads: the RPC histogram and its gRPC status for
    an objective on gRPC calls (`rpc_service`/`rpc_method`), else the HTTP one."""
    if selects_rpc(objective):
        return RPC_DURATION, GRPC_STATUS_LABEL
    return HTTP_DURATION, STATUS_LABEL


def narrowing(objective: Objective) -> list[str]:
    """The label matchers an objective puts on the exporter's series: route, port, the
    server's service name, and for gRPC objectives the RPC system, service and method."""
    matchers = []
    if selects_rpc(objective):
        matchers.append(f'{RPC_SYSTEM_LABEL}="grpc"')
        if objective.rpc_service is not None:
            matchers.append(f"{RPC_SERVICE_LABEL}={quote(objective.rpc_service)}")
        if objective.rpc_method is not None:
            matchers.append(f"{RPC_METHOD_LABEL}={quote(objective.rpc_method)}")
    if objective.route is not None:
        matchers.append(f"{ROUTE_LABEL}={quote(objective.route)}")
    if objective.port is not None:
        matchers.append(f"{PORT_LABEL}={quote(str(objective.port))}")
    if objective.service_name is not None:
        matchers.append(f"{SERVICE_NAME_LABEL}={quote(objective.service_name)}")
    return matchers


def selector(matchers: Sequence[str]) -> str:
    return "{" + ", ".join(matchers) + "}"


def job_matchers(job_selector: str) -> list[str]:
    """`job="x", env="y"` (already validated by the caller) as a list of matchers."""
    return [m.strip() for m in job_selector.split(",") if m.strip()] if job_selector else []


def status_classes_regex(classes: Sequence[str]) -> str:
    """`5..` for ["5xx"], `4..|5..` for ["4xx", "5xx"]: the status label's regex of classes."""
    return "|".join(f"{c[0]}.." for c in classes)


def grpc_server_error_regex(codes: Sequence[str] = GRPC_BAD_CODES) -> str:
    """The rpc_grpc_status_code regex of the codes that count as server errors."""
    return "|".join(re.escape(code) for code in codes)


def _bad_regex(objective: Objective) -> str | None:
    """The status label's regex of bad events; None when every class is good."""
    if selects_rpc(objective):
        return grpc_server_error_regex(objective.grpc_bad_codes) if objective.grpc_bad_codes else None
    bad = [c for c in STATUS_CLASSES if c not in objective.good_status_classes]
    return status_classes_regex(bad) if bad else None


@dataclass(frozen=True, slots=True)
class Sli:
    """An objective's events over one window as PromQL: total, and exactly one of good / bad."""

    total: str
    good: str | None = None
    bad: str | None = None

    def good_of(self, total: float, stated: float) -> float:
        """Good events from the total and the value of the stated side (`good` or `bad`)."""
        return stated if self.good is not None else max(0.0, total - stated)

    @property
    def stated(self) -> str:
        """The query of the side this SLI states (good or bad)."""
        text = self.good if self.good is not None else self.bad
        assert text is not None
        return text


def sli(objective: Objective, window: str | float | None = None, extra: Sequence[str] = (),
        by: Sequence[str] = ()) -> Sli:
    """The SLI of `objective` over `window` (a duration like `5m`, seconds, or the objective's
    own window), on series narrowed by the objective and the `extra` matchers (a job selector).

    `by`: labels to keep apart (`service_name` in the generated rules), one SLI per value; a
    missing error series then reads as 0 per total's label set, not as one unlabelled 0."""
    if window is None:
        window = objective.window_seconds
    if not isinstance(window, str):
        window = format_duration(window)
    if objective.promql is not None:
        good, total = objective.promql.render(window)
        return Sli(total=f"sum({total})", good=f"sum({good}) or vector(0)")
    metric, status_label = histogram(objective)
    base = [*extra, *narrowing(objective)]
    total_sum = _sum(by)
    total = f"{total_sum}(rate({metric}_count{selector(base)}[{window}]))"
    if objective.category == "latency":
        assert objective.latency_target_seconds is not None
        le = f"le=~{quote(le_regex(objective.latency_target_seconds))}"
        return Sli(total=total, good=f"{total_sum}(rate({metric}_bucket{selector([*base, le])}[{window}]))")
    zero = f"0 * {total}" if by else "vector(0)"
    bad_regex = _bad_regex(objective)
    if bad_regex is None:
        return Sli(total=total, bad=zero)
    status = f"{status_label}=~{quote(bad_regex)}"
    return Sli(total=total, bad=f"{total_sum}(rate({metric}_count{selector([*base, status])}[{window}])) or {zero}")


def _sum(by: Sequence[str]) -> str:
    return f"sum by ({', '.join(by)}) " if by else "sum"


def error_ratio(query: Sli) -> str:
    """1 - SLI as one expression. Dividing by `(total > 0)` leaves no sample at all when there
    was no traffic (not NaN, not +Inf), so a recording shows a gap and no alert can fire."""
    total = f"({query.total} > 0)"
    if query.good is not None:
        return f"1 - ({_operand(query.good)} / {total})"
    assert query.bad is not None
    return f"{_operand(query.bad)} / {total}"


def _operand(expr: str) -> str:
    """`a or b` binds looser than `/`: bracket it before dividing."""
    return f"({expr})" if " or " in expr else expr
