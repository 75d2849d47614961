"""identity/: cgroup layouts, kubelet directory names, overrides, and the resolver on a fixture /proc tree."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from exporter.errors import ConfigError
from exporter.identity import IDENTITY_LABEL_NAMES, Identity, parse_cgroup, parse_pod_dir, parse_service_override
from exporter.identity.resolver import Resolver
from exporter.metrics import HTTP_LABELS, HttpMetrics, http_key

CID = "3f2a" + "0123456789abcdef" * 3 + "0123456789ab"
UID = "5c4e1d2a-8b7f-4e3a-9d1c-0a1b2c3d4e5f"
UID_ = UID.replace("-", "_")


@pytest.mark.parametrize(("text", "container", "pod"), [
    # systemd cgroup driver, cgroup v2: containerd, CRI-O, dockershim
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
     CID, UID),
    (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope\n", CID, UID),
    (f"0::/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope\n", CID, UID),  # Guaranteed QoS
    # cgroupfs driver
    (f"0::/kubepods/burstable/pod{UID}/{CID}\n", CID, UID),
    (f"0::/kubepods/pod{UID}/{CID}\n", CID, UID),
    # seen from inside a cgroup namespace: relative components
    (f"0::/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n", CID, UID),
    # plain Docker and podman
    (f"0::/system.slice/docker-{CID}.scope\n", CID, ""),
    (f"0::/docker/{CID}\n", CID, ""),
    (f"0::/machine.slice/libpod-{CID}.scope/container\n", CID, ""),
    # cgroup v1 (hybrid hosts): any line
    (f"12:pids:/kubepods/besteffort/pod{UID}/{CID}\n1:name=systemd:/kubepods/besteffort/pod{UID}/{CID}\n", CID, UID),
    # a pod's sandbox-level cgroup: the pod without a container
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice\n", "", UID),
])
def test_cgroup_layouts_give_container_id_and_pod_uid(text: str, container: str, pod: str) -> None:
    got = parse_cgroup(text)
    assert (got.container_id, got.pod_uid, got.known_layout) == (container, pod, True)


@pytest.mark.parametrize(("text", "known"), [
    ("0::/\n", True),
    ("0::/user.slice/user-0.slice/session-3.scope\n", True),
    ("0::/system.slice/nginx.service\n", True),
    ("0::/kubepods.slice/kubepods-burstable.slice/something-new\n", False),  # kubepods, but not parsed
    ("0::/system.slice/containerd.service/weird-id\n", False),
    ("", True),
])
def test_host_processes_have_no_container_and_unknown_layouts_say_so(text: str, known: bool) -> None:
    got = parse_cgroup(text)
    assert (got.container_id, got.pod_uid, got.known_layout) == ("", "", known)


def test_kubelet_pod_directory_names() -> None:
    got = parse_pod_dir(f"payments_checkout-7d9f8b6c5-x2x4z_{UID}")
    assert got is not None and (got.namespace, got.pod, got.uid) == ("payments", "checkout-7d9f8b6c5-x2x4z", UID)
    assert parse_pod_dir("payments_checkout") is None
    assert parse_pod_dir(f"_pod_{UID}") is None
    assert parse_pod_dir("kube-system_coredns_not-a-uid") is None


def test_service_overrides_parse_and_match() -> None:
    by_port = parse_service_override("checkout=port:8080")
    assert by_port.matches(8080, "python3", "/", "") and not by_port.matches(8081, "python3", "/", "")
    assert parse_service_override("api=process:ngin*").matches(80, "nginx", "/", "")
    assert parse_service_override("db=cgroup:*payments*").matches(1, "x", "/system.slice/payments.service", "")
    by_id = parse_service_override(f"cart=container:{CID[:12]}")
    assert by_id.matches(1, "x", "/", CID) and not by_id.matches(1, "x", "/", "")
    for bad in ("checkout", "checkout=8080", "x=pid:1", "=port:80", "x=port:http"):
        with pytest.raises(ConfigError, match="--service"):
            parse_service_override(bad)


def test_http_key_appends_the_identity_labels_in_their_declared_order() -> None:
    identity = Identity("checkout", UID, "payments", "checkout-0", UID, CID)
    key = http_key("GET", 200, "/", 8080, identity=identity.labels())
    assert HTTP_LABELS[-len(IDENTITY_LABEL_NAMES):] == IDENTITY_LABEL_NAMES
    assert dict(zip(HTTP_LABELS, key, strict=True))["k8s_pod_name"] == "checkout-0"
    assert http_key("GET", 200, "/", 8080)[-6:] == ("",) * 6


# -- the resolver on a fixture /proc ----------------------------------------------------------

NETNS_A, NETNS_B, HOST_NS = "net:[4026532001]", "net:[4026532002]", "net:[4026531840]"
TCP_HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def _tcp_line(hex_addr: str, port: int, state: str, inode: int) -> str:
    return (f"   0: {hex_addr}:{port:04X} 00000000:0000 {state} 00000000:00000000 00:00000000 00000000     0"
            f"        0 {inode} 1 0000000000000000 100 0 0 10 0\n")


def _process(proc: Path, pid: int, *, netns: str, comm: str, cgroup: str, sockets: tuple[int, ...] = (),
             tcp: str = "", fib_local: tuple[str, ...] = ()) -> None:
    base = proc / str(pid)
    (base / "fd").mkdir(parents=True)
    (base / "ns").mkdir()
    (base / "net").mkdir()
    os.symlink(netns, base / "ns" / "net")
    (base / "comm").write_text(comm + "\n")
    (base / "cgroup").write_text(cgroup)
    for fd, inode in enumerate(sockets, start=3):
        os.symlink(f"socket:[{inode}]", base / "fd" / str(fd))
    os.symlink("/dev/null", base / "fd" / "0")
    (base / "net" / "tcp").write_text(TCP_HEADER + tcp)
    (base / "net" / "tcp6").write_text(TCP_HEADER)
    (base / "net" / "fib_trie").write_text("Main:\n  +-- 0.0.0.0/0 3 0 5\n" + "".join(
        f"     |-- {address}\n        /32 host LOCAL\n" for address in fib_local))
    (base / "net" / "if_inet6").write_text("")


def _node(tmp_path: Path) -> tuple[Path, Path]:
    """Two pods serving on 0.0.0.0:8080 in their own namespaces, a host nginx on 127.0.0.1:8080."""
    proc, pods = tmp_path / "proc", tmp_path / "log" / "pods"
    wildcard_8080 = _tcp_line("00000000", 8080, "0A", 7001)
    cgroup_a = (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
                f"cri-containerd-{CID}.scope\n")
    _process(proc, 100, netns=NETNS_A, comm="pause", cgroup=cgroup_a.replace(CID, "e" * 64), tcp=wildcard_8080,
             fib_local=("10.231.9.11", "127.0.0.1"))
    _process(proc, 101, netns=NETNS_A, comm="python3", cgroup=cgroup_a, sockets=(7001,), tcp=wildcard_8080,
             fib_local=("10.231.9.11", "127.0.0.1"))
    _process(proc, 200, netns=NETNS_B, comm="srv-b", cgroup="0::/system.slice/srv-b.service\n", sockets=(7002,),
             tcp=_tcp_line("00000000", 8080, "0A", 7002), fib_local=("10.231.9.12", "127.0.0.1"))
    # 127.0.0.1 little-endian in /proc/net/tcp: 0100007F
    _process(proc, 300, netns=HOST_NS, comm="nginx", cgroup="0::/system.slice/nginx.service\n", sockets=(7003,),
             tcp=_tcp_line("0100007F", 8080, "0A", 7003) + _tcp_line("0100007F", 9999, "01", 7004),
             fib_local=("127.0.0.1", "10.0.2.15"))
    os.symlink("300", proc / "self")
    (pods / f"payments_checkout-7d9f8b6c5-x2x4z_{UID}" / "checkout").mkdir(parents=True)
    (pods.parent / "containers").mkdir()
    os.symlink("/dev/null", pods.parent / "containers" / f"checkout-7d9f8b6c5-x2x4z_payments_checkout-{CID}.log")
    return proc, pods


def test_the_resolver_names_pods_host_processes_and_namespaces_apart(tmp_path: Path) -> None:
    proc, pods = _node(tmp_path)
    resolver = Resolver(proc=proc, pod_logs=pods, container_logs=pods.parent / "containers")
    pod = resolver.identify("10.231.9.11", 8080)
    assert pod == Identity("checkout", UID, "payments", "checkout-7d9f8b6c5-x2x4z", UID, CID)
    plain = resolver.identify("10.231.9.12", 8080)
    assert plain == Identity("srv-b", f"{NETNS_B}/0.0.0.0")
    host = resolver.identify("127.0.0.1", 8080)
    assert host == Identity("nginx", f"{HOST_NS}/127.0.0.1")
    assert resolver.identify("10.231.9.99", 8080) == Identity(service_instance_id="10.231.9.99")
    assert resolver.failures["no_listener"] == 1 and resolver.resolutions == 4
    resolver.identify("10.231.9.11", 8080)  # cached
    assert resolver.resolutions == 4
    assert {s.identity.service_name for s in resolver.servers()} == {"checkout", "srv-b", "nginx"}


def test_without_container_logs_a_single_container_pod_still_names_its_container(tmp_path: Path) -> None:
    proc, pods = _node(tmp_path)
    resolver = Resolver(proc=proc, pod_logs=pods, container_logs=tmp_path / "nowhere")
    assert resolver.identify("10.231.9.11", 8080).service_name == "checkout"
    (pods / f"payments_checkout-7d9f8b6c5-x2x4z_{UID}" / "sidecar").mkdir()
    fresh = Resolver(proc=proc, pod_logs=pods, container_logs=tmp_path / "nowhere")
    # Two containers and no way to tell which: the process name, never a guess.
    assert fresh.identify("10.231.9.11", 8080).service_name == "python3"


def test_overrides_win_and_a_vanished_process_gives_empty_labels_and_a_reason(tmp_path: Path) -> None:
    proc, pods = _node(tmp_path)
    resolver = Resolver(proc=proc, pod_logs=pods, overrides=[parse_service_override("edge=process:nginx")])
    assert resolver.identify("127.0.0.1", 8080).service_name == "edge"
    # The owner exits between the listener lookup and reading its cgroup.
    for name in ("comm", "cgroup"):
        (proc / "200" / name).unlink()
    got = resolver.identify("10.231.9.12", 8080)
    assert got == Identity(service_instance_id=f"{NETNS_B}/0.0.0.0")
    assert resolver.failures["process_gone"] == 1


def test_gone_servers_are_swept_after_the_grace_period_and_their_series_dropped(tmp_path: Path) -> None:
    proc, pods = _node(tmp_path)
    now = [0.0]
    resolver = Resolver(proc=proc, pod_logs=pods, clock=lambda: now[0])
    http = HttpMetrics()
    from exporter.core.model import Exchange

    for ip in ("10.231.9.11", "10.231.9.12"):
        exchange = Exchange("GET", "/", 200, 0, 1, 0, 0, 8080, server_ip=ip)
        http.observe(exchange, "/", resolver.identify(ip, 8080).labels())
    assert resolver.sweep(30.0) == set()
    shutil.rmtree(proc / "200")
    assert resolver.sweep(30.0) == set()  # gone, but within the grace period
    now[0] = 31.0
    assert resolver.sweep(30.0) == {f"{NETNS_B}/0.0.0.0"}
    assert http.forget_instances({f"{NETNS_B}/0.0.0.0"}) == 1
    assert http.series_count() == 1
    assert {s.identity.service_name for s in resolver.servers()} == {"checkout"}


def test_the_cache_is_bounded_and_evictions_are_counted(tmp_path: Path) -> None:
    proc, pods = _node(tmp_path)
    resolver = Resolver(proc=proc, pod_logs=pods, max_entries=2)
    for last in range(20, 25):
        resolver.identify(f"10.231.9.{last}", 8080)
    assert resolver.failures["evicted"] == 3


def test_a_source_that_knows_only_the_port_gets_the_one_listener_or_nothing(tmp_path: Path) -> None:
    """The kernel fast path's aggregates carry no server address (yet): port-only lookups."""
    proc, pods = _node(tmp_path)
    resolver = Resolver(proc=proc, pod_logs=pods)
    assert resolver.identify("", 8080) == Identity()  # three servers own 8080 on this node
    assert resolver.failures["ambiguous_port"] == 1
    _process(proc, 400, netns=HOST_NS, comm="api", cgroup="0::/\n", sockets=(7005,),
             tcp=_tcp_line("00000000", 9090, "0A", 7005))
    assert resolver.identify("", 9090) == Identity("api", f"{HOST_NS}/0.0.0.0")
    assert resolver.identify("", 9091) == Identity()
    assert resolver.failures["no_listener"] == 1
