"""What one probed SSL call costs its caller: `python -m bench.tls_trap_cost [--calls N]` (root).

Two measurements, each this process's utime+stime per call (other load on the machine inflates
it less than a rate), with and without the probes, side by side in one run:

- `trap`: a ctypes loop calling SSL_read_ex on an SSL without a connection, bare and with an
  empty uprobe, uretprobe and both, at SSL_read_ex's own entry and at the internal function
  that the exporter probes (openssl_probe.py says why). The difference is the price of the
  traps alone on this machine, whatever the program does.
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
import shutil
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
from exporter.capture.openssl_layout import calibrate
from exporter.capture.tls import TlsCapture, find_libraries

_KPROBE = 2  # BPF_PROG_TYPE_KPROBE: uprobes too


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _per_call_us(run: Callable[[], None], calls: int) -> float:
    before = _cpu_s()
    run()
    return (_cpu_s() - before) / calls * 1e6


def uprobe_programs(pid: int) -> dict[int, dict[str, int]]:
    """prog_id -> run_cnt, run_time_ns, recursion_misses of the uprobe programs `pid` holds."""
    out: dict[int, dict[str, int]] = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) != "anon_inode:bpf-prog":
                continue
            info = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines()
                        if ":" in line)
        except OSError:
            continue
        if int(info.get("prog_type", "-1")) == _KPROBE:
            out[int(info["prog_id"])] = {key: int(info.get(key, "0"))
                                         for key in ("run_cnt", "run_time_ns", "recursion_misses")}
    return out


def _bpf_run(pid: int) -> int:
    """run_time_ns summed over the uprobe programs this process holds."""
    return sum(program["run_time_ns"] for program in uprobe_programs(pid).values())


def trap_costs(library: str, calls: int) -> list[tuple[str, float]]:
    """SSL_read_ex through ctypes on an SSL without a connection (it fails at once inside the
    internal function) bare, then with empty probes where the exporter could put them: at
    SSL_read_ex itself (its first instruction, `sub rsp`, is single-stepped) and at the internal
    function it calls (`push`, emulated). A private copy of the library is probed, so that other
    exporters' probes on the system copy (system-wide, every process) do not count here."""
    from bcc import BPF  # the bench runs as root with BCC, as the loader does

    layout = calibrate(library)
    with tempfile.TemporaryDirectory() as tmp:
        copy = str(Path(tmp) / Path(library).name)
        shutil.copy(library, copy)
        lib = ctypes.CDLL(copy)  # its libcrypto: the system's, by soname
        lib.TLS_method.restype = ctypes.c_void_p
        lib.SSL_CTX_new.restype, lib.SSL_CTX_new.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
        lib.SSL_new.restype, lib.SSL_new.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
        lib.SSL_read_ex.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        ssl_ = lib.SSL_new(lib.SSL_CTX_new(lib.TLS_method()))
        buffer, count = ctypes.create_string_buffer(64), ctypes.c_size_t(0)
        read_ex = lib.SSL_read_ex

        def loop() -> None:
            for _ in range(calls):
                read_ex(ssl_, buffer, 64, ctypes.byref(count))  # its error queue is a ring: no growth

        rows = [("bare", _per_call_us(loop, calls))]
        places: list[tuple[str, dict[str, object]]] = [("at SSL_read_ex (sub rsp: single-stepped)",
                                                        {"sym": b"SSL_read_ex"})]
        if layout.read is not None:
            places.append((f"at the internal function ({layout.read.first})", {"addr": layout.read.vaddr}))
        for place, where in places:
            for name, entry, ret in (("uprobe", True, False), ("uretprobe", False, True), ("both", True, True)):
                bpf = BPF(text="int noop(void *ctx) { return 0; }")
                if entry:
                    bpf.attach_uprobe(name=copy.encode(), fn_name=b"noop", **where)
                if ret:
                    bpf.attach_uretprobe(name=copy.encode(), fn_name=b"noop", **where)
                rows.append((f"{name} {place}", _per_call_us(loop, calls)))
                # Detached by closing the perf events: BCC's detach also writes to tracefs, maybe unmounted.
                for fd in bpf.uprobe_fds.values():
                    os.close(fd)
                bpf.uprobe_fds.clear()
        rows.append(("bare again (the probes are gone)", _per_call_us(loop, calls)))
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
        print("| trap (SSL_read_ex via ctypes, no connection) | µs/call |")
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
