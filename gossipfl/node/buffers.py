"""Reusable byte buffers for large messages.

A freshly allocated 100 MB buffer costs Linux ~25 000 page faults before the first byte lands
(about as long as the copy itself), so a node keeps a few buffers of its model's frame size and
recycles them: one for what it sends, a handful for what it receives and has not merged yet.
"""

from __future__ import annotations

import threading

__all__ = ["BufferPool"]


class BufferPool:
    """Hands out bytearrays of an exact size; thread-safe; keeps at most ``keep`` spares."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._spare: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        with self._lock:
            for i, buf in enumerate(self._spare):
                if len(buf) == size:
                    return self._spare.pop(i)
        return bytearray(size)

    def give(self, buf: object) -> None:
        """Return a buffer nobody references any more (bytes and small bodies are simply dropped)."""
        if not isinstance(buf, bytearray) or len(buf) < 1 << 16:
            return
        with self._lock:
            if len(self._spare) >= self.keep:
                self._spare.pop(0)
            self._spare.append(buf)
