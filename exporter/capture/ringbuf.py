"""Read a BPF ring buffer (BPF_MAP_TYPE_RINGBUF) by mmap, without BCC or libbpf.

The exporter never imports BCC (see bpf_loader.py), so this is the consumer half of
libbpf's ring_buffer__poll, written against the kernel's layout (kernel/bpf/ringbuf.c):

    offset 0          one page, read-write: the consumer position (u64)
    offset PAGE       one page, read-only: the producer position (u64)
    offset 2 * PAGE   the data area, max_entries bytes

The kernel offers the data area twice in a row (a record that wraps around is then
contiguous), and maps every page of it at mmap time: each copy counts in full in our RSS.
We map it once and join a wrapped record's two pieces, which halves what the ring adds.

Each record starts with an 8-byte header: u32 length (bit 31: still being written,
bit 30: discarded) and u32 page offset; records are padded to 8 bytes. x86-64 and arm64
loads here are ordered enough for this: the producer position is published after the
record's header, and a header still marked busy stops the scan.

What a read gives is a *span*: the committed records since the last read, copied out in
one piece, headers, padding and discarded records included (`records_of` lists its
records; a reader that walks it itself, as capture/tls.py does, skips one Python object
and one copy per record: the copying thread's cost fell from 0.62 to 0.21 µs per record).
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import threading
import time
from collections import deque
from collections.abc import Callable

from exporter.errors import CaptureError

__all__ = ["DISCARD", "HEADER", "LENGTH", "DrainedRing", "RingBuffer", "records_of", "span_of"]

_BUSY = 1 << 31
DISCARD = 1 << 30  # a record's header: discarded by the producer, skip it
LENGTH = DISCARD - 1  # a record's header: its length
HEADER = 8  # bytes of a record's header; a record takes (HEADER + length) rounded up to 8
_U64 = struct.Struct("=Q")
_U32 = struct.Struct("=I")


class RingBuffer:
    """The consumer side of one ring buffer map, given its fd and size (max_entries bytes)."""

    def __init__(self, fd: int, size: int) -> None:
        if size <= 0 or size & (size - 1):
            raise CaptureError(f"ring buffer size {size} is not a power of two: bpf/tls_probes.c and tls.py disagree")
        page = mmap.PAGESIZE
        try:
            self._consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._producer = mmap.mmap(fd, page + size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except OSError as exc:
            raise CaptureError(f"cannot map the BPF ring buffer: {exc.strerror}") from exc
        self._data = memoryview(self._producer)[page:]
        self._mask = size - 1
        self._size = size
        self._fd = fd
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)

    def fileno(self) -> int:
        return self._fd

    def read(self, timeout_s: float) -> bytes:
        """The span of records committed since the last call (b"": none); waits up to `timeout_s` for one."""
        span = self._drain()
        if span or timeout_s <= 0:
            return span
        self._poller.poll(max(1, int(timeout_s * 1000)))
        return self._drain()

    def consumer_position(self) -> int:
        """Bytes consumed since the ring was made (the kernel's consumer position)."""
        position: int = _U64.unpack_from(self._consumer, 0)[0]
        return position

    def producer_position(self) -> int:
        """Bytes reserved since the ring was made, committed or still being written."""
        position: int = _U64.unpack_from(self._producer, 0)[0]
        return position

    def pending_bytes(self) -> int:
        producer: int = _U64.unpack_from(self._producer, 0)[0]
        consumer: int = _U64.unpack_from(self._consumer, 0)[0]
        return producer - consumer

    def _drain(self) -> bytes:
        consumer = _U64.unpack_from(self._consumer, 0)[0]
        producer = _U64.unpack_from(self._producer, 0)[0]
        # The records' headers are read in the mmap itself, after its producer page.
        ring, page, mask, size = self._producer, mmap.PAGESIZE, self._mask, self._size
        unpack_header = _U32.unpack_from
        start = consumer
        while consumer < producer:
            header = unpack_header(ring, page + (consumer & mask))[0]  # 8-aligned: a header never wraps
            if header & _BUSY:
                break  # the producer has not committed it yet; the next read takes it
            consumer += ((header & LENGTH) + HEADER + 7) & ~7
        if consumer == start:
            return b""
        first, end = start & mask, (start & mask) + consumer - start
        # A slice of the mmap is one copy; a span that wraps around is joined from its two pieces.
        span = ring[page + first:page + end] if end <= size else self._data[first:].tobytes() + \
            self._data[:end - size].tobytes()
        # Release the space: the kernel reuses everything before this position.
        _U64.pack_into(self._consumer, 0, consumer)
        return span

    def close(self) -> None:
        self._data.release()
        self._producer.close()
        self._consumer.close()


def records_of(span: bytes) -> list[bytes]:
    """The records of a span, discarded ones left out."""
    out = []
    at = 0
    while at < len(span):
        header = _U32.unpack_from(span, at)[0]
        if not header & DISCARD:
            out.append(span[at + HEADER:at + HEADER + (header & LENGTH)])
        at += ((header & LENGTH) + HEADER + 7) & ~7
    return out


def span_of(records: list[bytes]) -> bytes:
    """Records laid out as a span, as the kernel writes them (for tests and replays)."""
    return b"".join(_U32.pack(len(record)) + bytes(4) + record + bytes(-len(record) % 8) for record in records)


class DrainedRing:
    """A RingBuffer emptied by a thread of its own into a queue bounded in bytes, for a reader
    that takes the records in its own time.

    Why: the kernel drops an event when the ring is full, and the exporter's one loop both
    reads the ring and parses what it read. On busy cores it parses slower than a server
    writes, the unread backlog grows, and past the ring's size events were lost although the
    loop never stalled (measured: 5.8 MB unread with reads at most 0.24 s apart). The thread
    only copies spans of records out (about 0.2 µs per record), so the ring's room is given back at
    once and the queue takes the burst, growing only while there is one, where a larger ring
    would cost its full size in RSS from the start. At `max_queued_bytes` the thread stops
    taking: the ring fills again and the kernel counts what it loses, with its gap marks,
    as before.

    `processed_position` is the ring position up to which the reader has taken records: the
    backlog the probes judge (their trimming) by stays the reader's, not the thread's.

    `fallback`: a second ring the producer uses when the first refuses a record, and for every
    record after that one until this thread reports (`on_fallback_drained`) that it has taken
    them (bpf/tls_probes.c, output()). Each take reads the ring, then the fallback, then the ring
    again up to where it was reserved when the fallback was read, queues the spans in that order
    and only then reports the fallback's position: a record written to the ring before one in the
    fallback is queued before it, and one written after it only once the report is made, by a
    later take. The reader gets every record in the order the producers wrote them, per producer.
    """

    def __init__(self, ring: RingBuffer, max_queued_bytes: int, every_s: float,
                 on_drained: Callable[[int], None] | None = None, fallback: RingBuffer | None = None,
                 on_fallback_drained: Callable[[int], None] | None = None) -> None:
        self._ring = ring
        self._on_drained = on_drained  # told the ring's consumer position after each span taken
        self._fallback = fallback
        self._on_fallback_drained = on_fallback_drained  # told its consumer position once its spans are queued
        self._max = max_queued_bytes
        self._every_ms = max(1, int(every_s * 1000))
        self._queue: deque[tuple[bytes, int]] = deque()  # a span, the ring position after it
        self._queued = 0
        self._room = threading.Condition()
        self._reading = threading.Lock()  # one reader of the ring at a time, and spans queued in ring order
        self._stopping = False
        # Readable while the queue holds records: what the reader's select() waits on.
        self._ready_r, self._ready_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.processed_position = ring.consumer_position()
        self.largest_queued_bytes = 0
        self._thread = threading.Thread(target=self._drain, daemon=True, name="tls-ring")

    def start(self) -> None:
        """Start the thread; the first fileno(), read() or flush() does it anyway. Not at creation:
        a process that drops its privileges (`--user`) must do it while it has one thread only."""
        if self._thread.ident is None:
            self._thread.start()

    def fileno(self) -> int:
        self.start()
        return self._ready_r

    def thread_cpu_s(self) -> float:
        """CPU time its thread has used so far (0 before it starts): a benchmark that charges the
        process's CPU to something else takes it out."""
        ident = self._thread.ident
        if ident is None or not self._thread.is_alive():
            return 0.0
        return time.clock_gettime(time.pthread_getcpuclockid(ident))

    def _drain(self) -> None:
        poller = select.poll()
        poller.register(self._ring.fileno(), select.POLLIN)
        if self._fallback is not None:
            poller.register(self._fallback.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        room = self._room
        while True:
            with room:
                while self._queued >= self._max and not self._stopping:
                    room.wait()
                if self._stopping:
                    return
            if not self._take():
                poller.poll(self._every_ms)

    def _take(self) -> bool:
        with self._reading:
            ring = self._ring
            spans = [(ring.read(0), ring.consumer_position())]
            if self._fallback is not None:
                late = self._fallback.read(0)
                if late:
                    # The ring's records written before these may have come in after the first
                    # read: all were reserved by now, and a read stops at a record another CPU is
                    # still writing (microseconds), so read up to here, however many reads it takes.
                    end = ring.producer_position()
                    while ring.consumer_position() < end:
                        span = ring.read(0)
                        if span:
                            spans.append((span, ring.consumer_position()))
                        else:
                            os.sched_yield()
                    spans.append((late, spans[-1][1]))
            spans = [(span, position) for span, position in spans if span]
            if not spans:
                return False
            if self._on_drained is not None:
                self._on_drained(spans[-1][1])
            with self._room:
                for span, position in spans:
                    self._queue.append((span, position))
                    self._queued += len(span)
                self.largest_queued_bytes = max(self.largest_queued_bytes, self._queued)
            if self._fallback is not None and self._on_fallback_drained is not None:
                # Only now: the producers go back to the ring, behind everything queued above.
                self._on_fallback_drained(self._fallback.consumer_position())
        self._signal()
        return True

    def flush(self) -> None:
        """Queue all that the ring holds now, past the bound: the next reads return it."""
        self.start()
        while self._take():
            pass

    def queued(self) -> bool:
        """Whether spans wait for read()."""
        return bool(self._queue)

    def _signal(self) -> None:
        try:
            os.write(self._ready_w, b"r")
        except BlockingIOError:
            pass  # the pipe is full of earlier signals: the reader is woken anyway

    def read(self, timeout_s: float, limit: int = 8 << 20) -> list[bytes]:
        """Spans in ring order (at least one, then more while they total at most `limit` bytes);
        waits up to `timeout_s` for one."""
        self.start()
        if timeout_s > 0 and not self._queue:
            select.select([self._ready_r], [], [], timeout_s)
        try:
            os.read(self._ready_r, 4096)
        except BlockingIOError:
            pass
        out: list[bytes] = []
        taken = 0
        with self._room:
            while self._queue and (not out or taken + len(self._queue[0][0]) <= limit):
                span, position = self._queue.popleft()
                out.append(span)
                taken += len(span)
                self._queued -= len(span)
                self.processed_position = position
            left = bool(self._queue)
            self._room.notify()
        if left:
            self._signal()
        return out

    def close(self) -> None:
        with self._room:
            self._stopping = True
            self._room.notify()
        os.write(self._stop_w, b"s")
        if self._thread.ident is not None:
            self._thread.join()
        for fd in (self._ready_r, self._ready_w, self._stop_r, self._stop_w):
            os.close(fd)
        self._ring.close()
        if self._fallback is not None:
            self._fallback.close()
