"""Static checks of docker/ and deploy/kubernetes/: schemas, cross-references, real promtool/amtool.

No container engine runs here, so nothing is built or started: these tests check that the
files agree with each other (ports, paths, labels), with the compose specification's JSON
schema (vendored by the check-jsonschema package), with the exporter's real CLI options,
and that promtool accepts the Prometheus config and the committed rule file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from exporter.slo.manifest import parse_manifest
from exporter.slo.rules import render_rules

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = ROOT / "deploy" / "kubernetes"


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _k8s() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def _cli_options(*path: str) -> set[str]:
    from exporter.cli import cli

    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def _assert_cli_accepts(args: list[str]) -> None:
    """Every --flag in a compose/Kubernetes command line is an option of that CLI command."""
    command = [a for a in args if not a.startswith("-")][:1]
    known = _cli_options(*command)
    flags = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    assert flags <= known, f"{command}: unknown options {sorted(flags - known)}"


def _manifest_capabilities() -> list[str]:
    """The exporter's own list, as container engines spell capabilities (no CAP_ prefix)."""
    from exporter.preflight import MANIFEST_CAPABILITIES

    return [name.removeprefix("CAP_") for name in MANIFEST_CAPABILITIES]


def test_every_manifest_and_the_dockerfile_grant_the_exporters_own_capability_list():
    """The manifests cannot drift from preflight.py again (they once lacked CAP_PERFMON)."""
    from exporter.preflight import CAPTURE_CAPABILITIES, MANIFEST_CAPABILITIES

    assert set(CAPTURE_CAPABILITIES) <= set(MANIFEST_CAPABILITIES)
    assert _compose()["services"]["exporter"]["cap_add"] == _manifest_capabilities()
    [container] = _one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert container["securityContext"]["capabilities"]["add"] == _manifest_capabilities()
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert all(name in dockerfile for name in MANIFEST_CAPABILITIES)


def _host_port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _flag(args: list[str], name: str) -> str:
    for index, arg in enumerate(args):
        if arg == name:
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


# ---------------------------------------------------------------- compose


