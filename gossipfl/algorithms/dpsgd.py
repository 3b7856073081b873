"""Decentralized parallel SGD (D-PSGD), applied asynchronously as neighbours' models arrive.

Update rule (Lian et al., "Can Decentralized Algorithms Outperform Centralized Algorithms?",
NeurIPS 2017): x_i <- sum_j W_ij x_j - lr * g_i(x_i), with W doubly stochastic (Metropolis-Hastings
weights over the graph). Here each node keeps training at its own pace; between two local steps
it mixes in the newest model received from each neighbour since the last merge:

    x_i <- x_i + sum_{j in fresh} W_ij (x_j - x_i)

A neighbour whose message is missing (late, lost, dead) contributes x_i itself, i.e. its weight
folds into the self weight, so the rule stays a convex combination. With every neighbour fresh
in every round it is exactly synchronous D-PSGD.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from gossipfl.algorithms.base import AlgorithmBase, LocalState, Message, Requirements

__all__ = ["DPSGD", "mix"]


def mix(x: torch.Tensor, others: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x + sum_k w_k (others_k - x); shapes x [..., D], others [..., K, D], weights [..., K].

    Written as (1 - sum w) x + sum w_k others_k so it is one fused matmul on the node axis.
    """
    self_w = 1.0 - weights.sum(-1, keepdim=True)
    return self_w * x + (weights.unsqueeze(-2) @ others).squeeze(-2)


def latest_per_sender(messages: Sequence[Message]) -> dict[str, Message]:
    """Keep the newest message of each sender (by step; later arrival wins ties)."""
    latest: dict[str, Message] = {}
    for m in messages:
        old = latest.get(m.sender)
        if old is None or m.step >= old.step:
            latest[m.sender] = m
    return latest


class DPSGD(AlgorithmBase):
    """Push the model to every neighbour each gossip point; mix fresh neighbour models."""

    name: ClassVar[str] = "dpsgd"
    requirements: ClassVar[Requirements] = Requirements(weights="symmetric", undirected=True)

    @torch.no_grad()
    def merge(self, state: LocalState, messages: Sequence[Message], weights: Mapping[str, float]) -> None:
        fresh = latest_per_sender(messages)
        if not fresh:
            return
        senders = [s for s in fresh if s in weights]
        if not senders:
            return
        others = torch.stack([fresh[s].tensors["params"] for s in senders])
        w = torch.tensor([weights[s] for s in senders], dtype=state.params.dtype)
        state.params.copy_(mix(state.params, others, w))


class Averaging(DPSGD):
    """Pure gossip averaging (no training): the consensus-rate experiment of the mixing matrix."""

    name: ClassVar[str] = "averaging"
    requirements: ClassVar[Requirements] = Requirements(weights="symmetric", trains=False)
