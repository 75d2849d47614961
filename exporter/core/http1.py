"""Incremental HTTP/1.x parsers: one per direction of a TCP connection.

Bytes go in as they come off the wire, in sequence order, with the kernel timestamp of
the segment that carried them. The parsers find message boundaries (heads, then bodies
framed by Content-Length, chunked coding, or the end of the connection) and report them
to a sink; they never pair requests with responses themselves (see `flows`).

A parser that meets bytes it cannot frame counts one parse error and becomes *lost*: it
drops the message in progress and discards bytes until a line that can start a message
(a request line `TOKEN SP target SP HTTP/1.x`, or a status line `HTTP/1.x NNN`). A head
found while lost is *tentative*: if it turns out malformed, the parser goes back to
searching without counting again, so one resync is one error.

Parse error reasons (keys of the `errors` dict handed to the parsers):

- ``bad_request_line``: a first line that starts like a request (`TOKEN SP`) and names
  HTTP/1 (` HTTP/1.`), but is malformed.
- ``bad_status_line``: a first line that starts with `HTTP/` but is malformed.
- ``not_http``: where a message had to start, the bytes do not look like HTTP/1 at all
  (TLS, HTTP/2, another protocol, or a connection joined in the middle of a message).
- ``bad_header``: a header line that is not `token ":" value` (obs-fold included), or a
  request Transfer-Encoding that does not end in chunked.
- ``header_too_large``: a head or trailer section longer than the configured limit.
- ``bad_chunk``: a malformed chunk-size line or missing CRLF after chunk data.
- ``bad_content_length``: a Content-Length that is not a number, or conflicting duplicates.
- ``truncated``: the capture cut bytes the parser needed (head, chunk framing).
- ``gap``: TCP data lost for good (counted by `flows`, which then calls `lose()`).
- ``buffer_overflow``: unparsed bytes hit `max_buffered_bytes` before `max_header_bytes`
  (only possible when the buffer limit is the smaller of the two).
"""

from __future__ import annotations

import re
from itertools import compress, count, filterfalse
from operator import ne
from typing import Any, Final, Protocol

__all__ = [
    "HEAD_MEMO_BYTES",
    "HEAD_MEMO_ENTRIES",
    "HEAD_MEMO_REST",
    "KNOWN_METHODS",
    "LINE_MEMO_BYTES",
    "PARSE_ERROR_REASONS",
    "ByteSink",
    "HeadMemo",
    "HeadTable",
    "LineTable",
    "PendingRequest",
    "RequestParser",
    "RequestSink",
    "ResponseParser",
    "ResponseSink",
    "method_label",
    "normalise_target",
]

KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)

PARSE_ERROR_REASONS: Final = (
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
)


def method_label(token: str) -> str:
    """The method as a metric label: the token itself if standard, else ``_OTHER``."""
    return token if token in KNOWN_METHODS else "_OTHER"


def normalise_target(raw_target: str) -> str:
    """The path of a request target, without query or fragment.

    Origin-form is cut at ``?``/``#``; absolute-form (``http://host:8080/a?x``) is reduced to
    its path (``/a``); ``*`` (asterisk-form) stays; authority-form (``host:443``, CONNECT)
    is returned as sent, since it has no path. Empty becomes ``/``.
    """
    if not raw_target:
        return "/"
    if raw_target[0] == "/" and "?" not in raw_target and "#" not in raw_target:
        return raw_target  # the usual origin-form path: nothing to cut
    if raw_target[0] != "/":
        scheme_end = raw_target.find("://")
        if scheme_end > 0 and _SCHEME.fullmatch(raw_target, 0, scheme_end):
            authority = scheme_end + 3
            path = _first_of(raw_target, "/?#", authority)
            if path < 0 or raw_target[path] != "/":
                return "/"
            raw_target = raw_target[path:]
    cut = _first_of(raw_target, "?#", 0)
    if cut == 0:
        return "/"
    return raw_target if cut < 0 else raw_target[:cut]


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def _first_of(text: str, chars: str, start: int) -> int:
    found = -1
    for char in chars:
        at = text.find(char, start)
        if at >= 0 and (found < 0 or at < found):
            found = at
    return found


class PendingRequest:
    """A request whose head has been parsed, waiting for its final response."""

    __slots__ = ("body_bytes", "method", "start_ns", "target")

    def __init__(self, method: str, target: str, start_ns: int) -> None:
        self.method = method
        self.target = target  # as sent; normalised only when an exchange is emitted
        self.start_ns = start_ns
        self.body_bytes = 0


# Heads repeat: a keep-alive client sends the same request head again and again, and a server
# answers it with the same head but for its Date (new once a second). What a head parses to is a
# function of its bytes alone, so the parsers of one Tracker share a table of the heads they
# parsed whole: a repeated one costs a search for its end, a hash and a lookup instead of the
# regular-expression scans and framing (measured on nginx's HTTPS bench: 3.8 -> 1.1 us per
# response, 2.0 -> 0.8 us per request). Heads up to HEAD_MEMO_BYTES, at most HEAD_MEMO_ENTRIES
# per direction, emptied when full: at most ~2 MB for both, whatever the traffic (tracemalloc,
# both tables full of 510-byte heads with 400-byte targets). Emptied, not the oldest dropped one
# by one: a dict used as a queue slows its own iteration with the holes left at its front.
# Heads that never repeat (a request carrying a trace id, a cookie, a random path) would pay the
# lookup and the insertion for nothing, about 0.5 us per head: a table that filled up with fewer
# than half of its lookups hits rests for HEAD_MEMO_REST heads (no lookup), then tries again. Heads
# it cannot keep (longer than HEAD_MEMO_BYTES: browser heads with a cookie) fill it as if kept, so
# that a stream of them makes it rest too rather than search 512 bytes of each for nothing.
HEAD_MEMO_BYTES = 512
HEAD_MEMO_ENTRIES = 1024
HEAD_MEMO_REST = 16 * HEAD_MEMO_ENTRIES


