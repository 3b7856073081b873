"""Gossip learning with age-weighted merge.

Ormándi, Hegedűs, Jelasity, "Gossip learning with linear models on fully distributed data",
Concurrency and Computation 2013; Hegedűs, Danner, Jelasity, "Gossip learning as a decentralized
alternative to federated learning", DAIS 2019. Each node periodically sends (model, age) to ONE
random neighbour; a receiver merges every arriving model into its own, weighting each by its
age (number of updates it has seen):

    x <- (a_i x_i + a_j x_j) / (a_i + a_j),    a <- max(a_i, a_j)

then keeps training (merge-update order). Asynchronous by nature: no rounds, loss-tolerant.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from gossipfl.algorithms.base import AlgorithmBase, LocalState, Message, Requirements

__all__ = ["GossipLearning", "age_weighted_merge"]


def age_weighted_merge(
    x: torch.Tensor, age: torch.Tensor | float, y: torch.Tensor, age_y: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Age-weighted average of two models (leading node axes allowed; ages broadcast over D).

    Two fresh models (both age 0) average with equal weight.
    """
    if isinstance(age, torch.Tensor) or isinstance(age_y, torch.Tensor):
        a = torch.as_tensor(age, dtype=x.dtype)
        b = torch.as_tensor(age_y, dtype=x.dtype)
        total = a + b
        wa = torch.where(total > 0, a / total.clamp_min(1e-12), torch.full_like(total, 0.5))
        merged = wa.unsqueeze(-1) * x + (1 - wa).unsqueeze(-1) * y
        return merged, torch.maximum(a, b)
    total = float(age) + float(age_y)
    wa = 0.5 if total <= 0 else float(age) / total
    return wa * x + (1.0 - wa) * y, max(float(age), float(age_y))


class GossipLearning(AlgorithmBase):
    """Send to one random neighbour per gossip point; age-weighted merge on arrival."""

    name: ClassVar[str] = "gossip"
    requirements: ClassVar[Requirements] = Requirements(weights="none", undirected=False)

    def targets(self, neighbours: Sequence[str], rng: random.Random, *, round: int = 0) -> list[str]:
        return [rng.choice(list(neighbours))] if neighbours else []

    def message(self, state: LocalState, *, targets: Sequence[str] = ()) -> Message:
        return Message(tensors={"params": state.params}, step=state.step, round=state.step, age=state.age)

    @torch.no_grad()
    def merge(self, state: LocalState, messages: Sequence[Message], weights: Mapping[str, float]) -> None:
        for m in messages:
            merged, age = age_weighted_merge(state.params, state.age, m.tensors["params"], m.age)
            state.params.copy_(merged)
            state.age = float(age)