def test_compose_file_validates_against_the_compose_specification_schema():
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip(
        "check_jsonschema", reason="check-jsonschema vendors compose-spec.json (pip install it)"
    )
    schema = json.loads(
        resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    validator = jsonschema.validators.validator_for(schema)(schema)  # the draft the schema declares
    errors = sorted(validator.iter_errors(_compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    # The schema is permissive about unknown keys in places; a typo must still be caught.
    broken = _compose()
    broken["services"]["exporter"]["network-mode"] = "host"
    assert list(validator.iter_errors(broken))


def test_compose_has_the_demo_loop_services_on_the_host_network():
    services = _compose()["services"]
    assert set(services) == {"exporter", "demo", "load", "prometheus", "alertmanager", "grafana"}
    assert all(s["network_mode"] == "host" for s in services.values())
    exporter = services["exporter"]
    assert exporter["pid"] == "host"
    assert exporter["cap_add"] == _manifest_capabilities() and exporter["cap_drop"] == ["ALL"]
    assert "SYS_ADMIN" not in exporter["cap_add"] and not exporter.get("privileged")
    assert exporter["security_opt"] == ["seccomp=unconfined"]
    assert {"/lib/modules:/lib/modules:ro", "/usr/src:/usr/src:ro"} <= set(exporter["volumes"])
    assert exporter["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert services["demo"]["image"] == services["load"]["image"] == exporter["image"]


def test_compose_commands_use_options_the_cli_really_has():
    services = _compose()["services"]
    for name in ("exporter", "demo", "load"):
        _assert_cli_accepts(services[name]["command"])
    demo, load, run = (
        services["demo"]["command"],
        services["load"]["command"],
        services["exporter"]["command"],
    )
    assert demo[0] == "demo-service" and load[0] == "demo-load" and run[0] == "run"
    assert _flag(run, "--port") == _flag(demo, "--port") == "8000"
    assert f":{_flag(demo, '--port')}/" in _flag(load, "--url") and _flag(load, "--rate") == "30"


def test_compose_bind_mounts_exist_in_the_repository():
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source} does not exist"


def test_prometheus_config_scrapes_the_exporter_and_alerts_to_alertmanager():
    services = _compose()["services"]
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    listen = _flag(services["exporter"]["command"], "--listen")
    assert f"127.0.0.1:{_host_port(listen)}" in targets
    alertmanager_listen = _flag(services["alertmanager"]["command"], "--web.listen-address")
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [alertmanager_listen]
    mounts = services["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert "./prometheus/rules:/etc/prometheus/rules:ro" in mounts and config["rule_files"] == ["rules/*.yml"]


def test_promtool_check_config_resolves_the_rule_files():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: `make setup` installs Debian's prometheus package")
    result = subprocess.run(
        [promtool, "check", "config", str(DOCKER / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout
    assert "slo.rules.yml" in result.stdout and "exporter.rules.yml" in result.stdout


def test_alertmanager_config_is_accepted_by_amtool():
    amtool = shutil.which("amtool")
    config = yaml.safe_load((DOCKER / "alertmanager" / "alertmanager.yml").read_text())
    assert config["route"]["receiver"] in {r["name"] for r in config["receivers"]}
    if amtool is None:
        pytest.skip("amtool not installed (Debian package prometheus-alertmanager); structure checked only")
    result = subprocess.run(
        [amtool, "check-config", str(DOCKER / "alertmanager" / "alertmanager.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_points_at_prometheus_and_the_mounted_dashboards():
    services = _compose()["services"]
    grafana = services["grafana"]
    datasources = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    source = datasources["datasources"][0]
    assert source["type"] == "prometheus" and source["isDefault"]
    prometheus_listen = _flag(services["prometheus"]["command"], "--web.listen-address")
    assert source["url"] == f"http://{prometheus_listen}"
    providers = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/ebpf-slo-exporter.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    assert f"../dashboards:{path}:ro" in grafana["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(path + "/") and (ROOT / "dashboards" / Path(home).name).is_file()


def test_dockerfile_installs_bcc_and_the_project_on_bookworm():
    text = (DOCKER / "Dockerfile").read_text()
    instructions = [
        line.split(None, 1) for line in text.splitlines() if line and not line.startswith((" ", "#"))
    ]
    assert instructions[0][0] == "FROM" and instructions[0][1].startswith("debian:bookworm")
    assert "python3-bpfcc" in text and "--system-site-packages" in text and "pip install" in text
    assert '"ebpf-slo-exporter"' in text  # the entrypoint is the console script
    for word in ("/lib/modules", "/usr/src", "CAP_BPF", "CAP_NET_RAW", "CAP_SYS_ADMIN", "memlock"):
        assert word in text, f"the Dockerfile should explain {word}"
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    for copy in (i[1].split()[:-1] for i in instructions if i[0] == "COPY"):
        for source in copy:
            assert (ROOT / source).exists(), source
            assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is excluded from the context"


# ---------------------------------------------------------------- Kubernetes


def test_kubernetes_documents_carry_the_required_fields():
    docs = _k8s()
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "DaemonSet", "Service", "ServiceMonitor"} <= kinds
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "ebpf-slo-exporter"


def _one(kind: str) -> dict[str, Any]:
    [doc] = [d for d in _k8s() if d["kind"] == kind]
    return doc


def test_daemonset_runs_on_the_host_network_with_only_the_capabilities_it_needs():
    daemonset = _one("DaemonSet")
    spec = daemonset["spec"]
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    [container] = pod["containers"]
    security = container["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": _manifest_capabilities()}
    assert security["seccompProfile"] == {"type": "Unconfined"}
    assert pod["hostPID"] is True
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert container["resources"]["limits"]["memory"] and container["resources"]["limits"]["cpu"]
    assert container["resources"]["requests"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert all(m["name"] in volumes for m in mounts.values())
    for host_path in ("/lib/modules", "/usr/src", "/var/log/pods", "/var/log/containers"):
        assert mounts[host_path]["readOnly"] is True
        assert volumes[mounts[host_path]["name"]]["hostPath"]["path"] == host_path
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    _assert_cli_accepts(container["args"])
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    assert _host_port(_flag(container["args"], "--listen")) == port


def test_service_and_servicemonitor_select_the_daemonset_pods_by_port_name():
    daemonset, service, monitor = _one("DaemonSet"), _one("Service"), _one("ServiceMonitor")
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["clusterIP"] == "None"
    [port] = service["spec"]["ports"]
    container_ports = {p["name"] for p in daemonset["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert port["targetPort"] in container_ports
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [port["name"]]


def test_configmap_slo_manifest_is_a_valid_manifest_with_valid_rules():
    manifest = _one("ConfigMap")["data"]["reliably.yaml"]
    objectives = parse_manifest(manifest, source="ConfigMap")
    assert objectives and render_rules(objectives)
    daemonset = _one("DaemonSet")
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    slo_path = Path(_flag(container["args"], "--slo"))
    mount = [m for m in container["volumeMounts"] if m["mountPath"] == str(slo_path.parent)]
    assert mount and slo_path.name == "reliably.yaml"


def test_prometheusrule_carries_exactly_the_exporter_health_rules_and_promtool_accepts_them(tmp_path):
    resource = _one("PrometheusRule")
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
    assert resource["metadata"]["namespace"] == _one("DaemonSet")["metadata"]["namespace"]
    source = yaml.safe_load((DOCKER / "prometheus" / "rules" / "exporter.rules.yml").read_text())
    assert resource["spec"]["groups"] == source["groups"], (
        "deploy/kubernetes/prometheusrule.yaml differs from docker/prometheus/rules/exporter.rules.yml: "
        "copy the groups over")
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is not installed: `make setup` installs Debian's prometheus package"
    spec = tmp_path / "spec.yml"
    spec.write_text(yaml.safe_dump(resource["spec"]))
    result = subprocess.run([promtool, "check", "rules", str(spec)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
