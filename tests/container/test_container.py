"""The real container: docker/Dockerfile built with podman, run as the manifests say (`make test-container`).

No image registry is reachable, so the `debian:bookworm-slim` base is made here with
`mmdebstrap --variant=minbase` and `podman import`; the tarball is cached under
/var/cache/ebpf-slo-exporter (outside the repository) and made again when missing. pip inside
the build gets the host's CA bundle and pip configuration (and the local package directories
that configuration names), mounted read-only at the same paths. On this kind of machine podman
needs `--runtime runc` (crun refuses the hybrid cgroup layout) and explicit ulimits.

Checked with the real kernel:
- with exactly docker/compose.yaml's capabilities, security options, host network and PID
  namespace and mounts (the DaemonSet's are tested equal to them in tests/unit/test_docker.py),
  it counts a local server's exchanges exactly as the server logged them, and names it;
- with the capabilities shipped before (BPF, NET_RAW only), it exits with a one-line error that
  names the missing CAP_PERFMON and the fix;
- under podman's default seccomp profile, it exits with an error that names seccomp.
"""

from __future__ import annotations

import collections
import configparser
import http.client
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from exporter.core.routes import RouteMapper
from tests.integration.harness import REPO, counts_by_key, free_port, logging_server, scrape

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for podman with host networking and BPF")

