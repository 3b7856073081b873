"""Time for a node: read it, sleep on it, bound waits by it -- on the wall clock or a virtual one.

Every wait in the node package goes through a `Clock`: reading the time (``now``), sleeping
(``sleep``), bounding a wait (``timeout``, an async context manager raising `TimeoutError` like
`asyncio.timeout`) and running blocking work off the event loop (``to_thread``: a clock must know
about work it cannot see waiting, or virtual time would run on during it).

`WallClock` is the default: ``time.monotonic`` and asyncio. `VirtualClock` is for tests and
simulations: its time stands still while anything can run and jumps to the next deadline when
every task waits on it, so a protocol that waits 30 s for a silent peer does so in no real time,
deterministically. Only waits that go through the clock hold it back: run a node on a virtual
clock with the in-memory network (`MemoryNetwork`), not HTTP (a socket read is a wait the clock
cannot see, so virtual time would jump past it). Discovery (zeroconf) keeps real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = ["Clock", "VirtualClock", "WallClock", "as_clock"]

T = TypeVar("T")


@runtime_checkable
class Clock(Protocol):
    """What a node reads time from and waits on."""

    def now(self) -> float:
        """Seconds on a monotonic scale (only differences mean something)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (zero or less: just let other tasks run)."""
        ...

    def timeout(self, seconds: float) -> AbstractAsyncContextManager[object]:
        """Bound the body to ``seconds``: it is cancelled then, and `TimeoutError` raised."""
        ...

    async def to_thread(self, fn: Callable[..., T], /, *args: Any) -> T:
        """Run blocking ``fn(*args)`` without blocking the event loop."""
        ...


class WallClock:
    """Real time: ``now`` from a monotonic callable (``time.monotonic``), waits by asyncio."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now

    def now(self) -> float:
        return self._now()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def timeout(self, seconds: float) -> AbstractAsyncContextManager[object]:
        return asyncio.timeout(seconds)

    async def to_thread(self, fn: Callable[..., T], /, *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)


def wall_time(clock: Clock) -> Callable[[], float]:
    """Seconds since the epoch as ``clock`` sees them: what a message's timestamp is compared
    across machines with (a virtual clock: its own time, shared by the nodes it runs)."""
    return clock.now if isinstance(clock, VirtualClock) else time.time


def as_clock(clock: Clock | Callable[[], float] | None) -> Clock:
    """A `Clock` from what callers pass: a clock, a plain ``now`` callable (waits stay real), or None."""
    if clock is None:
        return WallClock()
    if isinstance(clock, Clock):
        return clock
    if callable(clock):
        return WallClock(clock)
    raise TypeError(f"clock: expected a Clock or a callable returning seconds, got {clock!r}")


class _Timer:
    """One deadline on a virtual clock; cancelled timers stay in the heap until they come up."""

    __slots__ = ("callback", "cancelled", "seq", "when")

    def __init__(self, when: float, seq: int, callback: Callable[[], None]) -> None:
        self.when, self.seq, self.callback, self.cancelled = when, seq, callback, False

    def __lt__(self, other: _Timer) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)

    def cancel(self) -> None:
        self.cancelled = True


class VirtualClock:
    """Time that moves only when every task waits on it (tests and simulations).

    ``async with clock.driving():`` (or ``await clock.run(main())``) starts a driver task beside
    the code under test. The driver lets everything runnable run; when nothing is -- the event
    loop's ready queue holds no callback but its own -- it jumps to the earliest deadline and
    wakes whatever waits for it (timers due at one instant fire in the order they were set).
    ``advance(seconds)`` moves time by hand instead, for code that only reads ``now``.

    Blocking work (``to_thread``) runs inline on the event loop, in zero virtual time, so a run
    is deterministic. Waits the clock cannot see hold nothing back: a socket read, a thread, an
    `asyncio.sleep` -- virtual time jumps past them. A task that polls with ``sleep(0)`` holds
    virtual time still; poll with ``sleep(dt)``, ``dt > 0``. Needs CPython's asyncio event loop
    (the driver reads its ready queue).
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._timers: list[_Timer] = []
        self._seq = itertools.count()
        self._wake: asyncio.Event | None = None  # set when a timer is added (the driver waits on it)
        self._driven = False

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> _Timer:
        """Run ``callback`` when virtual time reaches ``when``; returns a handle with ``cancel()``."""
        timer = _Timer(when, next(self._seq), callback)
        heapq.heappush(self._timers, timer)
        if self._wake is not None:
            self._wake.set()
        return timer

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not woken.done():
                woken.set_result(None)

        timer = self.call_at(self._now + seconds, wake)
        try:
            await woken
        finally:
            timer.cancel()

    def timeout(self, seconds: float) -> AbstractAsyncContextManager[object]:
        return _VirtualTimeout(self, seconds)

    async def to_thread(self, fn: Callable[..., T], /, *args: Any) -> T:
        return fn(*args)

    def advance(self, seconds: float) -> None:
        """Move time on by ``seconds``, firing every timer that comes due on the way, in order."""
        if seconds < 0:
            raise ValueError(f"a clock does not go back ({seconds} s)")
        self._fire_until(self._now + seconds)

    def _fire_until(self, when: float) -> None:
        while self._timers and self._timers[0].when <= when:
            timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._now = max(self._now, timer.when)
                timer.callback()
        self._now = max(self._now, when)

    def _next_deadline(self) -> float | None:
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0].when if self._timers else None

    @contextlib.asynccontextmanager
    async def driving(self) -> AsyncIterator[VirtualClock]:
        """Drive this clock on the running event loop for the duration of the block."""
        if self._driven:
            raise RuntimeError("this virtual clock already has a driver")
        loop = asyncio.get_running_loop()
        ready = getattr(loop, "_ready", None)
        if ready is None:
            raise RuntimeError(f"VirtualClock needs CPython's asyncio event loop, not {type(loop).__name__}")
        self._driven, self._wake = True, asyncio.Event()
        driver = asyncio.create_task(self._drive(ready), name="virtual-clock")
        try:
            yield self
        finally:
            driver.cancel()
            await asyncio.wait([driver])  # an outer cancellation still propagates from here
            self._driven, self._wake = False, None
            crashed = None if driver.cancelled() else driver.exception()
            if crashed is not None:
                raise crashed

    async def run(self, main: Awaitable[T]) -> T:
        """Await ``main`` with this clock driven: ``asyncio.run(clock.run(scenario()))``."""
        async with self.driving():
            return await main

    async def _drive(self, ready: Any) -> None:
        assert self._wake is not None
        while True:
            await asyncio.sleep(0)  # to the back of the ready queue: whatever is runnable runs first
            if ready:  # something else can still run at this instant
                continue
            when = self._next_deadline()
            if when is None:  # nobody waits on the clock: wait for someone to
                self._wake.clear()
                await self._wake.wait()
                continue
            self._fire_until(when)


class _VirtualTimeout:
    """`asyncio.timeout` whose deadline is on a virtual clock: asyncio's own timeout does the
    cancelling and the `TimeoutError`; the clock only says when."""

    def __init__(self, clock: VirtualClock, seconds: float) -> None:
        self._clock, self._seconds = clock, seconds
        self._inner = asyncio.timeout(None)
        self._timer: _Timer | None = None

    async def __aenter__(self) -> None:
        await self._inner.__aenter__()
        if self._seconds <= 0:
            self._expire()
        elif math.isfinite(self._seconds):
            self._timer = self._clock.call_at(self._clock.now() + self._seconds, self._expire)

    def _expire(self) -> None:
        self._inner.reschedule(asyncio.get_running_loop().time())  # due now: asyncio cancels the body

    async def __aexit__(self, *exc: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        await self._inner.__aexit__(*exc)  # raises TimeoutError if it expired the body; never suppresses
