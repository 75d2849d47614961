"""--web-config: TLS and basic auth on the real server, certificates made by the openssl CLI.

Most cases run the real MetricsServer + build_app (what `run` serves) in process; one runs the
whole exporter with `--web.config.file` and scrapes it over HTTPS with a password.
"""

from __future__ import annotations

import base64
import http.client
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import ListenAddress
from exporter.errors import ConfigError
from exporter.server import Health, MetricsServer, build_app
from exporter.webconfig import AUTH_CACHE_ENTRIES, BasicAuth, WebConfig, load_web_config, protect
from tests.integration.harness import REPO, free_port, logging_server

PASSWORD = "correct horse battery staple"


@dataclass
class Pki:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from a CA the server does not trust
    rogue_key: Path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=d)


def make_leaf(d: Path, ca: str, name: str, ext: str) -> None:
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
    (d / f"{name}.ext").write_text(ext)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    make_leaf(d, "ca", "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    make_leaf(d, "ca", "client", "extendedKeyUsage=clientAuth\n")
    make_leaf(d, "rogue-ca", "rogue", "extendedKeyUsage=clientAuth\n")
    return Pki(d, d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key",
               d / "rogue.crt", d / "rogue.key")


def bcrypt_hash(password: str) -> str:
    # The $2y$ prefix, as htpasswd -B writes it and exporter-toolkit's docs show.
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(10)).decode().replace("$2b$", "$2y$")


def write_config(d: Path, text: str, name: str = "web.yml") -> Path:
    path = d / name
    path.write_text(text)
    return path


@dataclass
class Served:
    server: MetricsServer
    config: WebConfig

    @property
    def port(self) -> int:
        return self.server.port


@pytest.fixture
def serve() -> Iterator[object]:
    started: list[MetricsServer] = []

    def start(config: WebConfig) -> Served:
        registry = CollectorRegistry(auto_describe=False)
        Counter("demo_requests", "A demo counter.", registry=registry).inc(3)
        health = Health()
        health.set(True, "filter attached to lo")
        app = protect(build_app(registry, health, "interface lo, ports 80"), config)
        server = MetricsServer(ListenAddress("127.0.0.1", 0), app, config.tls)
        server.start()
        started.append(server)
        return Served(server, config)

    yield start
    for server in started:
        server.stop()


def client_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def get(port: int, path: str = "/metrics", *, context: ssl.SSLContext | None = None,
        auth: tuple[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    if context is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def tls_config(pki: Pki, extra: str = "") -> str:
    return f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n{extra}"


def test_tls_serves_metrics_to_a_client_that_trusts_the_ca(pki: Pki, serve: object) -> None:
    served = serve(load_web_config(write_config(pki.dir, tls_config(pki))))  # type: ignore[operator]
    status, _headers, body = get(served.port, context=client_context(pki))
    assert status == 200
    assert b"demo_requests_total 3.0" in body
    # A client that does not trust our CA refuses the server.
    with pytest.raises(ssl.SSLCertVerificationError):
        get(served.port, context=ssl.create_default_context())
    # Plain HTTP to the TLS port gets no HTTP answer.
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError, http.client.BadStatusLine)):
        get(served.port)


def test_min_version_is_enforced(pki: Pki, serve: object) -> None:
    config = load_web_config(write_config(pki.dir, tls_config(pki, "  min_version: TLS13\n"), "tls13.yml"))
    served = serve(config)  # type: ignore[operator]
    old = client_context(pki)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        get(served.port, context=old)
    assert get(served.port, context=client_context(pki))[0] == 200


def test_a_stalled_handshake_does_not_block_other_clients(pki: Pki, serve: object) -> None:
    served = serve(load_web_config(write_config(pki.dir, tls_config(pki))))  # type: ignore[operator]
    stalled = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(5)]  # say nothing
    try:
        started = time.monotonic()
        assert get(served.port, context=client_context(pki))[0] == 200
        assert time.monotonic() - started < 2.0
    finally:
        for sock in stalled:
            sock.close()


