"""Differential test of the kernel fast path: the real loaded filter against the user-space parser.

Generated connections (heads of many shapes and sizes, header names in any case, bodies
announced by Content-Length, chunked and close-delimited responses, heads split at any byte
over two or three segments, paths with ids of every shape the route heuristic knows (digits,
UUIDs, hex hashes, tokens), pipelining, garbage, sequence numbers near the wrap) are fed two ways:

- reference: every segment to a user-space Tracker, as `--no-fast-path` does;
- fast: every segment through the loaded http_filter with BPF_PROG_TEST_RUN; handover records
  it writes seed a second Tracker, which gets only the segments the filter passes up, cut
  to the length the filter keeps; exchanges the kernel completed are read from http_agg.

Both must agree on every (method, status, route): count and body bytes. The filter keys ids
as `{id}` (route_ids on, as KernelFastPath sets it), so routes are compared: the heuristic's
route of the path sent against the heuristic's route of the kernel's key.
"""

from __future__ import annotations

import collections
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.capture.bpf import AGG_ENTRIES, PATH_LEN, RAW_PATH_LEN, HttpFilter
from exporter.capture.bpfsys import test_run as bpf_test_run
from exporter.capture.frames import LINKTYPE_RAW, decode_frame
from exporter.capture.kernel_agg import to_handover
from exporter.core.flows import Tracker
from exporter.core.http1 import normalise_target
from exporter.core.model import Exchange
from exporter.core.routes import _is_identifier, heuristic_route
from tests.integration.test_fast_path_heads import ACK_FIN, ACK_PSH, frame

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF: needs root")

PORT = 8080  # never opened: BPF_PROG_TEST_RUN needs no interface
CLIENT, SERVER = "10.251.0.1", "10.251.0.2"
ETH = 14
MAX_SEGMENT = 3000

Totals = collections.Counter[tuple[str, int, str, str]]  # (method, status, path, "count"|"bytes")


@pytest.fixture(scope="module")
def bpf_filter() -> Iterator[HttpFilter]:
    # link_header_len 0: BPF_PROG_TEST_RUN pulls the Ethernet header before a socket filter runs.
    f = HttpFilter([PORT], loopback=False, link_header_len=0, fast_path=True,
                   histogram_bounds=((0.001, 0.1), (100.0, 10000.0)))
    f.set_route_ids(True)
    yield f
    f.close()


@dataclass
class Step:
    to_server: bool
    data: bytes
    fin: bool = False
    back: int = 0  # sent this many bytes before the direction's next byte: out of order, or again


def _case(name: str, style: int) -> str:
    return (name, name.lower(), name.upper(), name.swapcase())[style % 4]


HEX = "0123456789abcdefABCDEF"


@st.composite
def id_segments(draw: st.DrawFn) -> str:
    """A path segment shaped like an id, or like one but not quite (routes.py's heuristic)."""
    kind = draw(st.sampled_from(["digits", "uuid", "hex", "token", "long", "near"]))
    if kind == "digits":
        return draw(st.text("0123456789", min_size=1, max_size=12))
    if kind == "uuid":  # 8-4-4-4-12, each dash kept or not, any case; sometimes digits only
        alphabet = "0123456789" if draw(st.integers(0, 4)) == 4 else HEX
        groups = [draw(st.text(alphabet, min_size=n, max_size=n)) for n in (8, 4, 4, 4, 12)]
        out = groups[0]
        for group in groups[1:]:
            out += ("-" if draw(st.booleans()) else "") + group
        return out
    if kind == "hex":
        return draw(st.text(HEX, min_size=14, max_size=64))
    if kind == "token":
        return draw(st.text("abcXYZ019_-", min_size=14, max_size=40))
    if kind == "long":
        return draw(st.text("abc-_.", min_size=63, max_size=70))
    # Near misses: a UUID with a dash out of place or doubled, a 15-character hex.
    return draw(st.sampled_from(["3f2a1b4c-9d8e7f6a-5b4c-3d2e-1f0a9b8c7d6e", "3f2a1b4c--9d8e-7f6a-5b4c-3d2e1f0a9b8c",
                                 "12345678-1234-1234-1234-123456789012", "abcdef-abcdefabcdef-abcdef",
                                 "0123456789abcde", "{id}", "v2", ""]))


def _paths() -> st.SearchStrategy[str]:
    words = st.sampled_from(["api", "orders", "blobs", "v2", "items", "users"])
    shaped = st.lists(st.one_of(words, id_segments()), min_size=1, max_size=5).map(lambda parts: "/" + "/".join(parts))
    return st.one_of(shaped, st.sampled_from([8, 40, 120]).flatmap(
        lambda size: st.text("abc019/-_.%", max_size=size).map(lambda text: "/" + text)))


@st.composite
def exchanges(draw: st.DrawFn, last: bool) -> tuple[list[bytes], list[bytes], bool]:
    """One request (as client segments) and its response (as server segments); whether the
    response is delimited by the server closing."""
    method = draw(st.sampled_from(["GET", "GET", "POST", "HEAD", "DELETE", "PURGE"]))
    path = draw(_paths())
    if draw(st.booleans()):
        path += "?q=" + draw(st.text("xyz0&=", max_size=20))
    headers = [("Host", "example.test")]
    for _ in range(draw(st.integers(0, 4))):
        # Names the word-at-a-time scan passes whole, names it must take byte by byte (other
        # tchar), and names and values user space treats otherwise (a space, a bare LF).
        name = draw(st.sampled_from(["Accept", "Cookie", "X-Pad", "User-Agent", "traceparent",
                                     "Accept-Language-And-More-Words", "X_Odd.Name!~", "Bad Name", "X-é"]))
        value = draw(st.sampled_from(["v" * 7, "", "v" * 300, "v" * 1500, "a\nb", "tab\there", "v" * 9]))
        headers.append((_case(name, draw(st.integers(0, 3))), value))
    body = b""
    framing = draw(st.sampled_from(["none", "none", "zero", "body", "chunked"]))
    cl_name = _case("Content-Length", draw(st.integers(0, 3)))
    if framing == "zero":
        headers.append((cl_name, "0"))
    elif framing == "body":
        body = b"b" * draw(st.integers(1, 60))
        headers.append((cl_name, str(len(body))))
    elif framing == "chunked":
        headers.append((_case("Transfer-Encoding", draw(st.integers(0, 3))), "chunked"))
        body = b"5\r\nhello\r\n0\r\n\r\n"
    request = f"{method} {path} HTTP/1.{draw(st.sampled_from([0, 1, 1]))}\r\n".encode()
    request += b"".join(f"{n}: {v}\r\n".encode() for n, v in headers) + b"\r\n" + body
    if draw(st.integers(0, 19)) == 19:  # not 0: hypothesis favours small integers
        request = b"\x16\x03\x01garbage " + request  # not HTTP: both sides give up alike
    status = draw(st.sampled_from([200, 200, 201, 204, 304, 404, 500]))
    length = draw(st.sampled_from([0, 2, 100, 1400, 5000]))
    no_body = method == "HEAD" or status in (204, 304)
    resp_framing = "length" if no_body else draw(
        st.sampled_from(["length", "length", "chunked"] + (["close"] if last else [])))
    head = f"HTTP/1.1 {status} X\r\n".encode()
    if resp_framing == "length":
        if status not in (204, 304):
            head += _case("Content-Length", draw(st.integers(0, 3))).encode() + b": %d\r\n" % length
        payload = b"" if no_body else b"r" * length
    elif resp_framing == "chunked":
        head += b"Transfer-Encoding: chunked\r\n"
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (length, b"r" * length) if length else b"0\r\n\r\n"
    else:
        payload = b"r" * length
    response = head + b"\r\n" + payload
    return _split(draw, request, 2), _split(draw, response), resp_framing == "close"


def _split(draw: st.DrawFn, data: bytes, odds: int = 4) -> list[bytes]:
    """One segment, or (one time in `odds`) two or three cut at any byte."""
    if draw(st.integers(1, odds)) != odds:
        return [data]
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), min_size=1, max_size=2))))
    cuts = [c for c in cuts if 0 < c < len(data)]
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def _capped(pieces: list[bytes]) -> list[bytes]:
    """BPF_PROG_TEST_RUN takes a packet of at most a page, headroom included."""
    return [piece[i:i + MAX_SEGMENT] for piece in pieces for i in range(0, len(piece), MAX_SEGMENT)]


