"""HTTP/2 (RFC 9113) connections to exchanges: frames, HPACK, one exchange per stream.

`Http2Connection` stands in for the two HTTP/1 parsers of a connection once `flows` has
decided the connection speaks HTTP/2 (client preface, `Upgrade: h2c` + 101, or frames
seen on a connection joined mid-stream). Its `client` and `server` readers take in-order
bytes of each direction with the kernel timestamp of the segment that carried them, the
same interface as `http1.RequestParser`/`ResponseParser`.

Frames: the 9-byte header is read by hand (`struct`) rather than with hyperframe, which
builds an object per frame and copies every DATA payload; here DATA payloads are counted
by length and never copied, and only HEADERS, CONTINUATION, PUSH_PROMISE, SETTINGS,
RST_STREAM and the first 8 bytes of GOAWAY are buffered. PADDED and the PRIORITY flag of
HEADERS are stripped; PRIORITY, PING, WINDOW_UPDATE and unknown frame types are skipped.

Header blocks go through the `hpack` package, one decoder per direction, with their decoded
fields reused across connections wherever that is exact (`CachedDecoder`).

Exchanges: each client-initiated stream is one exchange: `:method`, `:path` (query cut as
`http1.normalise_target` does), the final `:status`, timed from the first byte of the
request's HEADERS frame to the last byte of the frame that ends the response (END_STREAM),
with request/response body sizes from DATA payloads (padding excluded). A stream with
content-type `application/grpc*` and a `/package.Service/Method` path also carries an
`RpcCall`, whose status code is the `grpc-status` of the trailers (or of a trailers-only
response).

- RST_STREAM (either side) on a stream whose response has not ended: the exchange is
  emitted with status `RESET_STATUS` (0, "no complete response"; never a success) and, for
  gRPC, `GRPC_STATUS_RESET` unless a `grpc-status` was already seen. A response that ends
  without `grpc-status` gets `GRPC_STATUS_MISSING`.
- GOAWAY from the server: client streams above its last-stream-id were never processed;
  they are dropped (reason "goaway"), the others continue.
- PUSH_PROMISE: server push is ignored (not an exchange: nobody asked for it), counted on
  `Http2Stats.push_promises`; its header block is still decoded to keep HPACK in step.

Connections joined mid-stream (opened before the exporter started): the HPACK dynamic
tables already hold entries we never saw. Each decoder starts empty anyway. An index into
the static table, a literal, or an entry added since we joined is resolved exactly as the
peer meant it (new entries are the newest, so their indices are the same in the real table
and ours); a reference to an older entry fails in `hpack`, and that stream is counted as
undecodable. After any failed block the decoder is replaced by an empty one, since the
fields after the failure may have added entries we did not record. No route or status is
ever guessed.

Bounded: open streams per connection (`max_streams`), a header block's size
(`max_header_block`), and the HPACK table size a peer may ask for (`max_header_table`).
Hitting one is counted in `Http2Stats.caps`. Malformed input is a counted parse error
(reasons below) after which the direction resyncs on a later segment that starts with
plausible frames, and the streams then open are dropped (reason "lost"):

- ``bad_preface``: the client preface was expected and something else came.
- ``bad_frame``: a frame that breaks RFC 9113 framing (stream 0 where a stream is needed,
  a CONTINUATION out of place, SETTINGS of a bad length, padding longer than the frame).
- ``bad_header_block``: HPACK could not decode a block on a direction seen from its start.
- ``truncated``: the capture cut bytes the reader needed (a frame header or header block).
"""

from __future__ import annotations

import struct
from itertools import islice
from typing import Final

from hpack import Decoder
from hpack.exceptions import HPACKError
from hpack.hpack import decode_integer

from exporter.core.http1 import PendingRequest, normalise_target
from exporter.core.model import Exchange, RpcCall

__all__ = [
    "BLOCKS",
    "CAPS",
    "FRAME_TYPES",
    "GRPC_STATUS_MISSING",
    "GRPC_STATUS_RESET",
    "PARSE_ERROR_REASONS",
    "PREFACE",
    "RESET_STATUS",
    "STREAM_DROP_REASONS",
    "BlockCache",
    "CachedDecoder",
    "Http2Connection",
    "Http2Limits",
    "Http2Stats",
    "looks_like_frames",
]

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
RESET_STATUS: Final = 0  # Exchange.status of a stream reset before its response ended
GRPC_STATUS_RESET: Final = "reset"  # rpc status of a gRPC stream reset without grpc-status
GRPC_STATUS_MISSING: Final = "missing"  # rpc status of a gRPC response that ended without one

PARSE_ERROR_REASONS: Final = ("bad_preface", "bad_frame", "bad_header_block", "truncated")
CAPS: Final = ("streams", "header_block", "header_table")
# Why a stream left without an exchange (besides being undecodable).
STREAM_DROP_REASONS: Final = ("lost", "cap", "goaway", "closed")

_DATA = 0x0
_HEADERS = 0x1
_PRIORITY = 0x2
_RST_STREAM = 0x3
_SETTINGS = 0x4
_PUSH_PROMISE = 0x5
_PING = 0x6
_GOAWAY = 0x7
_WINDOW_UPDATE = 0x8
_CONTINUATION = 0x9
FRAME_TYPES: Final = (
    "DATA", "HEADERS", "PRIORITY", "RST_STREAM", "SETTINGS", "PUSH_PROMISE", "PING", "GOAWAY",
    "WINDOW_UPDATE", "CONTINUATION", "unknown",
)

