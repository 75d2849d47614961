from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from exporter import cli as cli_module
from exporter.config import (
    STATE_SUBDIR,
    ListenAddress,
    default_state_dir,
    load_file,
    parse_buckets,
    parse_listen,
    parse_port,
)
from exporter.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.0.0.0:9640", ListenAddress("0.0.0.0", 9640)), (":9640", ListenAddress("0.0.0.0", 9640)),
     ("[::1]:80", ListenAddress("::1", 80)), ("localhost:0", ListenAddress("localhost", 0))],
)
def test_listen_addresses(text: str, expected: ListenAddress) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9640", "host:", "host:99999", "a:b"])
def test_bad_listen_addresses(text: str) -> None:
    with pytest.raises(ConfigError, match="listen address"):
        parse_listen(text)


def test_ports_and_buckets() -> None:
    assert parse_port("8080") == 8080
    with pytest.raises(ConfigError, match="not a TCP port"):
        parse_port(0)
    assert parse_buckets("0.5, 0.1,0.15") == (0.1, 0.15, 0.5)
    with pytest.raises(ConfigError):
        parse_buckets("-1")


def test_config_file_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("interface: eth0\nport: [80, 443]\nmax-routes-per-port: 5\n")
    assert load_file(path) == {"interface": "eth0", "ports": [80, 443], "max_routes_per_port": 5}
    path.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_file(path)


def capture_settings(monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run `run` with the exporter stubbed out, returning the resolved settings."""
    seen: dict = {}

    class FakeExporter:
        def __init__(self, settings: object) -> None:
            seen["settings"] = settings

        def install_signal_handlers(self) -> None:
            pass

        def run(self) -> None:
            pass

    import exporter.app

    monkeypatch.setattr(exporter.app, "Exporter", FakeExporter)
    result = CliRunner().invoke(cli_module.cli, ["run", *args], env=env or {})
    assert result.exit_code == 0, result.output
    return seen


def test_flag_env_and_file_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("interface: from-file\nport: 81\nlisten: 127.0.0.1:9999\nmax_routes_per_port: 7\n"
                    "fast_path: false\n")
    seen = capture_settings(monkeypatch, ["--config", str(path), "--interface", "from-flag"],
                            env={"EBPF_SLO_LISTEN": "127.0.0.1:8888"})
    settings = seen["settings"]
    assert settings.interface == "from-flag"
    assert settings.ports == (81,)
    assert str(settings.listen) == "127.0.0.1:8888"
    assert settings.max_routes_per_port == 7
    assert settings.fast_path is False


def test_slo_latency_targets_become_bucket_bounds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    slo = tmp_path / "slo.yaml"
    slo.write_text(
        "apiVersion: reliably.com/v1\nkind: Objective\nmetadata:\n  labels: {name: fast, service: s}\n"
        "spec:\n  indicatorSelector: {category: latency, latency_target: 120ms}\n"
        "  objectivePercent: 99\n  window: 1m\n"
    )
    seen = capture_settings(monkeypatch, ["--port", "80", "--slo", str(slo), "--duration-buckets", "0.1,0.5"])
    assert seen["settings"].duration_buckets == (0.1, 0.12, 0.5)


def test_state_dir_defaults_under_the_spool_dir_only_when_given() -> None:
    assert default_state_dir("/var/lib/slo", "/var/spool/x") == Path("/var/lib/slo")
    assert default_state_dir(None, "/var/spool/x") == Path("/var/spool/x") / STATE_SUBDIR
    assert default_state_dir(None, None) is None


def test_state_options_from_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("state-dir: /srv/state\nstate_save_interval: 30s\n")
    assert load_file(path) == {"state_dir": "/srv/state", "state_save_interval": "30s"}