# Heads that differ only in a line or two (a random id in the target, a traceparent, one user's
# cookie) miss the head memo, and checking every line of a 1.4 KB browser head costs ~4.5 us in
# regular-expression scans (0.7 ns a byte, ~30 ns a line, twice: lines, then bare CRs). Most of
# their lines recur, though: the request parsers of one Tracker share the set of header lines
# already checked plain (`token:value`, no CR or LF, no framing name). A CRLF head whose lines are
# all in it, or pass that check now, needs no other scan: split at CRLF, hashed, looked up in C.
# Hashing costs about what a scan does, so the lines of the last head taken are kept too: a head
# whose lines (or all of them together) are the same bytes is compared, not hashed (memcmp), and
# one that differs where the last one differed from its own predecessor has only those lines
# checked. Only requests have one: responses nearly always carry a framing header, which it never
# holds, and their heads repeat whole (the head memo's).
# Bounded by LINE_MEMO_BYTES (what the lines and their set slots cost, about): emptied when full.
LINE_MEMO_BYTES = 1 << 20
_LINE_OVERHEAD = 64  # a bytes object's header and its set slot


class LineTable(set[bytes]):
    """Header lines (without their CRLF) known to be plain: see LINE_MEMO_BYTES."""

    __slots__ = ("last", "last_lines", "prefix", "size", "suffix")

    def __init__(self) -> None:
        super().__init__()
        self.size = 0  # bytes the lines cost, about
        self.last = b""  # the lines of the last head found plain, together and one by one
        self.last_lines: list[bytes] = []
        # What the last two heads found plain had in common before and after the lines that differed
        # (a traceparent, a request id): whole lines, with the CRLF that parts them from those lines.
        self.prefix = self.suffix = b""

    def plain(self, head: bytes, start: int, end: int) -> bool:
        """Whether `head[start:end]` is CRLF-separated plain lines (the CRLF after the last one
        excluded); those neither the last head's nor known are checked, and learnt."""
        section = head[start:end]
        if section == self.last:
            return True
        prefix, suffix = self.prefix, self.suffix
        if ((prefix or suffix) and len(section) > len(prefix) + len(suffix)
                and section.startswith(prefix) and section.endswith(suffix)):
            # The usual unique head: its lines but those that changed last time are the same bytes
            # (two comparisons, no split, no hashing); those are checked, not learnt (they change).
            middle = section[len(prefix) : len(section) - len(suffix)]
            if b"\r" not in middle:  # one line, the usual case
                return _PLAIN_LINE.fullmatch(middle) is not None
            return all(_PLAIN_LINE.fullmatch(line) is not None and b"\r" not in line
                       for line in middle.split(b"\r\n"))
        lines = section.split(b"\r\n")
        last = self.last_lines
        # Lines where the last head had the same bytes are plain; only the others are looked up.
        changed = [*compress(count(), map(ne, lines, last))] if len(lines) == len(last) else []
        new = [lines[at] for at in changed] if changed else lines  # (the same count, some changed)
        unknown = [*filterfalse(self.__contains__, new)]
        if unknown:
            size = 0
            for line in unknown:
                if _PLAIN_LINE.fullmatch(line) is None or b"\r" in line:
                    return False
                size += len(line) + _LINE_OVERHEAD
            if self.size + size > LINE_MEMO_BYTES:
                self.clear()
                self.size = 0
            self.update(unknown)
            self.size += size
        self.last = section
        self.last_lines = lines
        if changed:
            first, final = changed[0], changed[-1]
            after = len(lines) - final - 1  # lines after the last that changed, each after a CRLF
            self.prefix = section[: sum(map(len, lines[:first])) + 2 * first]
            self.suffix = section[len(section) - sum(map(len, lines[final + 1 :])) - 2 * after :]
        else:
            self.prefix = self.suffix = b""
        return True


class HeadTable(dict[bytes, tuple[Any, ...]]):
    """One direction's memo: head bytes -> what they parse to; its hits since it was last emptied,
    and how many heads it still rests for. `lines`: the request direction's LineTable."""

    __slots__ = ("hits", "lines", "passed", "rest")

    def __init__(self, lines: LineTable | None = None) -> None:
        super().__init__()
        self.hits = 0
        self.rest = 0
        self.passed = 0  # heads looked up that it could not keep, since it was last emptied
        self.lines = lines

    def keep(self, head: bytes, parsed: tuple[Any, ...]) -> None:
        if len(self) + self.passed >= HEAD_MEMO_ENTRIES:
            self._empty()
        self[head] = parsed

    def pass_over(self) -> None:
        """A head looked up that cannot be kept (too long, or cut by its segment's end)."""
        self.passed += 1
        if len(self) + self.passed >= HEAD_MEMO_ENTRIES:
            self._empty()

    def _empty(self) -> None:
        if self.hits < HEAD_MEMO_ENTRIES // 2:
            self.rest = HEAD_MEMO_REST
        self.hits = 0
        self.passed = 0
        self.clear()


class HeadMemo:
    """What heads parsed before parse to (`_Parser._read_head`), by their bytes up to and with their
    CRLF blank line; one table per direction. Only heads accepted whole from one segment, ended by
    CRLF CRLF and no longer than HEAD_MEMO_BYTES, are kept: a failure is never, so the errors
    counted stay those of a parser without it."""

    __slots__ = ("requests", "responses")

    def __init__(self) -> None:
        self.requests = HeadTable(LineTable())
        self.responses = HeadTable()


