"""Click commands for SLOs: `slo sync`, `slo report` and `bridge`. The lead's cli.py attaches them.

Every option names its environment variable. Bad values fail in a ParamType or callback
with one line; failures at run time are ExporterError subclasses, which the top-level
wrapper prints as one line.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click
from rich.console import Console

from exporter.bridge.backoff import Backoff
from exporter.bridge.client import PushRejected, PushRetryable, ReliablyClient
from exporter.bridge.indicator import Indicator
from exporter.bridge.pusher import Pusher
from exporter.bridge.scheduler import IntervalScheduler
from exporter.bridge.settings import PushSettings, resolve_push_settings
from exporter.bridge.spool import Spool, default_spool_dir
from exporter.config import DEFAULT_PUSH_INTERVAL_S, env_var
from exporter.errors import ConfigError, PushError, QueryError
from exporter.slo.evaluate import Result
from exporter.slo.manifest import Objective, load_manifest, parse_duration
from exporter.slo.promql import PrometheusClient, PromQLIntervals, PromQLSource
from exporter.slo.report import (
    FORMATS,
    fetch_snapshot,
    lines_from_prometheus,
    lines_from_snapshot,
    print_report,
    render,
    watch,
)

log = logging.getLogger("ebpf_slo_exporter.slo")

Bridge = IntervalScheduler[tuple[Objective, Result]]  # the scheduler with PromQL as its source

# Prometheus keeps its data for weeks, but an hour-old interval is rarely worth a late
# indicator; older ones are skipped and counted (slo_intervals_skipped_total).
MAX_CATCHUP_S = 3600.0


def _env(flag: str) -> str:
    return env_var(flag)


class Duration(click.ParamType):  # type: ignore[type-arg]
    """`10s`, `1m`, `500ms` → seconds (float)."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class HttpUrl(click.ParamType):  # type: ignore[type-arg]
    name = "url"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip()
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            self.fail(f"{text!r} is not an http(s) URL such as http://127.0.0.1:9090", param, ctx)
        return text.rstrip("/")


