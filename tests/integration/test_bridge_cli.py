"""The click commands `slo sync`, `slo report --from` and `bridge`, against real local HTTP servers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from exporter.core.model import Exchange
from exporter.errors import ConfigError, PushError
from exporter.slo.commands import bridge, objective_body, slo
from exporter.slo.manifest import load_manifest
from exporter.slo.report import ReportSourceError
from exporter.slo.runtime import SloRuntime
from tests.integration.prom import free_port
from tests.integration.receiver import Receiver

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "reliably.yaml"
TOKEN = "cli-token-123456"
NO_CONFIG = {"RELIABLY_CONFIG": "/nonexistent/config.yaml"}


def test_sync_puts_each_objective(tmp_path: Path) -> None:
    with Receiver() as rx:
        result = CliRunner().invoke(
            slo,
            ["sync", "--slo", str(EXAMPLE), "--reliably-url", rx.url],
            env={"RELIABLY_TOKEN": TOKEN, "RELIABLY_ORG": "acme", **NO_CONFIG},
        )
        assert result.exit_code == 0, result.output
        assert result.output == (
            "synced ebpf-2021-demo / 99% of the responses are under 150ms\n"
            "synced ebpf-2021-demo / 99% of the responses to our users are in the 2xx class\n"
        )
        first, second = rx.requests
    assert (first.method, first.path) == ("PUT", "/entities/acme/reliably.com/v1/objective")
    assert first.headers["Authorization"] == f"Bearer {TOKEN}"
    assert first.body == {
        "metadata": {"labels": {"name": "99% of the responses are under 150ms", "service": "ebpf-2021-demo"}},
        "spec": {
            "indicatorSelector": {
                "category": "latency",
                "path": "/",
                "percentile": "100",
                "latency_target": "150ms",
            },
            "objectivePercent": 99.5,
            "window": "1m",
        },
    }
    assert second.body == objective_body(load_manifest(EXAMPLE)[1])
    assert TOKEN not in result.output


def test_sync_reads_the_reliably_cli_config(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    with Receiver() as rx:
        host = rx.url.removeprefix("http://")
        config.write_text(f"currentOrg: {{name: from-file}}\nauths:\n  {host}: {{token: file-token}}\n")
        result = CliRunner().invoke(
            slo,
            ["sync", "--slo", str(EXAMPLE), "--reliably-url", rx.url],
            env={"RELIABLY_CONFIG": str(config)},
        )
        assert result.exit_code == 0, result.output
        assert rx.requests[0].path == "/entities/from-file/reliably.com/v1/objective"
        assert rx.requests[0].headers["Authorization"] == "Bearer file-token"


def test_sync_rejected_is_a_push_error() -> None:
    with Receiver() as rx:
        rx.script(403)
        result = CliRunner().invoke(
            slo,
            ["sync", "--slo", str(EXAMPLE), "--reliably-url", rx.url],
            env={"RELIABLY_TOKEN": TOKEN, "RELIABLY_ORG": "acme", **NO_CONFIG},
        )
    assert isinstance(result.exception, PushError)
    assert str(result.exception).startswith(
        f"PUT {rx.url}/entities/acme/reliably.com/v1/objective answered 403"
    )
    assert len(rx.requests) == 1


def test_sync_without_credentials_names_both_fixes() -> None:
    result = CliRunner().invoke(
        slo,
        ["sync", "--slo", str(EXAMPLE), "--reliably-url", "http://127.0.0.1:1"],
        env={"RELIABLY_TOKEN": "", "RELIABLY_ORG": "", **NO_CONFIG},
    )
    assert isinstance(result.exception, ConfigError)
    assert "RELIABLY_ORG and RELIABLY_TOKEN" in str(result.exception)
    assert "currentOrg.name and auths.<host>.token" in str(result.exception)


def test_sync_dry_run_prints_bodies() -> None:
    result = CliRunner().invoke(slo, ["sync", "--slo", str(EXAMPLE), "--dry-run"])
    assert result.exit_code == 0
    assert [json.loads(line) for line in result.output.splitlines()] == [
        objective_body(o) for o in load_manifest(EXAMPLE)
    ]


def test_bad_manifest_fails_in_the_option(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Indicator\n")
    result = CliRunner().invoke(slo, ["sync", "--slo", str(bad)])
    assert result.exit_code == 2
    assert (
        f"Invalid value for '--slo' (env var: 'EBPF_SLO_SLO'): {bad} document 1: kind is 'Indicator'"
        in result.output
    )


def test_bad_durations_and_urls_fail_in_their_types() -> None:
    runner = CliRunner()
    result = runner.invoke(bridge, ["--slo", str(EXAMPLE), "--prometheus", "localhost:9090"])
    assert result.exit_code == 2
    assert "'localhost:9090' is not an http(s) URL" in result.output
    result = runner.invoke(
        bridge, ["--slo", str(EXAMPLE), "--prometheus", "http://p", "--push-interval", "2.5s"]
    )
    assert result.exit_code == 2
    assert "must be a whole number of seconds, at least 1s, got 2.5s" in result.output
    result = runner.invoke(bridge, ["--slo", str(EXAMPLE), "--prometheus", "http://p", "--grace", "soon"])
    assert result.exit_code == 2
    assert "'soon' is not a duration like 150ms" in result.output


def test_bridge_without_credentials_is_a_config_error() -> None:
    result = CliRunner().invoke(
        bridge,
        ["--slo", str(EXAMPLE), "--prometheus", "http://127.0.0.1:1"],
        env={"RELIABLY_TOKEN": "", "RELIABLY_ORG": "", **NO_CONFIG},
    )
    assert isinstance(result.exception, ConfigError)
    assert str(result.exception).startswith("bridge needs a Reliably org and token")


def test_report_needs_exactly_one_source() -> None:
    runner = CliRunner()
    result = runner.invoke(slo, ["report"])
    assert result.exit_code == 2
    assert "give either --from URL (a running exporter) or --prometheus URL with --slo FILE" in result.output
    result = runner.invoke(slo, ["report", "--prometheus", "http://127.0.0.1:1"])
    assert result.exit_code == 2
    assert "--prometheus needs --slo FILE" in result.output


def snapshot_after_traffic() -> dict[str, object]:
    now = [1622548803.0]
    runtime = SloRuntime(load_manifest(EXAMPLE), wall_clock=lambda: now[0])
    for i in range(200):
        end = round((now[0] + i * 0.03) * 1e9)
        ms = 400 if i < 3 else 5
        runtime.observe(
            Exchange("GET", "/", 500 if i == 5 else 200, end - ms * 1_000_000, end, 0, 0, 8000), "/"
        )
    now[0] = 1622548812.0
    runtime.tick()
    return runtime.snapshot()


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        (
            "text",
            "Service #1: ebpf-2021-demo\n"
            "  ❌ 99% of the responses are under 150ms: 98.50% of 99.5% / 1m (Latency, not met, "
            "11.67% of the window observed) trend ✕\n"
            "  ✅ 99% of the responses to our users are in the 2xx class: 99.50% of 99% / 1m "
            "(Availability, met, 11.67% of the window observed) trend ✓\n",
        ),
        (
            "table",
            "                                                             Current  Objective  / Time Window  "
            "Type          Trend  Observed\n"
            "  Service #1: ebpf-2021-demo\n"
            "  ❌ 99% of the responses are under 150ms                     98.50%      99.5%  / 1m           "
            "Latency       ✕        11.67%\n"
            "  ✅ 99% of the responses to our users are in the 2xx class   99.50%        99%  / 1m           "
            "Availability  ✓        11.67%\n",
        ),
    ],
)
def test_report_from_a_running_exporter(fmt: str, expected: str) -> None:
    with Receiver() as rx:
        rx.script((200, {}, json.dumps(snapshot_after_traffic())))
        result = CliRunner().invoke(slo, ["report", "--from", rx.url, "--format", fmt], terminal_width=140)
        assert rx.requests[0].path == "/api/v1/slo"
    assert result.exit_code == 0, result.output
    assert "\n".join(line.rstrip() for line in result.output.splitlines()) + "\n" == expected


def test_report_from_json_keeps_the_shape() -> None:
    with Receiver() as rx:
        rx.script((200, {}, json.dumps(snapshot_after_traffic())))
        result = CliRunner().invoke(slo, ["report", "--from", rx.url, "-f", "json"])
    document = json.loads(result.output)
    assert document["services"][0]["service_levels"][0] == {
        "name": "99% of the responses are under 150ms",
        "type": "Latency",
        "objective": 99.5,
        "period": "1m",
        "result": {"actual": 98.5, "delta": -1.0, "slo_is_met": False},
        # The runtime started at 12:00:03: 7 s of the minute were observed.
        "window": {"from": "2021-06-01T11:59:10Z", "to": "2021-06-01T12:00:10Z", "coverage": 7 / 60},
    }


def test_report_from_an_unreachable_exporter() -> None:
    result = CliRunner().invoke(
        slo, ["report", "--from", f"http://127.0.0.1:{free_port()}", "--timeout", "1s"]
    )
    assert isinstance(result.exception, ReportSourceError)
    assert str(result.exception).startswith("cannot reach the exporter at http://127.0.0.1:")
    assert "\n" not in str(result.exception)
