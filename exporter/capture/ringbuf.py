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
"""

from __future__ import annotations

import mmap
import select
import struct

from exporter.errors import CaptureError

__all__ = ["RingBuffer"]

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HEADER = 8
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

    def read(self, timeout_s: float, limit: int = 65536) -> list[bytes]:
        """Records written since the last call (at most `limit`); waits up to `timeout_s` for one."""
        records = self._drain(limit)
        if records or timeout_s <= 0:
            return records
        self._poller.poll(max(1, int(timeout_s * 1000)))
        return self._drain(limit)

    def consumer_position(self) -> int:
        """Bytes consumed since the ring was made (the kernel's consumer position)."""
        position: int = _U64.unpack_from(self._consumer, 0)[0]
        return position

    def pending_bytes(self) -> int:
        producer: int = _U64.unpack_from(self._producer, 0)[0]
        consumer: int = _U64.unpack_from(self._consumer, 0)[0]
        return producer - consumer

    def _drain(self, limit: int) -> list[bytes]:
        consumer = _U64.unpack_from(self._consumer, 0)[0]
        producer = _U64.unpack_from(self._producer, 0)[0]
        data, mask, size = self._data, self._mask, self._size
        unpack_header = _U32.unpack_from
        out: list[bytes] = []
        append = out.append
        while consumer < producer and len(out) < limit:
            offset = consumer & mask  # 8-aligned, and the size is a power of two: a header never wraps
            header = unpack_header(data, offset)[0]
            if header & _BUSY:
                break  # the producer has not committed it yet; the next read takes it
            length = header & ~(_BUSY | _DISCARD)
            if not header & _DISCARD:
                start = (offset + _HEADER) & mask
                end = start + length
                append(data[start:end].tobytes() if end <= size else
                       data[start:].tobytes() + data[:end - size].tobytes())
            consumer += (length + _HEADER + 7) & ~7
        # Release the space: the kernel reuses everything before this position.
        _U64.pack_into(self._consumer, 0, consumer)
        return out

    def close(self) -> None:
        self._data.release()
        self._producer.close()
        self._consumer.close()
