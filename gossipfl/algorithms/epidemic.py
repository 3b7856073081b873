"""Epidemic Learning: each round, push the model to s random peers; average what arrived.

de Vos, Farhadkhani, Guerraoui, Kermarrec, Pires, Sharma, "Epidemic Learning: Boosting
Decentralized Learning with Randomized Communication", NeurIPS 2023 (EL-Local). After its local
step(s) a node sends its model to ``s`` peers drawn uniformly from those it knows (all members
when the topology is complete, as the paper's randomised communication assumes), and replaces
its model by the plain average of its own and every model that arrived since its last merge
(the ``mean`` channel, newest model per sender):

    x_i <- (x_i + sum_{j in arrived} x_j) / (1 + |arrived|)

The communication graph is a fresh random s-out graph every round: no fixed topology, no
mixing weights, nothing to keep symmetric. ``aggregator``: a robust rule in place of the plain
average (`gossipfl.algorithms.aggregation`), each arrival and the node's own model weighing
1 / (1 + |arrived|) where the rule uses weights (clipped gossip, mean). ``fanout`` 0 picks
``s = ceil(log2 n)`` for ``n`` the node count seen (the value the paper recommends).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from gossipfl.algorithms._util import check_int
from gossipfl.algorithms.aggregation import gathering
from gossipfl.algorithms.base import AlgorithmBase, Channel, Inbox, Requirements, State, Targets

__all__ = ["EpidemicLearning", "plain_average"]


def plain_average(x: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` ``[..., D]`` and ``others`` ``[..., K, D]``."""
    return (x + others.sum(-2)) / (1 + others.shape[-2])


class EpidemicLearning(AlgorithmBase):
    """Send to ``fanout`` random peers per gossip point; merge by plain averaging."""

    name: ClassVar[str] = "epidemic"
    requirements: ClassVar[Requirements] = Requirements(weights="none", undirected=False)
    channels = (Channel("params", "mean"),)

    def __init__(self, *, fanout: int = 0, aggregator: str = "mean", **rule_params: Any) -> None:
        self.fanout = check_int("fanout", fanout, minimum=0)
        self.targets = Targets("sample", self.fanout)
        gathering(self, aggregator, rule_params)

    def init_state(self, state: State) -> None:
        super().init_state(state)
        self.rule.init_state(state)

    def fanout_for(self, n_peers: int) -> int:
        s = self.fanout or max(1, math.ceil(math.log2(n_peers + 1)))
        return min(s, n_peers)

    @torch.no_grad()
    def merge(self, state: State, inbox: Inbox) -> None:
        if self.rule.plain:
            state["params"] = inbox["params"]
        else:
            self.rule.merge(state, inbox, uniform=True)