def test_basic_auth(pki: Pki, serve: object) -> None:
    text = tls_config(pki) + f"basic_auth_users:\n  alice: {bcrypt_hash(PASSWORD)}\n  bob: {bcrypt_hash('other')}\n"
    config = load_web_config(write_config(pki.dir, text, "auth.yml"))
    served = serve(config)  # type: ignore[operator]
    context = client_context(pki)
    # No password: 401 with the challenge.
    status, headers, body = get(served.port, context=context)
    assert (status, headers["WWW-Authenticate"], body) == (
        401, 'Basic realm="ebpf-slo-exporter", charset="UTF-8"', b"401 Unauthorized\n")
    assert b"demo_requests" not in body
    # Wrong password, unknown user, someone else's password, a non-Basic scheme: 401.
    for auth in (("alice", "wrong"), ("mallory", PASSWORD), ("alice", "other"), ("alice", "")):
        assert get(served.port, context=context, auth=auth)[0] == 401, auth
    for path in ("/", "/api/v1/slo", "/nope"):
        assert get(served.port, path, context=context)[0] == 401, path
    # Right password: 200, on every protected path.
    assert get(served.port, context=context, auth=("alice", PASSWORD))[0] == 200
    assert get(served.port, "/api/v1/slo", context=context, auth=("alice", PASSWORD))[0] == 200
    # /healthz stays open for probes.
    assert get(served.port, "/healthz", context=context)[:1] == (200,)
    # The success was cached: the second good request paid no bcrypt; failures are never cached.
    auth = config.auth
    assert auth is not None
    before = auth.checks
    assert get(served.port, context=context, auth=("alice", PASSWORD))[0] == 200
    assert auth.checks == before
    assert get(served.port, context=context, auth=("alice", "wrong"))[0] == 401
    assert get(served.port, context=context, auth=("alice", "wrong"))[0] == 401
    assert auth.checks == before + 2
    assert auth.cached_entries() == 1


def test_auth_cache_is_bounded_and_keyed_by_password() -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4))
    users = {f"u{i}": hashed for i in range(AUTH_CACHE_ENTRIES + 10)}
    auth = BasicAuth(users)
    for user in users:
        assert auth.check(user, "pw")
    assert auth.cached_entries() == AUTH_CACHE_ENTRIES
    assert not auth.check("u1", "pw2")  # a cached user with another password is checked, and fails
    assert not auth.allows("Basic !!!notbase64")
    assert not auth.allows("Bearer abc")
    assert not auth.allows("Basic " + base64.b64encode(b"no-colon").decode())


def test_client_certificate_required(pki: Pki, serve: object) -> None:
    text = tls_config(pki, f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca}\n")
    served = serve(load_web_config(write_config(pki.dir, text, "mtls.yml")))  # type: ignore[operator]
    # Without a client certificate the handshake fails (TLS 1.3 reports it on the first read).
    with pytest.raises((ssl.SSLError, ConnectionResetError, http.client.RemoteDisconnected)):
        get(served.port, context=client_context(pki))
    # A certificate from a CA the server does not trust fails too.
    with pytest.raises((ssl.SSLError, ConnectionResetError, http.client.RemoteDisconnected)):
        get(served.port, context=client_context(pki, pki.rogue_cert, pki.rogue_key))
    status, _, body = get(served.port, context=client_context(pki, pki.client_cert, pki.client_key))
    assert status == 200 and b"demo_requests_total 3.0" in body


