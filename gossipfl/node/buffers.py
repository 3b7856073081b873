"""Reusable byte buffers for large messages.

A freshly allocated 100 MB buffer costs Linux ~25 000 page faults before the first byte lands
(about as long as the copy itself), so a node keeps a few buffers of its model's frame size and
recycles them: one for what it sends, a handful for what it receives and has not merged yet.

A buffer too large to zero in one go without stalling the event loop (a 400 MB model) is an
anonymous memory map: it comes back at once, its pages zero and untouched, and each page is
faulted in as the body is streamed into it, spread over the reads instead of in one block.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import AsyncIterator, Callable

__all__ = ["MAPPED_FROM", "Buffer", "BufferPool", "new_buffer", "read_into"]

Buffer = bytearray | mmap.mmap
"""A writable receive or send buffer (`new_buffer`)."""

MAPPED_FROM = 16 * 2**20
"""Buffers of at least this many bytes are memory maps: ``bytearray(n)`` zeroes all n bytes before
returning, holding the GIL, which for 400 MB blocks every other thread (the event loop) ~0.1 s."""


def new_buffer(size: int) -> Buffer:
    """A writable zeroed buffer of ``size`` bytes that costs no page touches up front when large."""
    if size >= MAPPED_FROM:
        return mmap.mmap(-1, size)
    return bytearray(size)


class BufferPool:
    """Hands out buffers of an exact size; thread-safe; keeps at most ``keep`` spares."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._spare: list[Buffer] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> Buffer:
        with self._lock:
            for i, buf in enumerate(self._spare):
                if len(buf) == size:
                    return self._spare.pop(i)
        return new_buffer(size)

    def give(self, buf: object) -> None:
        """Return a buffer nobody references any more (bytes and small bodies are simply dropped)."""
        if not isinstance(buf, bytearray | mmap.mmap) or len(buf) < 1 << 16:
            return
        with self._lock:
            if len(self._spare) >= self.keep:
                self._spare.pop(0)
            self._spare.append(buf)


async def read_into(chunks: AsyncIterator[bytes], view: memoryview,
                    on_chunk: Callable[[int], None] | None = None) -> int | None:
    """Copy a body arriving in ``chunks`` into ``view`` (one copy per byte, no chunk list to join)
    and return its length; None if it is longer than ``view``. ``on_chunk(end)`` after each chunk,
    while it is still in cache."""
    off = 0
    async for chunk in chunks:
        end = off + len(chunk)
        if end > len(view):
            return None
        view[off:end] = chunk
        off = end
        if on_chunk is not None:
            on_chunk(off)
    return off
