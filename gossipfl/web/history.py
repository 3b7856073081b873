"""A bounded history of metric points, for the live page's ``GET /metrics?since=T``.

A node or a simulation may run for days: the history keeps at most ``limit`` points and, when
full, drops every other one of the older half, so the page still spans the whole run at a
coarser grain (recent points stay dense). Thread-safe: a simulation appends from its own thread
while the page's server reads from another.
"""

from __future__ import annotations

import math
import threading
from typing import Any

__all__ = ["History"]


def _clean(v: Any) -> Any:
    """JSON has no NaN or infinity: a missing reading is null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class History:
    """Points (dicts with a time ``t``) in time order, at most ``limit`` of them."""

    def __init__(self, limit: int = 2000) -> None:
        if limit < 4:
            raise ValueError(f"limit must be at least 4, got {limit}")
        self.limit = limit
        self._points: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.added = 0  # every point ever added (the page shows it beside what is kept)

    def add(self, point: dict[str, Any]) -> None:
        row = {k: _clean(v) for k, v in point.items()}
        with self._lock:
            self._points.append(row)
            self.added += 1
            if len(self._points) > self.limit:
                half = len(self._points) // 2
                self._points = self._points[:half:2] + self._points[half:]

    def since(self, t: float | None = None) -> list[dict[str, Any]]:
        """The points with time after ``t`` (all with None)."""
        with self._lock:
            if t is None:
                return list(self._points)
            return [p for p in self._points if p.get("t", 0.0) > t]

    def last(self) -> dict[str, Any] | None:
        with self._lock:
            return self._points[-1] if self._points else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._points)