BAD_CONFIGS = [
    ("tls_server_config: [1, 2]\n", "tls_server_config must be a mapping"),
    ("tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: /nonexistent.key\n",
     "cannot load the certificate and key: No such file or directory"),
    ("tls_server_config:\n  cert_file: x.crt\n", "give the certificate and the key"),
    ("basic_auth_users:\n  alice: plaintext-password\n", "the password of 'alice' is not a bcrypt hash"),
    ("frobnicate: 1\n", "unknown key 'frobnicate'"),
    ("rate_limit: {interval: 1s, burst: 20}\n", "rate_limit is not supported"),
    ("tls_server_config: {cert_file: a, key_file: b, cipher_suites: [TLS_AES_128_GCM_SHA256]}\n",
     "cipher_suites: choosing cipher suites is not supported"),
    ("tls_server_config: {cert_file: a, key_file: b, client_allowed_sans: [x]}\n",
     "client_allowed_sans: restricting client certificates by SAN is not supported"),
    ("{{{\n", "is not valid YAML"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS, ids=[m.split(":")[0][:30] for _, m in BAD_CONFIGS])
def test_bad_web_config_is_one_sentence(tmp_path: Path, text: str, message: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_web_config(path)
    assert message in str(info.value)
    assert "plaintext-password" not in str(info.value)
    assert "\n" not in str(info.value)


def test_tls_key_rules(pki: Pki, tmp_path: Path) -> None:
    cases = [
        ("  client_auth_type: RequireAndVerifyClientCert\n", "needs client_ca_file"),
        (f"  client_ca_file: {pki.ca}\n", "client_ca_file is set but client_auth_type is NoClientCert"),
        ("  client_auth_type: RequireAnyClientCert\n", "'RequireAnyClientCert' is not supported"),
        ("  min_version: TLS14\n", "min_version: 'TLS14' is not one of TLS10, TLS11, TLS12, TLS13"),
        ("  min_version: TLS13\n  max_version: TLS12\n", "min_version is above max_version"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_web_config(write_config(tmp_path, tls_config(pki, extra)))


def test_inline_certificate_and_headers(pki: Pki, serve: object, tmp_path: Path) -> None:
    cert = pki.server_cert.read_text().replace("\n", "\n    ")
    key = pki.server_key.read_text().replace("\n", "\n    ")
    text = (f"tls_server_config:\n  cert: |\n    {cert}\n  key: |\n    {key}\n"
            "http_server_config:\n  http2: true\n  headers:\n    X-Frame-Options: deny\n")
    served = serve(load_web_config(write_config(tmp_path, text)))  # type: ignore[operator]
    status, headers, _ = get(served.port, context=client_context(pki))
    assert (status, headers["X-Frame-Options"]) == (200, "deny")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to attach a BPF filter")
def test_the_exporter_with_web_config_file(pki: Pki, tmp_path: Path) -> None:
    text = tls_config(pki) + f"basic_auth_users:\n  prometheus: {bcrypt_hash(PASSWORD)}\n"
    config = write_config(tmp_path, text)
    listen = free_port()
    with logging_server("127.0.0.1") as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", "run", "-i", "lo", "-p", str(server.port), "--listen",
             f"127.0.0.1:{listen}", "--web.config.file", str(config)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            context = client_context(pki)
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                try:
                    if get(listen, "/healthz", context=context)[0] == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            for _ in range(3):
                conn.request("GET", "/via-tls")
                conn.getresponse().read()
            conn.close()
            time.sleep(1.0)
            assert get(listen, context=context)[0] == 401
            status, _, body = get(listen, context=context, auth=("prometheus", PASSWORD))
        finally:
            proc.terminate()
            output = proc.communicate(timeout=10)[0]
    assert status == 200
    wanted = {"http_request_method": "GET", "http_response_status_code": "200", "http_route": "/via-tls",
              "server_port": str(server.port), "url_scheme": "http", "network_protocol_version": "1.1"}
    counted = [sample.value for family in text_string_to_metric_families(body.decode()) for sample in family.samples
               if sample.name == "http_server_request_duration_seconds_count"
               and wanted.items() <= sample.labels.items()]
    assert counted == [3.0]
    assert f"serving https://127.0.0.1:{listen}/metrics" in output


def test_bad_web_config_stops_the_cli_with_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, "basic_auth_users:\n  alice: hunter2\n")
    result = subprocess.run([sys.executable, "-m", "exporter", "run", "-p", "8080", "--listen", "127.0.0.1:0",
                             "--web-config", str(config)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == (f"error: web config {config}: basic_auth_users: "
                             "the password of 'alice' is not a bcrypt hash\n")
    assert "hunter2" not in result.stderr