_END_STREAM = 0x1
_ACK = 0x1
_END_HEADERS = 0x4
_PADDED = 0x8
_PRIORITY_FLAG = 0x20

_SETTINGS_HEADER_TABLE_SIZE = 0x1
_HEADER = struct.Struct(">IBI")  # (length << 8 | type) as one word, then flags and stream
_FRAME_HEADER = 9
# A frame longer than this is taken as noise when looking for frames mid-stream: HTTP/1 text
# starts at 0x20 (over 2 MiB as a length), TLS records at 0x14 (1.3 MiB).
_PLAUSIBLE_LENGTH = 1 << 20
_GOAWAY_KEPT = 8  # last-stream-id and error code; debug data is skipped

# Reader units.
_U_HEADER = 0  # collecting a 9-byte frame header
_U_PAYLOAD = 1  # collecting a payload that is decoded
_U_SKIP = 2  # passing over payload bytes (DATA content, padding, frames we ignore)
_U_PAD_LENGTH = 3  # the pad-length byte of a padded DATA frame

_GRPC_CONTENT = b"application/grpc"
# Decoded header blocks remembered (BlockCache), for all connections together. A block counts
# 3x (its bytes + hpack's size of its fields, 32 bytes a field and the strings), about what
# Python holds for it (measured ~1.2 KB for a 92-byte browser-like request).
_BLOCK_CACHE_BYTES = 4 << 20
# A block that reads deeper into the dynamic table than this many entries (from before it) is
# decoded each time. Reuse compares every entry down to the deepest read: 64 cost ~1.2 µs,
# against 10-40 µs for hpack; a 4 KiB table (the default) rarely holds more than 64.
_BLOCK_DEPTH = 64
_STATIC_ENTRIES = 61  # RFC 7541 Appendix A; dynamic indices start after them


# Open streams per connection before the oldest is dropped (counted). Servers allow this many
# at once and more: nginx 128, Go's net/http 250, gRPC C-core no limit at all (grpcio clients
# then open hundreds), so the cap sits well above them; a stream's state is ~150 bytes.
DEFAULT_MAX_STREAMS = 1024
DEFAULT_MAX_HEADER_TABLE = 65536


class Http2Limits:
    """Per-connection caps (`flows.Limits` carries them from the configuration)."""

    __slots__ = ("max_header_block", "max_header_table", "max_streams")

    def __init__(self, max_streams: int = DEFAULT_MAX_STREAMS, max_header_block: int = 32768,
                 max_header_table: int = DEFAULT_MAX_HEADER_TABLE) -> None:
        self.max_streams = max_streams
        self.max_header_block = max_header_block
        self.max_header_table = max_header_table


class Http2Stats:
    """Counters the metrics layer reads at scrape time. Plain ints; never reset."""

    __slots__ = (
        "caps",
        "connections",
        "frames",
        "parse_errors",
        "push_promises",
        "reset_streams",
        "streams_dropped",
        "undecodable_streams",
    )

    def __init__(self) -> None:
        self.connections: dict[str, int] = {"prior_knowledge": 0, "upgrade": 0, "mid_stream": 0}
        self.frames = [0] * len(FRAME_TYPES)  # by type; the last slot is every unknown type
        self.parse_errors: dict[str, int] = dict.fromkeys(PARSE_ERROR_REASONS, 0)
        self.caps: dict[str, int] = dict.fromkeys(CAPS, 0)
        self.streams_dropped: dict[str, int] = dict.fromkeys(STREAM_DROP_REASONS, 0)
        self.undecodable_streams = 0
        self.reset_streams = 0
        self.push_promises = 0


def looks_like_frames(data: bytes | bytearray, start: int = 0) -> bool:
    """Whether `data[start:]` begins on a frame boundary: whole plausible frames, the last may run on.

    Used to find HTTP/2 on a connection joined mid-stream and to resync after a loss. Known
    frame types only, connection-level types on stream 0 and stream types off it, and at least
    one frame header complete.
    """
    end = len(data)
    pos = start
    if end - pos < _FRAME_HEADER:
        return False
    while end - pos >= _FRAME_HEADER:
        word, _, stream = _HEADER.unpack_from(data, pos)
        length = word >> 8
        kind = word & 0xFF
        if length >= _PLAUSIBLE_LENGTH or kind > _CONTINUATION or stream & 0x80000000:
            return False
        if (stream == 0) != (kind in (_SETTINGS, _PING, _GOAWAY)) and kind != _WINDOW_UPDATE:
            return False
        if (kind == _SETTINGS and length % 6) or (kind == _PING and length != 8) or (
                kind == _RST_STREAM and length != 4) or (kind == _WINDOW_UPDATE and length != 4):
            return False
        pos += _FRAME_HEADER + length
    return pos >= end or end - pos < _FRAME_HEADER


class _Decoded:
    """What decoding one header block gave, and what that depended on (see CachedDecoder)."""

    __slots__ = ("fields", "inserted", "inserted_size", "maxsize", "reads_table", "size", "snapshot")

    def __init__(self, fields: list[tuple[bytes, bytes]], inserted: tuple[tuple[bytes, bytes], ...],
                 reads_table: bool, snapshot: tuple[tuple[bytes, bytes], ...], maxsize: int) -> None:
        self.fields = fields
        self.inserted = inserted  # the entries the block adds to the table, oldest first
        self.reads_table = reads_table  # any dynamic index: the result depends on the table
        self.snapshot = snapshot  # the dynamic entries the block read, newest first, as they were
        self.maxsize = maxsize  # the table size then (it decides which entries survive insertions)
        self.size = sum(len(name) + len(value) + 32 for name, value in fields)  # as hpack counts it
        self.inserted_size = sum(len(name) + len(value) + 32 for name, value in inserted)


