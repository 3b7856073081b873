"""Replay protection for signed clusters: every signed message carries the sender's wall-clock
time (``ts``) and a random 63-bit ``nonce`` in its header, inside what the HMAC covers.

A receiver refuses (401) a signed message whose time is more than ``max_clock_skew`` seconds from
its own clock (``stale``: an old capture replayed later, or a badly set clock), and one whose
(sender, nonce) it has already accepted within that window (``replay``: a capture resent at
once). So a nonce need only be remembered for about twice the skew: older entries are dropped,
and the memory is bounded by the messages a window holds (at most `MAX_REMEMBERED`; beyond that
the oldest go first, and a replay of one of them would still be stale soon after).
"""

from __future__ import annotations

import math
import secrets
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["MAX_REMEMBERED", "RateLimit", "ReplayGuard", "stamp"]

MAX_REMEMBERED = 1_000_000


def stamp(meta: dict[str, Any], wall: Callable[[], float]) -> dict[str, Any]:
    """``meta`` with this message's time and a fresh nonce."""
    return {**meta, "ts": wall(), "nonce": secrets.randbits(63)}


class ReplayGuard:
    """Which signed messages to refuse: too far off in time, or seen before (module docstring).

    ``check`` returns None to accept (and remembers the nonce), else ``(reason, message)``."""

    def __init__(self, *, max_skew: float, wall: Callable[[], float]) -> None:
        self.max_skew = max_skew
        self.wall = wall
        self._seen: set[tuple[str, int]] = set()
        self._order: deque[tuple[float, tuple[str, int]]] = deque()

    def check(self, sender: str, meta: Mapping[str, Any]) -> tuple[str, str] | None:
        ts, nonce = meta.get("ts"), meta.get("nonce")
        if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts) \
                or not isinstance(nonce, int) or isinstance(nonce, bool):
            return "stale", "a signed message must carry its time and a nonce (ts, nonce)"
        now = self.wall()
        if abs(now - ts) > self.max_skew:
            return "stale", (f"message time {ts:.3f} is {now - ts:+.1f} s from ours (max_clock_skew "
                             f"{self.max_skew:g} s): stale, replayed, or a clock set wrong")
        self._forget(now)
        key = (sender, nonce)
        if key in self._seen:
            return "replay", f"message {nonce:#x} from {sender!r} was already received (a replay)"
        self._seen.add(key)
        self._order.append((ts, key))
        return None

    def _forget(self, now: float) -> None:
        horizon = now - 2 * self.max_skew
        while self._order and (self._order[0][0] < horizon or len(self._order) > MAX_REMEMBERED):
            _, key = self._order.popleft()
            self._seen.discard(key)


class RateLimit:
    """A token bucket per sender: ``rate`` messages per second on average, bursts of ``burst``.

    A flooding peer's excess is refused before it is queued (HTTP 429, reason ``rate``), so it
    can neither fill the inbox nor take the merges' time from the other neighbours. Senders idle
    for a minute are forgotten (the table stays as small as the peers that talk)."""

    def __init__(self, *, rate: float, burst: float, now: Callable[[], float]) -> None:
        self.rate, self.burst, self.now = rate, burst, now
        self._buckets: dict[str, tuple[float, float]] = {}  # sender -> (tokens, time)
        self._swept = now()

    def allow(self, sender: str) -> bool:
        t = self.now()
        tokens, last = self._buckets.get(sender, (self.burst, t))
        tokens = min(self.burst, tokens + (t - last) * self.rate)
        ok = tokens >= 1.0
        self._buckets[sender] = (tokens - 1.0 if ok else tokens, t)
        if t - self._swept > 60.0:
            self._buckets = {k: v for k, v in self._buckets.items() if t - v[1] < 60.0}
            self._swept = t
        return ok