class RequestSink(Protocol):
    def on_request(self, request: PendingRequest) -> None:
        """A request head is complete; its body (if any) may still be arriving."""


class ResponseSink(Protocol):
    def on_response_head(self, status: int, ts_ns: int) -> str | None:
        """A final response head ended at `ts_ns`: return the answered request's method, or None."""

    def on_response_complete(self, status: int, end_ns: int, body_bytes: int) -> None:
        """The final response's last byte arrived at `end_ns`."""

    def on_response_lost(self) -> None:
        """The response parser lost its place: whatever it was answering is gone."""

    def on_upgrade(self, protocol: str) -> None:
        """101 or a successful CONNECT: the connection is no longer HTTP/1.

        `protocol` is the 101's `Upgrade` token, lowercased (`h2c`, `websocket`), else "".
        For `h2c` the request that switched is not answered here: HTTP/2 answers it on
        stream 1, so no response is completed for it.
        """


class ByteSink(Protocol):
    def feed(self, data: bytes, ts_ns: int, missing: int = 0) -> None:
        """In-order bytes of one direction, stamped with their segment's kernel time."""


_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_REQUEST_LINE_PATTERN = rb"([" + _TCHAR + rb"]+) ([^\x00-\x20\x7f]+) HTTP/1\.[0-9]\r?"
_STATUS_LINE_PATTERN = rb"HTTP/1\.[0-9] ([0-9]{3})(?:[ \t][^\r\n]*)?\r?"
_REQUEST_LINE = re.compile(_REQUEST_LINE_PATTERN)
_STATUS_LINE = re.compile(_STATUS_LINE_PATTERN)
# A request line ended by CRLF (its groups as in _REQUEST_LINE): the heads LineTable serves start so.
_REQUEST_LINE_CRLF = re.compile(_REQUEST_LINE_PATTERN + rb"(?<=\r)\n")
# Header lines: `token ":" value` ended by LF, the value free of CR and LF but for one CR before the
# LF. Checked as two cheap scans rather than one `[^\r\n]*\r?\n` pattern: sre runs a negated
# single byte (`[^\n]`) in a tight loop but a two-byte class byte by byte, ~5x slower on a 1.4 KB
# browser head. (`_HEADER_LINES` with no bare CR after `start` is exactly that pattern; the outer
# repeat stays greedy, not possessive: CPython 3.11's `(...)*+` lets fullmatch accept a cut line.)
_HEADER_LINES = re.compile(rb"(?:[" + _TCHAR + rb"]++:[^\n]*+\n)*")
# The same lines, stopping before a framing header (Content-Length, Transfer-Encoding, any case):
# a head it takes whole up to its blank line has none, so its framing needs no scan of its own
# (a bodiless request, the usual case: ~0.5 us more here saves a ~1.5 us scan of a 1.4 KB head).
# Where it stops short, _HEADER_LINES goes on from there and the framing scan starts there.
_PLAIN_LINES_PATTERN = rb"(?:(?!(?i:content-length|transfer-encoding):)[" + _TCHAR + rb"]++:[^\n]*+\n)*"
# A head's first line (its groups as in _REQUEST_LINE, _STATUS_LINE) and its plain lines in one
# match: the whole-head path's first scan.
_REQUEST_HEAD = re.compile(_REQUEST_LINE_PATTERN + rb"\n" + _PLAIN_LINES_PATTERN)
# One plain line without its end, for LineTable (which also refuses any CR in it).
_PLAIN_LINE = re.compile(rb"(?!(?i:content-length|transfer-encoding):)[" + _TCHAR + rb"]++:[^\n]*+")
_STATUS_HEAD = re.compile(_STATUS_LINE_PATTERN + rb"\n" + _PLAIN_LINES_PATTERN)
_BARE_CR = re.compile(rb"\r(?!\n)")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")

# While lost: where a message may start (`^` is a segment or line start), and what a line
# cut by the segment end must look like to be worth keeping for the next segment.
_REQUEST_CANDIDATE = re.compile(rb"^[" + _TCHAR + rb"]+ [^\x00-\x20\x7f]+ HTTP/1\.[0-9]\r?$", re.M)
_VERSION_PREFIX = rb"(?:H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[0-9]\r?)?)?)?)?)?)?)?)?"
_REQUEST_PREFIX = re.compile(rb"[" + _TCHAR + rb"]+(?: [^\x00-\x20\x7f]*(?: " + _VERSION_PREFIX + rb")?)?")
_STATUS_CANDIDATE = re.compile(rb"^HTTP/1\.[0-9] [0-9]{3}", re.M)
_STATUS_PREFIX = re.compile(rb"H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[0-9](?: (?:[0-9](?:[0-9])?)?)?)?)?)?)?)?)?)?")

# How a message must begin, checked before its first line is complete.
_METHOD_START = re.compile(rb"[" + _TCHAR + rb"]+ |[" + _TCHAR + rb"]*\Z")
_STATUS_START = re.compile(rb"HTTP/|H(?:T(?:T(?:P)?)?)?\Z")
_EARLY_CHECK_BYTES = 64  # only on the first segments of a head, so long lines stay linear

_MAX_CHUNK_LINE = 1024  # size + extensions; nobody legitimate sends more

# Parser states.
_HEAD = 0
_BODY = 1  # Content-Length: `_remaining` bytes to go
_CLOSE_BODY = 2  # body ends when the server closes
_CHUNK_SIZE = 3
_CHUNK_DATA = 4
_CHUNK_CR = 5  # CRLF (or bare LF) after chunk data
_CHUNK_LF = 6
_TRAILERS = 7
_LOST = 8
_DEAD = 9  # no longer HTTP (upgrade, tunnel) or stream finished
_UNBOUNDED = 1 << 62  # opaque_bytes of a body that ends only with the connection

# `_parse_head` outcomes; a value >= 0 is where to resume, counted from the head's start.
_PARSED = -1
_SKIP_HEAD = -2
# `_parse_head`'s framing_from when the caller knows the head has no framing header, and the
# framing of such a head (as `_framing` gives it).
_NO_FRAMING = -1
_NO_BODY = (_HEAD, 0)

_BLANK = b"\r\n"


# How much of a head's lines the caller checked already (`_header_fields_ok`'s `checked`).
_UNCHECKED = 0
_LINES_CHECKED = 1  # `_HEADER_LINES` matched them all; bare CRs are left to find
_FIELDS_CHECKED = 2  # all of it (LineTable.plain)


def _header_fields_ok(head: bytes, start: int, checked: int = _UNCHECKED, end: int | None = None) -> bool:
    """Whether `head[start:end]` is header lines only (see `_HEADER_LINES`), obs-fold refused.

    `checked`: what the caller already knows of them (_UNCHECKED, _LINES_CHECKED, _FIELDS_CHECKED).
    """
    if checked == _FIELDS_CHECKED:
        return True
    lines_checked = checked == _LINES_CHECKED
    if end is None:
        end = len(head)
    return ((lines_checked or _HEADER_LINES.fullmatch(head, start, end) is not None)
            and _BARE_CR.search(head, start, end) is None)


class _Parser:
    """Framing shared by both directions. Subclasses interpret heads."""

    __slots__ = (
        "_body_bytes",
        "_errors",
        "_first_line_ok",
        "_head",
        "_head_ns",
        "_known",
        "_line",
        "_lost_tail",
        "_lost_tail_ns",
        "_max_head",
        "_overflow_reason",
        "_remaining",
        "_state",
        "_tentative",
        "_trailer_bytes",
        "successor",
    )

    _candidate: re.Pattern[bytes]
    _first_line_crlf: re.Pattern[bytes]  # set where HeadMemo gives a LineTable (requests)
    _prefix: re.Pattern[bytes]
    _start: re.Pattern[bytes]
    _whole_head: re.Pattern[bytes]

    def __init__(self, errors: dict[str, int], max_header_bytes: int, max_buffered_bytes: int,
                 known: HeadTable | None = None) -> None:
        self._errors = errors
        self._known = known  # this direction's HeadMemo table; None: none
        if max_buffered_bytes < max_header_bytes:
            self._max_head, self._overflow_reason = max_buffered_bytes, "buffer_overflow"
        else:
            self._max_head, self._overflow_reason = max_header_bytes, "header_too_large"
        self._state = _HEAD
        self._head: bytearray | None = None
        self._head_ns = 0
        self._first_line_ok = False
        self._line: bytearray | None = None
        self._remaining = 0
        self._body_bytes = 0
        self._trailer_bytes = 0
        self._tentative = False
        self._lost_tail = b""
        self._lost_tail_ns = 0
        # Where bytes go once this parser has stopped (after an upgrade to HTTP/2).
        self.successor: ByteSink | None = None

    # -- interface for flows -------------------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for a message start or framing line: counts against the flow's buffer."""
        held = len(self._lost_tail)
        if self._head is not None:
            held += len(self._head)
        if self._line is not None:
            held += len(self._line)
        return held

    @property
    def alive(self) -> bool:
        return self._state != _DEAD

    @property
    def opaque_bytes(self) -> int:
        """How many of the next bytes will be counted without being looked at.

        The rest of a Content-Length body or of a chunk, or all of a close-delimited body;
        0 where the next bytes may be framing. Their content can be dropped unseen.
        """
        state = self._state
        if state == _BODY or state == _CHUNK_DATA:
            return self._remaining
        if state == _CLOSE_BODY:
            return _UNBOUNDED
        return 0

    def feed(self, data: bytes, ts_ns: int, missing: int = 0) -> None:
        """Consume in-order bytes carried by a segment stamped `ts_ns`.

        `missing` bytes of unknown content follow `data` (the capture truncated them).
        """
        pos = 0
        end = len(data)
        while pos < end:
            state = self._state
            if state == _HEAD:
                pos = self._feed_head(data, pos, ts_ns)
            elif state == _BODY:
                left = self._remaining
                if end - pos < left:
                    self._remaining = left - (end - pos)
                    self._body_bytes += end - pos
                    pos = end
                else:
                    self._body_bytes += left
                    pos += left
                    self._complete(ts_ns)
            elif state == _CHUNK_DATA:
                left = self._remaining
                if end - pos < left:
                    self._remaining = left - (end - pos)
                    self._body_bytes += end - pos
                    pos = end
                else:
                    self._body_bytes += left
                    pos += left
                    if data[pos : pos + 2] == b"\r\n":
                        pos += 2
                        self._state = _CHUNK_SIZE
                    else:
                        self._state = _CHUNK_CR
            elif state == _CHUNK_SIZE:
                pos = self._feed_chunk_size(data, pos)
            elif state == _CHUNK_CR or state == _CHUNK_LF:
                byte = data[pos]
                if byte == 10:
                    self._state = _CHUNK_SIZE
                    pos += 1
                elif byte == 13 and state == _CHUNK_CR:
                    self._state = _CHUNK_LF
                    pos += 1
                else:
                    self._fail("bad_chunk")
            elif state == _TRAILERS:
                pos = self._feed_trailers(data, pos, ts_ns)
            elif state == _CLOSE_BODY:
                self._body_bytes += end - pos
                self._close_body_seen(ts_ns)
                pos = end
            elif state == _LOST:
                pos = self._feed_lost(data, pos, ts_ns)
            else:
                successor = self.successor
                if successor is not None:
                    successor.feed(data[pos:], ts_ns, missing)
                return
        if missing:
            self._feed_missing(missing, ts_ns)

    def lose(self) -> None:
        """Data before the next bytes is gone (a TCP gap): drop the message and resync."""
        if self._state != _DEAD:
            self._enter_lost()

    def stop(self) -> None:
        """Stop parsing for good: the stream is no longer HTTP/1, or it ended."""
        self._state = _DEAD
        self._head = self._line = None
        self._lost_tail = b""

    # -- framing -------------------------------------------------------------------------

    def _feed_head(self, data: bytes, pos: int, ts_ns: int) -> int:
        head = self._head
        end = len(data)
        if head is None:
            while data[pos] in _BLANK:  # stray CRLFs between messages
                pos += 1
                if pos == end:
                    return end
            self._head_ns = ts_ns
            known = self._known
            # A head the memo may hold ends its last line at memo_end (-1: none): its key is
            # data[pos:memo_end + 4], up to and with the CRLF blank line.
            memo_end = -1
            head_key = b""
            if known is not None and known.rest:
                known.rest -= 1
            elif known is not None:
                memo_end = data.find(b"\r\n\r\n", pos, pos + HEAD_MEMO_BYTES)
                if memo_end < 0:
                    known.pass_over()
                elif memo_end + 1 - pos < self._max_head:
                    head_key = data[pos : memo_end + 4]
                    parsed = known.get(head_key)
                    if parsed is not None:
                        known.hits += 1
                        self._take_head(parsed, ts_ns)
                        return memo_end + 4
                else:
                    memo_end = -1
            lines_known = known.lines if known is not None else None
            first = self._first_line_crlf.match(data, pos) if lines_known is not None else None
            if first is not None and lines_known is not None:
                # A CRLF head of known (or now checked) plain lines: no scan of its lines, a
                # search for its end and a split (see LINE_MEMO_BYTES). It is what the whole-head
                # path below accepts as a head without framing; any other goes there.
                fields = first.end()
                term = data.find(b"\r\n\r\n", fields - 2)
                if (term >= 0 and term + 1 - pos < self._max_head
                        and (term < fields or lines_known.plain(data, fields, term))):
                    read = self._read_head(data, pos, term + 2, _NO_FRAMING, _FIELDS_CHECKED, first)
                    if isinstance(read, int):
                        return term + 4 if read < 0 else pos + read
                    if memo_end == term and known is not None:
                        known.keep(head_key, read)
                    self._take_head(read, ts_ns)
                    return term + 4
            first = self._whole_head.match(data, pos)
            if first is not None:
                # The usual head, whole in this segment: a good first line, `name:value` lines up to
                # a CRLF blank line. One scan checks them and finds the blank line (and, for a head
                # without a framing header, that it has none); anything else (a bad first line, a
                # bare-LF end, a bad line, a cut head) takes the general search below. The head is
                # parsed in place, not copied.
                lines_end = first.end()
                blank = data[lines_end : lines_end + 2] == b"\r\n"
                if blank:
                    framing_from = _NO_FRAMING
                else:  # at a framing header (or a line that ends the lines): go on from its LF
                    framing_from = lines_end - 1
                    lines = _HEADER_LINES.match(data, lines_end)
                    lines_end = lines.end() if lines is not None else lines_end
                    blank = data[lines_end : lines_end + 2] == b"\r\n"
                if blank and lines_end - 1 - pos < self._max_head:
                    read = self._read_head(data, pos, lines_end, framing_from, _LINES_CHECKED, first)
                    if isinstance(read, int):
                        return lines_end + 2 if read < 0 else pos + read
                    if memo_end == lines_end - 2 and known is not None:  # the key is this whole head
                        known.keep(head_key, read)
                    self._take_head(read, ts_ns)
                    return lines_end + 2
            term = data.find(b"\n\r\n", pos)
            if term >= 0:
                bare = data.find(b"\n\n", pos, term)
                if bare >= 0:
                    term, skip = bare, 2
                else:
                    skip = 3
            else:
                term = data.find(b"\n\n", pos)
                skip = 2
            if term >= 0:
                if term - pos >= self._max_head:
                    self._fail(self._overflow_reason)
                    return term + skip
                outcome = self._parse_head(data, pos, term + 1, ts_ns, pos, _UNCHECKED)
                return term + skip if outcome < 0 else pos + outcome
            self._head = head = bytearray(data[pos:] if pos else data)
            self._first_line_ok = False
            return self._check_partial_head(head, 0, pos, end)

        old = len(head)
        head += memoryview(data)[pos:]
        start = old - 2 if old > 2 else 0
        term = head.find(b"\n\r\n", start)
        if term >= 0:
            bare = head.find(b"\n\n", start, term)
            if bare >= 0:
                term, skip = bare, 2
            else:
                skip = 3
        else:
            term = head.find(b"\n\n", start)
            skip = 2
        if term >= 0:
            self._head = None
            if term >= self._max_head:
                self._fail(self._overflow_reason)
                return pos + term + skip - old
            whole = bytes(head[: term + 1])
            outcome = self._parse_head(whole, 0, len(whole), ts_ns, 0, _UNCHECKED)
            # A first line that fails here was completed by this segment, so outcome >= old.
            return pos + (term + skip if outcome < 0 else outcome) - old
        return self._check_partial_head(head, old, pos, end)

    def _check_partial_head(self, head: bytearray, old: int, pos: int, end: int) -> int:
        """A head still incomplete: reject early what can already be rejected."""
        if not self._first_line_ok:
            newline = head.find(b"\n", old)
            if newline >= 0:
                reason = self._first_line_error(bytes(head[:newline]))
                if reason is not None:
                    self._fail(reason)
                    return pos + newline + 1 - old
                self._first_line_ok = True
            elif old < _EARLY_CHECK_BYTES and self._start.match(head) is None:
                self._fail("not_http")  # no newline needed to see this is not HTTP/1
                return pos
        if len(head) >= self._max_head:
            self._fail(self._overflow_reason)
        return end

    def _feed_chunk_size(self, data: bytes, pos: int) -> int:
        newline = data.find(b"\n", pos)
        partial = self._line
        if newline < 0:
            if partial is None:
                self._line = partial = bytearray()
            partial += memoryview(data)[pos:]
            if len(partial) > _MAX_CHUNK_LINE:
                self._fail("bad_chunk")
            return len(data)
        if partial is None:
            line = data[pos:newline]
        else:
            partial += memoryview(data)[pos:newline]
            line = bytes(partial)
            self._line = None
        semicolon = line.find(b";")  # chunk extensions carry nothing we need
        if semicolon >= 0:
            line = line[:semicolon]
        line = line.strip()
        if _HEX.fullmatch(line) is None:
            self._fail("bad_chunk")
            return newline + 1
        size = int(line, 16)
        if size:
            self._remaining = size
            self._state = _CHUNK_DATA
        else:
            self._trailer_bytes = 0
            self._state = _TRAILERS
        return newline + 1

    def _feed_trailers(self, data: bytes, pos: int, ts_ns: int) -> int:
        end = len(data)
        while pos < end:
            newline = data.find(b"\n", pos)
            partial = self._line
            if newline < 0:
                if partial is None:
                    self._line = partial = bytearray()
                partial += memoryview(data)[pos:]
                self._trailer_bytes += end - pos
                if self._trailer_bytes >= self._max_head:
                    self._fail(self._overflow_reason)
                return end
            if partial is None:
                line_length = newline - pos
                blank = line_length == 0 or (line_length == 1 and data[pos] == 13)
            else:
                partial += memoryview(data)[pos:newline]
                blank = len(partial) == 0 or partial == b"\r"
                self._line = None
                line_length = 0  # already counted while partial
            pos = newline + 1
            if blank:
                self._complete(ts_ns)
                return pos
            self._trailer_bytes += line_length + 1
            if self._trailer_bytes >= self._max_head:
                self._fail(self._overflow_reason)
                return pos
        return pos

    def _feed_missing(self, missing: int, ts_ns: int) -> None:
        """Bytes we know the length of but not the content: fine inside a counted body."""
        while missing:
            state = self._state
            if state == _BODY or state == _CHUNK_DATA:
                take = min(missing, self._remaining)
                self._remaining -= take
                self._body_bytes += take
                missing -= take
                if not self._remaining:
                    if state == _BODY:
                        self._complete(ts_ns)
                    else:
                        self._state = _CHUNK_CR
            elif state == _CLOSE_BODY:
                self._body_bytes += missing
                self._close_body_seen(ts_ns)
                return
            elif state == _LOST:
                self._lost_tail = b""  # the cut broke any line we were holding
                return
            elif state == _DEAD:
                return
            else:
                self._fail("truncated")

    def _feed_lost(self, data: bytes, pos: int, ts_ns: int) -> int:
        chunk = data[pos:] if pos else data
        tail = self._lost_tail
        if tail:
            joined = tail + chunk
            self._lost_tail = b""
            if self._candidate.match(joined) is not None:
                self._tentative = True
                self._state = _HEAD
                self._head = bytearray(tail)
                self._head_ns = self._lost_tail_ns
                self._first_line_ok = False
                return pos
            if len(joined) < self._max_head and self._prefix.fullmatch(joined) is not None:
                self._lost_tail = joined
                return len(data)
        found = self._candidate.search(chunk)
        if found is not None:
            self._tentative = True
            self._state = _HEAD
            return pos + found.start()
        rest = chunk[chunk.rfind(b"\n") + 1 :]
        if rest and len(rest) < self._max_head and self._prefix.fullmatch(rest) is not None:
            self._lost_tail = rest
            self._lost_tail_ns = ts_ns
        return len(data)

    def _fail(self, reason: str) -> None:
        if not self._tentative:
            errors = self._errors
            errors[reason] = errors.get(reason, 0) + 1
        self._enter_lost()

    def _enter_lost(self) -> None:
        self._state = _LOST
        self._head = self._line = None
        self._tentative = False
        self._lost_tail = b""
        self._on_lost()

    def _after_head(self, framing: int, length: int, ts_ns: int) -> None:
        """Set up body framing once a head is accepted."""
        self._tentative = False
        self._body_bytes = 0
        if framing == _BODY:
            if length:
                self._remaining = length
                self._state = _BODY
            else:
                self._complete(ts_ns)
        elif framing == _CHUNK_SIZE:
            self._state = _CHUNK_SIZE
        elif framing == _CLOSE_BODY:
            self._state = _CLOSE_BODY
            self._close_body_seen(ts_ns)
        else:
            self._complete(ts_ns)

    # -- hooks ---------------------------------------------------------------------------

    def _parse_head(self, data: bytes, start: int, end: int, ts_ns: int, framing_from: int,
                    checked: int, first: re.Match[bytes] | None = None) -> int:
        """Take the head `data[start:end]` (its lines end with LF; the blank line is not included).

        `framing_from`: where in `data` a framing header's name may first start (its LF), or
        _NO_FRAMING when there is none. `checked`: what is known of its lines (`_header_fields_ok`).
        `first`: `_whole_head`'s match of it, when that checked its first line. Returns _PARSED,
        _SKIP_HEAD, or where to resume counted from `start`.
        """
        read = self._read_head(data, start, end, framing_from, checked, first)
        if isinstance(read, int):
            return read
        self._take_head(read, ts_ns)
        return _PARSED

    def _read_head(self, data: bytes, start: int, end: int, framing_from: int, checked: int,
                   first: re.Match[bytes] | None) -> tuple[Any, ...] | int:
        """What the head `data[start:end]` says (see _parse_head), a function of its bytes alone:
        a tuple for _take_head, or, when it is not acceptable (counted here), where to resume."""
        raise NotImplementedError

    def _take_head(self, head: tuple[Any, ...], ts_ns: int) -> None:
        """Act on an accepted head that ended at `ts_ns`, given as _read_head read it."""
        raise NotImplementedError

    def _first_line_error(self, line: bytes) -> str | None:
        raise NotImplementedError

    def _complete(self, ts_ns: int) -> None:
        raise NotImplementedError

    def _on_lost(self) -> None:
        pass

    def _close_body_seen(self, ts_ns: int) -> None:
        pass


