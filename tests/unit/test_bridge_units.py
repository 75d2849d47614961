"""Indicators, push settings and the on-disk spool (a temporary directory, no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from exporter.bridge.client import parse_retry_after
from exporter.bridge.indicator import Indicator, rfc3339
from exporter.bridge.settings import PushSettings, resolve_push_settings
from exporter.bridge.spool import Spool, default_spool_dir
from exporter.errors import ConfigError

SELECTOR = (("category", "latency"), ("latency_target", "150ms"), ("path", "/"), ("percentile", "100"))
TOKEN = "s3cr3t-t0ken-value"


def indicator(to_s: int = 1622548810, percent: float = 98.5, objective: str = "demo_latency") -> Indicator:
    return Indicator(objective, SELECTOR, to_s - 10, to_s, percent)


def test_indicator_body_is_what_reliably_expects() -> None:
    assert indicator().body() == {
        "metadata": {
            "labels": {
                "category": "latency",
                "latency_target": "150ms",
                "path": "/",
                "percentile": "100",
                "from": "2021-06-01T12:00:00Z",
                "to": "2021-06-01T12:00:10Z",
            }
        },
        "spec": {"from": "2021-06-01T12:00:00Z", "to": "2021-06-01T12:00:10Z", "percent": 98.5},
    }


def test_indicator_id_is_stable_and_distinct() -> None:
    assert indicator().id == indicator(percent=50.0).id  # same objective and interval: same id
    assert indicator().id != indicator(to_s=1622548820).id
    assert indicator().id != indicator(objective="other").id
    assert len(indicator().id) == 24


def test_indicator_json_round_trip_and_checks() -> None:
    item = indicator()
    assert Indicator.from_json(json.loads(json.dumps(item.to_json()))) == item
    tampered = item.to_json() | {"percent": 12.0, "to": item.to_s + 10}
    with pytest.raises(ValueError, match="id does not match"):
        Indicator.from_json(tampered)
    with pytest.raises(ValueError, match="percent"):
        Indicator.from_json(item.to_json() | {"percent": 101})
    with pytest.raises(ValueError, match="missing"):
        Indicator.from_json({"id": "x"})


def test_rfc3339_is_utc_whole_seconds() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
    assert rfc3339(1622548810.9) == "2021-06-01T12:00:10Z"


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_push_is_off_without_url_or_token(tmp_path: Path) -> None:
    assert resolve_push_settings(config_path=tmp_path / "none.yaml", env={}) is None


def test_flags_win_over_the_cli_config(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, "currentOrg: {name: file-org}\nauths: {reliably.com: {token: file-token}}\n"
    )
    settings = resolve_push_settings(None, "flag-org", TOKEN, config_path=config, env={})
    assert settings == PushSettings("https://reliably.com", "flag-org", TOKEN)


def test_cli_config_gives_org_and_token(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, "currentOrg: {name: file-org}\nauths: {reliably.com: {token: file-token}}\n"
    )
    settings = resolve_push_settings(env={"RELIABLY_CONFIG": str(config)})
    assert settings is not None
    assert (settings.base_url, settings.org, settings.token) == (
        "https://reliably.com",
        "file-org",
        "file-token",
    )
    # The 2021 demo's host is accepted, and a token stored under either host is found.
    legacy = resolve_push_settings("https://api.reliably.com/", config_path=config, env={})
    assert legacy is not None and legacy.base_url == "https://api.reliably.com"
    assert (
        legacy.entity_url("Indicator")
        == "https://api.reliably.com/entities/file-org/reliably.com/v1/indicator"
    )


def test_missing_org_names_both_fixes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_push_settings("http://127.0.0.1:1", None, TOKEN, config_path=tmp_path / "none.yaml", env={})
    message = str(caught.value)
    assert message.startswith("pushing to Reliably needs an org and a token, missing: org; ")
    assert "RELIABLY_ORG" in message and "currentOrg.name" in message
    assert TOKEN not in message


def test_missing_token_when_url_given(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing: token; set RELIABLY_ORG and RELIABLY_TOKEN"):
        resolve_push_settings("http://127.0.0.1:1", "org", None, config_path=tmp_path / "none.yaml", env={})


def test_bad_url_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--reliably-url 'ftp://x' is not an http\(s\) URL"):
        resolve_push_settings("ftp://x", "o", TOKEN, config_path=tmp_path / "none.yaml", env={})


def test_token_never_in_repr() -> None:
    settings = PushSettings("https://reliably.com", "org", TOKEN)
    assert TOKEN not in repr(settings)
    assert TOKEN not in str(settings)
    assert "<redacted>" in repr(settings)


def test_default_spool_dir_follows_xdg() -> None:
    assert default_spool_dir({"XDG_STATE_HOME": "/x"}) == Path("/x/ebpf-slo-exporter/spool")
    assert default_spool_dir({"HOME": "/home/u"}) == Path("/home/u/.local/state/ebpf-slo-exporter/spool")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("7", 7.0), ("100000", 300.0), (None, None), ("soon", None), ("Thu, 01 Jan 1970 00:00:30 GMT", 20.0)],
)
def test_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, now=10.0) == seconds


def test_spool_keeps_order_across_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    items = [indicator(to_s=1000 + 10 * i) for i in range(3)]
    for item in items:
        assert spool.put(item)
    assert not spool.put(items[1])  # same id twice is refused
    assert len(spool) == 3
    reopened = Spool(tmp_path)
    assert reopened.peek() == items[0]
    reopened.remove(items[0])
    assert Spool(tmp_path).peek() == items[1]
    assert sorted(p.name.split("-", 1)[1] for p in tmp_path.glob("*.json")) == sorted(
        i.id + ".json" for i in items[1:]
    )


def test_full_spool_drops_the_oldest(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_items=2)
    items = [indicator(to_s=1000 + 10 * i) for i in range(3)]
    for item in items:
        spool.put(item)
    assert (len(spool), spool.dropped) == (2, 1)
    assert spool.peek() == items[1]
    assert Spool(tmp_path, max_items=1).dropped == 1  # a smaller cap on restart trims too


def test_corrupt_file_is_quarantined_not_fatal(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first, second = indicator(to_s=1000), indicator(to_s=1010)
    spool.put(first)
    spool.put(second)
    path = next(p for p in sorted(tmp_path.glob("*.json")) if first.id in p.name)
    path.write_text('{"id": "trunc')
    (tmp_path / "junk.json").write_text("{}")
    reopened = Spool(tmp_path)
    assert reopened.quarantined == 1  # junk.json: not a spool file name
    assert reopened.peek() == second
    assert reopened.quarantined == 2
    assert sorted(p.name for p in tmp_path.glob("*.corrupt")) == sorted(
        [path.name + ".corrupt", "junk.json.corrupt"]
    )


def test_leftover_temporary_files_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".tmp-0000000000000001-abc.json").write_text("{")
    Spool(tmp_path)
    assert not list(tmp_path.glob(".tmp-*"))


def test_state_file_round_trip_and_corruption(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.read_state() == {}
    spool.write_state({"closed_until": 1010})
    assert Spool(tmp_path).read_state() == {"closed_until": 1010}
    (tmp_path / "state.json").write_text("not json")
    broken = Spool(tmp_path)
    assert broken.read_state() == {}
    assert broken.quarantined == 1
    assert len(broken) == 0


def test_writes_are_atomic_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.put(indicator())
    (path,) = list(tmp_path.glob("*.json"))
    assert json.loads(path.read_text())["percent"] == 98.5
    assert os.stat(path).st_size > 0