def _block_shape(block: bytes) -> tuple[bool, int, list[int]] | None:
    """(whether it reads any dynamic index; how many entries from before it, newest first; which fields insert).

    None: not worth remembering (a table size update, or more entries read than
    `_BLOCK_DEPTH`). Only the representations' prefixes and string lengths are read (RFC 7541
    section 6), with hpack's own integer decoder; strings are skipped, never decoded. Called
    on a block `hpack` has just decoded without error, so it is well formed.
    """
    view = memoryview(block)
    end = len(block)
    pos = 0
    field = 0
    reads_table = False
    depth = 0
    inserts: list[int] = []
    while pos < end:
        byte = block[pos]
        if byte & 0x80:  # indexed field
            index, used = decode_integer(view[pos:], 7)
            literal = False
        elif byte & 0x40:  # literal with incremental indexing
            index, used = decode_integer(view[pos:], 6)
            literal = True
        elif byte & 0x20:  # dynamic table size update
            return None
        else:  # literal without indexing, or never indexed
            index, used = decode_integer(view[pos:], 4)
            literal = True
        pos += used
        if index > _STATIC_ENTRIES:
            # Even an entry this block added depends on the table size (it may not have stayed).
            reads_table = True
            # The entries this block added so far sit in front of the older ones.
            depth = max(depth, index - _STATIC_ENTRIES - len(inserts))
            if depth > _BLOCK_DEPTH:
                return None
        if literal:
            for _ in range(1 if index else 2):  # the name, when not indexed, then the value
                length, used = decode_integer(view[pos:], 7)
                pos += used + length
            if byte & 0x40:
                inserts.append(field)
        field += 1
    return reads_table, depth, inserts


class BlockCache:
    """Decoded header blocks by their bytes, for every connection's `CachedDecoder` together.

    What is kept depends on a block's bytes and on the dynamic entries it read, never on the
    connection, so one cache serves them all (`BLOCKS`). Bounded by `capacity` bytes (counted
    as `_BLOCK_CACHE_BYTES` says); full, it starts again empty.
    """

    __slots__ = ("blocks", "capacity", "held")

    def __init__(self, capacity: int = _BLOCK_CACHE_BYTES) -> None:
        self.capacity = capacity
        self.held = 0
        self.blocks: dict[bytes, _Decoded] = {}

    def remember(self, block: bytes, decoded: _Decoded) -> None:
        old = self.blocks.pop(block, None)  # one that no longer matched the table it met
        if old is not None:
            self.held -= 3 * (len(block) + old.size)
        cost = 3 * (len(block) + decoded.size)
        if cost > self.capacity:
            return
        if self.held + cost > self.capacity:
            self.blocks.clear()
            self.held = 0
        self.blocks[block] = decoded
        self.held += cost


BLOCKS: Final = BlockCache()


class CachedDecoder:
    """One direction's `hpack.Decoder`, reusing the result of a block's bytes where that is exact.

    `hpack` costs ~10-40 µs a block (Huffman in Python), and blocks repeat: a client's requests,
    once its encoder has indexed them, are a few indices; nginx sends every connection the same
    response block, four literals with incremental indexing, until its `date` changes. A block's
    fields are a function of its bytes, of the dynamic entries it reads (as they were before it)
    and of the table size, which decides whether an entry survives the block's own insertions.
    So a block that reads no dynamic index is reused on its bytes alone, and one that does only
    while the entries it reads and the table size are those it was decoded with. On reuse its
    insertions are replayed into the table (`HeaderTable.add`, which also evicts), so that the
    table stays exactly the one `hpack` would have built, and what `hpack` checks at the end
    of a block is checked again (header list size, table size allowed). Anything else, and any
    block that fails a check, goes through `hpack.Decoder.decode`, which then raises as usual.

    The replay itself (~1.2 µs an entry) is skipped when it cannot change the table. The table
    holds the newest entries added since it was last emptied that fit in its size (an entry
    larger than the table empties it). So once one block's insertions, repeated back to back,
    have added more bytes than the table holds, the table is made of that block's entries alone,
    the same after each repetition, and one more leaves it as it is. Any other change to the
    table (another block that inserts, or any block decoded by `hpack`) starts the count again.
    And a block that passed its checks and left the table as it was passes them again until
    the table or the allowed size changes: it is then returned at once.

    The lists returned may be shared with other connections: read them, never change them.
    """

    __slots__ = ("_checked", "_last", "_repeated", "blocks", "decoder")

    def __init__(self, max_header_list_size: int, max_allowed_table_size: int,
                 blocks: BlockCache = BLOCKS) -> None:
        self.decoder = Decoder(max_header_list_size=max_header_list_size)
        self.decoder.max_allowed_table_size = max_allowed_table_size
        self.blocks = blocks
        self._last: _Decoded | None = None  # the last block that inserted, when reused ...
        self._repeated = 0  # ... and the bytes it inserted, back to back, since the count started
        self._checked: _Decoded | None = None  # a block that passed its checks, and the table unchanged since

    def allow_table_size(self, value: int) -> None:
        """The SETTINGS_HEADER_TABLE_SIZE the decoding side sent: the encoder's table may not outgrow it."""
        self.decoder.max_allowed_table_size = value
        self._checked = None

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """`hpack.Decoder.decode(block, raw=True)`: the same fields, the same table after it."""
        known = self.blocks.blocks.get(block)
        if known is not None:
            if known is self._checked:
                return known.fields  # checked against this very table, which has not changed since
            decoder = self.decoder
            table = decoder.header_table
            maxsize = table.maxsize
            if maxsize <= decoder.max_allowed_table_size and known.size <= decoder.max_header_list_size and (
                    not known.reads_table or (
                    maxsize == known.maxsize
                    and tuple(islice(table.dynamic_entries, len(known.snapshot))) == known.snapshot)):
                if known.inserted and (known is not self._last or self._repeated <= maxsize):
                    if known is not self._last:
                        self._last = known
                        self._repeated = 0
                    for name, value in known.inserted:
                        table.add(name, value)
                    self._repeated += known.inserted_size
                    self._checked = None
                else:
                    self._checked = known  # it leaves the table as it is: it will pass again
                return known.fields
        self._last = self._checked = None
        table = self.decoder.header_table
        maxsize = table.maxsize
        before = tuple(islice(table.dynamic_entries, _BLOCK_DEPTH))
        fields: list[tuple[bytes, bytes]] = self.decoder.decode(block, raw=True)  # type: ignore[assignment]
        shape = _block_shape(block)
        if shape is not None:
            reads_table, depth, inserts = shape
            inserted = tuple((fields[i][0], fields[i][1]) for i in inserts)
            self.blocks.remember(block, _Decoded(fields, inserted, reads_table, before[:depth], maxsize))
        return fields