IMAGE = "localhost/ebpf-slo-exporter:test"
BASE = "debian:bookworm-slim"
BASE_TAR = Path("/var/cache/ebpf-slo-exporter/bookworm-minbase.tar")
PODMAN = ["podman", "--runtime", "runc"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
PREFIX = f"esxnode-ctr-{os.getpid()}"


def _run(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def _pip_mounts() -> list[str]:
    """-v options for the CA bundle, every pip config file, and the local paths they name."""
    paths = {Path("/etc/ssl/certs/ca-certificates.crt")}
    files = [Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf"), Path.home() / ".config" / "pip" / "pip.conf"]
    for config in files:
        if not config.is_file():
            continue
        paths.add(config)
        parser = configparser.ConfigParser()
        parser.read(config)
        for section in parser.sections():
            for value in parser[section].values():
                for word in value.split():
                    local = Path(word.removeprefix("file://"))
                    if word.startswith("file://"):
                        local = local.parent  # a local index links outside its simple/ directory
                    if local.is_absolute() and local.exists():
                        paths.add(local)
    for name in ("PIP_CERT", "PIP_FIND_LINKS", "PIP_CONSTRAINT"):
        for word in os.environ.get(name, "").split():
            if Path(word).is_absolute() and Path(word).exists():
                paths.add(Path(word))
    return [arg for path in sorted(paths) for arg in ("-v", f"{path}:{path}:ro")]


@pytest.fixture(scope="module")
def image() -> str:
    for tool in ("podman", "runc", "mmdebstrap"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: run `make setup`")
    if _run(*PODMAN, "image", "exists", BASE).returncode != 0:
        if not BASE_TAR.is_file():
            BASE_TAR.parent.mkdir(parents=True, exist_ok=True)
            partial = BASE_TAR.with_suffix(".partial.tar")
            made = _run("mmdebstrap", "--variant=minbase", "--include=ca-certificates", "bookworm", str(partial),
                        timeout=900)
            assert made.returncode == 0, made.stderr[-2000:]
            partial.rename(BASE_TAR)
        imported = _run(*PODMAN, "import", str(BASE_TAR), BASE)
        assert imported.returncode == 0, imported.stderr
    built = _run(*PODMAN, "build", *ULIMITS, *_pip_mounts(), "-f", "docker/Dockerfile", "-t", IMAGE, str(REPO),
                 timeout=1200)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return IMAGE


def _manifest_run_options(*, security_opt: bool = True) -> list[str]:
    """The exporter service of docker/compose.yaml as podman options: capabilities, security, namespaces."""
    service = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]["exporter"]
    options = ["--network", service["network_mode"], "--pid", service["pid"]]
    options += [f"--cap-drop={cap}" for cap in service["cap_drop"]]
    options += ["--cap-add", ",".join(service["cap_add"])]
    if security_opt:
        options += [arg for opt in service.get("security_opt", []) for arg in ("--security-opt", opt)]
    for volume in service["volumes"]:
        source, target, mode = volume.split(":")
        if source.startswith("/"):
            options += ["-v", f"{source}:{target}:{mode}"]
    # The DaemonSet's readOnlyRootFilesystem and its /tmp emptyDir.
    return [*options, "--read-only", "--tmpfs", "/tmp"]


def _container(name: str, options: list[str], args: list[str]) -> subprocess.CompletedProcess[str]:
    # No --rm: the output of one that exits is read after it has; the fixture removes them all.
    return _run(*PODMAN, "run", *ULIMITS, "-d", "--name", name, *options, IMAGE, "run", *args)


def _logs(name: str) -> str:
    done = _run(*PODMAN, "logs", name)
    return done.stdout + done.stderr


def _wait_exit(name: str, timeout: float = 120) -> str:
    """The output of a container expected to exit on its own."""
    waited = _run(*PODMAN, "wait", name, timeout=timeout)
    assert waited.stdout.strip() not in ("", "0"), f"exit status {waited.stdout!r}: {_logs(name)}"
    return _logs(name)


@pytest.fixture
def names() -> Iterator[list[str]]:
    started: list[str] = []
    yield started
    for name in started:
        _run(*PODMAN, "rm", "-f", "-t", "2", name)


def test_the_image_counts_exactly_with_the_manifests_privileges(image: str, names: list[str]) -> None:
    listen = free_port()
    with logging_server("127.0.0.1") as server:
        name = f"{PREFIX}-ok"
        names.append(name)
        started = _container(name, _manifest_run_options(),
                             ["--interface", "lo", "--port", str(server.port), "--listen", f"127.0.0.1:{listen}"])
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, _logs(name)
            time.sleep(0.5)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        for path in ("/", "/status/404", "/x", "/status/503") * 5:
            conn.request("GET", path)
            conn.getresponse().read()
        conn.close()
        routes = RouteMapper(())
        expected = collections.Counter({(m, s, routes.route(server.port, p)): n for (m, s, p), n in server.log.items()})
        deadline = time.monotonic() + 15
        while True:
            samples = scrape(f"http://127.0.0.1:{listen}/metrics")
            if counts_by_key(samples, server.port) == expected or time.monotonic() > deadline:
                break
            time.sleep(0.3)
    assert counts_by_key(samples, server.port) == expected and sum(expected.values()) == 20
    # Identity works inside the container too (host PID namespace, CAP_SYS_PTRACE): this process.
    own_name = Path("/proc/self/comm").read_text().strip()
    names_seen = {dict(labels)["service_name"] for (metric, labels), _ in samples.items()
                  if metric == "http_server_request_duration_seconds_count"}
    assert names_seen == {own_name}


def test_without_cap_perfmon_the_error_names_it(image: str, names: list[str]) -> None:
    name = f"{PREFIX}-noperfmon"
    names.append(name)
    options = _manifest_run_options()
    options[options.index("--cap-add") + 1] = "BPF,NET_RAW"  # what the manifests shipped before
    started = _container(name, options, ["--interface", "lo", "--port", str(free_port()),
                                         "--listen", f"127.0.0.1:{free_port()}"])
    assert started.returncode == 0, started.stderr
    output = _wait_exit(name)
    # The kernel's errno depends on which check the verifier trips first (EFAULT or EACCES);
    # the message names the missing capability either way.
    assert "kernel refused the BPF program" in output and "CAP_PERFMON is missing" in output, output
    assert "--cap-add BPF,NET_RAW,PERFMON" in output and "Traceback" not in output


def test_under_the_default_seccomp_profile_the_error_names_seccomp(image: str, names: list[str]) -> None:
    name = f"{PREFIX}-seccomp"
    names.append(name)
    options = _manifest_run_options(security_opt=False)
    started = _container(name, options, ["--interface", "lo", "--port", str(free_port()),
                                         "--listen", f"127.0.0.1:{free_port()}"])
    assert started.returncode == 0, started.stderr
    output = _wait_exit(name)
    assert "seccomp filter is in the way" in output and "seccomp=unconfined" in output, output
    assert "Traceback" not in output
