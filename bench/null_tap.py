"""The packet tap alone, held on lo: `python -m bench.null_tap` (root).

The red and realistic scenarios' `tap` configuration runs this beside nginx. It opens a packet
socket as the exporter opens its own (SO_ATTACH_BPF, PACKET_IGNORE_OUTGOING on lo, kernel receive
timestamps) with a filter that returns 0 at its first instruction, and holds it until stopped.
Every packet still reaches the filter, nothing is parsed or kept: what the machine pays here is
the price of tapping the interface at all, which no cheaper filter can lower.
"""

from __future__ import annotations

import signal
import socket
import sys

from exporter.capture.live import ETH_P_ALL, PACKET_IGNORE_OUTGOING, SO_ATTACH_BPF, SO_TIMESTAMPNS, SOL_PACKET


def main() -> int:
    from bcc import BPF  # root with BCC, as the exporter's loader

    bpf = BPF(text="int drop(struct __sk_buff *skb) { return 0; }")
    program = bpf.load_func("drop", BPF.SOCKET_FILTER)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, program.fd)
    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.bind(("lo", ETH_P_ALL))
    print("ready: a packet socket on lo whose filter drops every packet", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    sock.close()
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    sys.exit(main())
