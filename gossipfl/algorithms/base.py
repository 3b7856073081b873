"""What every algorithm shares: the node's local state, a message, declared requirements.

An algorithm is three small pieces of math over flat parameter tensors: the local step (done by
the Trainer), the message a node sends, and the merge that folds received messages into its
state. The classes here are thin; the math lives in module-level functions that also accept a
leading node axis, so the vectorised simulator can call them on [N, D] tensors unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

__all__ = ["Algorithm", "LocalState", "Message", "Requirements"]


@dataclass
class LocalState:
    """One node's learning state between steps; ``params`` is the flat model vector."""

    params: torch.Tensor
    step: int = 0
    age: float = 0.0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Message:
    """Algorithm-level content of one message; the wire envelope adds identity and checks."""

    sender: str
    tensors: Mapping[str, torch.Tensor]
    step: int = 0
    age: float = 0.0
    round: int = 0
    weight: float = 1.0
    meta: Mapping[str, int | float | str | bool | None] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Requirements:
    """What an algorithm assumes of the engine; engines refuse a mismatch with a clear error."""

    rounds: bool = False  # needs neighbour-local rounds (messages carry a round number)
    weights: str = "symmetric"  # "symmetric" (doubly stochastic), "column" (push-sum) or "none"
    undirected: bool = True  # needs an undirected graph
    lossless: bool = False  # breaks if messages are lost
    trains: bool = True  # runs local SGD steps (pure averaging does not)


class Algorithm(Protocol):
    """The interface engines call; implementations are small classes around pure functions."""

    name: ClassVar[str]
    requirements: ClassVar[Requirements]

    def targets(self, neighbours: Sequence[str], rng: random.Random) -> list[str]:
        """Whom to send to at this gossip point."""
        ...

    def message(self, state: LocalState) -> Message:
        """What to send. Tensors may alias the state: the node encodes them (a copy) before the
        next step, under the same lock."""
        ...

    def merge(
        self,
        state: LocalState,
        messages: Sequence[Message],
        weights: Mapping[str, float],
    ) -> None:
        """Fold received messages into ``state`` in place; ``weights`` maps sender -> mixing weight.

        Message tensors alias receive buffers that the node reuses once ``merge`` returns: copy
        anything that must outlive the call.
        """
        ...
