"""kernel_layout's offsets, used by a real BPF program on the running kernel, name the right bytes.

A uprobe on libc's getsockname() (tests/fixtures/bpf/socket_walk.c) walks
current->files->fdt->fd[fd] -> file -> inode / socket -> sock with socket_walk_offsets()
for each fd this test passes, and stores what it read. The oracle is the socket itself:
the ports and addresses this test bound and connected, as the socket API reports them.
A single wrong offset reads another field (or nothing) and fails an exact comparison.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from exporter.capture.bpf import ask_loader
from exporter.capture.bpfsys import BpfMap, possible_cpus
from exporter.capture.kernel_layout import socket_walk_offsets

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF and attaches a uprobe: needs root")

FIXTURE = Path(__file__).parents[1] / "fixtures" / "bpf" / "socket_walk.c"
# struct walk in socket_walk.c
WALK = struct.Struct("=IIIHHHHHxxII16s16s")
ALL_STEPS = 7


class Walk(NamedTuple):
    fd: int
    max_fds: int
    steps: int
    mode: int
    type: int
    family: int
    num: int
    dport: int  # network order, as the kernel keeps it
    daddr: int
    rcv_saddr: int
    v6_daddr: bytes
    v6_rcv_saddr: bytes

    def ipv4(self) -> tuple[str, str]:
        """(local, peer) IPv4 addresses."""
        return (socket.inet_ntoa(struct.pack("=I", self.rcv_saddr)),
                socket.inet_ntoa(struct.pack("=I", self.daddr)))

    def ipv6(self) -> tuple[str, str]:
        return (socket.inet_ntop(socket.AF_INET6, self.v6_rcv_saddr),
                socket.inet_ntop(socket.AF_INET6, self.v6_daddr))

    def peer_port(self) -> int:
        return socket.ntohs(self.dport)


@pytest.fixture(scope="module")
def walk() -> Iterator[Callable[[socket.socket], Walk]]:
    cflags = [f"-D{key}={offset}" for key, offset in socket_walk_offsets().items()]
    cflags += [f"-DTARGET_TGID={os.getpid()}", "-w"]
    request = {"src": str(FIXTURE), "cflags": cflags, "maps": ["walk_result"],
               "probes": [{"library": "c", "symbol": "getsockname", "function": "walk_fd", "return": False}],
               "raw_tracepoints": []}
    reply, fds = ask_loader(request, 8, "reinstall the package")
    try:
        assert reply["ok"], reply
        assert reply["attached"] == [["c", "getsockname", False]], reply["failed"]
        result = BpfMap(fds[0], possible_cpus())

        def walk_one(sock: socket.socket) -> Walk:
            sock.getsockname()  # libc getsockname(fd, ...): the uprobe walks to this fd's socket
            raw = result.lookup(struct.pack("=I", 0))
            assert raw is not None
            return Walk(*WALK.unpack(raw))

        yield walk_one
    finally:
        for fd in fds:
            os.close(fd)


def check_common(seen: Walk, sock: socket.socket, family: int, kind: int) -> None:
    assert (seen.fd, seen.steps) == (sock.fileno(), ALL_STEPS)
    assert seen.max_fds > sock.fileno()
    assert stat.S_ISSOCK(seen.mode)
    assert (seen.family, seen.type) == (family, kind)


def test_tcp_listener_and_both_ends_of_a_connection(walk: Callable[[socket.socket], Walk]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_connection(listener.getsockname()) as client:
        server, _ = listener.accept()
        with server:
            port = listener.getsockname()[1]
            client_port = client.getsockname()[1]
            seen = walk(listener)
            check_common(seen, listener, socket.AF_INET, socket.SOCK_STREAM)
            assert (seen.num, seen.peer_port(), seen.ipv4()) == (port, 0, ("127.0.0.1", "0.0.0.0"))

            seen = walk(server)  # the accepted socket: what the TLS probes will look at
            check_common(seen, server, socket.AF_INET, socket.SOCK_STREAM)
            assert (seen.num, seen.peer_port(), seen.ipv4()) == (port, client_port, ("127.0.0.1", "127.0.0.1"))

            seen = walk(client)
            check_common(seen, client, socket.AF_INET, socket.SOCK_STREAM)
            assert (seen.num, seen.peer_port()) == (client_port, port)


def test_ipv6_udp_socket_on_a_high_fd(walk: Callable[[socket.socket], Walk]) -> None:
    """A datagram socket's type and the v6 addresses (unconnected first, so that local and peer
    differ), and an fd far into the fd array."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as peer, \
            socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as low:
        peer.bind(("::1", 0))
        seen = walk(peer)
        check_common(seen, peer, socket.AF_INET6, socket.SOCK_DGRAM)
        assert (seen.num, seen.peer_port(), seen.ipv6()) == (peer.getsockname()[1], 0, ("::1", "::"))

        low.bind(("::1", 0))
        low.connect(peer.getsockname()[:2])
        high = socket.socket(fileno=os.dup2(low.fileno(), 700))
        with high:
            seen = walk(high)
            check_common(seen, high, socket.AF_INET6, socket.SOCK_DGRAM)
            assert seen.fd == 700
            assert (seen.num, seen.peer_port()) == (low.getsockname()[1], peer.getsockname()[1])
            assert seen.ipv6() == ("::1", "::1")