def _read_request(fields: list[tuple[bytes, bytes]]) -> tuple[str, str, str, str] | None:
    """(method, target, gRPC service, gRPC method) of a request's fields; None when malformed."""
    method = path = authority = content_type = b""
    for name, value in fields:
        if name == b":method":
            method = value
        elif name == b":path":
            path = value
        elif name == b":authority":
            authority = value
        elif name == b"content-type":
            content_type = value
    if not path and method == b"CONNECT":
        path = authority  # authority-form, as HTTP/1 reports a CONNECT target
    if not method or not path:
        return None
    target = path.decode("latin-1")
    service = rpc_method = ""
    if content_type.startswith(_GRPC_CONTENT) and target[0] == "/":
        service, _, rpc_method = target.partition("?")[0][1:].rpartition("/")
        if not service or not rpc_method:
            service = rpc_method = ""
    return method.decode("latin-1"), normalise_target(target), service, rpc_method


def _read_response(fields: list[tuple[bytes, bytes]]) -> tuple[int, str | None]:
    """(the block's first final :status, 0 if none; its last grpc-status, None if none)."""
    status = 0
    grpc_status = None
    for name, value in fields:
        if name == b":status":
            if not status and len(value) == 3 and value.isdigit():
                code = int(value)
                if code >= 200:
                    status = code
        elif name == b"grpc-status":
            grpc_status = value.decode("latin-1")
    return status, grpc_status


class _Stream:
    """One stream: its request, and what the response has shown so far."""

    __slots__ = (
        "grpc_status",
        "known",
        "method",
        "request_body",
        "response_body",
        "rpc_method",
        "service",
        "start_ns",
        "status",
        "target",
    )

    def __init__(self, method: str, target: str, start_ns: int, known: bool = True, service: str = "",
                 rpc_method: str = "") -> None:
        self.known = known  # False: a tombstone; frames are consumed, nothing is emitted
        self.method = method
        self.target = target
        self.start_ns = start_ns
        self.status = 0  # the final :status once seen
        self.request_body = 0
        self.response_body = 0
        self.service = service  # set for gRPC
        self.rpc_method = rpc_method
        self.grpc_status = ""


