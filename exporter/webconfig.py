"""`--web-config FILE`: TLS and basic auth for the HTTP endpoints, in the Prometheus
exporter-toolkit web configuration format, so one file serves this exporter and the others.

    tls_server_config:
      cert_file: server.crt           # or `cert:` with the PEM inline
      key_file: server.key            # or `key:`
      client_auth_type: RequireAndVerifyClientCert   # NoClientCert (default), VerifyClientCertIfGiven
      client_ca_file: ca.crt          # required by the two verifying types
      min_version: TLS12              # TLS10..TLS13; default TLS12
      max_version: TLS13
    http_server_config:
      headers: {X-Frame-Options: deny}  # added to every response
    basic_auth_users:
      alice: $2y$10$...                # bcrypt hashes (htpasswd -nBC 10 alice)

TLS is Python's `ssl` (OpenSSL); hashes are checked with the `bcrypt` package. Settings of
the format that this exporter cannot honour exactly (cipher_suites, curve_preferences,
client_allowed_sans, rate_limit, RequestClientCert, RequireAnyClientCert) are refused with
a sentence rather than ignored: a file that asks for a restriction must not get less.

The file is read once at start (unlike exporter-toolkit, which re-reads it per request):
restart to pick up new certificates. Read before privileges are dropped, so the key may stay
readable by root only.

Successful bcrypt checks are cached (bcrypt costs ~80 ms per check on purpose; a scrape every
few seconds would pay it each time). The cache key is an HMAC-SHA256, under a key random per
process, of the user, the stored hash and the password: the password itself is never kept,
a changed hash invalidates the entry, and only successes are cached, so guessing stays
bcrypt-slow. The cache holds at most `AUTH_CACHE_ENTRIES` entries.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import ssl
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from exporter.errors import ConfigError

__all__ = ["AUTH_CACHE_ENTRIES", "BasicAuth", "WebConfig", "load_web_config", "protect"]

AUTH_CACHE_ENTRIES = 256
REALM = "ebpf-slo-exporter"
# Paths served without credentials: liveness/readiness probes carry none. /healthz says
# only ok, degraded or not ready and why (the interface name, the capture error, counts lost).
OPEN_PATHS = frozenset({"/healthz"})

_BCRYPT = re.compile(r"\$2[abxy]?\$\d\d\$[./A-Za-z0-9]{53}")
_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_KEYS = {"cert", "key", "cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
             "max_version", "prefer_server_cipher_suites"}
_REFUSED = {
    "cipher_suites": "choosing cipher suites is not supported; OpenSSL's defaults apply",
    "curve_preferences": "choosing curves is not supported; OpenSSL's defaults apply",
    "client_allowed_sans": "restricting client certificates by SAN is not supported",
    "client_ca": "inline client CAs are not supported; use client_ca_file",
}


class BasicAuth:
    """Checks `Authorization: Basic` credentials against bcrypt hashes, with a success cache."""

    def __init__(self, users: Mapping[str, bytes], cache_entries: int = AUTH_CACHE_ENTRIES) -> None:
        import bcrypt  # the one place that imports it

        self._bcrypt = bcrypt
        self._users = dict(users)
        # A hash for unknown users, so that "no such user" costs the same time as a wrong password.
        self._dummy = bcrypt.hashpw(os.urandom(16), bcrypt.gensalt(10))
        self._key = os.urandom(32)
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self._cache_entries = cache_entries
        self._lock = threading.Lock()
        self.checks = 0  # bcrypt computations done (for tests and curiosity)

    def check(self, user: str, password: str) -> bool:
        stored = self._users.get(user)
        hashed = stored if stored is not None else self._dummy
        key = hmac.new(self._key, b"\0".join((user.encode(), hashed, password.encode())), hashlib.sha256).digest()
        with self._lock:
            if stored is not None and key in self._cache:
                self._cache.move_to_end(key)
                return True
        self.checks += 1
        try:
            ok = self._bcrypt.checkpw(password.encode(), hashed)
        except ValueError:
            ok = False
        if ok and stored is not None:
            with self._lock:
                self._cache[key] = None
                while len(self._cache) > self._cache_entries:
                    self._cache.popitem(last=False)
            return True
        return False

    def cached_entries(self) -> int:
        with self._lock:
            return len(self._cache)

    def allows(self, header: str | None) -> bool:
        """True for a well-formed `Basic` header naming a user with the right password."""
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, sep, password = decoded.partition(":")
        return bool(sep) and self.check(user, password)


@dataclass
class WebConfig:
    path: str
    tls: ssl.SSLContext | None = None
    auth: BasicAuth | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)

    def describe(self) -> str:
        parts = ["TLS" if self.tls is not None else "plain HTTP"]
        if self.tls is not None and self.tls.verify_mode == ssl.CERT_REQUIRED:
            parts.append("client certificates required")
        if self.auth is not None:
            parts.append("basic auth")
        return ", ".join(parts)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping")
    return value


def _file(base: Path, value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a file name")
    path = Path(value)
    return path if path.is_absolute() else base / path


def _tls_context(section: dict[str, Any], base: Path, where: str) -> ssl.SSLContext:
    for key in section:
        if key in _REFUSED:
            raise ConfigError(f"{where}.{key}: {_REFUSED[key]}")
        if key not in _TLS_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}")
    if ("cert" in section) == ("cert_file" in section) or ("key" in section) == ("key_file" in section):
        raise ConfigError(f"{where}: give the certificate and the key, each as *_file or inline (not both)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    versions = {}
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        value = str(section.get(key) or default)
        if value not in _VERSIONS:
            raise ConfigError(f"{where}.{key}: {value!r} is not one of {', '.join(_VERSIONS)}")
        versions[key] = _VERSIONS[value]
    context.minimum_version = versions["min_version"]
    context.maximum_version = versions["max_version"]
    if context.minimum_version > context.maximum_version:
        raise ConfigError(f"{where}: min_version is above max_version")
    try:
        if "cert_file" in section:
            cert_path = _file(base, section["cert_file"], f"{where}.cert_file")
            key_path = _file(base, section["key_file"], f"{where}.key_file")
            context.load_cert_chain(cert_path, key_path)
        else:
            _load_inline(context, str(section["cert"]), str(section["key"]))
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise ConfigError(f"{where}: cannot load the certificate and key: {reason}") from exc
    auth_type = str(section.get("client_auth_type") or "NoClientCert")
    if auth_type not in _CLIENT_AUTH:
        raise ConfigError(
            f"{where}.client_auth_type: {auth_type!r} is not supported; use NoClientCert, "
            "VerifyClientCertIfGiven or RequireAndVerifyClientCert"
        )
    ca_file = section.get("client_ca_file")
    if ca_file and auth_type == "NoClientCert":
        raise ConfigError(f"{where}: client_ca_file is set but client_auth_type is NoClientCert")
    if auth_type != "NoClientCert":
        if not ca_file:
            raise ConfigError(f"{where}: client_auth_type {auth_type} needs client_ca_file")
        try:
            context.load_verify_locations(cafile=_file(base, ca_file, f"{where}.client_ca_file"))
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
            raise ConfigError(f"{where}.client_ca_file: cannot load: {reason}") from exc
    context.verify_mode = _CLIENT_AUTH[auth_type]
    return context


def _load_inline(context: ssl.SSLContext, cert: str, key: str) -> None:
    # ssl loads chains from files only: a private temporary file, removed at once.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pair.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(cert.strip() + "\n" + key.strip() + "\n")
        context.load_cert_chain(path)


def load_web_config(path: str | Path) -> WebConfig:
    """Read and check the whole file; every problem is a one-line ConfigError naming the key."""
    where = f"web config {path}"
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {exc.strerror}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} is not valid YAML: {getattr(exc, 'problem', None) or exc}") from exc
    top = _mapping(raw, where)
    known = {"tls_server_config", "basic_auth_users", "http_server_config"}
    for key in top:
        if key == "rate_limit":
            raise ConfigError(f"{where}: rate_limit is not supported")
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
    config = WebConfig(str(path))
    base = Path(path).resolve().parent
    tls_section = _mapping(top.get("tls_server_config"), f"{where}: tls_server_config")
    if tls_section:
        config.tls = _tls_context(tls_section, base, f"{where}: tls_server_config")
    http_section = _mapping(top.get("http_server_config"), f"{where}: http_server_config")
    for key, value in http_section.items():
        if key == "http2":
            continue  # HTTP/1.1 only here; the setting is about allowing HTTP/2
        if key != "headers":
            raise ConfigError(f"{where}: http_server_config: unknown key {key!r}")
        for name, text in _mapping(value, f"{where}: http_server_config.headers").items():
            if not re.fullmatch(r"[A-Za-z0-9-]+", str(name)) or "\n" in str(text) or "\r" in str(text):
                raise ConfigError(f"{where}: http_server_config.headers: bad header {name!r}")
            config.headers.append((str(name), str(text)))
    users = _mapping(top.get("basic_auth_users"), f"{where}: basic_auth_users")
    hashes: dict[str, bytes] = {}
    for user, hashed in users.items():
        if not isinstance(hashed, str) or _BCRYPT.fullmatch(hashed) is None:
            # The user name is fine to print; the value is not (it might be a plain password).
            raise ConfigError(f"{where}: basic_auth_users: the password of {user!r} is not a bcrypt hash")
        if ":" in str(user):
            raise ConfigError(f"{where}: basic_auth_users: user {user!r} contains ':'")
        hashes[str(user)] = hashed.encode()
    if hashes:
        config.auth = BasicAuth(hashes)
    return config


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def protect(app: WSGIApp, config: WebConfig | None, open_paths: Iterable[str] = OPEN_PATHS) -> WSGIApp:
    """`app` behind basic auth (every path but `open_paths`) and with the configured headers."""
    if config is None or (config.auth is None and not config.headers):
        return app
    auth = config.auth
    extra = list(config.headers)
    exempt = frozenset(open_paths)

    def protected(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            return start_response(status, [*headers, *extra], exc_info)

        if auth is not None and environ.get("PATH_INFO", "/") not in exempt:
            if not auth.allows(environ.get("HTTP_AUTHORIZATION")):
                start("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                           ("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"')])
                return [b"401 Unauthorized\n"]
        return app(environ, start)

    return protected
