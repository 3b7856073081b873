"""Metrics: JSONL rows (one JSON object per line) and the cluster-level measures.

Node rows: node, t, step, loss, accuracy, bytes_out, bytes_in, msgs_out, msgs_in, staleness.
Cluster rows: node = null, t, consensus_distance, avg_model_accuracy, mean_accuracy.

Staleness of a message, in local steps: the receiver's step count when it merges the message
minus the sender's step count when it sent it. It is 0 in lock-step rounds, grows with latency
and with a receiver that runs ahead of its sender, and is negative for a message from a sender
that is ahead. Node rows carry the mean over the messages merged since the node's previous row
(null if none); summaries carry the run's mean and maximum. Every engine counts it the same way.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["MetricsWriter", "StalenessTally", "consensus_distance", "honest_accuracy", "read_metrics", "robust_counts"]

log = logging.getLogger("gossipfl.metrics")


def honest_accuracy(accuracies: list[float], attackers: set[int]) -> dict[str, Any]:
    """The summary's honest-node keys: mean and minimum accuracy of the nodes (by index) that do
    not attack (all nodes without an ``[attack]`` table), and how many attack; every engine alike."""
    honest = [a for i, a in enumerate(accuracies) if i not in attackers]
    return {"honest_mean_accuracy": sum(honest) / len(honest) if honest else None,
            "honest_min_accuracy": min(honest) if honest else None, "attackers": len(attackers)}


def robust_counts(state: Mapping[str, torch.Tensor], row: int = 0) -> dict[str, int]:
    """Node ``row``'s cumulative counts of neighbour contributions its robust rule clipped and
    discarded (`gossipfl.algorithms.aggregation`); empty when it merges by the plain average."""
    return {k: int(state[k][row]) for k in ("clipped", "discarded") if k in state}


def consensus_distance(params: torch.Tensor) -> float:
    """Mean over nodes of the squared distance to the average model: (1/N) sum_i ||x_i - x_bar||^2.

    ``params`` is [N, D]. Zero means every node holds the same model.
    """
    p = params.double()
    return float(((p - p.mean(0, keepdim=True)) ** 2).sum(1).mean())


STALENESS_KEYS = ("staleness_mean", "staleness_max", "staleness_min", "staleness_behind_mean",
                  "staleness_ahead_mean")


def staleness_totals(total: int, behind: int, count: int, high: int, low: int) -> dict[str, float | int]:
    """A run's staleness figures from the sums over its merges: the signed step lag (receiver's
    step at merge - sender's at send: negative where a slower node merges a faster neighbour's
    model), and its two sides, how far the merged models were behind and ahead."""
    return {"staleness_mean": total / count, "staleness_max": high, "staleness_min": low,
            "staleness_behind_mean": behind / count, "staleness_ahead_mean": (behind - total) / count}


class StalenessTally:
    """Running staleness of one node's merged messages (see the module docstring)."""

    def __init__(self) -> None:
        self.total = 0
        self.count = 0
        self.behind = 0  # sum of max(0, lag): steps the merged models were behind the receiver
        self.max: int | None = None
        self.min: int | None = None
        self._row = (0, 0)  # total and count at the previous metrics row

    def add(self, staleness: int) -> None:
        self.total += staleness
        self.count += 1
        self.behind += max(staleness, 0)
        self.max = staleness if self.max is None else max(self.max, staleness)
        self.min = staleness if self.min is None else min(self.min, staleness)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    @property
    def behind_mean(self) -> float | None:
        """Mean of max(0, lag): how many steps a merged model was older than the receiver's."""
        return self.behind / self.count if self.count else None

    @property
    def ahead_mean(self) -> float | None:
        """Mean of max(0, -lag): how many steps a merged model was ahead (a faster sender's)."""
        return (self.behind - self.total) / self.count if self.count else None

    def since_row(self) -> float | None:
        """Mean over the messages merged since the last call (the previous metrics row)."""
        total, count = self.total - self._row[0], self.count - self._row[1]
        self._row = (self.total, self.count)
        return total / count if count else None


def _clean(v: Any) -> Any:
    # JSON has no NaN/Inf; write null rather than produce a file other tools cannot parse.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsWriter:
    """Appends rows to ``metrics.jsonl``; thread-safe; a full disk is logged once, not raised.

    Losing a metrics row must never stop learning, so write errors are counted and reported.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.rows: list[dict[str, Any]] = []  # kept in memory too, for summaries
        self.write_errors = 0
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")

    def __call__(self, row: dict[str, Any]) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        with self._lock:
            self.rows.append(row)
            if self._file is None:
                return
            try:
                self._file.write(json.dumps(row) + "\n")
                self._file.flush()
            except OSError as exc:
                self.write_errors += 1
                if self.write_errors == 1:
                    log.error("cannot write metrics to %s (%s); learning continues", self.path, exc)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError as exc:
                    log.error("closing %s failed: %s", self.path, exc)
                self._file = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file; a truncated last line (crash mid-write) is skipped."""
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows
