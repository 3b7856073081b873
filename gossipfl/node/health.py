"""A node's health figures for ``GET /status``: memory, open files, tasks and event-loop stalls.

What a long-running service is watched for: resident memory and open file descriptors that grow
without bound (a leak), asyncio tasks that pile up (fire-and-forget work that never ends), and a
blocked event loop (a computation or a blocking call on the loop thread, during which the node
answers nobody). The stall monitor is one small task: it asks to wake every `TICK` seconds and
records how late it woke. A late wake-up is a stall of the whole loop, whatever caused it.

Memory, files and tasks are the process's and its loop's: nodes sharing one process (a local
cluster) report the same figures. Memory and files are read from ``/proc`` (Linux); elsewhere
they are None.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

__all__ = ["TICK", "WINDOW", "LoopMonitor", "open_fds", "resident_bytes"]

TICK = 0.1  # seconds between the stall monitor's wake-ups
WINDOW = 10.0  # seconds per window of the "recent" longest stall

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident memory now (not its peak), or None where /proc is missing."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def open_fds() -> int | None:
    """How many file descriptors this process holds open (sockets included), or None."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself holds
    except OSError:
        return None


class LoopMonitor:
    """Measures how late the event loop runs a task that asked to wake every ``tick`` seconds.

    ``longest`` is the longest stall since the monitor started; ``recent`` the longest in the
    current and the previous ``window`` (so it covers between one and two windows back)."""

    def __init__(self, *, tick: float = TICK, window: float = WINDOW,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.tick, self.window, self._now = tick, window, now
        self.longest = 0.0
        self._current = self._previous = 0.0
        self._window_start = now()

    def record(self, stall: float) -> None:
        """One wake-up, ``stall`` seconds late."""
        t = self._now()
        if t - self._window_start >= self.window:
            # Two windows or more since the last roll: the previous one saw nothing.
            self._previous = self._current if t - self._window_start < 2 * self.window else 0.0
            self._current = 0.0
            self._window_start = t
        self._current = max(self._current, stall)
        self.longest = max(self.longest, stall)

    @property
    def recent(self) -> float:
        return max(self._current, self._previous)

    async def loop(self) -> None:
        """Wake every ``tick`` seconds and record the delay, until cancelled (a node's loop)."""
        while True:
            asked = self._now()
            await asyncio.sleep(self.tick)
            self.record(max(0.0, self._now() - asked - self.tick))

    def status(self) -> dict[str, Any]:
        """The ``/status`` fields: memory, files, tasks, and the stalls in seconds."""
        return {
            "rss_bytes": resident_bytes(),
            "open_fds": open_fds(),
            "tasks": _tasks(),
            "loop_stall_max": round(self.longest, 4),
            "loop_stall_recent": round(self.recent, 4),
        }


def _tasks() -> int | None:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # asked from outside the node's event loop
        return None