_UPGRADE = re.compile(rb"\nupgrade:[ \t]*([^\r\n \t,]*)", re.I)


def _upgrade_protocol(head: bytes, start: int, end: int) -> str:
    """The first token of the Upgrade header of a 101 head (`head[start:end]`), lowercased; "" without one."""
    found = _UPGRADE.search(head, start, end)
    return found.group(1).decode("latin-1").lower() if found is not None else ""


# Either framing header, in any case (ASCII folding, as bytes.lower): one scan finds them all,
# where lowering a copy of the head and searching it for each name took three.
_FRAMING_NAME = re.compile(rb"\n(?:content-length|transfer-encoding):", re.I)
_TRANSFER_ENCODING_NAME_LENGTH = len(b"\ntransfer-encoding:")


def _framing(head: bytes, start: int, end: int) -> tuple[int, int]:
    """Body framing from the header lines in `head[start:end]`: (state, content length); length -1 is invalid.

    `start` is at a line's LF (or before the first line). `_HEAD` means neither Content-Length
    nor Transfer-Encoding is present.
    """
    name = _FRAMING_NAME.search(head, start, end)
    if name is None:
        return _HEAD, 0
    at = name.end()
    line_end = head.find(b"\n", at)
    if at - name.start() != _TRANSFER_ENCODING_NAME_LENGTH and _FRAMING_NAME.search(head, line_end, end) is None:
        # One plain Content-Length and no other framing header, the usual response: no lists.
        value = head[at:line_end].strip()
        if value.isdigit() and len(value) <= 18:
            return _BODY, int(value)
    transfer_encoding = -1  # where the last one's value starts: it decides
    content_lengths: list[int] = []  # where each one's value starts
    for name in _FRAMING_NAME.finditer(head, start, end):
        if name.end() - name.start() == _TRANSFER_ENCODING_NAME_LENGTH:
            transfer_encoding = name.end()
        else:
            content_lengths.append(name.end())
    if transfer_encoding >= 0:
        value = head[transfer_encoding : head.find(b"\n", transfer_encoding)].lower()
        if value.rsplit(b",", 1)[-1].strip() == b"chunked":
            return _CHUNK_SIZE, 0
        return _CLOSE_BODY, 0  # a coding we cannot frame: only the close ends it
    if not content_lengths:
        return _HEAD, 0
    length = -1
    for at in content_lengths:
        value = head[at : head.find(b"\n", at)].strip()
        if not value.isdigit():
            # A list of identical values is allowed (RFC 9110 §8.6), anything else is not.
            values = {item.strip() for item in value.split(b",")}
            if len(values) != 1:
                return _BODY, -1
            value = values.pop()
            if not value.isdigit():
                return _BODY, -1
        if len(value) > 18:
            return _BODY, -1
        this = int(value)
        if length >= 0 and this != length:
            return _BODY, -1
        length = this
    return _BODY, length


