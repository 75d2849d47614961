"""What one probed SSL call costs its caller: `python -m bench.tls_trap_cost [--calls N]` (root).

Two measurements, each this process's utime+stime per call (other load on the machine inflates
it less than a rate), with and without the probes, side by side in one run:

- `trap`: a ctypes loop calling libssl's `TLS_method` (a function that returns a constant) bare,
  with an empty uprobe, with an empty uretprobe, and with both. The difference is the price of
  the traps alone on this machine, whatever the program does.
- `ssl`: SSL_write + SSL_read of 64 bytes over a loopback TLS connection inside this process
  (each call of the pair on the client side and the server side: 4 SSL calls per round), bare
  and with bpf/tls_probes.c attached as the exporter attaches it, its port not watched (the
  kernel's verdict drops every call: the cost that any TLS on the host pays while the exporter
  runs) and watched (events into the ring, which a thread reads with TlsCapture).

The BPF programs' own run time per call comes from the kernel's run time statistics
(enabled here while measuring), read from the programs' /proc/self/fdinfo.
"""

from __future__ import annotations

import ctypes
import os
import resource
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import click

from exporter.capture.bpfsys import enable_run_time_stats
from exporter.capture.tls import TlsCapture, find_libraries

_KPROBE = 2  # BPF_PROG_TYPE_KPROBE: uprobes too


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _per_call_us(run: Callable[[], None], calls: int) -> float:
    before = _cpu_s()
    run()
    return (_cpu_s() - before) / calls * 1e6


def _bpf_run(pid: int) -> int:
    """run_time_ns summed over the uprobe programs this process holds."""
    total_ns = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) != "anon_inode:bpf-prog":
                continue
            info = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines()
                        if ":" in line)
        except OSError:
            continue
        if int(info.get("prog_type", "-1")) == _KPROBE:
            total_ns += int(info.get("run_time_ns", "0"))
    return total_ns


def trap_costs(library: str, calls: int) -> list[tuple[str, float]]:
    from bcc import BPF  # the bench runs as root with BCC, as the loader does

    lib = ctypes.CDLL(library)
    function = lib.TLS_method

    def loop() -> None:
        for _ in range(calls):
            function()

    rows = [("bare", _per_call_us(loop, calls))]
    for name, entry, ret in (("uprobe", True, False), ("uretprobe", False, True), ("both", True, True)):
        bpf = BPF(text="int noop(void *ctx) { return 0; }")
        if entry:
            bpf.attach_uprobe(name=library.encode(), sym=b"TLS_method", fn_name=b"noop")
        if ret:
            bpf.attach_uretprobe(name=library.encode(), sym=b"TLS_method", fn_name=b"noop")
        rows.append((name, _per_call_us(loop, calls)))
        # Detached by closing the perf events: BCC's detach also writes to tracefs, unmounted here.
        for fd in bpf.uprobe_fds.values():
            os.close(fd)
        bpf.uprobe_fds.clear()
    return rows


class _Pair:
    """A TLS connection over loopback inside this process: client and server SSLSockets."""

    def __init__(self, port: int, cert: Path, key: Path) -> None:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(cert, key)
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.check_hostname = False
        client_ctx.verify_mode = ssl.CERT_NONE
        listener = socket.create_server(("127.0.0.1", port))
        accepted: list[ssl.SSLSocket] = []
        thread = threading.Thread(target=lambda: accepted.append(server_ctx.wrap_socket(listener.accept()[0],
                                                                                        server_side=True)))
        thread.start()
        self.client = client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)))
        thread.join()
        listener.close()
        self.server = accepted[0]

    def rounds(self, count: int) -> None:
        payload = b"x" * 64
        for _ in range(count):
            self.client.write(payload)
            self.server.read(64)
            self.server.write(payload)
            self.client.read(64)

    def close(self) -> None:
        self.client.close()
        self.server.close()


def ssl_costs(calls: int) -> list[tuple[str, float, float | None]]:
    rounds = calls // 4
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
        rows: list[tuple[str, float, float | None]] = []
        for name, probed, watched in (("bare", False, False), ("exporter, port not watched", True, False),
                                      ("exporter, port watched (reader's CPU not included)", True, True)):
            port = _free_port()
            capture = TlsCapture([port] if watched else [], find_libraries()).open() if probed else None
            stop = threading.Event()
            reader_cpu = [0.0]
            reader = None
            if capture is not None:
                reader = threading.Thread(target=_drain, args=(capture, stop, reader_cpu))
                reader.start()
            pair = _Pair(port, cert, key)
            pair.rounds(100)  # handshake done, state made
            before_ns = _bpf_run(os.getpid())
            probes = capture.probes if capture is not None else None
            ring_started = probes.ring_thread_cpu_s() if probes is not None else 0.0
            started = _cpu_s()
            pair.rounds(rounds)
            after_ns = _bpf_run(os.getpid())
            stop.set()
            if reader is not None:
                reader.join()  # its CPU is this process's too: taken out below
            # So is the CPU of the exporter's own thread that empties the ring into its queue.
            ring_cpu_s = probes.ring_thread_cpu_s() - ring_started if probes is not None else 0.0
            spent = _cpu_s() - started - reader_cpu[0] - ring_cpu_s
            pair.close()
            if capture is not None:
                counters = capture.counters()
                capture.close()
                print(f"  {name}: counters {counters}")
            bpf_us = (after_ns - before_ns) / (rounds * 4) / 1e3 if capture is not None else None
            rows.append((name, spent / (rounds * 4) * 1e6, bpf_us))
            time.sleep(1.5)  # the detach of the previous probes (tls.py detaches in the background)
        return rows


def _drain(capture: TlsCapture, stop: threading.Event, cpu_s: list[float]) -> None:
    """Read the ring as the exporter does, so that the watched case never fills it; its CPU into cpu_s[0]."""
    started = time.thread_time()
    while not stop.is_set():
        capture.read(0.05)
    cpu_s[0] = time.thread_time() - started


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@click.command()
@click.option("--calls", default=400_000, show_default=True, help="Calls per measurement.")
def main(calls: int) -> None:
    [library, *_] = find_libraries()
    stats = enable_run_time_stats()
    try:
        print(f"library {library}, {calls} calls per line, utime+stime of this process per call")
        print("| trap (TLS_method via ctypes) | µs/call |")
        print("|---|---:|")
        for name, us in trap_costs(library, calls):
            print(f"| {name} | {us:.3f} |")
        print()
        print("| 64-byte SSL_write/SSL_read over loopback TLS | µs/SSL call (process CPU) | BPF run time µs/SSL call |")
        print("|---|---:|---:|")
        for name, us, bpf_us in ssl_costs(calls):
            print(f"| {name} | {us:.3f} | {'n/a' if bpf_us is None else f'{bpf_us:.3f}'} |")
    finally:
        os.close(stats)


if __name__ == "__main__":
    main()
