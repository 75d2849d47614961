"""Where and as whom to push: PushSettings, resolved from flags, environment and the Reliably CLI config.

Credentials, first found wins: the flags / `RELIABLY_TOKEN` and `RELIABLY_ORG`, then the
Reliably CLI's own config file (`~/.config/reliably/config.yaml`, or `RELIABLY_CONFIG`):

    currentOrg: {name: my-org}
    auths: {reliably.com: {token: ...}}

The token is never shown: PushSettings' repr hides it and no message includes it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import yaml

from exporter.errors import ConfigError

DEFAULT_URL = "https://reliably.com"
LEGACY_URL = "https://api.reliably.com"  # the 2021 demo's host; same API paths
API_VERSION = "reliably.com/v1"


@dataclass(frozen=True, slots=True)
class PushSettings:
    base_url: str = DEFAULT_URL
    org: str = ""
    token: str = field(default="", repr=False)
    timeout_s: float = 5.0

    def __repr__(self) -> str:
        return f"PushSettings(base_url={self.base_url!r}, org={self.org!r}, token=<redacted>)"

    def entity_url(self, kind: str) -> str:
        """`{base}/entities/{org}/reliably.com/v1/{kind}`, lowercased as the CLI does."""
        return f"{self.base_url.rstrip('/')}/entities/{quote(self.org, safe='')}/{API_VERSION}/{kind.lower()}"

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).netloc


def default_config_path(env: Mapping[str, str]) -> Path:
    explicit = env.get("RELIABLY_CONFIG")
    if explicit:
        return Path(explicit)
    return Path(env.get("HOME") or Path.home()) / ".config" / "reliably" / "config.yaml"


def _read_cli_config(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read the Reliably config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"the Reliably config {path} is not valid YAML") from exc
    return raw if isinstance(raw, dict) else {}


def _config_token(config: dict[str, Any], host: str) -> str:
    auths = config.get("auths")
    if not isinstance(auths, dict):
        return ""
    # The CLI keys auths by host; accept the new and the legacy host for either base URL.
    hosts = [host, *(h for h in ("reliably.com", "api.reliably.com") if h != host)]
    for candidate in hosts:
        entry = auths.get(candidate)
        if isinstance(entry, dict) and entry.get("token"):
            return str(entry["token"])
    return ""


def resolve_push_settings(
    url: str | None = None,
    org: str | None = None,
    token: str | None = None,
    *,
    config_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 5.0,
) -> PushSettings | None:
    """None when pushing is off (no URL and no token anywhere); otherwise complete settings or ConfigError.

    `url`, `org` and `token` are the flags' values (click already folded in RELIABLY_URL,
    RELIABLY_ORG and RELIABLY_TOKEN). The CLI config fills what they leave empty, and a
    token found there turns pushing on.
    """
    env = os.environ if env is None else env
    base = (url or "").strip() or DEFAULT_URL
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--reliably-url {base!r} is not an http(s) URL such as {DEFAULT_URL}")
    path = config_path or default_config_path(env)
    config = _read_cli_config(path)
    token = (token or "").strip() or _config_token(config, parts.netloc)
    if not url and not token:
        return None
    if not org:
        current = config.get("currentOrg")
        if isinstance(current, dict) and current.get("name"):
            org = str(current["name"])
    missing = [what for what, value in (("org", org), ("token", token)) if not value]
    if missing:
        raise ConfigError(
            f"pushing to Reliably needs an org and a token, missing: {' and '.join(missing)}; "
            f"set RELIABLY_ORG and RELIABLY_TOKEN (or --reliably-org/--reliably-token), "
            f"or log in with the Reliably CLI so {path} has currentOrg.name and auths.<host>.token"
        )
    return PushSettings(base_url=base.rstrip("/"), org=str(org), token=token, timeout_s=timeout_s)