class RequestParser(_Parser):
    """Client → server bytes: request heads and bodies.

    `current` is the request whose body is still arriving, if any (its `body_bytes` are
    final only once it is complete; `body_so_far` has the running count).
    """

    __slots__ = ("_current", "_sink")

    _candidate = _REQUEST_CANDIDATE
    _first_line_crlf = _REQUEST_LINE_CRLF
    _prefix = _REQUEST_PREFIX
    _start = _METHOD_START
    _whole_head = _REQUEST_HEAD

    def __init__(
        self,
        sink: RequestSink,
        errors: dict[str, int],
        max_header_bytes: int = 32768,
        max_buffered_bytes: int = 65536,
        known: HeadTable | None = None,
    ) -> None:
        super().__init__(errors, max_header_bytes, max_buffered_bytes, known)
        self._sink = sink
        self._current: PendingRequest | None = None

    @property
    def current(self) -> PendingRequest | None:
        return self._current

    @property
    def body_so_far(self) -> int:
        return self._body_bytes

    def _first_line_error(self, line: bytes) -> str | None:
        if _REQUEST_LINE.fullmatch(line) is not None:
            return None
        if _METHOD_START.match(line) is not None and b" HTTP/1." in line:
            return "bad_request_line"
        return "not_http"

    def _read_head(self, data: bytes, start: int, end: int, framing_from: int, checked: int,
                   first: re.Match[bytes] | None) -> tuple[Any, ...] | int:
        newline = data.find(b"\n", start, end)
        if first is None:
            first = _REQUEST_LINE.fullmatch(data, start, newline)
            if first is None:
                self._fail(self._first_line_error(data[start:newline]) or "bad_request_line")
                return newline + 1 - start
        if not _header_fields_ok(data, newline + 1, checked, end):
            self._fail("bad_header")
            return _SKIP_HEAD
        framing, length = _framing(data, framing_from, end) if framing_from != _NO_FRAMING else _NO_BODY
        if framing == _CLOSE_BODY:  # RFC 9112 §6.3: a request must end in chunked
            self._fail("bad_header")
            return _SKIP_HEAD
        if length < 0:
            self._fail("bad_content_length")
            return _SKIP_HEAD
        method, target = first.group(1, 2)
        return method.decode("ascii"), target.decode("latin-1"), framing, length

    def _take_head(self, head: tuple[Any, ...], ts_ns: int) -> None:
        method, target, framing, length = head
        request = PendingRequest(method, target, self._head_ns)
        self._current = request
        self._sink.on_request(request)
        if method == "CONNECT":
            # What follows may be tunnel bytes; if the proxy refuses, the next request
            # is found by the lost-mode search without counting an error.
            self._current = None
            self._tentative = False
            self._state = _LOST
            self._lost_tail = b""
            return
        if framing == _HEAD:
            # No body: the request is complete with its head (what _after_head and _complete
            # would do, without their two calls on the usual GET).
            self._current = None
            self._tentative = False
            self._body_bytes = 0
            return
        self._after_head(framing, length, ts_ns)

    def _complete(self, ts_ns: int) -> None:
        current = self._current
        if current is not None:
            current.body_bytes = self._body_bytes
            self._current = None
        self._state = _HEAD

    def _on_lost(self) -> None:
        # A request whose head was parsed keeps waiting for its response: the server saw it.
        current = self._current
        if current is not None:
            current.body_bytes = self._body_bytes
            self._current = None

    def finish(self, graceful: bool = True) -> None:
        """The client closed its side: nothing more will come (`graceful` is for symmetry)."""
        self._on_lost()
        self.stop()


