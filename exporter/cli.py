"""The command line. The only place that exits the process or prints an error for the user.

Every ExporterError becomes one line on stderr and exit status 1; flag misuse is click's
exit status 2. Tracebacks are for bugs only.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from exporter import __version__
from exporter.config import (
    DEFAULT_DEGRADED_WINDOW_S,
    DEFAULT_FAST_PATH,
    DEFAULT_INSTANCE_GRACE_S,
    DEFAULT_LISTEN,
    DEFAULT_MAX_ROUTES_PER_PORT,
    DEFAULT_POD_LOGS,
    DEFAULT_PUSH_INTERVAL_S,
    DEFAULT_STATE_SAVE_INTERVAL,
    STATE_SUBDIR,
    ListenAddress,
    default_state_dir,
    env_var,
    load_file,
    parse_buckets,
    parse_listen,
    parse_port,
)
from exporter.errors import ConfigError, ExporterError

if TYPE_CHECKING:  # imported lazily at run time: `--help` and `check` stay fast and need no bcc
    from exporter.app import RunSettings
    from exporter.slo.manifest import Objective
    from exporter.slo.runtime import SloRuntime
    from exporter.webconfig import WebConfig

log = logging.getLogger("ebpf_slo_exporter")


def _ports(ctx: click.Context, param: click.Parameter, value: Sequence[str]) -> tuple[int, ...]:
    try:
        return tuple(parse_port(part) for item in value for part in str(item).split(",") if part.strip())
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def _interfaces(ctx: click.Context, param: click.Parameter, value: Sequence[str]) -> tuple[str, ...]:
    names = tuple(part.strip() for item in value for part in str(item).split(",") if part.strip())
    for name in names:
        if len(name) > 15 and not any(c in name for c in "*?["):
            raise click.BadParameter(f"{name!r} is longer than an interface name can be (15 characters)")
    return names or ("lo",)


def _services(ctx: click.Context, param: click.Parameter, value: Sequence[str]) -> tuple[Any, ...]:
    from exporter.identity import parse_service_override

    try:
        return tuple(parse_service_override(str(item)) for item in value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def _listen(ctx: click.Context, param: click.Parameter, value: str) -> ListenAddress:
    try:
        return parse_listen(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def _buckets(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return parse_buckets(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def _config_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Eager: load --config into click's default_map before the other options are read, so
    click itself gives the precedence flag > environment variable > file > built-in default."""
    if not value:
        return value
    values = load_file(value)  # a ConfigError: one line, exit status 1, as before
    params = {p.name: p for p in ctx.command.params}
    defaults: dict[str, Any] = {}
    for name, raw in values.items():
        option = params.get(name)
        if option is None:
            continue
        if option.multiple and not isinstance(raw, (list, tuple)):
            raw = [raw]
        try:  # checked here too, so a bad value names the file it came from
            option.process_value(ctx, raw)
        except click.BadParameter as exc:
            raise ConfigError(f"config file {value}: {name}: {exc.format_message()}") from None
        defaults[name] = raw
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ebpf-slo-exporter")
def cli() -> None:
    """HTTP RED metrics and SLOs from the wire, with an eBPF socket filter.

    Point it at an interface and the ports of an HTTP/1.x service; Prometheus gets request
    counts and latency histograms named after the OpenTelemetry HTTP conventions.
    """


F = TypeVar("F", bound=Callable[..., Any])


