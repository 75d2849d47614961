"""Prometheus rules from a Reliably manifest: SLI recordings and multiwindow burn-rate alerts.

`render_rules(objectives)` returns the text of a Prometheus rule file, one group per
objective (groups are evaluated concurrently, rules inside a group in order, so keeping an
objective's recordings and alerts in one group means its alerts never read a recording
from the previous cycle). Usage: `ebpf-slo-exporter slo rules --slo reliably.yaml > rules.yml`.

What is recorded, each series labelled `slo` (the objective's slug), `service`, `category`:

    slo:sli_error:ratio_rate<W>       error ratio over W for W in 5m 30m 1h 2h 6h 1d 3d and
                                      the objective's own period (its `window`); the standard
                                      windows are emitted even when the period is shorter
                                      (the demo's 1m), because the alerts need them
    slo:burn_rate:ratio_rate<W>       the same divided by the error budget (1 - objective)
    slo:objective:ratio               the objective, e.g. 0.995           (+ window=<period>)
    slo:error_budget:ratio            1 - objective                       (+ window=<period>)
    slo:sli_error:ratio_period        error ratio over the period         (+ window=<period>)
    slo:error_budget_remaining:ratio  1 - period error ratio / budget     (+ window=<period>)

The SLI is always a ratio of sums over the raw counters (never an average of ratios), and
its PromQL comes from exporter/slo/query.py, the builder the bridge and the dashboards use
too, so a recording and a pushed indicator read the same series the same way:

- latency:      1 - sum(rate(bucket{le=~<every spelling of the target>}[W])) / sum(rate(count[W]))
  The target must be a bucket bound (the exporter adds one for every latency objective);
  if it is not, the recording is empty rather than a made-up value.
- availability: sum(rate(count{status=~<bad classes>}[W])) / sum(rate(count[W])), the bad
  classes being those not in `goodStatusClasses` (5xx by default). `or vector(0)` makes a
  missing error series (no 5xx seen yet) count as zero errors instead of an empty result.
- promql:       1 - sum(good) / sum(total), `{{window}}` replaced by W; good gets the same
  `or vector(0)` guard. Both queries must return instant vectors.

No traffic: every division is by `(total > 0)`, which keeps only samples whose total is
above zero. With no requests in W the recording has no sample at all (not NaN, not +Inf),
so dashboards show a gap, the budget is not touched and no alert can fire: an alert's
`and` needs both of its windows to have a sample.

Alerts follow the Google SRE workbook's multiwindow, multi-burn-rate table:

    severity  long  short  budget spent  factor on a 30d period
    page      1h    5m     2%            14.4
    page      6h    30m    5%             6
    ticket    1d    2h     10%            3
    ticket    3d    6h     10%            1

factor = budget fraction x period / long window, so other periods scale: a 7d period pages
at 3.36x over 1h. When the period is shorter than a long window the formula drops below 1,
which would alert on a service that meets its objective; the factor is therefore floored at
1 ("over the long window the errors exceeded what the objective allows"). For the demo's 1m
period all four alerts use factor 1. The alert is named SLOErrorBudgetBurn and carries
severity, slo, service, category, long_window and short_window labels.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import click
import yaml

from exporter.errors import ConfigError
from exporter.slo.manifest import Objective, format_duration, load_manifest
from exporter.slo.query import SERVICE_NAME_LABEL, error_ratio, job_matchers, le_regex, quote, selector, sli
from exporter.slo.query import number as _number

__all__ = [
    "ALERT_NAME",
    "BURN_RATE_ALERTS",
    "STANDARD_WINDOWS",
    "BurnRateAlert",
    "as_prometheus_rule",
    "burn_rate_factor",
    "le_regex",
    "render_rules",
    "rules",
    "rules_command",
    "sli_error_expr",
]

STANDARD_WINDOWS: tuple[str, ...] = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
ALERT_NAME = "SLOErrorBudgetBurn"
DEFAULT_RUNBOOK_URL = "https://example.com/runbooks/{slo}"
# Where deploy/kubernetes/ puts the exporter, and the name its PrometheusRule gets.
DEFAULT_NAMESPACE = "ebpf-slo-exporter"
PROMETHEUS_RULE_NAME = "ebpf-slo-exporter-slos"
_LABEL_NAME = re.compile(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")

_WINDOW_SECONDS = {"5m": 300, "30m": 1800, "1h": 3600, "2h": 7200, "6h": 21600, "1d": 86400, "3d": 259200}


@dataclass(frozen=True, slots=True)
class BurnRateAlert:
    severity: str
    long_window: str
    short_window: str
    budget_fraction: float  # share of the period's budget spent within the long window


BURN_RATE_ALERTS: tuple[BurnRateAlert, ...] = (
    BurnRateAlert("page", "1h", "5m", 0.02),
    BurnRateAlert("page", "6h", "30m", 0.05),
    BurnRateAlert("ticket", "1d", "2h", 0.10),
    BurnRateAlert("ticket", "3d", "6h", 0.10),
)


def burn_rate_factor(alert: BurnRateAlert, period_seconds: float) -> float:
    """budget fraction x period / long window, floored at 1 (see the module docstring)."""
    factor = alert.budget_fraction * period_seconds / _WINDOW_SECONDS[alert.long_window]
    return max(round(factor, 6), 1.0)


def per_service(objective: Objective) -> tuple[str, ...]:
    """What the rules keep apart: each server's `service_name`, so two services behind one port
    or route get their own SLI, burn rate and alert, unless the objective already names one.
    PromQL objectives (`spec.promql`, OpenSLO queries) are the user's own queries, left as written."""
    if objective.service_name is not None or objective.promql is not None:
        return ()
    return (SERVICE_NAME_LABEL,)