@st.composite
def connections(draw: st.DrawFn) -> list[Step]:
    n = draw(st.integers(1, 4))
    exs = [draw(exchanges(last=i == n - 1)) for i in range(n)]
    steps: list[Step] = []
    sent: set[int] = set()
    closed = False
    for i, (request, response, closes) in enumerate(exs):
        if i not in sent:
            pieces = list(request)
            if i + 1 < n and draw(st.integers(0, 5)) == 5:
                # Pipelined: the next request rides on this one's last segment, before any response.
                pieces[-1] += b"".join(exs[i + 1][0])
                sent.add(i + 1)
            request_steps = _disordered(draw, _capped(pieces))
            if len(request_steps) > 1 and draw(st.integers(0, 9)) == 9:  # the server answers mid-head
                request_steps.insert(1, Step(False, b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n"))
            steps += request_steps
        steps += [Step(False, piece) for piece in _capped(response)]
        if closes:
            steps.append(Step(False, b"", fin=True))
            closed = True
    if not closed:
        steps.append(Step(False, b"", fin=True))
    steps.append(Step(True, b"", fin=True))
    return steps


def _disordered(draw: st.DrawFn, pieces: list[bytes]) -> list[Step]:
    """A message's segments in order, or (sometimes, when it has several) with two of them
    swapped, or one sent again after the next: a head out of order or retransmitted mid-way."""
    steps = [Step(True, piece) for piece in pieces]
    if len(pieces) < 2 or draw(st.integers(0, 3)) != 3:
        return steps
    i = draw(st.integers(0, len(pieces) - 2))
    if draw(st.booleans()):  # i + 1 first, then i
        return [*steps[:i], Step(True, pieces[i + 1], back=-len(pieces[i])),
                Step(True, pieces[i], back=len(pieces[i]) + len(pieces[i + 1])), *steps[i + 2:]]
    return [*steps[:i + 2], Step(True, pieces[i], back=len(pieces[i]) + len(pieces[i + 1])), *steps[i + 2:]]


_client_ports = iter(range(20000, 65000))


def _totals(exchanges: list[Exchange]) -> Totals:
    out: Totals = collections.Counter()
    for ex in exchanges:
        key = (ex.method, ex.status, heuristic_route(normalise_target(ex.target)))
        out[(*key, "count")] += 1
        out[(*key, "bytes")] += ex.response_body_bytes
        out[(*key, "request bytes")] += ex.request_body_bytes
    return out


def _kernel(bpf_filter: HttpFilter) -> Totals:
    out: Totals = collections.Counter()
    for agg in bpf_filter.read_aggregates():
        if agg.server_ip == SERVER:
            route = heuristic_route(agg.path)
            out[(agg.method, agg.status, route, "count")] += agg.count
            out[(agg.method, agg.status, route, "bytes")] += agg.response_sum
            out[(agg.method, agg.status, route, "request bytes")] += agg.request_sum
    return out


def run_both(bpf_filter: HttpFilter, steps: list[Step], client_seq: int, server_seq: int) -> tuple[Totals, Totals]:
    client_port = next(_client_ports)
    reference, fast = Tracker([PORT]), Tracker([PORT])
    ref_out: list[Exchange] = []
    fast_out: list[Exchange] = []
    kernel_before = _kernel(bpf_filter)
    for step in steps:
        if step.to_server:
            seq = client_seq - step.back
            data = frame(CLIENT, client_port, SERVER, PORT, seq, step.data, ACK_FIN if step.fin else ACK_PSH)
            client_seq = max(client_seq, seq + len(step.data) + step.fin)
        else:
            data = frame(SERVER, PORT, CLIENT, client_port, server_seq, step.data, ACK_FIN if step.fin else ACK_PSH)
            server_seq += len(step.data) + step.fin
        ts = time.time_ns()
        kept = bpf_test_run(bpf_filter.fd, data)
        for record in bpf_filter.drain_handovers():  # before the segment, as the capture does
            fast_out += fast.seed(record.flow, to_handover(record, 0, ts))
        if kept:
            segment = decode_frame(data[ETH:ETH + kept], ts, len(data) - ETH, LINKTYPE_RAW)
            assert segment is not None
            fast_out += fast.feed(segment)
        whole = decode_frame(data[ETH:], ts, len(data) - ETH, LINKTYPE_RAW)
        assert whole is not None
        ref_out += reference.feed(whole)
    ref_out += reference.flush()
    fast_out += fast.flush()
    kernel = _kernel(bpf_filter)
    kernel.subtract(kernel_before)
    fast_totals = _totals(fast_out)
    fast_totals.update(kernel)
    return +_totals(ref_out), +fast_totals


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(steps=connections(), client_seq=st.integers(0, 2**32 - 1), server_seq=st.integers(0, 2**32 - 1))
def test_kernel_and_user_space_count_every_exchange_alike(bpf_filter: HttpFilter, steps: list[Step],
                                                          client_seq: int, server_seq: int) -> None:
    reference, fast = run_both(bpf_filter, steps, client_seq, server_seq)
    assert fast == reference


def test_the_generator_reaches_the_kernel_path(bpf_filter: HttpFilter) -> None:
    """Not vacuous: a browser-sized head and a request with a body are both taken in the kernel."""
    before = bpf_filter.fast_counters()["exchanges"]
    head = b"GET /items/1 HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * 1200 + b"\r\n\r\n"
    steps = [Step(True, head), Step(False, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
             Step(True, b"PUT /items/1 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"),
             Step(False, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"),
             Step(False, b"", fin=True), Step(True, b"", fin=True)]
    reference, fast = run_both(bpf_filter, steps, 2**32 - 100, 5)
    assert fast == reference == {("GET", 200, "/items/{id}", "count"): 1, ("GET", 200, "/items/{id}", "bytes"): 2,
                                 ("PUT", 201, "/items/{id}", "count"): 1,
                                 ("PUT", 201, "/items/{id}", "request bytes"): 3}
    assert bpf_filter.fast_counters()["exchanges"] == before + 2


def test_heads_split_at_any_byte_stay_in_the_kernel(bpf_filter: HttpFilter) -> None:
    """Not vacuous either: a 2 KB head cut in two and a 4 KB head cut in three (as behind a
    1500-byte MTU) at every kind of place are taken in the kernel, and their exchanges timed
    from the first segment."""
    head = (b"GET /api/orders/3f2a1b4c-9d8e-7f6a-5b4c-3d2e1f0a9b8c?x=1 HTTP/1.1\r\nHost: x\r\n"
            b"content-length: 0\r\nCookie: " + b"c" * 1900 + b"\r\n\r\n")
    big = head.replace(b"c" * 1900, b"c" * 3900)
    assert len(big) <= 4096
    cuts = [(5,), (20,), (40,), (70,), (80,), (95,), (len(head) - 1,), (len(head) - 3,), (1448,)]
    cases = [[head[:c], head[c:]] for (c,) in cuts] + [[big[:1448], big[1448:2896], big[2896:]],
                                                       [big[:2000], big[2000:2001], big[2001:]]]
    before = bpf_filter.fast_counters()
    expected = 0
    for pieces in cases:
        steps = [*(Step(True, piece) for piece in pieces),
                 Step(False, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
                 Step(False, b"", fin=True), Step(True, b"", fin=True)]
        reference, fast = run_both(bpf_filter, steps, 2**32 - 1000, 77)
        assert fast == reference == {("GET", 200, "/api/orders/{id}", "count"): 1,
                                     ("GET", 200, "/api/orders/{id}", "bytes"): 2}
        expected += len(pieces[0]) >= 16  # a first segment under 16 bytes is not a head's start to it
    after = bpf_filter.fast_counters()
    assert after["split_heads"] - before["split_heads"] == expected == len(cases) - 1
    assert after["exchanges"] - before["exchanges"] == expected


def test_word_steps_of_the_scan_agree_with_the_parser_at_every_cut(bpf_filter: HttpFilter) -> None:
    """The scan passes target, name and value bytes a word or more a step and folds a value's
    CRLF with the next line's first byte. Heads whose framing headers (Content-Length with the
    body sent apart, Transfer-Encoding) sit at every offset from a word's edge, cut at every
    byte of their first 40 and last 40 (a name's first byte ending the first segment among
    them), must count as the parser counts them, and every one without Transfer-Encoding whose
    first segment is long enough to start a head (16 bytes) must stay in the kernel."""
    bodies = 0
    taken = 0
    before = bpf_filter.fast_counters()["exchanges"]
    for pad in range(9):
        for framing in (b"Content-Length: 2", b"content-length:2", b"Transfer-Encoding: chunked", b"cookie: a"):
            target = b"/" + b"a" * pad + b"?q" + b"#" * (pad % 2)
            head = (b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nX-" + b"y" * pad + b": " + b"z" * (pad * 5)
                    + b"\r\n" + framing + b"\r\nt: 1\r\n\r\n")
            chunked = framing.startswith(b"Transfer")
            body = b"2\r\nab\r\n0\r\n\r\n" if chunked else b"ab" if b"ength" in framing else b""
            bodies += body == b"ab"
            for cut in sorted({*range(1, min(40, len(head))), *range(max(1, len(head) - 40), len(head))}):
                steps = [Step(True, head[:cut]), Step(True, head[cut:])]
                steps += [Step(True, body)] if body else []
                steps += [Step(False, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
                          Step(False, b"", fin=True), Step(True, b"", fin=True)]
                reference, fast = run_both(bpf_filter, steps, 1000, 2000)
                assert fast == reference, (head, cut)
                assert reference[("POST", 200, "/" + "a" * pad, "count")] == 1, (head, cut)
                taken += not chunked and cut >= 16
    assert bodies == 18
    assert bpf_filter.fast_counters()["exchanges"] - before == taken


GET_X = b"GET /items/1 HTTP/1.1\r\nHost: x\r\n\r\n"
OK_2 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _response(*lines: bytes, status_line: bytes = b"HTTP/1.1 200 OK", body: bytes = b"ok") -> bytes:
    return status_line + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body


def _request(*lines: bytes, target: bytes = b"/items/1", body: bytes = b"") -> bytes:
    return b"POST " + target + b" HTTP/1.1\r\nHost: x\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body


# (request, response, taken in the kernel): the shapes the scan's word stages take whole (a name's
# first 8 bytes against "content-" and "transfer", "length:", a Content-Length value in one word,
# names and values by the word, a reason phrase as a value, the target up to its first other
# byte) and their near misses, which must end as the parser ends them. None: the parser decides.
EDGE_HEADS = [
    (GET_X, OK_2, True),
    (GET_X, _response(b"content-length: 2"), True),
    (GET_X, _response(b"CONTENT-LENGTH: 2"), True),
    (GET_X, _response(b"Content-Length:  2"), True),
    (GET_X, _response(b"Content-Length:\t2"), True),
    (GET_X, _response(b"Content-Length: 2 "), True),
    (GET_X, _response(b"Content-Length:2"), True),
    (GET_X, _response(b"Content-Length: 000002"), True),
    (GET_X, _response(b"Content-Length: 0000002"), True),
    (GET_X, _response(b"Content-Length: 000000002"), True),
    (GET_X, _response(b"Content-Length: 0000000002"), None),
    (GET_X, _response(b"Content-Length: 2x"), None),
    (GET_X, _response(b"Content-Length: +2"), None),
    (GET_X, _response(b"Content-Length: 2, 2"), None),
    (GET_X, _response(b"Content-Length: "), None),
    (GET_X, _response(b"Content-Length: 2", b"Content-Length: 2"), None),
    (GET_X, _response(b"Content-Type: text/plain", b"Content-Length: 2"), True),
    (GET_X, _response(b"Content-Lengthy: 5", b"Content-Length: 2"), True),
    (GET_X, _response(b"Content-Lengt: 5", b"Content-Length: 2"), True),
    (GET_X, _response(b"Content-: 5", b"Content-Length: 2"), True),
    (GET_X, _response(b"Content_Length: 5", b"Content-Length: 2"), True),
    (GET_X, _response(b"content-length : 2"), None),
    (GET_X, _response(b"Transfer-Encodings: x", b"Content-Length: 2"), True),
    (GET_X, _response(b"TE: trailers", b"c: 1", b"t: 1", b"Connection: keep-alive", b"Content-Length: 2"), True),
    (GET_X, _response(b"Transfer-Encoding: chunked", body=b"2\r\nok\r\n0\r\n\r\n"), False),
    (GET_X, _response(b"Content-Length: 2", status_line=b"HTTP/1.1 200 "), None),
    (GET_X, _response(b"Content-Length: 2", status_line=b"HTTP/1.1 200"), None),
    (GET_X, _response(b"Content-Length: 2", status_line=b"HTTP/1.1 200 A\tB \xe9"), None),
    (GET_X, _response(b"Content-Length: 2", status_line=b"HTTP/1.1 200 O\nK"), None),
    (GET_X, _response(b"X-Pad: " + b"v" * 120, b"X-Pad: " + b"v" * 121, b"X-Pad: " + b"v" * 122, b"Content-Length: 2"),
     True),
    (GET_X, _response(b"X-Pad: " + b"v" * 60 + b"\nv", b"Content-Length: 2"), None),
    (GET_X, _response(b"X-Pad: " + b"v" * 60 + b"\rv", b"Content-Length: 2"), None),
    (_request(b"Content-Length: 3", body=b"abc"), OK_2, True),
    (_request(b"Upgrade-Insecure-Requests: 1", b"Sec-CH-UA-Platform-Version-And-Then-Some: x"), OK_2, True),
    (_request(b"X-\xc9: v"), OK_2, None),
    (_request(b"X-Pad: a\tb" + b"c" * 200), OK_2, True),
    (_request(target=b"/items/1?a=b&c=%20"), OK_2, True),
    (_request(target=b"/items/1#frag"), OK_2, True),
    (_request(target=b"/items/?x"), OK_2, True),
    (_request(target=b"/it\xe9ms/1"), OK_2, None),
    (_request(target=b"/" + b"a" * 127), OK_2, True),
    (_request(target=b"/" + b"a" * 127 + b"?q=1"), OK_2, True),
    (_request(target=b"/" + b"a" * 128), OK_2, False),
    (_request(target=b"/x/" + b"1" * 125), OK_2, True),
]


@pytest.mark.parametrize(("request_head", "response", "kernel"), EDGE_HEADS)
def test_the_scan_s_word_stages_end_edge_heads_as_the_parser_does(bpf_filter: HttpFilter, request_head: bytes,
                                                                  response: bytes, kernel: bool | None) -> None:
    before = bpf_filter.fast_counters()["exchanges"]
    steps = [Step(True, request_head), Step(False, response), Step(False, b"", fin=True), Step(True, b"", fin=True)]
    reference, fast = run_both(bpf_filter, steps, 7, 2**32 - 3)
    assert fast == reference
    if kernel is not None:
        assert bpf_filter.fast_counters()["exchanges"] - before == kernel


HANDOVER_ENTRIES = 16384  # the C file's default


def test_a_full_handover_map_loses_the_connection_counted_never_mis_paired(bpf_filter: HttpFilter) -> None:
    """When no record fits, user space must not get the connection's segments without one
    (it would pair the kernel's open request's response with the next request)."""
    def open_then_pipeline(client_port: int) -> int:
        """A request the kernel takes, then a second one while it is open: a handover."""
        first = frame(CLIENT, client_port, SERVER, PORT, 100, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", ACK_PSH)
        assert bpf_test_run(bpf_filter.fd, first) == 0
        return bpf_test_run(bpf_filter.fd, frame(CLIENT, client_port, SERVER, PORT, 100 + 29,
                                                 b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n", ACK_PSH))

    bpf_filter.drain_handovers()
    before = bpf_filter.fast_counters()
    for i in range(HANDOVER_ENTRIES):  # nobody drains: the map fills
        assert open_then_pipeline(1000 + i) > 0
    assert open_then_pipeline(1000 + HANDOVER_ENTRIES) == 0  # no record: the segment dies here
    response = frame(SERVER, PORT, CLIENT, 1000 + HANDOVER_ENTRIES, 5000,
                     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", ACK_PSH)
    assert bpf_test_run(bpf_filter.fd, response) == 0  # and so does the rest of the connection
    for src, sport, dst, dport, seq in ((SERVER, PORT, CLIENT, 1000 + HANDOVER_ENTRIES, 5040),
                                        (CLIENT, 1000 + HANDOVER_ENTRIES, SERVER, PORT, 158)):
        assert bpf_test_run(bpf_filter.fd, frame(src, sport, dst, dport, seq, b"", ACK_FIN)) == 0
    after = bpf_filter.fast_counters()
    assert after["handover_map_full"] - before["handover_map_full"] == 1
    assert after["flows_deleted"] - before["flows_deleted"] == 1  # the lost connection's state is gone
    assert len(bpf_filter.drain_handovers()) == HANDOVER_ENTRIES


def _kernel_key(path: str) -> str | None:
    """What the filter keys a path as with route_ids on: every segment of an identifier's shape,
    at any depth, written `{id}` (routes.py's rule); as sent if that passes 96 bytes and the path
    does not; None (handed over, path_too_long) when neither fits or the path passes 128."""
    if len(path) > RAW_PATH_LEN:
        return None
    shaped = "/".join("{id}" if _is_identifier(segment) else segment for segment in path.split("/"))
    if len(shaped) <= PATH_LEN:
        return shaped
    return path if len(path) <= PATH_LEN else None


def _get_200_keys(bpf_filter: HttpFilter) -> collections.Counter[str]:
    out: collections.Counter[str] = collections.Counter()
    for agg in bpf_filter.read_aggregates():
        if agg.server_ip == SERVER and agg.method == "GET" and agg.status == 200:
            out[agg.path] += agg.count
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(paths=st.lists(_paths().filter(lambda p: len(p) <= RAW_PATH_LEN + 8),
                      min_size=1, max_size=12))
def test_the_kernel_keys_ids_exactly_as_the_route_heuristic_names_them(bpf_filter: HttpFilter,
                                                                        paths: list[str]) -> None:
    """The key itself, byte for byte: a UUID, a hash or a token more or less would be a key per id.
    A path too long for the kernel is passed up."""
    before = _get_200_keys(bpf_filter)
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    for path in paths:
        client_port = next(_client_ports)
        request = frame(CLIENT, client_port, SERVER, PORT, 1, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode(),
                        ACK_PSH)
        taken = _kernel_key(path) is not None
        assert (bpf_test_run(bpf_filter.fd, request) == 0) == taken
        assert (bpf_test_run(bpf_filter.fd, frame(SERVER, PORT, CLIENT, client_port, 1, ok, ACK_PSH)) == 0) == taken
        for src, sport, dst, dport, seq in ((SERVER, PORT, CLIENT, client_port, 1 + len(ok)),
                                            (CLIENT, client_port, SERVER, PORT, 1 + len(request) - ETH - 40)):
            bpf_test_run(bpf_filter.fd, frame(src, sport, dst, dport, seq, b"", ACK_FIN))
    after = _get_200_keys(bpf_filter)
    after.subtract(before)
    assert +after == collections.Counter(key for key in map(_kernel_key, paths) if key is not None)


def test_past_the_aggregate_map_s_capacity_exchanges_go_to_user_space_then_a_drain_makes_room() -> None:
    """http_agg is bounded: a key it has no room for hands its connection over (agg_full) with the
    exchange open, and user space counts it; keys it holds go on in the kernel. A drain takes
    every entry out whole, and new keys are taken in the kernel again."""
    full = HttpFilter([PORT], loopback=False, link_header_len=0, fast_path=True,
                      histogram_bounds=((0.001, 0.1), (100.0, 10000.0)))
    full.set_route_ids(True)
    ok = [Step(False, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), Step(False, b"", fin=True),
          Step(True, b"", fin=True)]
    try:
        for i in range(AGG_ENTRIES):  # words, not ids: a key each
            client_port = 10000 + i
            request = b"GET /w/k%dx HTTP/1.1\r\nHost: x\r\n\r\n" % i
            assert bpf_test_run(full.fd, frame(CLIENT, client_port, SERVER, PORT, 1, request, ACK_PSH)) == 0
            assert bpf_test_run(full.fd, frame(SERVER, PORT, CLIENT, client_port, 1, ok[0].data, ACK_PSH)) == 0
        assert len(full.read_aggregates()) == AGG_ENTRIES and full.handover_counters()["agg_full"] == 0
        new_key = [Step(True, b"GET /w/one-too-many HTTP/1.1\r\nHost: x\r\n\r\n"), *ok]
        reference, fast = run_both(full, new_key, 10, 20)
        assert fast == reference == {("GET", 200, "/w/one-too-many", "count"): 1,
                                     ("GET", 200, "/w/one-too-many", "bytes"): 2}
        assert full.handover_counters()["agg_full"] == 1
        known_key = [Step(True, b"GET /w/k7x HTTP/1.1\r\nHost: x\r\n\r\n"), *ok]
        before = full.fast_counters()["exchanges"]
        reference, fast = run_both(full, known_key, 10, 20)
        assert fast == reference == {("GET", 200, "/w/k7x", "count"): 1, ("GET", 200, "/w/k7x", "bytes"): 2}
        assert full.fast_counters()["exchanges"] == before + 1 and full.handover_counters()["agg_full"] == 1
        drained = full.drain_aggregates()
        assert len(drained) == AGG_ENTRIES and full.read_aggregates() == []
        assert {agg.path: agg.count for agg in drained} == {f"/w/k{i}x": 1 + (i == 7) for i in range(AGG_ENTRIES)}
        reference, fast = run_both(full, new_key, 10, 20)
        assert fast == reference and full.handover_counters()["agg_full"] == 1
        assert [(agg.path, agg.count) for agg in full.read_aggregates()] == [("/w/one-too-many", 1)]
    finally:
        full.close()


def _path_hash(path: bytes) -> int:
    """bpf/http_filter.c's path_hash, to check the premise of the test below."""
    h, mask = 0, (1 << 64) - 1
    for (word,) in struct.iter_unpack("<Q", path.ljust(PATH_LEN, b"\0")):
        h = ((((h << 5) | (h >> 59)) & mask ^ word) * 0x517CC1B727220A95) & mask
    return h


def test_two_paths_of_one_hash_are_counted_apart() -> None:
    """http_agg is keyed by the path's hash, its value holds the path: on one CPU the second path
    of a hash goes to user space (agg_full), on another CPU it is counted in that CPU's copy, and
    the aggregates read back give each path its own count."""
    first, second = b"/w/collideXa0000", b"/w/cxjqlfeXaPhi3"  # found by search: FxHash is not keyed
    assert first != second and _path_hash(first) == _path_hash(second)
    one = HttpFilter([PORT], loopback=False, link_header_len=0, fast_path=True,
                     histogram_bounds=((0.001, 0.1), (100.0, 10000.0)))
    one.set_route_ids(True)
    cpus = os.sched_getaffinity(0)
    ok = [Step(False, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), Step(False, b"", fin=True),
          Step(True, b"", fin=True)]
    try:
        assert len(cpus) >= 2, "needs two CPUs"
        cpu_a, cpu_b = sorted(cpus)[:2]
        os.sched_setaffinity(0, {cpu_a})
        for path, in_kernel in ((first, 1), (second, 0)):
            steps = [Step(True, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"), *ok]
            before = one.fast_counters()["exchanges"]
            reference, fast = run_both(one, steps, 10, 20)
            assert fast == reference and reference[("GET", 200, path.decode(), "count")] == 1
            assert one.fast_counters()["exchanges"] == before + in_kernel
        assert one.handover_counters()["agg_full"] == 1
        os.sched_setaffinity(0, {cpu_b})
        steps = [Step(True, b"GET " + second + b" HTTP/1.1\r\nHost: x\r\n\r\n"), *ok]
        reference, fast = run_both(one, steps, 10, 20)
        assert fast == reference and one.handover_counters()["agg_full"] == 1
        assert sorted((agg.path, agg.count, agg.response_sum) for agg in one.read_aggregates()) == [
            (first.decode(), 1, 2), (second.decode(), 1, 2)]
        assert one.aggregate_entries == 1
    finally:
        os.sched_setaffinity(0, cpus)
        one.close()