def _load_objectives(ctx: click.Context, param: click.Parameter, value: str | None) -> list[Objective] | None:
    if value is None:
        return None
    try:
        return load_manifest(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc


def _whole_seconds(ctx: click.Context, param: click.Parameter, value: float) -> int:
    if value < 1 or value != int(value):
        raise click.BadParameter(
            f"must be a whole number of seconds, at least 1s, got {value:g}s", ctx, param
        )
    return int(value)


F = TypeVar("F", bound=Callable[..., Any])


def _slo_option(required: bool) -> Callable[[F], F]:
    return click.option(
        "--slo",
        "objectives",
        required=required,
        envvar=_env("slo"),
        show_envvar=True,
        callback=_load_objectives,
        metavar="FILE",
        help="Reliably objectives manifest (multi-document YAML).",
    )


def push_options(func: F) -> F:
    """The Reliably options, shared with `run` (the lead can decorate it with these too)."""
    for option in reversed(
        [
            click.option(
                "--reliably-url",
                envvar="RELIABLY_URL",
                show_envvar=True,
                type=HttpUrl(),
                default=None,
                help="Reliably API base URL [default: https://reliably.com; https://api.reliably.com works].",
            ),
            click.option(
                "--reliably-org",
                envvar="RELIABLY_ORG",
                show_envvar=True,
                default=None,
                help="Reliably organisation (default: currentOrg.name of the Reliably CLI config).",
            ),
            click.option(
                "--reliably-token",
                envvar="RELIABLY_TOKEN",
                show_envvar=True,
                default=None,
                show_default=False,
                help="API token; prefer the RELIABLY_TOKEN variable, as flags show up in ps.",
            ),
            click.option(
                "--reliably-config",
                envvar="RELIABLY_CONFIG",
                show_envvar=True,
                default=None,
                type=click.Path(dir_okay=False, path_type=Path),
                help="Reliably CLI config file [default: ~/.config/reliably/config.yaml].",
            ),
        ]
    ):
        func = option(func)
    return func


def settings_from_options(
    reliably_url: str | None,
    reliably_org: str | None,
    reliably_token: str | None,
    reliably_config: Path | None,
) -> PushSettings | None:
    return resolve_push_settings(reliably_url, reliably_org, reliably_token, config_path=reliably_config)


@click.group()
def slo() -> None:
    """Service level objectives: push them to Reliably, report on them."""


@slo.command()
@_slo_option(required=True)
@push_options
@click.option("--dry-run", is_flag=True, help="Print the objective bodies instead of sending them.")
def sync(
    objectives: list[Objective],
    reliably_url: str | None,
    reliably_org: str | None,
    reliably_token: str | None,
    reliably_config: Path | None,
    dry_run: bool,
) -> None:
    """PUT every objective of the manifest to Reliably, like `reliably slo sync`."""
    bodies = [objective_body(o) for o in objectives]
    if dry_run:
        for body in bodies:
            click.echo(json.dumps(body, sort_keys=True))
        return
    settings = settings_from_options(reliably_url, reliably_org, reliably_token, reliably_config)
    if settings is None:
        raise ConfigError(
            "slo sync needs a Reliably token: set RELIABLY_TOKEN and RELIABLY_ORG, "
            "or log in with the Reliably CLI"
        )
    client = ReliablyClient(settings)
    try:
        for objective, body in zip(objectives, bodies, strict=True):
            _put_with_retries(client, "objective", body)
            click.echo(f"synced {objective.service} / {objective.name}")
    finally:
        client.close()


def _put_with_retries(
    client: ReliablyClient,
    kind: str,
    body: dict[str, Any],
    attempts: int = 3,
    backoff: Backoff | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    backoff = backoff or Backoff()
    for attempt in range(1, attempts + 1):
        try:
            client.put(kind, body)
            return
        except PushRetryable as exc:
            if attempt == attempts:
                raise PushError(f"{exc} (gave up after {attempts} attempts)") from exc
            sleep(exc.retry_after_s if exc.retry_after_s is not None else backoff.delay(attempt))
        except PushRejected:
            raise


def objective_body(objective: Objective) -> dict[str, Any]:
    """The manifest's objective as Reliably stores it; our extension fields are not sent."""
    labels = dict(objective.labels)
    labels.setdefault("name", objective.name)
    return {
        "metadata": {"labels": labels},
        "spec": {
            "indicatorSelector": dict(objective.selector),
            "objectivePercent": objective.objective_percent,
            "window": objective.window_text,
        },
    }


@slo.command()
@click.option(
    "--from",
    "from_url",
    type=HttpUrl(),
    envvar=_env("report_from"),
    show_envvar=True,
    metavar="URL",
    help="A running exporter (its /api/v1/slo), e.g. http://127.0.0.1:9640.",
)
@click.option(
    "--prometheus",
    type=HttpUrl(),
    envvar=_env("prometheus"),
    show_envvar=True,
    metavar="URL",
    help="Evaluate through Prometheus instead (needs --slo).",
)
@_slo_option(required=False)
@click.option("-w", "--watch", "watch_", is_flag=True, help="Refresh every 3 seconds until Ctrl-C.")
@click.option(
    "-f",
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    envvar=_env("report_format"),
    show_envvar=True,
    help="Output format.",
)
@click.option(
    "--trend-step",
    type=Duration(),
    default="10s",
    show_default=True,
    envvar=_env("trend_step"),
    show_envvar=True,
    help="With --prometheus: time between the trend's results.",
)
@click.option(
    "--timeout",
    type=Duration(),
    default="5s",
    show_default=True,
    envvar=_env("query_timeout"),
    show_envvar=True,
    help="HTTP timeout of each request.",
)
def report(
    from_url: str | None,
    prometheus: str | None,
    objectives: list[Objective] | None,
    watch_: bool,
    fmt: str,
    trend_step: float,
    timeout: float,
) -> None:
    """Print the SLO report: per service, each SLI against its objective and the last 5 results."""
    if (from_url is None) == (prometheus is None):
        raise click.UsageError(
            "give either --from URL (a running exporter) or --prometheus URL with --slo FILE"
        )
    if prometheus is not None and objectives is None:
        raise click.UsageError("--prometheus needs --slo FILE: the objectives to evaluate")
    console = Console(highlight=False)
    if not console.is_terminal:
        # Piped: rich would squeeze the table into 80 columns with ellipses; let it be as wide as it needs.
        console = Console(highlight=False, width=max(console.width, 250))

    source: PromQLSource | None = None
    if prometheus is not None:
        assert objectives is not None
        prom_objectives = objectives
        source = PromQLSource(PrometheusClient(prometheus, timeout_s=timeout), attempts=1)

        def produce() -> Any:
            now = time.time()
            return render(lines_from_prometheus(prom_objectives, source, now, trend_step), fmt, now)
    else:
        assert from_url is not None
        url = from_url

        def produce() -> Any:
            lines = lines_from_snapshot(fetch_snapshot(url, timeout_s=timeout), objectives)
            return render(lines, fmt, time.time())

    try:
        if watch_:
            watch(console, produce)
        else:
            print_report(console, produce())
    finally:
        if source is not None:
            source.client.close()


@click.command()
@_slo_option(required=True)
@click.option(
    "--prometheus",
    type=HttpUrl(),
    required=True,
    envvar=_env("prometheus"),
    show_envvar=True,
    metavar="URL",
    help="Prometheus that scrapes the exporter, e.g. http://127.0.0.1:9090.",
)
@push_options
@click.option(
    "--push-interval",
    type=Duration(),
    default=f"{DEFAULT_PUSH_INTERVAL_S}s",
    show_default=True,
    callback=_whole_seconds,
    envvar=_env("push_interval"),
    show_envvar=True,
    help="Indicator interval, clock aligned (at least 2 scrape intervals).",
)
@click.option(
    "--grace",
    type=Duration(),
    default="5s",
    show_default=True,
    envvar=_env("grace"),
    show_envvar=True,
    help="Wait this long after an interval ends before evaluating it (lets Prometheus scrape).",
)
@click.option(
    "--spool-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar=_env("spool_dir"),
    show_envvar=True,
    help="Where unsent indicators wait [default: $XDG_STATE_HOME/ebpf-slo-exporter/spool].",
)
@click.option("--dry-run", is_flag=True, help="Print indicator bodies as JSON lines instead of pushing.")
@click.option("--once", is_flag=True, help="Evaluate the last closed interval, push it, and exit.")
def bridge(
    objectives: list[Objective],
    prometheus: str,
    reliably_url: str | None,
    reliably_org: str | None,
    reliably_token: str | None,
    reliably_config: Path | None,
    push_interval: int,
    grace: float,
    spool_dir: Path | None,
    dry_run: bool,
    once: bool,
) -> None:
    """Evaluate the objectives through Prometheus every push interval and push Reliably indicators."""
    settings = (
        None
        if dry_run
        else settings_from_options(reliably_url, reliably_org, reliably_token, reliably_config)
    )
    if settings is None and not dry_run:
        raise ConfigError(
            "bridge needs a Reliably org and token: set RELIABLY_TOKEN and RELIABLY_ORG, log in "
            "with the Reliably CLI, or use --dry-run to print indicators instead"
        )
    client = PrometheusClient(prometheus)
    pusher = None
    if settings is not None:
        pusher = Pusher(ReliablyClient(settings), Spool(spool_dir or default_spool_dir()))
    printed: list[Indicator] = []
    loop: Bridge = IntervalScheduler(
        PromQLIntervals(objectives, PromQLSource(client), push_interval),
        pusher,
        interval_s=push_interval,
        grace_s=grace,
        max_catchup_s=MAX_CATCHUP_S,
        on_indicators=printed.extend if dry_run else None,
        thread_name="bridge",
    )
    try:
        if once:
            _bridge_once(loop, printed, dry_run)
        elif dry_run:
            _dry_run_loop(loop, printed)
        else:
            log.info("bridging %d objectives from %s every %ds", len(objectives), prometheus, push_interval)
            _bridge_forever(loop)
    finally:
        client.close()
        if pusher is not None:
            pusher.client.close()


def _bridge_once(loop: Bridge, printed: list[Indicator], dry_run: bool) -> None:
    # Re-open the last closed interval, whatever an earlier run recorded.
    last = int((time.time() - loop.grace_s) // loop.interval_s) * loop.interval_s
    loop.closed_until_s = last - loop.interval_s
    loop.tick()
    if loop.evaluations["error"]:
        raise QueryError(f"the last interval could not be evaluated: {loop.last_error}")
    if dry_run:
        for indicator in printed:
            click.echo(json.dumps(indicator.body(), sort_keys=True))
        return
    pusher = loop.pusher
    if pusher is not None:
        pusher.pump(time.monotonic() + 30.0, threading.Event())
        if len(pusher.spool):
            raise PushError(
                f"{len(pusher.spool)} indicators not delivered ({pusher.last_error}); "
                f"they stay spooled in {pusher.spool.directory}"
            )


def _bridge_forever(loop: Bridge) -> None:
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        loop.run(stop)
    except KeyboardInterrupt:
        stop.set()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _dry_run_loop(loop: Bridge, printed: list[Indicator]) -> None:
    try:
        while True:
            loop.tick()
            for indicator in printed:
                click.echo(json.dumps(indicator.body(), sort_keys=True))
            printed.clear()
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