class Http2Connection:
    """Both directions of one HTTP/2 connection, and its streams."""

    __slots__ = (
        "answered",
        "client",
        "counted",
        "emitted",
        "last_client_stream",
        "limits",
        "parsed",
        "scheme",
        "server",
        "server_ip",
        "server_port",
        "stats",
        "streams",
    )

    def __init__(
        self,
        server_port: int,
        emitted: list[Exchange],
        stats: Http2Stats,
        limits: Http2Limits,
        scheme: str = "http",
        upgraded: PendingRequest | None = None,
        upgraded_body: int = 0,
        server_ip: str = "",
    ) -> None:
        """`upgraded`: the HTTP/1.1 request that switched with `Upgrade: h2c`; it becomes stream 1."""
        self.server_port = server_port
        self.server_ip = server_ip  # names the server (identity/) beside its port
        self.emitted = emitted
        self.stats = stats
        self.limits = limits
        self.scheme = scheme
        self.streams: dict[int, _Stream] = {}
        self.last_client_stream = 0
        self.counted = False  # counted in stats.connections
        # The last request and response blocks read, and what they said: a block decoded from the
        # cache is the same list as the last time (CachedDecoder), and is read once.
        self.parsed: tuple[list[tuple[bytes, bytes]], tuple[str, str, str, str] | None] | None = None
        self.answered: tuple[list[tuple[bytes, bytes]], tuple[int, str | None]] | None = None
        self.client = _Reader(self, True)
        self.server = _Reader(self, False)
        if upgraded is not None:
            stream = _Stream(upgraded.method, normalise_target(upgraded.target), upgraded.start_ns)
            stream.request_body = upgraded_body
            self.streams[1] = stream
            self.last_client_stream = 1
            self.server.synced = True  # the server's frames start right after the 101
            self.count("upgrade")

    def count(self, how: str) -> None:
        if not self.counted:
            self.counted = True
            self.stats.connections[how] += 1

    # -- streams -------------------------------------------------------------------------

    def drop_all(self, reason: str) -> None:
        """Every open stream leaves without an exchange (a loss, or the connection ended)."""
        streams = self.streams
        dropped = self.stats.streams_dropped
        for stream in streams.values():
            if stream.known:
                dropped[reason] += 1
        streams.clear()

    def open_stream(self, stream_id: int, stream: _Stream) -> None:
        streams = self.streams
        if len(streams) >= self.limits.max_streams:
            self.stats.caps["streams"] += 1
            oldest = next(iter(streams))
            if streams.pop(oldest).known:
                self.stats.streams_dropped["cap"] += 1
        streams[stream_id] = stream
        if stream_id > self.last_client_stream:
            self.last_client_stream = stream_id

    def request_headers(self, stream_id: int, fields: list[tuple[bytes, bytes]] | None, end_stream: bool,
                        start_ns: int) -> None:
        if stream_id <= self.last_client_stream:
            return  # request trailers (open streams are never above it), or a stream already done
        if fields is None:
            self.stats.undecodable_streams += 1
            self.open_stream(stream_id, _Stream("", "", start_ns, known=False))
            return
        parsed = self.parsed
        if parsed is not None and parsed[0] is fields:
            request = parsed[1]  # the same block as the last request: decoded once, read once
        else:
            request = _read_request(fields)
            self.parsed = (fields, request)
        if request is None:
            self.stats.undecodable_streams += 1  # malformed request: no route to give it
            self.open_stream(stream_id, _Stream("", "", start_ns, known=False))
            return
        method, target, service, rpc_method = request
        self.open_stream(stream_id, _Stream(method, target, start_ns, True, service, rpc_method))

    def response_headers(self, stream_id: int, fields: list[tuple[bytes, bytes]] | None, end_stream: bool,
                         end_ns: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id & 1 and stream_id > self.last_client_stream:
                # A response to a request sent before we joined: its route is unknown.
                self.stats.undecodable_streams += 1
                if not end_stream:
                    self.open_stream(stream_id, _Stream("", "", 0, known=False))
                else:
                    self.last_client_stream = stream_id
            return  # a pushed stream, or one already dropped and counted
        if not stream.known:
            if end_stream:
                del self.streams[stream_id]
            return
        if fields is None:
            self.stats.undecodable_streams += 1
            stream.known = False
            if end_stream:
                del self.streams[stream_id]
            return
        answered = self.answered
        if answered is not None and answered[0] is fields:
            status, grpc_status = answered[1]  # the same block as the last response: read once
        else:
            status, grpc_status = _read_response(fields)
            self.answered = (fields, (status, grpc_status))
        if status and not stream.status:
            stream.status = status
        if grpc_status is not None:
            stream.grpc_status = grpc_status
        if end_stream:
            self.complete(stream_id, stream, end_ns)

    def complete(self, stream_id: int, stream: _Stream, end_ns: int) -> None:
        del self.streams[stream_id]
        if not stream.known:
            return
        if stream.status == 0:
            self.stats.undecodable_streams += 1  # ended without a final :status: never guess one
            return
        rpc = None
        if stream.service:
            rpc = RpcCall("grpc", stream.service, stream.rpc_method, stream.grpc_status or GRPC_STATUS_MISSING)
        self.emitted.append(Exchange(
            stream.method, stream.target, stream.status, stream.start_ns, end_ns, stream.request_body,
            stream.response_body, self.server_port, self.scheme, "2", rpc, server_ip=self.server_ip,
        ))

    def reset(self, stream_id: int, end_ns: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None or not stream.known:
            return
        self.stats.reset_streams += 1
        rpc = None
        if stream.service:
            rpc = RpcCall("grpc", stream.service, stream.rpc_method, stream.grpc_status or GRPC_STATUS_RESET)
        self.emitted.append(Exchange(
            stream.method, stream.target, RESET_STATUS, stream.start_ns, end_ns, stream.request_body,
            stream.response_body, self.server_port, self.scheme, "2", rpc, server_ip=self.server_ip,
        ))

    def goaway(self, last_stream_id: int) -> None:
        """The server will not process client streams above `last_stream_id`."""
        streams = self.streams
        for stream_id in [s for s in streams if s > last_stream_id and s & 1]:
            if streams.pop(stream_id).known:
                self.stats.streams_dropped["goaway"] += 1

    def data_frame(self, to_server: bool, stream_id: int, size: int, end_stream: int, end_ns: int) -> None:
        """A whole DATA frame without padding: `size` body bytes, the last of it at `end_ns`."""
        stream = self.streams.get(stream_id)
        if stream is not None:
            if to_server:
                stream.request_body += size  # the end of the request: the exchange ends with the response
            else:
                stream.response_body += size
                if end_stream:
                    self.complete(stream_id, stream, end_ns)

    def data(self, to_server: bool, stream_id: int, size: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            if to_server:
                stream.request_body += size
            else:
                stream.response_body += size

    def data_end(self, to_server: bool, stream_id: int, end_ns: int) -> None:
        if to_server:
            return  # the request ended; the exchange ends with the response
        stream = self.streams.get(stream_id)
        if stream is not None:
            self.complete(stream_id, stream, end_ns)

    def close(self) -> None:
        """The connection ended (or was evicted): streams still open get no exchange."""
        self.drop_all("closed")
        self.client.stop()
        self.server.stop()


class _Reader:
    """One direction's frames: the parser interface `flows` drives (feed, lose, stop, ...)."""

    __slots__ = (
        "_block",
        "_block_end_stream",
        "_block_ns",
        "_block_over",
        "_block_push",
        "_block_stream",
        "_buf",
        "_conn",
        "_decoder",
        "_flags",
        "_frame_ns",
        "_kind",
        "_left",
        "_pad",
        "_stream",
        "_to_server",
        "_unit",
        "_want",
        "alive",
        "seen_start",
        "started",
        "synced",
    )

    def __init__(self, conn: Http2Connection, to_server: bool) -> None:
        self._conn = conn
        self._to_server = to_server
        self.alive = True
        self.synced = False  # at a frame boundary we trust
        self.seen_start = False  # HPACK state known: this direction was read from its first frame
        self.started = False  # any byte fed yet
        self._decoder = self._new_decoder()
        self._unit = _U_HEADER
        self._buf = bytearray()
        self._want = _FRAME_HEADER
        self._left = 0  # _U_SKIP: bytes to pass over
        self._kind = 0
        self._flags = 0
        self._stream = 0
        self._pad = 0  # padding at the end of the current frame, inside _left
        self._frame_ns = 0
        self._block: bytearray | None = None  # a header block waiting for CONTINUATION
        self._block_stream = 0
        self._block_end_stream = False
        self._block_ns = 0
        self._block_push = False
        self._block_over = False  # the block outgrew max_header_block: it will not be decoded

    def _new_decoder(self) -> CachedDecoder:
        limits = self._conn.limits
        return CachedDecoder(limits.max_header_block, limits.max_header_table)

    # -- the parser interface flows uses -------------------------------------------------

    @property
    def opaque_bytes(self) -> int:
        return 0  # never ask the kernel to cut bytes: frame headers sit anywhere in the stream

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf) + (len(self._block) if self._block is not None else 0)

    def stop(self) -> None:
        self.alive = False
        self._buf = bytearray()
        self._block = None

    def finish(self, graceful: bool = True) -> None:
        self.stop()

    def lose(self) -> None:
        """Bytes are missing before the next ones: framing and HPACK state are both gone."""
        if not self.alive:
            return
        self.synced = False
        self.seen_start = False
        self._unit = _U_HEADER
        self._want = _FRAME_HEADER
        self._buf = bytearray()
        self._block = None
        self._decoder = self._new_decoder()
        self._conn.drop_all("lost")

    def _error(self, reason: str) -> None:
        self._conn.stats.parse_errors[reason] += 1
        self.lose()

    def feed(self, data: bytes, ts_ns: int, missing: int = 0) -> None:
        if not self.alive:
            return
        first = not self.started or bool(self._buf)  # the direction's first bytes (a cut preface included)
        self.started = True
        pos = 0
        end = len(data)
        if not self.synced:
            if self._to_server and (self._buf or PREFACE.startswith(data[:len(PREFACE)])):
                data = bytes(self._buf) + data  # a preface cut by the segment end
                if len(data) < len(PREFACE) and PREFACE.startswith(data):
                    self._buf = bytearray(data)
                    return
                self._buf = bytearray()
                end = len(data)
            if self._to_server and data.startswith(PREFACE):
                pos = len(PREFACE)
                self._conn.count("prior_knowledge")
                self.seen_start = True
                server = self._conn.server
                if not server.started:
                    # The server's first byte is then the start of its frames, and of its HPACK state.
                    server.synced = server.seen_start = True
            elif self._to_server and first and data[:4] == PREFACE[:4]:
                self._conn.stats.parse_errors["bad_preface"] += 1  # e.g. after a 101 to h2c
                self.stop()
                return
            elif not looks_like_frames(data):
                return  # not at a frame boundary yet (joined mid-stream, or after a loss)
            elif self._to_server:
                self._conn.count("mid_stream")
            elif self._conn.client.seen_start:
                # After a client preface, a server's first frame is SETTINGS: if that is what we
                # see, its HPACK state starts here too (a failed block is then an error).
                self.seen_start = data[3] == _SETTINGS and not data[4] & _ACK
            self.synced = True
        if self._unit == _U_HEADER and not self._buf and self._block is None:
            # The common case: whole frames in this segment, outside a header block. DATA and
            # single-frame HEADERS are read here without the reader's units; at anything else, and
            # at any check that fails, the general loop below takes over.
            conn = self._conn
            frames = conn.stats.frames
            max_block = conn.limits.max_header_block
            while end - pos >= _FRAME_HEADER:
                word, flags, stream = _HEADER.unpack_from(data, pos)
                after = pos + _FRAME_HEADER + (word >> 8)
                kind = word & 0xFF
                stream &= 0x7FFFFFFF
                if after > end or not stream:
                    break
                if kind == _DATA and not flags & _PADDED:
                    frames[_DATA] += 1
                    conn.data_frame(self._to_server, stream, after - pos - _FRAME_HEADER, flags & _END_STREAM, ts_ns)
                elif kind == _HEADERS and flags & _END_HEADERS and after - pos - _FRAME_HEADER <= max_block:
                    frames[_HEADERS] += 1
                    if flags & (_PADDED | _PRIORITY_FLAG):
                        self._headers(_HEADERS, flags, stream, data[pos + _FRAME_HEADER:after], ts_ns, ts_ns)
                        if not self.synced:
                            return  # an error: resync on a later segment
                    else:
                        self._apply_block(data[pos + _FRAME_HEADER:after], stream, bool(flags & _END_STREAM),
                                          False, ts_ns, ts_ns)
                else:
                    break
                pos = after
        while pos < end:
            unit = self._unit
            if unit == _U_SKIP:
                left = self._left
                take = end - pos
                if take < left:
                    self._left = left - take
                    if self._kind == _DATA:
                        self._count_data(take)
                    break
                pos += left
                self._left = 0
                if self._kind == _DATA:
                    self._count_data(left)
                self._frame_done(ts_ns)
                continue
            buf = self._buf
            want = self._want
            if not buf and end - pos >= want:
                chunk = data[pos:pos + want] if unit != _U_HEADER else data
                start = 0 if unit != _U_HEADER else pos
                if unit == _U_HEADER:
                    self._frame_ns = ts_ns
                pos += want
            else:
                if not buf and unit == _U_HEADER:
                    self._frame_ns = ts_ns
                take = min(want - len(buf), end - pos)
                buf += data[pos:pos + take]
                pos += take
                if len(buf) < want:
                    break
                chunk = bytes(buf)
                start = 0
                self._buf = bytearray()
            if unit == _U_HEADER:
                self._on_header(chunk, start, ts_ns)
            elif unit == _U_PAD_LENGTH:
                self._on_pad_length(chunk[start], ts_ns)
            else:
                self._on_payload(chunk, ts_ns)
            if not self.synced:
                return  # an error: resync on a later segment
        if missing:
            self._missing(missing, ts_ns)

    def _missing(self, missing: int, ts_ns: int) -> None:
        """Bytes the capture cut: fine inside DATA or skipped payload, fatal anywhere else."""
        if self._unit == _U_SKIP and missing <= self._left:
            self._left -= missing
            if self._kind == _DATA:
                self._count_data(missing)
            if self._left == 0:
                self._frame_done(ts_ns)
            return
        self._error("truncated")

    # -- frames --------------------------------------------------------------------------

    def _on_header(self, data: bytes, pos: int, ts_ns: int) -> None:
        word, flags, stream = _HEADER.unpack_from(data, pos)
        length = word >> 8
        kind = word & 0xFF
        stream &= 0x7FFFFFFF
        self._kind = kind
        self._flags = flags
        self._stream = stream
        self._pad = 0
        stats = self._conn.stats
        stats.frames[kind if kind <= _CONTINUATION else -1] += 1
        if self._block is not None and (kind != _CONTINUATION or stream != self._block_stream):
            return self._error("bad_frame")  # nothing may sit between HEADERS and its CONTINUATIONs
        if kind == _DATA:
            if stream == 0:
                return self._error("bad_frame")
            if flags & _PADDED:
                if length == 0:
                    return self._error("bad_frame")
                self._left = length - 1
                self._unit, self._want = _U_PAD_LENGTH, 1
                return None
            self._left = length
            self._unit = _U_SKIP
            if length == 0:
                self._frame_done(ts_ns)
            return None
        if kind in (_HEADERS, _CONTINUATION, _PUSH_PROMISE):
            if stream == 0 or (kind == _CONTINUATION and self._block is None):
                return self._error("bad_frame")
            if (self._block is not None and len(self._block) + length > self._conn.limits.max_header_block) or (
                    length > self._conn.limits.max_header_block):
                # Too large to hold: skip it, and the block will count as undecodable.
                if not self._block_over:
                    stats.caps["header_block"] += 1
                self._block_over = True
                if kind != _CONTINUATION:
                    self._start_block(stream, flags, kind, self._frame_ns)
                self._left = length
                self._unit = _U_SKIP
                if length == 0:
                    self._frame_done(ts_ns)
                return None
        elif kind == _SETTINGS:
            if stream != 0 or length % 6:
                return self._error("bad_frame")
            if flags & _ACK:
                self._left = length
                self._unit = _U_SKIP
                if length == 0:
                    self._frame_done(ts_ns)
                return None
        elif kind == _RST_STREAM:
            if stream == 0 or length != 4:
                return self._error("bad_frame")
        elif kind == _GOAWAY:
            if stream != 0 or length < _GOAWAY_KEPT:
                return self._error("bad_frame")
            self._left = length - _GOAWAY_KEPT  # debug data, skipped after the payload
            self._unit, self._want = _U_PAYLOAD, _GOAWAY_KEPT
            return None
        else:
            self._left = length  # PRIORITY, PING, WINDOW_UPDATE, unknown: nothing to learn
            self._unit = _U_SKIP
            if length == 0:
                self._frame_done(ts_ns)
            return None
        self._left = 0
        if length == 0:
            self._unit = _U_HEADER
            self._want = _FRAME_HEADER
            self._on_payload(b"", ts_ns)
            return None
        self._unit, self._want = _U_PAYLOAD, length
        return None

    def _on_pad_length(self, pad: int, ts_ns: int) -> None:
        if pad > self._left:
            self._error("bad_frame")
            return
        self._pad = pad
        self._unit = _U_SKIP
        self._want = _FRAME_HEADER
        if self._left == 0:
            self._frame_done(ts_ns)

    def _count_data(self, size: int) -> None:
        """`size` more DATA payload bytes, `_left` still to come: padding is the frame's last `_pad`."""
        body = size
        padding_here = self._pad - self._left
        if padding_here > 0:
            body -= min(size, padding_here)
        if body:
            self._conn.data(self._to_server, self._stream, body)

    def _frame_done(self, ts_ns: int) -> None:
        """The last byte of a skipped or counted frame arrived at `ts_ns`."""
        self._unit = _U_HEADER
        self._want = _FRAME_HEADER
        kind = self._kind
        if kind == _DATA:
            if self._flags & _END_STREAM:
                self._conn.data_end(self._to_server, self._stream, ts_ns)
        elif kind in (_HEADERS, _CONTINUATION, _PUSH_PROMISE) and self._block_over:
            if self._flags & _END_HEADERS:
                self._end_block(None, ts_ns)

    def _on_payload(self, payload: bytes, ts_ns: int) -> None:
        kind = self._kind
        self._unit = _U_HEADER
        self._want = _FRAME_HEADER
        if kind == _HEADERS or kind == _PUSH_PROMISE:
            self._headers(kind, self._flags, self._stream, payload, self._frame_ns, ts_ns)
        elif kind == _CONTINUATION:
            assert self._block is not None
            self._block += payload
            if self._flags & _END_HEADERS:
                self._end_block(bytes(self._block), ts_ns)
        elif kind == _SETTINGS:
            for at in range(0, len(payload), 6):
                ident, value = struct.unpack_from(">HI", payload, at)
                if ident == _SETTINGS_HEADER_TABLE_SIZE:
                    self._table_size_setting(value)
        elif kind == _RST_STREAM:
            self._conn.reset(self._stream, ts_ns)
        elif kind == _GOAWAY:
            last_stream = struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF
            if not self._to_server:
                self._conn.goaway(last_stream)
            if self._left:
                self._kind = _PING  # skip the debug data as a frame of no interest
                self._unit = _U_SKIP
        return None

    def _table_size_setting(self, value: int) -> None:
        """This side's SETTINGS_HEADER_TABLE_SIZE bounds the table the *other* side encodes with."""
        conn = self._conn
        other = conn.server if self._to_server else conn.client
        cap = conn.limits.max_header_table
        if value > cap:
            conn.stats.caps["header_table"] += 1
            value = cap
        other._decoder.allow_table_size(value)

    def _headers(self, kind: int, flags: int, stream: int, payload: bytes, frame_ns: int, ts_ns: int) -> None:
        """The payload of a HEADERS or PUSH_PROMISE frame that began at `frame_ns` and ended at `ts_ns`."""
        start = 0
        end = len(payload)
        if flags & _PADDED:
            if not payload or payload[0] >= end:
                return self._error("bad_frame")
            end -= payload[0]
            start = 1
        if kind == _HEADERS and flags & _PRIORITY_FLAG:
            start += 5
        elif kind == _PUSH_PROMISE:
            start += 4  # the promised stream id
            self._conn.stats.push_promises += 1
        if start > end:
            return self._error("bad_frame")
        block = payload[start:end] if start or end < len(payload) else payload
        if flags & _END_HEADERS:  # the usual case: the whole block in this one frame
            self._apply_block(block, stream, bool(flags & _END_STREAM) and kind == _HEADERS, kind == _PUSH_PROMISE,
                              frame_ns, ts_ns)
            return None
        self._start_block(stream, flags, kind, frame_ns)
        assert self._block is not None
        self._block += block
        return None

    def _start_block(self, stream: int, flags: int, kind: int, frame_ns: int) -> None:
        """A header block that goes on in CONTINUATION frames (or that is too large to hold)."""
        self._block = bytearray()
        self._block_stream = stream
        self._block_end_stream = bool(flags & _END_STREAM) and kind == _HEADERS
        self._block_ns = frame_ns
        self._block_push = kind == _PUSH_PROMISE

    def _end_block(self, block: bytes | None, ts_ns: int) -> None:
        """The last frame of a block started by `_start_block`; None: it was too large to hold."""
        self._block = None
        over = self._block_over
        self._block_over = False
        self._apply_block(None if over else block, self._block_stream, self._block_end_stream, self._block_push,
                          self._block_ns, ts_ns)

    def _apply_block(self, block: bytes | None, stream: int, end_stream: bool, push: bool, start_ns: int,
                     ts_ns: int) -> None:
        """A whole header block: decode it (always, to keep HPACK in step) and apply it."""
        fields: list[tuple[bytes, bytes]] | None = None
        if block is not None:
            try:
                fields = self._decoder.decode(block)
            except (HPACKError, IndexError, ValueError, TypeError):
                if self.seen_start:
                    self._conn.stats.parse_errors["bad_header_block"] += 1
                # Fields after the failure may have added entries we missed: start empty, and
                # resolve only what can be resolved exactly from here on.
                self._decoder = self._new_decoder()
                self.seen_start = False
        else:
            self._decoder = self._new_decoder()  # the block skipped may have changed the table
            self.seen_start = False
        if push:
            return
        if self._to_server:
            self._conn.request_headers(stream, fields, end_stream, start_ns)
        else:
            self._conn.response_headers(stream, fields, end_stream, ts_ns)
