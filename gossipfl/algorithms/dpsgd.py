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

``order``: where the gradient is taken relative to the mix (in lock-step, X the [N, D] models):

- ``lian`` (the default): X <- W X - lr G(X), Lian et al.'s rule: the gradient at the point the node
  sent (its model after its last step, kept as ``anchor``), applied to the mixed model; the
  gradient needs nothing from the neighbours, so a node computes while its messages travel.
- ``atc`` (adapt then combine): X <- W (X - lr G(X)); the node sends its half step and deploys
  the combination (``model`` is the point before the local step, ``combined``).
- ``cta`` (combine then adapt; what every engine did before ``order`` existed, and the order
  QGM and exact diffusion build on): X <- W X - lr G(W X); the gradient at the mixed point, and the
  node deploys and sends the model after its step. (ATC and CTA are one recursion read at two
  points: X_atc = W X_cta.)

With f_i(x) = 1/2 |x - b_i|^2 the fixed points differ (ring, n = 16, lr 0.1: 3.6 %): lian
X* = lr ((1 + lr) I - W)^-1 B; atc (I - (1 - lr) W)^-1 lr W B; cta (I - (1 - lr) W)^-1 lr B.

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

from gossipfl.algorithms._util import check_choice
from gossipfl.algorithms.aggregation import gathering
from gossipfl.algorithms.base import AlgorithmBase, Channel, Inbox, Learner, Requirements, State
from gossipfl.algorithms.inbox import latest_per_sender, mix

__all__ = ["ORDERS", "DPSGD", "Averaging", "latest_per_sender", "mix"]

ORDERS = ("lian", "atc", "cta")


class DPSGD(AlgorithmBase):
    """Push the model to every neighbour each gossip point; mix fresh neighbour models."""

    name: ClassVar[str] = "dpsgd"
    requirements: ClassVar[Requirements] = Requirements(weights="symmetric", undirected=True)
    channels = (Channel("params", "mix", replaces=True),)  # merge: params <- the mix (robust rules: gather)

    def __init__(self, *, aggregator: str = "mean", order: str = "lian", **rule_params: Any) -> None:
        check_choice("order", order, ORDERS)
        self.order = order if self.requirements.trains else "cta"  # no local step: nothing to order
        gathering(self, aggregator, rule_params)

    def init_state(self, state: State) -> None:
        super().init_state(state)
        self.rule.init_state(state)
        if self.order == "lian":  # the point the next gradient is taken at: the model last sent
            state["anchor"] = state["params"].clone()
        elif self.order == "atc":  # the combination the node deploys
            state["combined"] = state["params"].clone()

    def local_step(self, state: State, learner: Learner) -> torch.Tensor:
        if self.order == "cta":
            return learner.sgd_step(state["params"])
        if self.order == "atc":
            state["combined"].copy_(state["params"])
            return learner.sgd_step(state["params"])
        anchor, params = state["anchor"], state["params"]
        loss, grad = learner.grad(anchor)
        if learner.weight_decay:  # the optimiser adds decay * params: make it decay * anchor, part of g(anchor)
            grad = grad + learner.weight_decay * (anchor - params)
        learner.apply(params, grad)
        anchor.copy_(params)
        return loss

    def model(self, state: State) -> torch.Tensor:
        return state["combined"] if self.order == "atc" else state["params"]

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
