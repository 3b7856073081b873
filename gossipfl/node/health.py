"""A node's health figures for ``GET /status``: memory, open files, tasks and event-loop stalls.

What a long-running service is watched for: resident memory and open file descriptors that grow
without bound (a leak), asyncio tasks that pile up (fire-and-forget work that never ends), and a
blocked event loop (a computation or a blocking call on the loop thread, during which the node
answers nobody). The stall monitor is one small task: it asks to wake every `TICK` seconds and
records how late it woke. A late wake-up is a stall of the whole loop, whatever caused it.
While the loop is stuck, a small watcher thread looks at what the loop thread is doing: a stall of
`REPORT_AFTER` seconds or more is logged with the loop thread's stack (and kept, short, as
``loop_stall_where``), so a stall seen in a soak names its cause instead of only its length.

What it found in the 32-node soak (5-6 s stalls, once in each node's life, minutes in): Python's
full (generation 2) garbage collection. It walks every tracked object -- 265 000 after torch,
NumPy, aiohttp and the data set are loaded -- holding the GIL, on whichever thread allocated last:
0.1 s on an idle core, seconds when 32 processes share two. `freeze_heap` takes what a service
built before it serves out of the collector's sight (``gc.freeze``).

Memory, files and tasks are the process's and its loop's: nodes sharing one process (a local
cluster) report the same figures. Memory and files are read from ``/proc`` (Linux); elsewhere
they are None.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["REPORT_AFTER", "TICK", "WINDOW", "LoopMonitor", "freeze_heap", "open_fds", "resident_bytes"]

TICK = 0.1  # seconds between the stall monitor's wake-ups
WINDOW = 10.0  # seconds per window of the "recent" longest stall
REPORT_AFTER = 1.0  # a stall this long is logged with the loop thread's stack

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def freeze_heap() -> int:
    """Collect once, then exempt every object alive now from future collections (``gc.freeze``);
    returns how many were frozen.

    For a long-running service process, called once before it serves: modules, the data set and
    the model live as long as the process, yet every full collection walks them all with the GIL
    held, stalling the event loop (see the module docstring). Afterwards a full collection walks
    only what was made since. Not for a process that builds and drops many nodes (tests, local
    clusters): what is frozen is never collected, even once it becomes garbage.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


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

    def __init__(self, *, tick: float = TICK, window: float = WINDOW, now: Callable[[], float] = time.monotonic,
                 report_after: float = REPORT_AFTER, log: logging.Logger | None = None) -> None:
        self.tick, self.window, self._now = tick, window, now
        self.report_after = report_after
        self.log = log or logging.getLogger(__name__)
        self.longest = 0.0
        self._current = self._previous = 0.0
        self._window_start = now()
        self._woke = now()  # the loop's last wake-up (read by the watcher thread)
        self.where: str | None = None  # innermost frames of the loop thread in the last reported stall

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
        stop = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(threading.get_ident(), stop),
                                   name="gossipfl-stall-watch", daemon=True)
        self._woke = self._now()
        watcher.start()
        try:
            while True:
                asked = self._now()
                await asyncio.sleep(self.tick)
                self._woke = self._now()
                self.record(max(0.0, self._woke - asked - self.tick))
        finally:
            stop.set()

    def _watch(self, loop_thread: int, stop: threading.Event) -> None:
        """Watcher thread: once per stall of ``report_after`` seconds, log where the loop thread is.

        If the stack shows the loop idle (in ``select``), the loop was not running code: the
        process was starved of CPU or of the GIL, or the watcher itself was late."""
        reported = None  # the wake-up whose stall was reported
        while not stop.wait(min(self.tick, self.report_after / 2)):
            woke = self._woke
            late = self._now() - woke - self.tick
            if late < self.report_after or reported == woke:
                continue
            frame = sys._current_frames().get(loop_thread)
            if frame is None:
                return
            stack = traceback.extract_stack(frame)
            reported = woke
            self.where = " < ".join(f"{_short(f.filename)}:{f.lineno} {f.name}" for f in reversed(stack[-4:]))
            self.log.warning("event loop blocked for %.1f s so far, in:\n%s", late,
                             "".join(traceback.format_list(stack[-12:])).rstrip())

    def status(self) -> dict[str, Any]:
        """The ``/status`` fields: memory, files, tasks, and the stalls in seconds."""
        return {
            "rss_bytes": resident_bytes(),
            "open_fds": open_fds(),
            "tasks": _tasks(),
            "loop_stall_max": round(self.longest, 4),
            "loop_stall_recent": round(self.recent, 4),
            "loop_stall_where": self.where,
        }


def _short(filename: str) -> str:
    """``package/module.py`` of a frame's file: enough to find it, short enough for /status."""
    parts = filename.replace(os.sep, "/").split("/")
    return "/".join(parts[-2:])


def _tasks() -> int | None:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # asked from outside the node's event loop
        return None
