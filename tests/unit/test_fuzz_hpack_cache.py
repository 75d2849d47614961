"""CachedDecoder against plain `hpack.Decoder`: the same fields, the same errors, the same table.

Two connections share one BlockCache, as every connection does in the exporter, and each is
checked against a plain decoder fed the same blocks. The blocks come from `hpack.Encoder`
(incremental indexing, references to dynamic entries, never-indexed fields, table size updates,
evictions in small tables, entries larger than the table), and from steps that break the
encoder's assumptions: a block sent again, the last or an earlier one (its insertions land
twice, its indices may now name other entries), another connection's block (its dynamic
indices mean other entries here), a smaller allowed table size, a smaller header list limit
on one connection than on the other, and decoders that start again empty while the encoder
goes on (a connection joined mid-stream).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hpack import Decoder, Encoder, HPACKError, NeverIndexedHeaderTuple
from hypothesis import given
from hypothesis import strategies as st

from exporter.core.http2 import BlockCache, CachedDecoder
from tests.unit.fuzz_settings import fuzz

NAMES = [":path", ":status", "date", "server", "content-type", "x-a", "x-b"]
VALUES = ["/", "/a", "200", "ok", "nginx/1.22.1", "Mon, 30 Nov 2026 20:21:40 GMT", "v" * 90, "w" * 300]
TABLE_SIZES = [0, 40, 64, 128, 256, 4096]
LIST_LIMITS = (65536, 400)  # per connection: a block within one may exceed the other


@dataclass(frozen=True)
class Field:
    name: str
    value: str
    sensitive: bool


steps = st.lists(st.one_of(
    st.tuples(st.just("block"), st.integers(0, 1), st.lists(
        st.builds(Field, st.sampled_from(NAMES), st.sampled_from(VALUES), st.integers(0, 9).map(lambda n: n == 0)),
        min_size=1, max_size=5)),
    st.tuples(st.just("again"), st.integers(0, 1), st.tuples(st.integers(0, 3), st.integers(1, 30))),
    st.tuples(st.just("other"), st.integers(0, 1), st.just(0)),
    st.tuples(st.just("resize"), st.integers(0, 1), st.sampled_from(TABLE_SIZES)),
    st.tuples(st.just("allow"), st.integers(0, 1), st.sampled_from(TABLE_SIZES)),
    st.tuples(st.just("rejoin"), st.integers(0, 1), st.just(0)),
), min_size=1, max_size=40)


class Side:
    """One connection's direction: an encoder, a plain decoder and a cached one."""

    def __init__(self, limit: int, cache: BlockCache) -> None:
        self.limit = limit
        self.cache = cache
        self.encoder = Encoder()
        self.sent: list[bytes] = []
        self.allowed = 4096
        self.plain, self.cached = self.decoders()

    def decoders(self) -> tuple[Decoder, CachedDecoder]:
        plain = Decoder(max_header_list_size=self.limit)
        plain.max_allowed_table_size = self.allowed
        return plain, CachedDecoder(self.limit, self.allowed, self.cache)

    def feed(self, block: bytes) -> None:
        try:
            want: object = self.plain.decode(block, raw=True)
        except (HPACKError, IndexError, ValueError) as exc:
            want = type(exc)
        try:
            got: object = self.cached.decode(block)
        except (HPACKError, IndexError, ValueError) as exc:
            got = type(exc)
        assert got == want
        if isinstance(want, type):
            # As the reader does after a failed block: both start again from an empty table.
            self.plain, self.cached = self.decoders()
        self.check_tables()
        assert self.cache.held <= self.cache.capacity
        assert self.cache.held == sum(3 * (len(b) + d.size) for b, d in self.cache.blocks.items())

    def check_tables(self) -> None:
        mine, theirs = self.cached.decoder.header_table, self.plain.header_table
        assert list(mine.dynamic_entries) == list(theirs.dynamic_entries)
        assert mine.maxsize == theirs.maxsize
        assert mine._current_size == theirs._current_size


@fuzz(400)
@given(steps)
def test_cached_decoder_agrees_with_hpack(script: list[tuple[str, int, object]]) -> None:
    cache = BlockCache(capacity=8192)  # small: also exercises starting again when full
    sides = [Side(limit, cache) for limit in LIST_LIMITS]
    for kind, which, arg in script:
        side = sides[which]
        if kind == "block":
            assert isinstance(arg, list)
            headers = [NeverIndexedHeaderTuple(f.name, f.value) if f.sensitive else (f.name, f.value) for f in arg]
            side.sent.append(side.encoder.encode(headers))
            side.feed(side.sent[-1])
        elif kind == "again" and side.sent:
            assert isinstance(arg, tuple)
            back, times = arg
            block = side.sent[-1 - back % len(side.sent)]  # the last block, or one before it
            for _ in range(times):  # back to back: also reaches the point where replays stop
                side.feed(block)
        elif kind == "other" and sides[1 - which].sent:
            side.feed(sides[1 - which].sent[-1])
        elif kind == "resize":
            assert isinstance(arg, int)
            side.encoder.header_table_size = arg  # a size update at the start of its next block
        elif kind == "rejoin":
            # Empty decoders while the encoder keeps its table: a connection joined mid-stream.
            side.plain, side.cached = side.decoders()
        elif kind == "allow":
            assert isinstance(arg, int)
            side.allowed = arg
            side.plain.max_allowed_table_size = arg
            side.cached.allow_table_size(arg)


@pytest.mark.parametrize("fields", [
    [("x-a", "v" * 90), ("x-a", "v" * 90)],  # a literal that inserts, then index 62: the entry just added
    [(":path", "/a"), (":status", "/"), (":status", "/")],  # two insertions, then index 62 (found by the fuzz)
])
def test_a_block_reading_its_own_insertion_depends_on_the_table_size(fields: list[tuple[str, str]]) -> None:
    block = Encoder().encode(fields)
    cache = BlockCache()
    big = Side(65536, cache)
    big.feed(block)
    small = Side(65536, cache)
    small.plain.header_table_size = small.cached.decoder.header_table_size = 0  # nothing it adds stays
    small.feed(block)  # hpack fails (index 62 is empty): so must the cache


def test_a_block_repeated_back_to_back_stops_replaying_and_keeps_the_table() -> None:
    response = Encoder().encode([(":status", "200"), ("server", "nginx/1.22.1"),
                                 ("date", "Mon, 30 Nov 2026 20:21:40 GMT")])
    side = Side(65536, BlockCache())
    for _ in range(200):
        side.feed(response)
    assert side.cached._repeated > side.cached.decoder.header_table.maxsize  # replays stopped
    other = Encoder().encode([("server", "other")])
    side.feed(other)  # another insertion starts the count again
    for _ in range(3):
        side.feed(response)
    assert 0 < side.cached._repeated <= side.cached.decoder.header_table.maxsize
