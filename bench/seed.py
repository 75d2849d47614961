"""The 2021 demo's capture design, rebuilt as the bench's reference point.

Usage (as root; the bench runs it for you):
    .venv/bin/python bench/seed.py --interface lo --port 8080

Needs BCC (python3-bpfcc), pypacker and kernel headers, like the exporter.

What it keeps from the 2021 design, because that is what is being measured:
- a BCC socket filter that passes every Ethernet/IPv4/TCP packet whole and drops the
  rest: no port filter, no payload filter, loopback duplicates reach user space;
- BCC's raw socket (`attach_raw_socket`), made blocking, and one `os.read` per packet;
- pypacker decodes every packet; user space keeps the ones to or from the port;
- a dict keyed by the connection's 4-tuple holds method, path and a wall-clock start
  (`datetime.utcnow()` when processed); a response completes the record, which goes on a
  queue to a worker thread that tallies it per path, as the demo's push thread did.
  Sessions are never freed, as in the demo.

What it leaves out, and why: the 10 ms sleep per dequeued request and the Reliably
push. Both only make the seed look worse (the sleep alone caps it near 100 req/s), and
the bench wants the cost of the capture design itself. It also stops promptly on SIGTERM
(the demo hung until the next packet), because the bench needs its counts.

On SIGTERM or SIGINT it prints one JSON line to stdout: `requests` (records completed,
the demo's unit of work), `request_heads` (request lines matched, loopback duplicates
included), `packets` read, and the socket's PACKET_STATISTICS (`kernel_packets`,
`kernel_drops`), accumulated over the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import re
import signal
import socket
import struct
import sys
import threading
from typing import Any

SOL_PACKET = 263
PACKET_STATISTICS = 6

BPF_TEXT = r"""
int seed_filter(struct __sk_buff *skb) {
    if (load_half(skb, 12) != 0x0800)  /* Ethernet type IPv4 */
        return 0;
    if (load_byte(skb, 14 + 9) != 6)    /* IP protocol TCP */
        return 0;
    return -1;                          /* keep the whole packet */
}
"""

REQUEST = re.compile(rb"^(GET|PUT|POST|DELETE|HEAD) ([A-Za-z0-9/._]*) HTTP/1\.[01]\r\n")
RESPONSE = re.compile(rb"^HTTP/1\.[01] (\d{3})")


class _Stop(BaseException):  # not Exception: must pass the decode `except Exception`
    pass


class Stats:
    def __init__(self) -> None:
        self.packets = 0
        self.request_heads = 0
        self.requests = 0
        self.kernel_packets = 0
        self.kernel_drops = 0
        self.decode_errors = 0

    def poll_kernel(self, sock: socket.socket) -> None:
        packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self.kernel_packets += packets  # the kernel resets both on every read
        self.kernel_drops += drops


def worker(records: queue.Queue[Any], stats: Stats, windows: dict[str, list[int]]) -> None:
    """The demo's consumer: per-path counts of all and good records (no sleep, no push)."""
    while True:
        record = records.get()
        if record is None:
            return
        path, status, duration = record
        window = windows.setdefault(path, [0, 0, 0])
        window[0] += 1
        window[1] += status == 200
        window[2] += duration <= datetime.timedelta(milliseconds=150)
        stats.requests += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interface", default="lo")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    from bcc import BPF
    from pypacker.layer3 import ip as ip_layer
    from pypacker.layer4 import tcp as tcp_layer
    from pypacker.layer12 import ethernet

    bpf = BPF(text=BPF_TEXT)
    function = bpf.load_func("seed_filter", BPF.SOCKET_FILTER)
    BPF.attach_raw_socket(function, args.interface)
    fd = function.sock
    sock = socket.fromfd(fd, socket.AF_PACKET, socket.SOCK_RAW, socket.IPPROTO_IP)
    sock.setblocking(True)

    stats = Stats()
    sessions: dict[tuple[str, int, str, int], dict[str, Any]] = {}
    records: queue.Queue[Any] = queue.Queue()
    windows: dict[str, list[int]] = {}
    thread = threading.Thread(target=worker, args=(records, stats, windows), daemon=True)
    thread.start()

    def stop(signum: int, frame: Any) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready", file=sys.stderr, flush=True)

    port = args.port
    try:
        while True:
            packet = os.read(fd, 4096)
            stats.packets += 1
            if stats.packets & 0xFFFF == 0:
                stats.poll_kernel(sock)
            try:
                eth = ethernet.Ethernet(packet)
                ip = eth[ip_layer.IP]
                tcp = eth[tcp_layer.TCP]
                if ip is None or tcp is None:
                    continue
                if tcp.dport == port:
                    key = (ip.src_s, tcp.sport, ip.dst_s, tcp.dport)
                elif tcp.sport == port:
                    key = (ip.dst_s, tcp.dport, ip.src_s, tcp.sport)
                else:
                    continue
                payload = tcp.body_bytes
            except Exception:
                stats.decode_errors += 1
                continue
            session = sessions.get(key)
            if session is None or session["done"]:
                session = {"start": datetime.datetime.utcnow(), "method": None, "path": None, "done": False}
                sessions[key] = session
            if not payload:
                continue
            request = REQUEST.match(payload)
            if request is not None:
                stats.request_heads += 1
                session["method"] = request.group(1).decode()
                session["path"] = request.group(2).decode()
                continue
            response = RESPONSE.match(payload)
            if response is not None and session["method"] is not None:
                duration = datetime.datetime.utcnow() - session["start"]
                records.put((session["path"], int(response.group(1)), duration))
                session["done"] = True
    except _Stop:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stats.poll_kernel(sock)
    records.put(None)
    thread.join(5.0)
    print(json.dumps({
        "requests": stats.requests,
        "request_heads": stats.request_heads,
        "packets": stats.packets,
        "kernel_packets": stats.kernel_packets,
        "kernel_drops": stats.kernel_drops,
        "decode_errors": stats.decode_errors,
        "sessions": len(sessions),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
