"""HTTP/1 parsers: bytes in, messages out, whatever the segment boundaries."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest

from exporter.core.http1 import (
    HEAD_MEMO_BYTES,
    HEAD_MEMO_ENTRIES,
    HEAD_MEMO_REST,
    KNOWN_METHODS,
    LINE_MEMO_BYTES,
    PARSE_ERROR_REASONS,
    HeadMemo,
    PendingRequest,
    RequestParser,
    ResponseParser,
    method_label,
    normalise_target,
)

# -- harness --------------------------------------------------------------------------------


class RequestRecorder:
    def __init__(self) -> None:
        self.requests: list[PendingRequest] = []

    def on_request(self, request: PendingRequest) -> None:
        self.requests.append(request)


@dataclass
class ResponseRecorder:
    methods: list[str] = field(default_factory=list)  # what each final head answers
    events: list[tuple[str, int, int, int]] = field(default_factory=list)

    def on_response_head(self, status: int, ts_ns: int) -> str | None:
        return self.methods.pop(0) if self.methods else None

    def on_response_complete(self, status: int, end_ns: int, body_bytes: int) -> None:
        self.events.append(("done", status, end_ns, body_bytes))

    def on_response_lost(self) -> None:
        self.events.append(("lost", 0, 0, 0))

    def on_upgrade(self, protocol: str) -> None:
        self.events.append(("upgrade", 0, 0, 0))


def splits(stream: bytes, small: int = 200) -> Iterator[list[bytes]]:
    """The stream whole, cut at every byte boundary into two, and (if small) into single bytes."""
    yield [stream]
    for cut in range(1, len(stream)):
        yield [stream[:cut], stream[cut:]]
    if len(stream) <= small:
        yield [stream[i : i + 1] for i in range(len(stream))]


def errors_only(errors: dict[str, int]) -> dict[str, int]:
    return {reason: count for reason, count in errors.items() if count}


def run_requests(pieces: Sequence[bytes]) -> tuple[list[tuple[str, str, int, int]], dict[str, int]]:
    sink = RequestRecorder()
    errors: dict[str, int] = {}
    parser = RequestParser(sink, errors)
    for ts, piece in enumerate(pieces):
        parser.feed(piece, ts)
    return [(r.method, r.target, r.body_bytes, r.start_ns) for r in sink.requests], errors_only(errors)


def run_responses(
    pieces: Sequence[bytes], methods: Sequence[str], finish: bool = False
) -> tuple[list[tuple[str, int, int]], dict[str, int]]:
    sink = ResponseRecorder(list(methods))
    errors: dict[str, int] = {}
    parser = ResponseParser(sink, errors)
    for ts, piece in enumerate(pieces):
        parser.feed(piece, ts)
    if finish:
        parser.finish()
    # Timestamps depend on where the stream was cut; the table checks them whole.
    return [(kind, status, body) for kind, status, _, body in sink.events], errors_only(errors)


# -- requests -------------------------------------------------------------------------------

REQUEST_CASES: list[tuple[str, bytes, list[tuple[str, str, int]], dict[str, int]]] = [
    ("simple get", b"GET /a/b?x=1 HTTP/1.1\r\nHost: h\r\n\r\n", [("GET", "/a/b?x=1", 0)], {}),
    (
        "absolute form",
        b"GET http://host:8080/a/b?x=1 HTTP/1.1\r\nHost: h\r\n\r\n",
        [("GET", "http://host:8080/a/b?x=1", 0)],
        {},
    ),
    ("asterisk form", b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", [("OPTIONS", "*", 0)], {}),
    ("unknown method kept", b"PURGE /cache HTTP/1.1\r\n\r\n", [("PURGE", "/cache", 0)], {}),
    ("http/1.0 no headers", b"GET / HTTP/1.0\r\n\r\n", [("GET", "/", 0)], {}),
    ("bare lf", b"GET /lf HTTP/1.1\nHost: h\n\n", [("GET", "/lf", 0)], {}),
    ("mixed line ends", b"GET /m HTTP/1.1\r\nHost: h\n\r\n", [("GET", "/m", 0)], {}),
    ("content-length body", b"POST /p HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", [("POST", "/p", 5)], {}),
    ("header names any case", b"PUT /p HTTP/1.1\r\ncOnTeNt-LeNgTh: 3\r\n\r\nabc", [("PUT", "/p", 3)], {}),
    (
        "identical duplicate content-length",
        b"POST /p HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab",
        [("POST", "/p", 2)],
        {},
    ),
    ("content-length list", b"POST /p HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\nab", [("POST", "/p", 2)], {}),
    (
        "chunked with extension and trailer",
        b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n",
        [("POST", "/c", 15)],
        {},
    ),
    (
        "chunked bare lf",
        b"POST /c HTTP/1.1\nTransfer-Encoding: chunked\n\n3\nabc\n0\n\n",
        [("POST", "/c", 3)],
        {},
    ),
    (
        "chunked wins over content-length",
        b"POST /c HTTP/1.1\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
        [("POST", "/c", 1)],
        {},
    ),
    (
        "pipelined",
        b"GET /1 HTTP/1.1\r\n\r\nPOST /2 HTTP/1.1\r\nContent-Length: 1\r\n\r\nxGET /3 HTTP/1.1\r\n\r\n",
        [("GET", "/1", 0), ("POST", "/2", 1), ("GET", "/3", 0)],
        {},
    ),
    (
        "stray crlf between requests",
        b"POST /a HTTP/1.1\r\nContent-Length: 1\r\n\r\nx\r\nGET /b HTTP/1.1\r\n\r\n",
        [("POST", "/a", 1), ("GET", "/b", 0)],
        {},
    ),
    (
        "binary body",
        b"POST /bin HTTP/1.1\r\nContent-Length: 6\r\n\r\n\x00\xff\r\n\r\nGET /n HTTP/1.1\r\n\r\n",
        [("POST", "/bin", 6), ("GET", "/n", 0)],
        {},
    ),
    (
        "conflicting content-length",
        b"POST /p HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        [],
        {"bad_content_length": 1},
    ),
    (
        "non-numeric content-length",
        b"POST /p HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc",
        [],
        {"bad_content_length": 1},
    ),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", [], {"bad_header": 1}),
    ("obs-fold", b"GET / HTTP/1.1\r\nX-A: 1\r\n  2\r\n\r\n", [], {"bad_header": 1}),
    (
        "request transfer-encoding not chunked",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        [],
        {"bad_header": 1},
    ),
    ("extra field in request line", b"GET /a b HTTP/1.1\r\n\r\n", [], {"bad_request_line": 1}),
    ("http/0.9 style", b"GET /\r\n\r\n", [], {"not_http": 1}),
    ("http/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", [], {"not_http": 1}),
    ("tls", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", [], {"not_http": 1}),
    (
        "bad chunk size",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        [("POST", "/", 0)],
        {"bad_chunk": 1},
    ),
    (
        "no crlf after chunk data",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxy\r\n",
        [("POST", "/", 1)],
        {"bad_chunk": 1},
    ),
    (
        "resync after garbage line",
        b"FOO\r\n\r\nGET /ok HTTP/1.1\r\n\r\n",
        [("GET", "/ok", 0)],
        {"not_http": 1},
    ),
    (
        "resync after bad header",
        b"GET /x HTTP/1.1\r\nbad header\r\n\r\nGET /ok HTTP/1.1\r\n\r\n",
        [("GET", "/ok", 0)],
        {"bad_header": 1},
    ),
    (
        "connect then tunnel bytes",
        b"CONNECT host:443 HTTP/1.1\r\nHost: host:443\r\n\r\n\x16\x03\x01\x00\x05hello",
        [("CONNECT", "host:443", 0)],
        {},
    ),
]


@pytest.mark.parametrize(
    ("stream", "expected", "errors"),
    [case[1:] for case in REQUEST_CASES],
    ids=[case[0] for case in REQUEST_CASES],
)
def test_requests_whatever_the_cuts(
    stream: bytes, expected: list[tuple[str, str, int]], errors: dict[str, int]
) -> None:
    for pieces in splits(stream):
        requests, counted = run_requests(pieces)
        assert [r[:3] for r in requests] == expected, pieces
        assert counted == errors, pieces


def test_request_starts_at_the_segment_of_its_first_byte() -> None:
    requests, _ = run_requests(
        [b"GET /1 HTTP/1.1\r\n\r\nGET /2 HT", b"TP/1.1\r\n\r\n", b"GET /3 HTTP/1.1\r\n\r\n"]
    )
    assert [(r[1], r[3]) for r in requests] == [("/1", 0), ("/2", 0), ("/3", 2)]


def test_head_too_large_is_counted_once_and_the_next_request_found() -> None:
    sink = RequestRecorder()
    errors: dict[str, int] = {}
    parser = RequestParser(sink, errors, max_header_bytes=1024)
    flood = b"GET / HTTP/1.1\r\n" + b"X-Flood: aaaaaaaaaaaaaaaaaaaaaaaa\r\n" * 200
    for start in range(0, len(flood), 100):
        parser.feed(flood[start : start + 100], 1)
    parser.feed(b"\r\n", 2)
    parser.feed(b"GET /next HTTP/1.1\r\n\r\n", 3)
    assert errors_only(errors) == {"header_too_large": 1}
    assert [r.target for r in sink.requests] == ["/next"]


def test_long_path_is_fine_under_the_limit() -> None:
    path = b"/" + b"a" * 10_000
    requests, errors = run_requests([b"GET " + path + b" HTTP/1.1\r\n\r\n"])
    assert requests[0][1] == path.decode() and errors == {}


def test_truncated_body_counts_by_length() -> None:
    sink = RequestRecorder()
    errors: dict[str, int] = {}
    parser = RequestParser(sink, errors)
    parser.feed(b"POST /u HTTP/1.1\r\nContent-Length: 1000\r\n\r\nabc", 1, missing=997)
    parser.feed(b"GET /next HTTP/1.1\r\n\r\n", 2)
    assert [(r.target, r.body_bytes) for r in sink.requests] == [("/u", 1000), ("/next", 0)]
    assert errors_only(errors) == {}


@pytest.mark.parametrize(
    ("first", "missing"),
    [
        (b"GET /a HTTP/1.1\r\nHo", 5),  # inside a head
        (b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 3),  # a chunk-size line
        (b"GET /a HTTP/1.1\r\n\r\n", 4),  # where the next request would start
    ],
)
def test_truncated_where_bytes_are_needed(first: bytes, missing: int) -> None:
    sink = RequestRecorder()
    errors: dict[str, int] = {}
    parser = RequestParser(sink, errors)
    parser.feed(first, 1, missing=missing)
    parser.feed(b"xx\r\n\r\nGET /after HTTP/1.1\r\n\r\n", 2)
    assert errors_only(errors) == {"truncated": 1}
    assert sink.requests[-1].target == "/after"


def test_truncated_chunk_data_is_fine() -> None:
    sink = RequestRecorder()
    errors: dict[str, int] = {}
    parser = RequestParser(sink, errors)
    parser.feed(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n100\r\nab", 1, missing=254)
    parser.feed(b"\r\n0\r\n\r\n", 2)
    assert [(r.target, r.body_bytes) for r in sink.requests] == [("/c", 256)]
    assert errors_only(errors) == {}


# -- responses ------------------------------------------------------------------------------

RESPONSE_CASES: list[tuple[str, bytes, list[str], bool, list[tuple[str, int, int]], dict[str, int]]] = [
    (
        "content-length",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        ["GET"],
        False,
        [("done", 200, 5)],
        {},
    ),
    (
        "no reason phrase",
        b"HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n",
        ["GET"],
        False,
        [("done", 404, 0)],
        {},
    ),
    (
        "head has no body",
        b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
        ["HEAD", "GET"],
        False,
        [("done", 200, 0), ("done", 200, 1)],
        {},
    ),
    (
        "204 and 304 have no body",
        b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n"
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
        ["GET", "GET"],
        False,
        [("done", 204, 0), ("done", 304, 0)],
        {},
    ),
    (
        "100 continue is interim",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
        ["POST"],
        False,
        [("done", 201, 2)],
        {},
    ),
    (
        "103 early hints is interim",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ["GET"],
        False,
        [("done", 200, 0)],
        {},
    ),
    (
        "101 ends http",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
        ["GET"],
        False,
        [("done", 101, 0), ("upgrade", 0, 0)],
        {},
    ),
    (
        "connect 200 ends http",
        b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x01garbage",
        ["CONNECT"],
        False,
        [("done", 200, 0), ("upgrade", 0, 0)],
        {},
    ),
    (
        "connect refused stays http",
        b"HTTP/1.1 407 Proxy Auth\r\nContent-Length: 0\r\n\r\n",
        ["CONNECT"],
        False,
        [("done", 407, 0)],
        {},
    ),
    (
        "chunked with trailers",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nwiki\r\n5;x=y\r\npedia\r\n0\r\nT: v\r\nU: w\r\n\r\n",
        ["GET"],
        False,
        [("done", 200, 9)],
        {},
    ),
    (
        "close-delimited ends at finish",
        b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nall of this",
        ["GET"],
        True,
        [("done", 200, 11)],
        {},
    ),
    (
        "unknown transfer coding is close-delimited",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        ["GET"],
        True,
        [("done", 200, 3)],
        {},
    ),
    (
        "unmatched response still framed",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxHTTP/1.1 500 E\r\n\r\n",
        [],
        True,
        [("done", 200, 1), ("done", 500, 0)],
        {},
    ),
    ("bad status line", b"HTTP/1.1 2x0 OK\r\n\r\n", ["GET"], False, [("lost", 0, 0)], {"bad_status_line": 1}),
    ("not http", b"SSH-2.0-OpenSSH_9.0\r\n", ["GET"], False, [("lost", 0, 0)], {"not_http": 1}),
    (
        "conflicting content-length",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        ["GET"],
        False,
        [("lost", 0, 0)],
        {"bad_content_length": 1},
    ),
    (
        "resync to next status line",
        b"garbage\r\nmore\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ["GET"],
        False,
        [("lost", 0, 0), ("done", 200, 2)],
        {"not_http": 1},
    ),
    (
        "aborted body reported lost",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        ["GET"],
        True,
        [("lost", 0, 0)],
        {},
    ),
]


@pytest.mark.parametrize(
    ("stream", "methods", "finish", "expected", "errors"),
    [case[1:] for case in RESPONSE_CASES],
    ids=[case[0] for case in RESPONSE_CASES],
)
def test_responses_whatever_the_cuts(
    stream: bytes,
    methods: list[str],
    finish: bool,
    expected: list[tuple[str, int, int]],
    errors: dict[str, int],
) -> None:
    for pieces in splits(stream):
        events, counted = run_responses(pieces, methods, finish)
        assert events == expected, pieces
        assert counted == errors, pieces


def test_response_end_is_the_segment_of_its_last_byte() -> None:
    sink = ResponseRecorder(["GET", "GET"])
    parser = ResponseParser(sink, {})
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab", 10)
    parser.feed(b"cdHTTP/1.1 200 OK\r\n", 20)
    parser.feed(b"\r\n", 30)  # close-delimited from here
    parser.feed(b"tail", 40)
    parser.feed(b"", 50)
    parser.finish()
    assert sink.events == [("done", 200, 20, 4), ("done", 200, 40, 4)]


def test_close_delimited_body_may_be_truncated() -> None:
    sink = ResponseRecorder(["GET"])
    parser = ResponseParser(sink, {})
    parser.feed(b"HTTP/1.1 200 OK\r\n\r\nab", 1, missing=1000)
    parser.finish()
    assert sink.events == [("done", 200, 1, 1002)]


# -- labels and targets ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ("/a/b?x=1", "/a/b"),
        ("/a/b#frag", "/a/b"),
        ("/a?x=1#f", "/a"),
        ("http://host:8080/a/b?x=1", "/a/b"),
        ("HTTPS://host/a", "/a"),
        ("http://host", "/"),
        ("http://host?x=/y", "/"),
        ("*", "*"),
        ("host:443", "host:443"),
        ("", "/"),
        ("?x=1", "/"),
        ("/", "/"),
    ],
)
def test_normalise_target(raw: str, path: str) -> None:
    assert normalise_target(raw) == path


@pytest.mark.parametrize(
    ("token", "label"), [("GET", "GET"), ("PATCH", "PATCH"), ("get", "_OTHER"), ("PURGE", "_OTHER")]
)
def test_method_label(token: str, label: str) -> None:
    assert method_label(token) == label


def test_reasons_and_methods_are_the_documented_ones() -> None:
    assert len(KNOWN_METHODS) == 9
    assert set(PARSE_ERROR_REASONS) == {
        "bad_request_line",
        "bad_status_line",
        "bad_header",
        "header_too_large",
        "bad_chunk",
        "bad_content_length",
        "truncated",
        "gap",
        "buffer_overflow",
        "not_http",
    }


# -- the head memo ------------------------------------------------------------------------------

NGINX_HEAD = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 02:02:37 GMT\r\n"
              b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n")


def test_a_repeated_head_is_taken_from_the_memo() -> None:
    memo = HeadMemo()
    sink = ResponseRecorder(["GET"] * 3)
    parser = ResponseParser(sink, {}, known=memo.responses)
    parser.feed(NGINX_HEAD + b"ok", 1)
    assert memo.responses == {NGINX_HEAD: (200, 1, 2, "")}  # status, framing (_BODY), length, upgrade
    # What the table says is what the parser does: a planted entry shows the bytes were not read again.
    memo.responses[NGINX_HEAD] = (200, 1, 5, "")
    parser.feed(NGINX_HEAD + b"ok", 2)
    parser.feed(b"abc", 3)
    assert sink.events == [("done", 200, 1, 2), ("done", 200, 3, 5)]


@pytest.mark.parametrize(("stream", "why"), [
    (b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", "bare LF lines"),
    # CRLF CRLF only in the blank line and the body that follows: the search finds that, not the head's end.
    (b"HTTP/1.1 200 OK\r\nContent-Length: 4\n\r\n\r\n\r\n", "a last line ended by a bare LF"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "a failure"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"y" * HEAD_MEMO_BYTES + b"\r\nContent-Length: 0\r\n\r\n", "too long"),
])
def test_heads_the_memo_never_keeps(stream: bytes, why: str) -> None:
    memo = HeadMemo()
    parser = ResponseParser(ResponseRecorder(["GET"]), {}, known=memo.responses)
    parser.feed(stream, 1)
    assert memo.responses == {}, why


def test_a_head_cut_by_the_segment_end_is_not_kept() -> None:
    memo = HeadMemo()
    parser = RequestParser(RequestRecorder(), {}, known=memo.requests)
    parser.feed(b"GET / HTTP/1.1\r\nHost: a\r", 1)
    parser.feed(b"\n\r\n", 2)
    assert memo.requests == {}
    parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 3)
    assert memo.requests == {b"GET / HTTP/1.1\r\nHost: a\r\n\r\n": ("GET", "/", 0, 0)}  # framing: none


def test_a_full_memo_is_emptied_and_rests_when_its_heads_do_not_repeat() -> None:
    memo = HeadMemo()
    recorder = RequestRecorder()
    parser = RequestParser(recorder, {}, known=memo.requests)
    unique = [b"GET /%d HTTP/1.1\r\n\r\n" % i for i in range(HEAD_MEMO_ENTRIES + 1)]
    for ts, head in enumerate(unique):
        parser.feed(head, ts)
    # Full after 1,024 heads that never hit: emptied, the newest kept, and no lookups for a while.
    assert list(memo.requests) == unique[-1:]
    assert (memo.requests.rest, memo.requests.hits) == (HEAD_MEMO_REST, 0)
    parser.feed(unique[-1], 10_000)  # resting: parsed again, not looked up
    assert (memo.requests.rest, memo.requests.hits) == (HEAD_MEMO_REST - 1, 0)
    for ts in range(HEAD_MEMO_REST - 1):
        parser.feed(unique[0], 20_000 + ts)
    assert memo.requests.rest == 0 and list(memo.requests) == unique[-1:]  # nothing kept while resting
    parser.feed(unique[-1], 50_000)  # looked up again
    assert memo.requests.hits == 1
    assert [r.target for r in recorder.requests] == (
        [f"/{i}" for i in range(HEAD_MEMO_ENTRIES + 1)] + [f"/{HEAD_MEMO_ENTRIES}"] + ["/0"] * (HEAD_MEMO_REST - 1)
        + [f"/{HEAD_MEMO_ENTRIES}"])


def test_a_full_memo_whose_heads_repeat_never_rests() -> None:
    memo = HeadMemo()
    parser = RequestParser(RequestRecorder(), {}, known=memo.requests)
    repeated = b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n"
    for i in range(2 * HEAD_MEMO_ENTRIES):
        parser.feed(repeated, 2 * i)
        parser.feed(b"GET /%d HTTP/1.1\r\n\r\n" % i, 2 * i + 1)  # one new head per hit
    assert memo.requests.rest == 0 and repeated in memo.requests  # emptied twice, never resting
    parser.feed(repeated, 10_000)
    assert memo.requests.hits == 1


# -- the line memo ------------------------------------------------------------------------------

def _traced(trace: bytes) -> bytes:
    return b"GET /a/1 HTTP/1.1\r\nHost: a\r\ntraceparent: " + trace + b"\r\nCookie: c=1\r\n\r\n"


def test_the_line_memo_learns_lines_then_only_checks_the_one_that_changes() -> None:
    memo = HeadMemo()
    table = memo.requests.lines
    assert table is not None
    recorder = RequestRecorder()
    parser = RequestParser(recorder, {}, known=memo.requests)
    parser.feed(_traced(b"00-1"), 1)
    assert table == {b"Host: a", b"traceparent: 00-1", b"Cookie: c=1"} and table.prefix == table.suffix == b""
    parser.feed(_traced(b"00-2"), 2)  # one line changed: the lines around it are kept, with their CRLFs
    assert (table.prefix, table.suffix) == (b"Host: a\r\n", b"\r\nCookie: c=1")
    assert b"traceparent: 00-2" in table
    parser.feed(_traced(b"00-3"), 3)  # compared around, checked alone, not learnt
    assert b"traceparent: 00-3" not in table and table.last == _traced(b"00-2")[19:-4]
    parser.feed(_traced(b"00-\r4"), 4)  # a bare CR where the id was: refused, as without the memo
    assert [r.target for r in recorder.requests] == ["/a/1"] * 3


def test_a_full_line_memo_is_emptied() -> None:
    memo = HeadMemo()
    table = memo.requests.lines
    assert table is not None
    parser = RequestParser(RequestRecorder(), {}, known=memo.requests)
    line = b"X-Pad: " + b"p" * 1000
    for n in range(LINE_MEMO_BYTES // 1000 + 2):
        parser.feed(b"GET / HTTP/1.1\r\nX-N: %d\r\n%s%d\r\n\r\n" % (n, line, n), n)  # two lines new each time
    assert table.size <= LINE_MEMO_BYTES and len(table) < LINE_MEMO_BYTES // 1000


def test_heads_too_long_to_keep_make_the_memo_rest_too() -> None:
    memo = HeadMemo()
    parser = RequestParser(RequestRecorder(), {}, known=memo.requests)
    long_head = b"GET / HTTP/1.1\r\nCookie: " + b"c" * HEAD_MEMO_BYTES + b"\r\n\r\n"
    for ts in range(HEAD_MEMO_ENTRIES - 1):
        parser.feed(long_head, ts)
    assert (memo.requests.passed, memo.requests.rest) == (HEAD_MEMO_ENTRIES - 1, 0)
    parser.feed(long_head, HEAD_MEMO_ENTRIES)  # the table is "full" of heads it could not keep, none hit
    assert (memo.requests.passed, memo.requests.rest, len(memo.requests)) == (0, HEAD_MEMO_REST, 0)
