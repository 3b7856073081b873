"""Split a training set among nodes: IID, Dirichlet(alpha) label skew, or K label shards per node."""

from __future__ import annotations

import math

import numpy as np
import torch

from gossipfl.errors import DataError

__all__ = ["parse_partition", "partition"]


def parse_partition(spec: str) -> tuple[str, float]:
    """Parse ``iid``, ``dirichlet:ALPHA`` or ``shards:K`` into (kind, parameter)."""
    kind, _, arg = spec.partition(":")
    if kind == "iid" and not arg:
        return "iid", 0.0
    if kind in ("dirichlet", "shards") and arg:
        try:
            value = float(arg)
        except ValueError:
            raise DataError(f"partition: {arg!r} in {spec!r} is not a number") from None
        if kind == "dirichlet" and not (value > 0 and math.isfinite(value)):
            raise DataError(f"partition: Dirichlet alpha must be a finite number > 0, got {arg}")
        if kind == "shards" and not (math.isfinite(value) and value >= 1 and value == int(value)):
            raise DataError(f"partition: shards per node must be a positive integer, got {arg}")
        return kind, value
    raise DataError(f"partition: {spec!r} is not one of iid, dirichlet:ALPHA, shards:K")


def partition(labels: torch.Tensor, n_parts: int, spec: str = "iid", *, seed: int = 0) -> list[torch.Tensor]:
    """Return one index tensor per node; every node gets at least one sample.

    Seeded so that every process of a cluster (each real node computes its own shard) agrees.
    """
    kind, arg = parse_partition(spec)
    y = labels.cpu().numpy()
    n = len(y)
    if n_parts < 1:
        raise DataError(f"partition: need at least one node, got {n_parts}")
    if n < n_parts:
        raise DataError(f"partition: {n} training samples cannot be split among {n_parts} nodes")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        parts = np.array_split(rng.permutation(n), n_parts)
    elif kind == "shards":
        parts = _shards(y, n_parts, int(arg), rng)
    else:
        parts = _dirichlet(y, n_parts, arg, rng)
    return [torch.as_tensor(np.sort(p), dtype=torch.long) for p in parts]


def _shards(y: np.ndarray, n_parts: int, per_node: int, rng: np.random.Generator) -> list[np.ndarray]:
    # Sort by label, cut into n_parts * per_node shards, deal shards at random (McMahan et al. 2017).
    n_shards = n_parts * per_node
    if n_shards > len(y):
        raise DataError(f"partition: {n_shards} shards exceed {len(y)} samples")
    order = np.argsort(y, kind="stable")
    shards = np.array_split(order, n_shards)
    deal = rng.permutation(n_shards).reshape(n_parts, per_node)
    return [np.concatenate([shards[s] for s in row]) for row in deal]


def _dirichlet(y: np.ndarray, n_parts: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    # Per class, proportions over nodes ~ Dir(alpha); small alpha = strong label skew.
    parts: list[list[int]] = [[] for _ in range(n_parts)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        props = rng.dirichlet(np.full(n_parts, alpha))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
        for node, chunk in enumerate(np.split(idx, cuts)):
            parts[node].extend(chunk.tolist())
    # Guarantee a non-empty shard: move one sample from the largest node to each empty one.
    for node in range(n_parts):
        if not parts[node]:
            donor = max(range(n_parts), key=lambda k: len(parts[k]))
            parts[node].append(parts[donor].pop())
    return [np.asarray(p, dtype=np.int64) for p in parts]
