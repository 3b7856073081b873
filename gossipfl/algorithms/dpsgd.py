"""Decentralized parallel SGD (D-PSGD), applied asynchronously as neighbours' models arrive.

Update rule (Lian et al., "Can Decentralized Algorithms Outperform Centralized Algorithms?",
NeurIPS 2017): x_i <- sum_j W_ij x_j - lr * g_i(x_i), with W doubly stochastic (Metropolis-Hastings
weights over the graph). Here each node keeps training at its own pace; between two local steps
it mixes in the newest model received from each neighbour since the last merge (the ``mix``
channel: the engine hands over ``sum_{j fresh} W_ij x_j + (1 - sum_{j fresh} W_ij) x_i``):

    x_i <- x_i + sum_{j in fresh} W_ij (x_j - x_i)

A neighbour whose message is missing (late, lost, dead) contributes x_i itself, i.e. its weight
folds into the self weight, so the rule stays a convex combination. With every neighbour fresh
in every round it is exactly synchronous D-PSGD.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from gossipfl.algorithms.base import AlgorithmBase, Channel, Inbox, Requirements, State
from gossipfl.algorithms.inbox import latest_per_sender, mix

__all__ = ["DPSGD", "Averaging", "latest_per_sender", "mix"]


class DPSGD(AlgorithmBase):
    """Push the model to every neighbour each gossip point; mix fresh neighbour models."""

    name: ClassVar[str] = "dpsgd"
    requirements: ClassVar[Requirements] = Requirements(weights="symmetric", undirected=True)
    channels = (Channel("params", "mix"),)

    @torch.no_grad()
    def merge(self, state: State, inbox: Inbox) -> None:
        state["params"] = inbox["params"]


class Averaging(DPSGD):
    """Pure gossip averaging (no training): the consensus-rate experiment of the mixing matrix."""

    name: ClassVar[str] = "averaging"
    requirements: ClassVar[Requirements] = Requirements(weights="symmetric", trains=False)
