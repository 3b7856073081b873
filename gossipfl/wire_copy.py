"""Large frame copies shared with one helper thread, without ever waiting on a slow one.

Encoding a large model is one memcpy per tensor into the frame. One thread copies at about half
the machine's memory bandwidth, so a second thread nearly doubles the speed -- but ``Tensor.copy_``
splits a copy between threads up front, and when the cores are busy (a node trains while it
gossips) one descheduled thread stalls the whole copy: measured 100x slower for 1 MB.

Here the copy is cut into pieces of `PIECE` bytes handed out one at a time: the caller and the
helper each take the next piece until none is left. If the helper is slow to wake or descheduled,
the caller simply copies everything itself; at the end it waits only for the one piece the helper
may be in the middle of. ``ctypes.memmove`` drops the GIL, so both copies run at once.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from typing import Final

__all__ = ["PARALLEL_FROM", "PIECE", "copy_pieces", "split"]

PARALLEL_FROM: Final = 4 * 2**20
"""Copies of fewer bytes stay on the calling thread: waking the helper costs ~20-50 us."""

PIECE: Final = 2**20
"""Bytes per piece: long enough that handing one out is noise, short enough that waiting for the
helper's last one is too (~0.1 ms at memory speed)."""

Piece = tuple[int, int, int]  # destination address, source address, bytes


def split(dst: int, src: int, nbytes: int, out: list[Piece]) -> None:
    """Append the pieces of one contiguous copy of ``nbytes`` from ``src`` to ``dst``."""
    for off in range(0, nbytes, PIECE):
        out.append((dst + off, src + off, min(PIECE, nbytes - off)))


class _Job:
    """The pieces of one copy and who holds which; every field is guarded by ``lock``."""

    __slots__ = ("closed", "done", "helper_busy", "lock", "next", "pieces")

    def __init__(self, pieces: list[Piece]) -> None:
        self.pieces = pieces
        self.next = 0
        self.closed = False  # the caller has finished: the helper must take nothing more
        self.helper_busy = False  # the helper is copying a piece now
        self.lock = threading.Lock()
        self.done = threading.Event()  # set when the helper finishes a piece after `closed`

    def take(self, *, helper: bool) -> Piece | None:
        with self.lock:
            if helper:
                if self.helper_busy and self.closed:
                    self.done.set()
                self.helper_busy = False
            if self.closed or self.next >= len(self.pieces):
                return None
            piece = self.pieces[self.next]
            self.next += 1
            if helper:
                self.helper_busy = True
            return piece

    def close(self) -> bool:
        """Stop handing out pieces; True if the helper is still copying one (wait on ``done``)."""
        with self.lock:
            self.closed = True
            return self.helper_busy


class _Helper:
    """The one helper thread of this process, started on first use (and again after a fork)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._free = threading.Lock()  # held by the copy the helper is serving
        self._pid = -1

    def copy(self, pieces: list[Piece]) -> None:
        memmove = ctypes.memmove
        if not self._free.acquire(blocking=False):  # serving another thread's copy: go alone
            for dst, src, n in pieces:
                memmove(dst, src, n)
            return
        try:
            if self._pid != os.getpid():  # first use, or a forked child without the thread
                self._jobs = queue.SimpleQueue()
                threading.Thread(target=self._serve, args=(self._jobs,), name="gossipfl-wire-copy",
                                 daemon=True).start()
                self._pid = os.getpid()
            job = _Job(pieces)
            self._jobs.put(job)
            while (piece := job.take(helper=False)) is not None:
                memmove(*piece)
            if job.close():
                job.done.wait()
        finally:
            self._free.release()

    @staticmethod
    def _serve(jobs: queue.SimpleQueue[_Job]) -> None:
        memmove = ctypes.memmove
        while True:
            job = jobs.get()
            while (piece := job.take(helper=True)) is not None:
                memmove(*piece)


_HELPER = _Helper()


def copy_pieces(pieces: list[Piece]) -> None:
    """Do every copy in ``pieces`` (disjoint destinations), sharing them with the helper thread.

    The caller guarantees that every address stays valid until this returns; it returns only
    once every piece is copied."""
    _HELPER.copy(pieces)