def run_options(func: F) -> F:
    options = [
        click.option("--interface", "-i", "interface", multiple=True, envvar=env_var("interface"),
                     default=("lo",), show_default=True, callback=_interfaces,
                     help="Interface to capture on (repeat, or comma-separate): a name, a glob such as "
                          "'veth*', or 'any'. Several, a glob or 'any' capture node-wide: interfaces "
                          "that appear later are picked up, and each exchange is counted once."),
        click.option("--port", "-p", "ports", multiple=True, envvar=env_var("port"), callback=_ports,
                     help="TCP port of the HTTP service (repeat, or comma-separate). Required."),
        click.option("--listen", envvar=env_var("listen"), default=DEFAULT_LISTEN, show_default=True,
                     callback=_listen, help="Where to serve /metrics, as HOST:PORT."),
        click.option("--route", "routes", multiple=True, envvar=env_var("route"),
                     help="Route pattern such as /api/items/{id} (repeatable); matched before the ID heuristic."),
        click.option("--duration-buckets", envvar=env_var("duration_buckets"), callback=_buckets,
                     help="Latency histogram bounds in seconds, comma-separated. SLO latency targets are added."),
        click.option("--max-routes-per-port", type=click.IntRange(1, 100_000), default=DEFAULT_MAX_ROUTES_PER_PORT,
                     show_default=True,
                     envvar=env_var("max_routes_per_port"),
                     help="Distinct http_route values per port before new ones become /{overflow}."),
        click.option("--max-flows", type=click.IntRange(16, 10_000_000), default=65536, show_default=True,
                     envvar=env_var("max_flows"), help="TCP connections tracked at once."),
        click.option("--idle-timeout", type=click.FloatRange(1, 86400), default=300.0, show_default=True,
                     envvar=env_var("idle_timeout"), help="Seconds before an idle connection is forgotten."),
        click.option("--config", "-c", type=click.Path(dir_okay=False), envvar=env_var("config"),
                     is_eager=True, callback=_config_file,
                     help="YAML file with any of these options (flags and env vars win)."),
        click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
                     show_default=True, envvar=env_var("log_level")),
        click.option("--user", envvar=env_var("user"),
                     help="Once the filter is attached, drop every capability and run as this user."),
        click.option("--fast-path/--no-fast-path", default=DEFAULT_FAST_PATH, show_default=True,
                     envvar=env_var("fast_path"),
                     help="Aggregate simple HTTP/1.x exchanges in the kernel (user space gets the rest); "
                          "--no-fast-path parses everything in user space, the reference path."),
        click.option("--service", "services", multiple=True, envvar=env_var("service"), callback=_services,
                     help="Name the servers a selector matches: NAME=port:8080, NAME=process:nginx, "
                          "NAME=cgroup:GLOB or NAME=container:ID-PREFIX (repeatable; first match wins). "
                          "Default: the Kubernetes container name, else the process name."),
        click.option("--pod-logs", type=click.Path(file_okay=False), default=DEFAULT_POD_LOGS, show_default=True,
                     envvar=env_var("pod_logs"),
                     help="The kubelet's pod log directory, whose names give k8s namespace, pod and container."),
        click.option("--instance-grace", type=click.FloatRange(0, 86400), default=DEFAULT_INSTANCE_GRACE_S,
                     show_default=True, envvar=env_var("instance_grace"),
                     help="Seconds a server's series stay after its process is gone."),
        click.option("--tls/--no-tls", default=True, show_default=True, envvar=env_var("tls"),
                     help="Also count HTTPS served through a shared OpenSSL (uprobes on libssl); "
                          "--no-tls leaves TLS traffic uncounted."),
        click.option("--libssl", "libssl", multiple=True, envvar=env_var("libssl"),
                     type=click.Path(exists=True, dir_okay=False),
                     help="Another libssl to probe, besides the system's (repeatable), e.g. "
                          "/proc/<pid>/root/usr/lib/x86_64-linux-gnu/libssl.so.3 for a container's copy."),
        click.option("--web-config", "--web.config.file", "web_config", type=click.Path(dir_okay=False),
                     envvar=env_var("web_config"),
                     help="Prometheus exporter-toolkit web config: TLS and basic auth for the endpoints."),
        click.option("--degraded-window", type=click.FloatRange(1, 3600), default=DEFAULT_DEGRADED_WINDOW_S,
                     show_default=True, envvar=env_var("degraded_window"),
                     help="Seconds a loss (kernel drops, TLS events lost, a full table...) keeps /healthz "
                          "and the degraded gauge saying degraded after it stops."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def slo_options(func: F) -> F:
    options = [
        click.option("--slo", type=click.Path(dir_okay=False), envvar=env_var("slo"),
                     help="Reliably objectives manifest (multi-document YAML) to evaluate."),
        click.option("--push-interval", default=f"{DEFAULT_PUSH_INTERVAL_S}s", show_default=True,
                     envvar=env_var("push_interval"),
                     help="How often indicators are computed and pushed."),
        click.option("--spool-dir", type=click.Path(file_okay=False), envvar=env_var("spool_dir"),
                     help="Where unsent indicators wait (default: $XDG_STATE_HOME/ebpf-slo-exporter/spool)."),
        click.option("--state-dir", type=click.Path(file_okay=False), envvar=env_var("state_dir"),
                     help=f"Where the SLO windows are saved so a restart keeps them "
                          f"(default: <--spool-dir>/{STATE_SUBDIR} when --spool-dir is given, else not saved)."),
        click.option("--state-save-interval", default=DEFAULT_STATE_SAVE_INTERVAL, show_default=True,
                     envvar=env_var("state_save_interval"),
                     help="How often the SLO windows are saved; a SIGKILL loses at most this much."),
    ]
    for option in reversed(options):
        func = option(func)
    from exporter.slo.commands import push_options

    return push_options(func)


@cli.command()
@run_options
@slo_options
@click.pass_context
def run(ctx: click.Context, /, **params: Any) -> None:
    """Capture HTTP on an interface and serve /metrics until SIGINT or SIGTERM."""
    _setup_logging(params["log_level"])
    if not params["ports"]:
        raise click.UsageError("give at least one --port (or EBPF_SLO_PORT, or port: in --config)")
    from exporter.app import Exporter

    settings = _run_settings(params)
    exporter = Exporter(settings)
    exporter.install_signal_handlers()
    scheme = "https" if settings.web_config is not None and settings.web_config.tls is not None else "http"
    click.echo(f"serving {scheme}://{params['listen']}/metrics", err=True)
    exporter.run()


def _run_settings(params: dict[str, Any]) -> RunSettings:
    from exporter.app import RunSettings
    from exporter.core.flows import Limits
    from exporter.metrics import DEFAULT_DURATION_BUCKETS

    buckets = set(params.get("duration_buckets") or DEFAULT_DURATION_BUCKETS)
    runtime = None
    if params.get("slo"):
        from exporter.slo.manifest import latency_targets, load_manifest, parse_duration

        objectives = _embedded_objectives(load_manifest(params["slo"]), params["slo"])
        added = latency_targets(objectives) - buckets
        if added:
            log.info("added latency bucket bounds %s for SLO targets", sorted(added))
        buckets |= added
        try:
            push_interval = parse_duration(params["push_interval"])
        except ValueError as exc:
            raise ConfigError(f"--push-interval: {exc}") from None
        runtime = _slo_runtime(objectives, params, push_interval)
    limits = Limits(max_flows=params["max_flows"], idle_timeout_ns=int(params["idle_timeout"] * 1e9))
    return RunSettings(
        interface=params["interface"][0],
        interfaces=tuple(params["interface"]),
        services=tuple(params.get("services") or ()),
        pod_logs=params.get("pod_logs") or DEFAULT_POD_LOGS,
        instance_grace_s=float(params.get("instance_grace", DEFAULT_INSTANCE_GRACE_S)),
        ports=params["ports"],
        listen=params["listen"],
        routes=tuple(params["routes"]),
        duration_buckets=tuple(sorted(buckets)),
        max_routes_per_port=params["max_routes_per_port"],
        limits=limits,
        slo_runtime=runtime,
        user=params.get("user") or None,
        fast_path=bool(params.get("fast_path")),
        tls=bool(params.get("tls", True)),
        libssl=tuple(params.get("libssl") or ()),
        web_config=_web_config(params.get("web_config"), params.get("user")),
        degraded_window_s=float(params.get("degraded_window", DEFAULT_DEGRADED_WINDOW_S)),
    )


def _embedded_objectives(objectives: list[Objective], path: str) -> list[Objective]:
    """The objectives `run` can evaluate from the wire. PromQL ratios (Reliably's spec.promql,
    OpenSLO Prometheus queries) need Prometheus: counting them here would be a wrong number."""
    embedded = [o for o in objectives if o.promql is None]
    skipped = [o.name for o in objectives if o.promql is not None]
    if not embedded:
        raise ConfigError(f"{path}: every objective is a PromQL ratio, which needs Prometheus; "
                          f"run `ebpf-slo-exporter bridge --slo {path} --prometheus URL` instead")
    if skipped:
        log.warning("not evaluated in process (PromQL ratios; use `bridge --prometheus` or "
                    "`slo report --prometheus`): %s", ", ".join(skipped))
    return embedded


def _web_config(path: str | None, user: str | None) -> WebConfig | None:
    if user:
        from exporter.security import resolve_user

        resolve_user(user)  # an unknown user fails now, not after the filter is attached
    if not path:
        return None
    from exporter.webconfig import load_web_config

    config = load_web_config(path)
    log.info("endpoints: %s (web config %s)", config.describe(), path)
    return config


def _slo_runtime(objectives: list[Objective], params: dict[str, Any], push_interval: float) -> SloRuntime:
    from exporter.slo.commands import settings_from_options
    from exporter.slo.runtime import SloRuntime

    push = settings_from_options(params.get("reliably_url"), params.get("reliably_org"),
                                 params.get("reliably_token"), params.get("reliably_config"))
    from exporter.slo.manifest import parse_duration

    spool = Path(params["spool_dir"]) if params.get("spool_dir") else None
    state_dir = default_state_dir(params.get("state_dir"), params.get("spool_dir"))
    try:
        save_every = parse_duration(params.get("state_save_interval") or DEFAULT_STATE_SAVE_INTERVAL)
    except ValueError as exc:
        raise ConfigError(f"--state-save-interval: {exc}") from None
    if save_every < 1:
        raise ConfigError("--state-save-interval must be at least 1s")
    if state_dir is None:
        log.info("SLO windows are not saved: they start empty at each start (give --state-dir or --spool-dir)")
    return SloRuntime(objectives, push=push, push_interval_s=push_interval, spool_dir=spool,
                      state_dir=state_dir, state_save_every_s=save_every)


@cli.command()
@click.argument("capture_file", type=click.Path(dir_okay=False))
@click.option("--port", "-p", "ports", multiple=True, required=True, callback=_ports,
              help="TCP port of the HTTP service (repeat, or comma-separate).")
@click.option("--route", "routes", multiple=True, help="Route pattern such as /api/items/{id} (repeatable).")
@click.option("--duration-buckets", callback=_buckets, help="Latency histogram bounds in seconds.")
@click.option("--max-routes-per-port", type=click.IntRange(1, 100_000), default=DEFAULT_MAX_ROUTES_PER_PORT,
              show_default=True)
@click.option("--openmetrics", is_flag=True, help="Print OpenMetrics text instead of the Prometheus format.")
def replay(capture_file: str, ports: tuple[int, ...], routes: tuple[str, ...],
           duration_buckets: tuple[float, ...] | None, max_routes_per_port: int, openmetrics: bool) -> None:
    """Run a pcap or pcapng file through the same pipeline and print the exposition text."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

    from exporter.capture.pcap import read_capture
    from exporter.core.routes import RouteMapper
    from exporter.metrics import ExporterCollector, HttpMetrics
    from exporter.pipeline import Pipeline

    http = HttpMetrics(duration_buckets) if duration_buckets else HttpMetrics()
    pipeline = Pipeline(ports, RouteMapper(routes, max_routes_per_port=max_routes_per_port), http)
    pipeline.feed(read_capture(capture_file, ports))
    pipeline.flush()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExporterCollector(http, [pipeline.self_samples]))
    render = generate_openmetrics if openmetrics else generate_latest
    click.echo(render(registry).decode(), nl=False)


@cli.command()
@click.option("--interface", "-i", default="lo", show_default=True, envvar=env_var("interface"))
@click.option("--tls/--no-tls", default=True, show_default=True, envvar=env_var("tls"),
              help="Also check what HTTPS capture needs (libssl, uprobe privileges).")
@click.option("--libssl", "libssl", multiple=True, envvar=env_var("libssl"), help="Another libssl `run` would probe.")
def check(interface: str, tls: bool, libssl: tuple[str, ...]) -> None:
    """Preflight: privileges, BPF, BCC, kernel headers, the interface and TLS, each with a fix."""
    from exporter.preflight import run_checks

    results = run_checks(interface, libssl, tls)
    width = max(len(r.name) for r in results)
    for result in results:
        mark = "FAIL" if not result.ok else "warn" if result.warning else "ok  "
        line = f"{mark} {result.name.ljust(width)}  {result.detail}"
        if (not result.ok or result.warning) and result.fix:
            line += f"  -> {result.fix}"
        click.echo(line)
    failed = [r for r in results if not r.ok]
    if failed:
        raise ExporterError(f"{len(failed)} check(s) failed; fix them and run `ebpf-slo-exporter check` again")
    click.echo("all checks passed")


@cli.command()
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535),
              help="Port of the demo HTTP service on loopback.")
@click.option("--listen", default="127.0.0.1:9640", show_default=True, callback=_listen,
              help="Where the exporter serves /metrics.")
@click.option("--rate", default=30.0, show_default=True, type=click.FloatRange(0.1, 10_000),
              help="Requests per second from the load generator.")
@click.option("--reliably-url", envvar="RELIABLY_URL", help="Also push indicators to this Reliably base URL.")
def demo(port: int, listen: ListenAddress, rate: float, reliably_url: str | None) -> None:
    """The 2021 demo, done right: a demo service, load, the exporter on lo and the live SLO report."""
    from exporter.demo import run_demo

    _setup_logging("warning")
    run_demo(port=port, listen=listen, rate=rate, reliably_url=reliably_url)


@cli.command("demo-service")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--slow-fraction", default=0.01, show_default=True, type=click.FloatRange(0, 1))
@click.option("--error-fraction", default=0.007, show_default=True, type=click.FloatRange(0, 1))
def demo_service(host: str, port: int, slow_fraction: float, error_fraction: float) -> None:
    """The seed's service: 1% of requests sleep a uniform 0-1 s, 0.7% answer 500."""
    from exporter.demo import serve_demo

    serve_demo(host, port, slow_fraction, error_fraction)


@cli.command("demo-load")
@click.option("--url", default="http://127.0.0.1:8000/", show_default=True)
@click.option("--rate", default=30.0, show_default=True, type=click.FloatRange(0.1, 10_000))
@click.option("--clients", default=3, show_default=True, type=click.IntRange(1, 256))
@click.option("--duration", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Seconds to run; 0 runs until interrupted.")
def demo_load(url: str, rate: float, clients: int, duration: float) -> None:
    """Steady keep-alive load: CLIENTS connections sharing RATE requests per second."""
    from exporter.demo import generate_load

    sent = generate_load(url, rate, clients, duration or None)
    click.echo(f"sent {sent} requests", err=True)


def _attach_slo_commands() -> None:
    from exporter.slo.commands import bridge, slo
    from exporter.slo.rules import rules

    slo.add_command(rules)
    cli.add_command(slo)
    cli.add_command(bridge)


_attach_slo_commands()


def main(argv: Sequence[str] | None = None) -> None:
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="ebpf-slo-exporter",
                 standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except ExporterError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # `ebpf-slo-exporter replay x.pcap | head`: the reader left; nothing to report.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)

