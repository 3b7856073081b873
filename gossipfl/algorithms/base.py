"""What every algorithm shares: the node's local state, a message, declared requirements.

An algorithm is three small pieces of math over flat parameter tensors: the local step, the
message a node sends, and the merge that folds received messages into its state. The classes
are thin; the math lives in module-level functions that also accept a leading node axis, so the
vectorised simulator can call them on [N, D] tensors unchanged.

How an engine drives an algorithm (the node's order of events, one "step"):

    merge(state, messages that arrived, weights)     # between steps, never during one
    loss = local_step(state, trainer)                 # default: one SGD step on own data
    if gossip point:
        targets = targets(neighbours, rng, round=step)
        msg = message(state, targets=targets)         # one message, sent to every target
    evaluate(model(state))                            # push-sum evaluates x / w, not x

Pairwise algorithms (``requirements.pairwise``, AD-PSGD) replace the push by an exchange: the
initiator sends ``message``; the responder calls ``respond`` (atomically under its own lock)
and returns a reply; the initiator calls ``apply_reply``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from gossipfl.learning.trainer import Trainer

__all__ = ["Algorithm", "AlgorithmBase", "LocalState", "Message", "Requirements", "TensorSpecs"]

# name -> (shape, dtype) of every tensor a message of this algorithm may carry
TensorSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass
class LocalState:
    """One node's learning state between steps.

    ``params`` is the flat model vector and is the Trainer's own tensor (same storage), so a
    merge that writes ``params`` in place changes what the next local step starts from.
    ``weight`` is the push-sum weight; ``extra`` holds algorithm state (CHOCO's public copies,
    gradient trackers, ...), created by ``init_state``. ``seed`` is a per-node seed for the
    algorithm's own randomness (compression draws, which partition to send); engines set it to
    something that differs between nodes (e.g. the seed of the node's ``random.Random``) before
    ``init_state``. Left at 0 on every node, algorithms still work, with correlated draws.
    """

    params: torch.Tensor
    step: int = 0
    age: float = 0.0
    weight: float = 1.0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class Message:
    """Algorithm-level content of one message; the wire envelope adds identity and checks."""

    sender: str = ""
    tensors: Mapping[str, torch.Tensor]
    step: int = 0
    age: float = 0.0
    round: int = 0
    weight: float = 1.0
    meta: Mapping[str, int | float | str | bool | None] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Requirements:
    """What an algorithm assumes of the engine; engines refuse a mismatch with a clear error."""

    rounds: bool = False  # needs neighbour-local rounds (merge round r-1 from every in-neighbour)
    weights: str = "symmetric"  # "symmetric" (doubly stochastic), "column" (push-sum) or "none"
    undirected: bool = True  # needs an undirected graph
    lossless: bool = False  # breaks if messages are lost
    trains: bool = True  # runs local SGD steps (pure averaging does not)
    pairwise: bool = False  # exchanges with one peer atomically (AD-PSGD) instead of pushing
    static_topology: bool = False  # needs the same neighbours and weights every round (CHOCO's replicas)


class Algorithm(Protocol):
    """The interface engines call; implementations are small classes around pure functions."""

    name: ClassVar[str]
    requirements: ClassVar[Requirements]

    def tensor_specs(self, numel: int, dtype: torch.dtype) -> TensorSpecs:
        """Every tensor a message may carry, so a node can reject wrong shapes before merging.
        A message may omit some (e.g. parameters sent only every k-th step), never add others."""
        ...

    def init_state(self, state: LocalState) -> None:
        """Allocate algorithm state in ``state.extra`` (called once, before the first step)."""
        ...

    def targets(self, neighbours: Sequence[str], rng: random.Random, *, round: int = 0) -> list[str]:
        """Whom to send to at this gossip point (``neighbours`` sorted; ``round`` = local step)."""
        ...

    def local_step(self, state: LocalState, trainer: Trainer) -> float:
        """One local computation on the node's own data; returns the minibatch loss."""
        ...

    def message(self, state: LocalState, *, targets: Sequence[str] = ()) -> Message:
        """What to send to ``targets``. Tensors may alias the state: the node encodes them (a
        copy) before the next step, under the same lock. May update the state (push-sum keeps
        only its own share of the mass)."""
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

    def model(self, state: LocalState) -> torch.Tensor:
        """The model this node would deploy (evaluated, averaged for consensus metrics)."""
        ...

    def expected_senders(self, in_neighbours: Sequence[str], *, round: int) -> list[str]:
        """Round algorithms: whose round-``round`` message a node waits for before its next step
        (default: every in-neighbour; an algorithm with random targets returns none)."""
        ...

    def respond(self, state: LocalState, incoming: Message) -> Message:
        """Pairwise algorithms: the responder's side of one atomic exchange."""
        ...

    def apply_reply(self, state: LocalState, reply: Message) -> None:
        """Pairwise algorithms: the initiator's side once the reply arrived."""
        ...


class AlgorithmBase:
    """Defaults for the optional parts of `Algorithm`; subclasses override what they need."""

    name: ClassVar[str] = ""
    requirements: ClassVar[Requirements] = Requirements()

    def tensor_specs(self, numel: int, dtype: torch.dtype) -> TensorSpecs:
        return {"params": ((numel,), dtype)}

    def init_state(self, state: LocalState) -> None:
        return None

    def targets(self, neighbours: Sequence[str], rng: random.Random, *, round: int = 0) -> list[str]:
        return list(neighbours)

    def local_step(self, state: LocalState, trainer: Trainer) -> float:
        return trainer.step()

    def message(self, state: LocalState, *, targets: Sequence[str] = ()) -> Message:
        return Message(tensors={"params": state.params}, step=state.step, round=state.step)

    def merge(self, state: LocalState, messages: Sequence[Message], weights: Mapping[str, float]) -> None:
        raise NotImplementedError

    def model(self, state: LocalState) -> torch.Tensor:
        return state.params

    def expected_senders(self, in_neighbours: Sequence[str], *, round: int) -> list[str]:
        return list(in_neighbours) if self.requirements.rounds else []

    def respond(self, state: LocalState, incoming: Message) -> Message:
        raise NotImplementedError(f"{self.name} is not a pairwise algorithm")

    def apply_reply(self, state: LocalState, reply: Message) -> None:
        raise NotImplementedError(f"{self.name} is not a pairwise algorithm")
