"""Defaults and the YAML config file. Every `run` flag has a key here and an environment variable.

Precedence, highest first: command-line flag, environment variable (`EBPF_SLO_<FLAG>`),
config file (`--config`), built-in default. Click resolves all four: `--config` is eager
and puts the file's values in click's `default_map` (cli.py).

The built-in defaults that more than one module needs live here and nowhere else.

Config file keys are the long flag names with `_` or `-`:

    interface: eth0
    port: [8080, 8443]
    listen: 0.0.0.0:9640
    route: ["/api/items/{id}"]
    duration_buckets: [0.005, 0.01, 0.15, 1]
    max_routes_per_port: 200
    slo: reliably.yaml
    tls: true
    libssl: [/opt/app/lib/libssl.so.3]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from exporter.errors import ConfigError

DEFAULT_LISTEN = "0.0.0.0:9640"
DEFAULT_PUSH_INTERVAL_S = 10  # Reliably indicators: one per objective per interval
DEFAULT_MAX_ROUTES_PER_PORT = 100
DEFAULT_FAST_PATH = True  # the kernel aggregates the common exchange; --no-fast-path is the reference
# /healthz says degraded while a loss counter rose within this many seconds: long enough that a
# scrape every 15 to 60 s sees the degraded gauge, short enough to clear soon after the loss stops.
DEFAULT_DEGRADED_WINDOW_S = 60.0
DEFAULT_BACKOFF_BASE_S = 1.0  # first retry after ~1 s, doubling...
DEFAULT_BACKOFF_MAX_S = 60.0  # ...up to a minute
# Where the kubelet writes /var/log/pods/<namespace>_<pod>_<uid>/<container>/ (its sibling
# containers/ holds <pod>_<namespace>_<container>-<container id>.log links): identity/ reads names there.
DEFAULT_POD_LOGS = "/var/log/pods"
# How long the series of a server whose process is gone stay on /metrics (one Prometheus
# scrape interval is too short: a restarting pod would flap).
DEFAULT_INSTANCE_GRACE_S = 300.0
# Servers (address, port) whose identity is cached at once; the oldest beyond it is evicted (counted).
DEFAULT_MAX_SERVERS = 4096
ENV_PREFIX = "EBPF_SLO"
# The SLO windows are saved this often (a SIGKILL loses at most this much), under
# `--state-dir`, or by default in this subdirectory of `--spool-dir` when that is given.
DEFAULT_STATE_SAVE_INTERVAL = "60s"
STATE_SUBDIR = "slo-state"

# Keys accepted in the config file, mapped to the click parameter they fill.
FILE_KEYS = {
    "interface": "interface",
    "port": "ports",
    "ports": "ports",
    "listen": "listen",
    "route": "routes",
    "routes": "routes",
    "duration_buckets": "duration_buckets",
    "max_routes_per_port": "max_routes_per_port",
    "max_flows": "max_flows",
    "idle_timeout": "idle_timeout",
    "slo": "slo",
    "reliably_url": "reliably_url",
    "push_interval": "push_interval",
    "spool_dir": "spool_dir",
    "state_dir": "state_dir",
    "state_save_interval": "state_save_interval",
    "log_level": "log_level",
    "user": "user",
    "fast_path": "fast_path",
    "web_config": "web_config",
    "service": "services",
    "services": "services",
    "pod_logs": "pod_logs",
    "instance_grace": "instance_grace",
    "tls": "tls",
    "libssl": "libssl",
    "degraded_window": "degraded_window",
}


ANY_INTERFACE = "any"


def is_node_wide(patterns: tuple[str, ...] | list[str]) -> bool:
    """Several --interface values, `any` or a glob: capture on every interface they match, now and
    later, with one socket and duplicates dropped in the kernel (capture/live.py)."""
    return len(patterns) > 1 or any(p == ANY_INTERFACE or any(c in p for c in "*?[") for p in patterns)


def env_var(flag: str) -> str:
    return f"{ENV_PREFIX}_{flag.upper().replace('-', '_')}"


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config into {click parameter name: value}; unknown keys are an error."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping of option: value")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = FILE_KEYS.get(str(key).replace("-", "_"))
        if name is None:
            known = ", ".join(sorted(k for k in FILE_KEYS if k not in ("ports", "routes")))
            raise ConfigError(f"config file {path}: unknown key {key!r}; known keys: {known}")
        values[name] = value
    return values


def default_state_dir(state_dir: str | None, spool_dir: str | None) -> Path | None:
    """Where the SLO windows are saved: `--state-dir`, else `<--spool-dir>/slo-state`, else
    nowhere (the windows start empty at each start, and the log says so)."""
    if state_dir:
        return Path(state_dir)
    if spool_dir:
        return Path(spool_dir) / STATE_SUBDIR
    return None


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    """`HOST:PORT`, `:PORT` or `[v6]:PORT`."""
    value = str(text).strip()
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ConfigError(f"listen address {text!r} must look like 0.0.0.0:9640, :9640 or [::1]:9640")
    host = host.strip("[]") or "0.0.0.0"
    return ListenAddress(host, int(port_text))


def parse_port(value: Any) -> int:
    text = str(value).strip()
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"port {value!r} is not a TCP port (1-65535)")
    return int(text)


def parse_buckets(value: Any) -> tuple[float, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        buckets = tuple(sorted({float(item) for item in items if str(item).strip()}))
    except ValueError as exc:
        raise ConfigError(f"duration buckets {value!r} must be numbers of seconds, e.g. 0.05,0.1,0.15") from exc
    if not buckets or any(b <= 0 or b != b or b == float("inf") for b in buckets):
        raise ConfigError(f"duration buckets {value!r} must be positive finite seconds")
    return buckets