class ResponseParser(_Parser):
    """Server → client bytes: status lines, interim responses, bodies."""

    __slots__ = ("_in_response", "_last_data_ns", "_sink", "_status")

    _candidate = _STATUS_CANDIDATE
    _prefix = _STATUS_PREFIX
    _start = _STATUS_START
    _whole_head = _STATUS_HEAD

    def __init__(
        self,
        sink: ResponseSink,
        errors: dict[str, int],
        max_header_bytes: int = 32768,
        max_buffered_bytes: int = 65536,
        known: HeadTable | None = None,
    ) -> None:
        super().__init__(errors, max_header_bytes, max_buffered_bytes, known)
        self._sink = sink
        self._status = 0
        self._last_data_ns = 0
        self._in_response = False  # a final head was handed to the sink, not yet complete

    def _first_line_error(self, line: bytes) -> str | None:
        if _STATUS_LINE.fullmatch(line) is not None:
            return None
        return "bad_status_line" if line.startswith(b"HTTP/") else "not_http"

    def _read_head(self, data: bytes, start: int, end: int, framing_from: int, checked: int,
                   first: re.Match[bytes] | None) -> tuple[Any, ...] | int:
        newline = data.find(b"\n", start, end)
        if first is None:
            first = _STATUS_LINE.fullmatch(data, start, newline)
            if first is None:
                self._fail(self._first_line_error(data[start:newline]) or "bad_status_line")
                return newline + 1 - start
        if not _header_fields_ok(data, newline + 1, checked, end):
            self._fail("bad_header")
            return _SKIP_HEAD
        status = int(first.group(1))
        if status < 200 and status != 101:
            return status, _HEAD, 0, ""  # interim (100, 103): the final response follows
        framing, length = _framing(data, framing_from, end) if framing_from != _NO_FRAMING else _NO_BODY
        if framing == _HEAD:
            framing = _CLOSE_BODY
        if length < 0:
            self._fail("bad_content_length")
            return _SKIP_HEAD
        return status, framing, length, _upgrade_protocol(data, start, end) if status == 101 else ""

    def _take_head(self, head: tuple[Any, ...], ts_ns: int) -> None:
        status, framing, length, protocol = head
        if status < 200 and status != 101:
            self._tentative = False
            return
        method = self._sink.on_response_head(status, ts_ns)
        self._status = status
        self._in_response = True
        if status == 101 or (method == "CONNECT" and status < 300):
            self._in_response = False
            if protocol != "h2c":
                self._sink.on_response_complete(status, ts_ns, 0)
            self.stop()
            self._sink.on_upgrade(protocol)
            return
        if method == "HEAD" or status == 204 or status == 304:
            framing = _HEAD
        self._after_head(framing, length, ts_ns)

    def _complete(self, ts_ns: int) -> None:
        self._state = _HEAD
        if self._in_response:
            self._in_response = False
            self._sink.on_response_complete(self._status, ts_ns, self._body_bytes)

    def _close_body_seen(self, ts_ns: int) -> None:
        self._last_data_ns = ts_ns

    def _on_lost(self) -> None:
        self._in_response = False
        self._sink.on_response_lost()

    def finish(self, graceful: bool = True) -> None:
        """The server closed (or the flow is being dropped): end a close-delimited body.

        With `graceful` false (RST, capacity eviction), a body in progress is aborted.
        Any other message in progress is incomplete and reported lost.
        """
        state = self._state
        if state == _CLOSE_BODY and graceful:
            self._complete(self._last_data_ns)
        elif state == _DEAD or (state == _HEAD and self._head is None):
            pass
        else:
            self._on_lost()
        self.stop()
