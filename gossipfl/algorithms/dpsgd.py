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

``aggregator``: a robust rule of `gossipfl.algorithms.robust` in place of the mix (``median``,
``trimmed_mean`` with ``b``, ``krum`` with ``f`` and ``m``, ``clipped_gossip`` with ``tau`` and
``delta``, ``balance`` with ``gamma``, ``kappa``, ``alpha``, ``horizon``); the channel then gathers
every fresh neighbour's model (``gather``) and the rule folds them in (`gossipfl.algorithms.aggregation`).
``mean`` (default) is the mix above. The coordinate-wise rules and Krum compare models entry by
entry: start the nodes from one model (``same_init = true``), or they mix unrelated hidden units
(median from independent initial models stays at chance on digits).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from gossipfl.algorithms.aggregation import gathering
from gossipfl.algorithms.base import AlgorithmBase, Channel, Inbox, Requirements, State
from gossipfl.algorithms.inbox import latest_per_sender, mix

__all__ = ["DPSGD", "Averaging", "latest_per_sender", "mix"]


class DPSGD(AlgorithmBase):
    """Push the model to every neighbour each gossip point; mix fresh neighbour models."""

    name: ClassVar[str] = "dpsgd"
    requirements: ClassVar[Requirements] = Requirements(weights="symmetric", undirected=True)
    channels = (Channel("params", "mix"),)

    def __init__(self, *, aggregator: str = "mean", **rule_params: Any) -> None:
        gathering(self, aggregator, rule_params)

    def init_state(self, state: State) -> None:
        super().init_state(state)
        self.rule.init_state(state)

    @torch.no_grad()
    def merge(self, state: State, inbox: Inbox) -> None:
        if self.rule.plain:
            state["params"] = inbox["params"]
            return
        self.rule.merge(state, inbox)


class Averaging(DPSGD):
    """Pure gossip averaging (no training): the consensus-rate experiment of the mixing matrix."""

    name: ClassVar[str] = "averaging"
    requirements: ClassVar[Requirements] = Requirements(weights="symmetric", trains=False)
