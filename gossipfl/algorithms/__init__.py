"""Learning algorithms, each written once as pure tensor math and run by every engine.

To add one: write a module with pure functions and a small class deriving from
`gossipfl.algorithms.base.AlgorithmBase` (see `Algorithm` there for what an engine calls and in
which order), then list it in ``ALGORITHMS`` below.
"""

from __future__ import annotations

from typing import Any

from gossipfl.algorithms.base import Algorithm, AlgorithmBase, LocalState, Message, Requirements
from gossipfl.algorithms.dpsgd import DPSGD, Averaging
from gossipfl.algorithms.gossip import GossipLearning
from gossipfl.errors import ConfigError

__all__ = ["ALGORITHMS", "Algorithm", "AlgorithmBase", "LocalState", "Message", "Requirements", "get_algorithm"]

ALGORITHMS: dict[str, type] = {cls.name: cls for cls in (DPSGD, GossipLearning, Averaging)}


def get_algorithm(name: str, **params: Any) -> Algorithm:
    """Instantiate an algorithm by name with its hyperparameters; errors name the bad value."""
    cls = ALGORITHMS.get(name)
    if cls is None:
        raise ConfigError(f"algorithm: unknown {name!r}; choose one of {', '.join(sorted(ALGORITHMS))}")
    try:
        return cls(**params)  # type: ignore[no-any-return]
    except TypeError as exc:
        raise ConfigError(f"algorithm_params for {name!r}: {exc}") from None
