"""Who wakes at each clock tick of randomized gossip, the same in every engine.

Boyd, Ghosh, Prabhakar, Shah, "Randomized Gossip Algorithms", IEEE Trans. Inf. Theory 2006: each
node has a rate-1 Poisson clock; equivalently one global clock whose every tick wakes one node
drawn uniformly at random. A lock-step round is N ticks, so a node wakes once per round on
average. The draws come from their own seeded stream (not the engines' generators), so the local
cluster and the vectorised engine wake the same nodes in the same order.
"""

from __future__ import annotations

import numpy as np

__all__ = ["wakeups"]


def wakeups(seed: int, round_: int, n: int) -> list[int]:
    """The N nodes woken, in tick order, in lock-step round ``round_`` (1-based) of a run seeded ``seed``."""
    rng = np.random.default_rng([seed, round_, 0x60551])
    return rng.integers(0, n, size=n).tolist()