def sli_error_expr(objective: Objective, window: str, job_selector: str = "") -> str:
    """The PromQL of the objective's error ratio over `window`, one series per service (empty,
    never NaN, with no traffic)."""
    return error_ratio(sli(objective, window, job_matchers(job_selector), by=per_service(objective)))


def _windows(objective: Objective) -> list[str]:
    period = format_duration(objective.window_seconds)
    return list(STANDARD_WINDOWS) + ([period] if period not in STANDARD_WINDOWS else [])


def _group(objective: Objective, job_selector: str, runbook_url: str) -> dict[str, Any]:
    labels = {"slo": objective.slug, "service": objective.service, "category": objective.category}
    period = format_duration(objective.window_seconds)
    period_labels = {**labels, "window": period}
    budget = max(1.0 - objective.objective_ratio, 1e-9)  # a 100% objective has no budget; stay finite
    match = selector([f"slo={quote(objective.slug)}"])
    rules: list[dict[str, Any]] = []

    for window in _windows(objective):
        rules.append(
            {
                "record": f"slo:sli_error:ratio_rate{window}",
                "expr": sli_error_expr(objective, window, job_selector),
                "labels": dict(labels),
            }
        )
    for window in _windows(objective):
        rules.append(
            {
                "record": f"slo:burn_rate:ratio_rate{window}",
                "expr": f"slo:sli_error:ratio_rate{window}{match} / {_number(budget)}",
                "labels": dict(labels),
            }
        )
    rules.extend(
        [
            {
                "record": "slo:objective:ratio",
                "expr": f"vector({_number(objective.objective_ratio)})",
                "labels": dict(period_labels),
            },
            {
                "record": "slo:error_budget:ratio",
                "expr": f"vector({_number(budget)})",
                "labels": dict(period_labels),
            },
            {
                "record": "slo:sli_error:ratio_period",
                "expr": f"slo:sli_error:ratio_rate{period}{match}",
                "labels": dict(period_labels),
            },
            {
                "record": "slo:error_budget_remaining:ratio",
                "expr": f"1 - slo:sli_error:ratio_rate{period}{match} / {_number(budget)}",
                "labels": dict(period_labels),
            },
        ]
    )

    for alert in BURN_RATE_ALERTS:
        factor = _number(burn_rate_factor(alert, objective.window_seconds))
        rules.append(
            {
                "alert": ALERT_NAME,
                "expr": (
                    f"slo:burn_rate:ratio_rate{alert.long_window}{match} > {factor}\n"
                    f"and\n"
                    f"slo:burn_rate:ratio_rate{alert.short_window}{match} > {factor}"
                ),
                "labels": {
                    "severity": alert.severity,
                    **labels,
                    "long_window": alert.long_window,
                    "short_window": alert.short_window,
                },
                "annotations": {
                    "summary": f"{objective.service}: {objective.name} is burning its error budget"
                    f" ({alert.severity})",
                    "description": (
                        f"Objective {_number(objective.objective_percent)}% over {period}. "
                        f'The burn rate over {alert.long_window} is {{{{ $value | printf "%.2f" }}}} '
                        f"and over {alert.short_window} also above {factor} (a burn rate of 1 spends "
                        f"exactly the budget in {period})."
                    ),
                    "runbook_url": runbook_url.replace("{slo}", objective.slug),
                },
            }
        )
    return {"name": f"slo:{objective.slug}", "rules": rules}


class _RuleDumper(yaml.SafeDumper):
    """Block scalars for multi-line expressions so the rule file reads like a hand-written one."""


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_RuleDumper.add_representer(str, _str_representer)


def render_rules(
    objectives: Sequence[Objective] | Iterable[Objective],
    *,
    job_selector: str = "",
    runbook_url: str = DEFAULT_RUNBOOK_URL,
) -> str:
    """The text of a Prometheus rule file for these objectives.

    `job_selector` is extra label matchers for the exporter's series, e.g. `job="ebpf-slo-exporter"`
    (comma-separated for several); `{slo}` in `runbook_url` becomes the objective's slug.
    """
    objectives = list(objectives)
    if not objectives:
        raise ConfigError("no objectives to render rules for")
    if job_selector and not re.fullmatch(
        r'\s*[A-Za-z_]\w*\s*(=|!=|=~|!~)\s*".*"\s*(,\s*[A-Za-z_]\w*\s*(=|!=|=~|!~)\s*".*"\s*)*', job_selector
    ):
        raise ConfigError(f'job selector {job_selector!r} is not label matchers like job="ebpf-slo-exporter"')
    slugs = [o.slug for o in objectives]
    duplicates = sorted({s for s in slugs if slugs.count(s) > 1})
    if duplicates:
        raise ConfigError(f"two objectives share the rule identifier {duplicates[0]!r}; rename one of them")
    document = {"groups": [_group(o, job_selector, runbook_url) for o in objectives]}
    header = (
        "# Generated by `ebpf-slo-exporter slo rules`; edit the SLO manifest, not this file.\n"
        "# Recording rules slo:* and multiwindow burn-rate alerts " + ALERT_NAME + ".\n"
    )
    return header + yaml.dump(document, Dumper=_RuleDumper, sort_keys=False, width=1000, allow_unicode=True)


def as_prometheus_rule(rule_file: str, *, name: str, namespace: str, labels: dict[str, str],
                       comment: str | None = None) -> str:
    """A rule file's groups as a Prometheus Operator PrometheusRule: the same groups under `spec:`.

    The operator only loads PrometheusRules its Prometheus's `ruleSelector` matches (in
    kube-prometheus-stack, by default, the label `release: <helm release>`), hence `labels`.
    The rule file's leading comment is kept unless `comment` replaces it.
    """
    for key, value in labels.items():
        if not _LABEL_NAME.fullmatch(key) or not _LABEL_VALUE.fullmatch(value):
            raise ConfigError(f"{key}={value!r} is not a Kubernetes label: give --label KEY=VALUE "
                              "like release=kube-prometheus-stack")
    if comment is None:
        header = "".join(line + "\n" for line in rule_file.splitlines() if line.startswith("#"))
    else:
        header = "".join(f"# {line}\n" for line in comment.splitlines())
    groups = yaml.safe_load(rule_file)["groups"]
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": "ebpf-slo-exporter", **labels}},
        "spec": {"groups": groups},
    }
    return header + yaml.dump(resource, Dumper=_RuleDumper, sort_keys=False, width=1000, allow_unicode=True)


def _parse_labels(pairs: Sequence[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--label {pair!r} is not KEY=VALUE, e.g. --label release=kube-prometheus-stack")
        labels[key] = value
    return labels


@click.command("rules")
@click.option(
    "--slo",
    "slo_file",
    required=True,
    type=click.Path(dir_okay=False),
    envvar="EBPF_SLO_FILE",
    help="Reliably manifest (multi-document YAML of kind: Objective).",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write the rule file here instead of standard output.",
)
@click.option(
    "--job-selector",
    default="",
    show_default=False,
    help='Extra label matchers for the exporter\'s series, e.g. job="ebpf-slo-exporter".',
)
@click.option(
    "--runbook-url",
    default=DEFAULT_RUNBOOK_URL,
    show_default=True,
    help="Runbook link put in each alert; {slo} becomes the objective's identifier.",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["rules", "prometheusrule"]),
    default="rules",
    show_default=True,
    help="A plain rule file, or the same groups in a Prometheus Operator PrometheusRule.",
)
@click.option(
    "--namespace",
    default=DEFAULT_NAMESPACE,
    show_default=True,
    help="With --format prometheusrule: the resource's namespace.",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    help="With --format prometheusrule: a label the operator's ruleSelector needs (repeatable), "
    "e.g. release=kube-prometheus-stack.",
)
def rules_command(
    slo_file: str,
    output: str | None,
    job_selector: str,
    runbook_url: str,
    output_format: str,
    namespace: str,
    labels: tuple[str, ...],
) -> None:
    """Write Prometheus recording rules and burn-rate alerts for the objectives in --slo.

    Check the result with `promtool check rules FILE`.
    """
    try:
        text = render_rules(load_manifest(slo_file), job_selector=job_selector, runbook_url=runbook_url)
        if output_format == "prometheusrule":
            text = as_prometheus_rule(text, name=PROMETHEUS_RULE_NAME, namespace=namespace,
                                      labels=_parse_labels(labels))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if output is None:
        sys.stdout.write(text)
        return
    try:
        with open(output, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror}") from exc


rules = rules_command  # the name cli.py attaches to the `slo` group
