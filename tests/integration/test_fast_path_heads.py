"""Real request heads on the real filter: which ones the kernel takes, and that nothing is lost.

Browser heads are 0.5-2 KB; the fast path scans request heads up to HEAD_MAX (4 KB) in the
tail-called http_scan program. Each case is written onto lo as raw frames between two
addresses that are not local (as in test_fast_path_reorder.py), so the segmentation is
exactly the one under test. Two exporters watch at once: the kernel fast path and the
user-space reference path. Both must count every exchange alike, and the fast one must
take exactly the cases it claims and hand over the rest with their own reason.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from exporter.capture.bpf import HttpFilter
from tests.integration.harness import counts_by_key, free_port, self_metric
from tests.integration.test_exporter_lo import both_paths
from tests.integration.test_fast_path_reorder import CLIENT, SERVER, frame

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF and writes raw frames: needs root")

ACK_PSH, ACK_FIN = 0x18, 0x11

# A browser's head (Chromium on Linux) with a 700-byte cookie: ~1.3 KB, names in both cases.
BROWSER = (
    b"Host: shop.example\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 "
    b"Safari/537.36\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\n"
    b"Accept-Language: en-GB,en-US;q=0.9,en;q=0.8\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"sec-ch-ua: \"Chromium\";v=\"124\", \"Not-A.Brand\";v=\"99\"\r\n"
    b"sec-ch-ua-platform: \"Linux\"\r\n"
    b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
    b"Cookie: " + b"; ".join(b"c%d=%08x" % (i, i * 2654435761 & 0xFFFFFFFF) for i in range(50))[:700] + b"\r\n"
)


class Conn:
    """One connection's segments, in order, each direction with its own sequence space."""

    def __init__(self, sock: socket.socket, server_port: int, client_port: int) -> None:
        self.sock, self.server_port, self.client_port = sock, server_port, client_port
        self.client_seq, self.server_seq = 7_000, 90_000

    def request(self, *pieces: bytes, flags: int = ACK_PSH) -> None:
        for piece in pieces:
            self.sock.send(frame(CLIENT, self.client_port, SERVER, self.server_port, self.client_seq, piece, flags))
            self.client_seq += len(piece) + (flags == ACK_FIN)
            time.sleep(0.002)

    def response(self, data: bytes, flags: int = ACK_PSH) -> None:
        self.sock.send(frame(SERVER, self.server_port, CLIENT, self.client_port, self.server_seq, data, flags))
        self.server_seq += len(data) + (flags == ACK_FIN)
        time.sleep(0.002)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def head(method: bytes, path: bytes, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return method + b" " + path + b" HTTP/" + version + b"\r\n" + BROWSER + extra + b"\r\n"


def pad_to(size: int, method: bytes, path: bytes) -> bytes:
    """A head of exactly `size` bytes (an X-Pad header fills it)."""
    short = head(method, path, b"X-Pad: \r\n")
    return head(method, path, b"X-Pad: " + b"p" * (size - len(short)) + b"\r\n")


def test_browser_heads_up_to_4_kb_stay_in_the_kernel_and_the_rest_is_handed_over_by_reason() -> None:
    port = free_port()
    taken = [  # (request segments, response): every one an exchange the kernel completes
        ([head(b"GET", b"/items/1")], OK),  # ~1.3 KB
        ([pad_to(2048, b"GET", b"/items/2")], OK),
        ([pad_to(4096, b"GET", b"/items/3")], OK),  # HEAD_MAX exactly
        ([head(b"POST", b"/items/4", b"content-LENGTH: 0\r\n")], OK),  # any case, no body
        ([head(b"DELETE", b"/items/5", b"Content-Length:0\r\n")], b"HTTP/1.1 204 No Content\r\n\r\n"),
        ([head(b"GET", b"/items/6")], b"HTTP/1.1 500 Oops\r\nCONTENT-LENGTH: 3\r\nx-Odd-Case: 1\r\n\r\nbad"),
        ([head(b"PUT", b"/items/10", b"Content-Length: 5\r\n") + b"hello"], OK),  # a body in the head's segment
        ([head(b"PATCH", b"/items/12", b"content-length: 11\r\n"), b"hello", b" body!"], OK),  # and after it
        ([head(b"GET", b"/items/9")[:700], head(b"GET", b"/items/9")[700:]], OK),  # a head in two segments
        ([pad_to(4096, b"GET", b"/items/14")[:1448], pad_to(4096, b"GET", b"/items/14")[1448:2896],
          pad_to(4096, b"GET", b"/items/14")[2896:]], OK),  # and a 4 KB one in three, as behind a 1500 MTU
    ]
    handed = [  # (request segments, response, reason)
        ([pad_to(4097, b"GET", b"/items/7")], OK, "head_too_long"),
        ([pad_to(9000, b"GET", b"/items/8")], OK, "head_too_long"),
        # A head's second segment that reads as a head of its own (a header value "GET /x"): the
        # kernel cannot tell, and hands the connection over with the first segment's bytes.
        ([head(b"GET", b"/items/15", b"X-A: GET /x HTTP/1.1\r\n").split(b"GET /x")[0],
          b"GET /x" + head(b"GET", b"/items/15", b"X-A: GET /x HTTP/1.1\r\n").split(b"GET /x")[1]], OK, "head_split"),
        ([head(b"PUT", b"/items/13", b"Expect: 100-continue\r\nContent-Length: 5\r\n")],
         b"HTTP/1.1 100 Continue\r\n\r\n", "request_body"),  # answered before its body: see below
        ([head(b"GET", b"/items/" + b"1" * 130)], OK, "path_too_long"),  # over 128 bytes as sent
        ([head(b"GET", b"/items/11", b"Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n"], OK, "new_flow"),
    ]
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind(("lo", 0))
        with both_paths(port, "--route", "/items/{id}") as exporters:
            client_port = 41000
            # Each case twice: on a new connection, and after a first exchange the kernel took.
            for warm in (False, True):
                for pieces, response in [(p, r) for p, r in taken] + [(p, r) for p, r, _ in handed]:
                    client_port += 1
                    conn = Conn(sock, port, client_port)
                    if warm:
                        conn.request(b"GET /items/0 HTTP/1.1\r\nHost: x\r\n\r\n")
                        conn.response(OK)
                    conn.request(*pieces)
                    conn.response(response)
                    if response.startswith(b"HTTP/1.1 100"):
                        conn.request(b"hello")
                        conn.response(OK)
                    conn.request(b"", flags=ACK_FIN)
                    conn.response(b"", flags=ACK_FIN)
            cases = len(taken) + len(handed)
            scraped = {mode: proc.wait_for_exchanges(2 * cases + cases) for mode, proc in exporters.items()}
    # Every case twice (on a new connection, then after a warm-up GET): the GET 200s are every case
    # but the POST, DELETE, PUT, PATCH and 500 ones, plus the warm-ups.
    expected = {("GET", "200", "/items/{id}"): 2 * (cases - 6) + cases, ("GET", "500", "/items/{id}"): 2,
                ("POST", "200", "/items/{id}"): 2, ("DELETE", "204", "/items/{id}"): 2,
                ("PUT", "200", "/items/{id}"): 4, ("PATCH", "200", "/items/{id}"): 2}
    for mode, samples in scraped.items():
        assert counts_by_key(samples, port) == expected, mode
        assert self_metric(samples, "parse_errors_total", reason="gap") == 0, mode
        request_bytes = sum(value for (name, labels), value in samples.items()
                            if name == "http_server_request_body_size_bytes_sum"
                            and ("server_port", str(port)) in labels)
        assert request_bytes == 2 * (5 + 11 + 5), mode
    fast = scraped["fast"]
    assert self_metric(fast, "fast_path_exchanges_total") == 2 * len(taken) + cases
    for reason in ("head_too_long", "head_split", "request_body", "path_too_long"):
        n = sum(1 for *_, r in handed if r == reason)
        assert self_metric(fast, "fast_path_handovers_total", reason=reason) == 2 * n, reason
    assert self_metric(fast, "fast_path_split_heads_total") == 2 * 2
    # Transfer-Encoding in a request is no more specific than "not simple".
    assert self_metric(fast, "fast_path_handovers_total", reason="new_flow") == 1
    assert self_metric(fast, "fast_path_handovers_total", reason="request") == 1
    assert self_metric(fast, "fast_path_busy_total") == 0
    assert ("ebpf_slo_exporter_fast_path_tail_call_failed_total", ()) in fast
    assert self_metric(fast, "fast_path_tail_call_failed_total") == 0


def test_http_1_0_and_connection_close_stay_in_the_kernel() -> None:
    port = free_port()
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind(("lo", 0))
        with both_paths(port, "--route", "/items/{id}") as exporters:
            for i, (version, response) in enumerate([
                (b"1.0", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"),
                (b"1.1", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"),
            ]):
                conn = Conn(sock, port, 42000 + i)
                conn.request(head(b"GET", b"/items/%d" % i, b"Connection: close\r\n", version=version))
                conn.response(response)
                conn.response(b"", flags=ACK_FIN)  # the server closes first, as Connection: close asks
                conn.request(b"", flags=ACK_FIN)
            scraped = {mode: proc.wait_for_exchanges(2) for mode, proc in exporters.items()}
    for mode, samples in scraped.items():
        assert counts_by_key(samples, port) == {("GET", "200", "/items/{id}"): 2}, mode
    fast = scraped["fast"]
    assert self_metric(fast, "fast_path_exchanges_total") == 2
    assert sum(value for (name, _), value in fast.items()
               if name == "ebpf_slo_exporter_fast_path_handovers_total") == 0


SO_ATTACH_BPF = 50
ETH_P_ALL = 3


def test_ids_share_one_kernel_key_and_the_key_carries_the_server_address() -> None:
    """100,000 random ids must not fill http_agg: with route_ids on, `/items/<digits>` is one key."""
    port = free_port()
    bpf_filter = HttpFilter([port], loopback=True, fast_path=True, histogram_bounds=((0.1,), (10.0,)))
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as tap, \
                socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as wire:
            tap.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, bpf_filter.fd)
            tap.bind(("lo", ETH_P_ALL))  # host order here: Python applies htons
            wire.bind(("lo", 0))
            client_port = 43000
            for route_ids, paths in ((True, [b"/items/%d" % (i * 7919) for i in range(40)] + [b"/items/12/x7"]),
                                     (False, [b"/items/%d" % i for i in range(5)])):
                bpf_filter.set_route_ids(route_ids)
                for path in paths:
                    client_port += 1
                    conn = Conn(wire, port, client_port)
                    conn.request(head(b"GET", path))
                    conn.response(OK)
            aggregates = bpf_filter.read_aggregates()
    finally:
        bpf_filter.close()
    counts = {(agg.server_ip, agg.port, agg.method, agg.status, agg.path): agg.count for agg in aggregates}
    assert counts == {
        (SERVER, port, "GET", 200, "/items/{id}"): 40,
        (SERVER, port, "GET", 200, "/items/{id}/x7"): 1,
        **{(SERVER, port, "GET", 200, f"/items/{i}"): 1 for i in range(5)},
    }


ACK_PSH_FIN = 0x19


def test_a_fin_carrying_data_is_counted_and_leaves_no_kernel_state() -> None:
    """Connection: close responses often end with data and FIN in one segment."""
    port = free_port()
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind(("lo", 0))
        with both_paths(port, "--route", "/items/{id}") as exporters:
            # The response's last segment carries the FIN: taken in the kernel.
            whole = Conn(sock, port, 44001)
            whole.request(head(b"GET", b"/items/1", b"Connection: close\r\n"))
            whole.response(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nok")
            whole.response(b"ok", flags=ACK_PSH_FIN)
            whole.request(b"", flags=ACK_FIN)
            # A whole response and FIN in one segment (HTTP/1.0 servers): taken in the kernel too.
            one = Conn(sock, port, 44004)
            one.request(head(b"GET", b"/items/4", version=b"1.0"))
            one.response(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", flags=ACK_PSH_FIN)
            one.request(b"", flags=ACK_FIN)
            # Data and FIN in one segment that does not end the response: handed over (close).
            cut = Conn(sock, port, 44002)
            cut.request(head(b"GET", b"/items/2"))
            cut.response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nok", flags=ACK_PSH_FIN)
            cut.request(b"", flags=ACK_FIN)
            # A request with FIN (a client that half-closes at once): handed over (close).
            half = Conn(sock, port, 44003)
            half.request(b"GET /items/0 HTTP/1.1\r\nHost: x\r\n\r\n")
            half.response(OK)
            half.request(head(b"GET", b"/items/3"), flags=ACK_PSH_FIN)
            half.response(OK, flags=ACK_PSH_FIN)
            scraped = {mode: proc.wait_for_exchanges(4) for mode, proc in exporters.items()}
    for mode, samples in scraped.items():
        assert counts_by_key(samples, port) == {("GET", "200", "/items/{id}"): 4}, mode
        assert self_metric(samples, "requests_without_response_total") == 1, mode  # the cut response
    fast = scraped["fast"]
    assert self_metric(fast, "fast_path_exchanges_total") == 3  # /items/1, /items/4 and the warm-up
    assert self_metric(fast, "fast_path_handovers_total", reason="close") == 2
    created = self_metric(fast, "fast_path_flow_states_created_total")
    assert created == 4
    assert self_metric(fast, "fast_path_flow_states_deleted_total") == created  # nothing leaks


SYN_ACK = 0x12


def test_a_first_response_segment_overtaken_by_the_next_keeps_its_anchor_from_the_syn_ack() -> None:
    """The kernel learns the server's first sequence number from its SYN-ACK: when the second
    response segment reaches the tap first, the flow is handed over with the right anchor
    (reason seq) rather than parsed from the wrong byte. The same anchor reaches user space for
    a connection that is user space's from its first request."""
    port = free_port()
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789"
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind(("lo", 0))
        with both_paths(port, "--route", "/items/{id}") as exporters:
            for client_port, request in ((45001, [head(b"GET", b"/items/1")]),
                                         (45002, [pad_to(4097, b"GET", b"/items/2")])):
                conn = Conn(sock, port, client_port)
                sock.send(frame(SERVER, port, CLIENT, client_port, conn.server_seq - 1, b"", SYN_ACK))
                conn.request(*request)
                conn.server_seq += 20
                conn.response(response[20:])  # the second segment first
                conn.server_seq -= len(response)
                conn.response(response[:20])
                conn.server_seq += len(response) - 20
                conn.request(b"", flags=ACK_FIN)
                conn.response(b"", flags=ACK_FIN)
            fast = exporters["fast"].wait_for_exchanges(2)
    assert counts_by_key(fast, port) == {("GET", "200", "/items/{id}"): 2}
    assert self_metric(fast, "fast_path_handovers_total", reason="seq") == 1
    assert self_metric(fast, "fast_path_handovers_total", reason="head_too_long") == 1
    assert self_metric(fast, "fast_path_handovers_seeded_total") == 2  # both anchored
    assert self_metric(fast, "parse_errors_total", reason="gap") == 0
