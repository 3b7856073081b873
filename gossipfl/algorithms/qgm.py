"""Quasi-Global Momentum (QG-DSGDm): a momentum buffer of the model's own displacement, not of gradients.

Lin, Karimireddy, Stich, Jaggi, "Quasi-Global Momentum: Accelerating Decentralized Deep Learning on
Heterogeneous Data", ICML 2021, Algorithm 1 (heavy-ball form). On heterogeneous data a local
momentum buffer accumulates the node's own (biased) gradients and amplifies the drift between
nodes; QGM replaces it with an average of how the node's model actually moved, gossip included,
which approximates the global optimisation direction. With W doubly stochastic, for t = 0, 1, ...:

    g_i^t       = grad f_i(x_i^t) + wd x_i^t
    x_i^{t+1/2} = x_i^t - lr (g_i^t + beta m_i^{t-1})                  local step
    x_i^{t+1}   = sum_j W_ij x_j^{t+1/2}                               gossip (as D-PSGD)
    m_i^t       = beta m_i^{t-1} + (1 - beta) (x_i^t - x_i^{t+1}) / lr  quasi-global momentum

with ``m_i^{-1} = 0``. The paper writes the buffer's averaging factor as its own mu (the authors'
code defaults to ``mu = 0.9 = beta``); here both are ``beta``. The paper's experiments use the
Nesterov variant; this is the heavy-ball one. On a complete graph with uniform weights (or
W = I) and identical models every node runs ``x^{t+1} = x^t - lr (g^t + beta m^{t-1})``,
``m^t = beta m^{t-1} + (1 - beta) (g^t + beta m^{t-1})`` on the average (own) objective.

How it maps onto the seam: messages and merges are D-PSGD's (``params`` channel, ``mix``, the
newest model of each neighbour, asynchronous; no rounds needed). ``local_step`` first folds in
the displacement since the node's previous local step, ``d = (x_start - x) / lr``, where
``x_start`` (``state["x_start"]``) is the model the previous local step STARTED from (after that
step's merge) and ``x`` the model now (after this step's merge): the node's own update plus
whatever gossip moved it by in between, however many merges (none, one or several) that was.
Synchronously, with every neighbour's message merged once per step, this is exactly
``x_i^t - x_i^{t+1}`` above. It then sets ``x_start = x`` and steps along ``g + beta m``
(``state["m_hat"]``). Steps are plain gradient steps via ``learner.grad`` at the learner's ``lr``
with its weight decay: the learner's own momentum (the run's ``momentum`` setting) is NOT applied
on top; ``beta`` is the only momentum.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from gossipfl.algorithms._util import check_real
from gossipfl.algorithms.base import AlgorithmBase, Channel, Inbox, Learner, Requirements, State

__all__ = ["QuasiGlobalMomentum", "quasi_global_momentum"]


def quasi_global_momentum(m: torch.Tensor, x_start: torch.Tensor, x: torch.Tensor, *, beta: float,
                          lr: float) -> torch.Tensor:
    """``beta m + (1 - beta) (x_start - x) / lr`` (any leading node axes)."""
    return beta * m + (1.0 - beta) * (x_start - x) / lr


class QuasiGlobalMomentum(AlgorithmBase):
    """QG-DSGDm: D-PSGD mixing, local steps along ``g + beta m`` with ``m`` the displacement momentum.

    Hyperparameter: ``beta`` (momentum factor in [0, 1), default 0.9; 0 is plain D-PSGD).
    """

    name: ClassVar[str] = "qgm"
    requirements: ClassVar[Requirements] = Requirements(weights="symmetric", undirected=True)
    channels = (Channel("params", "mix"),)

    def __init__(self, *, beta: float = 0.9) -> None:
        self.beta = check_real("beta", beta, low=0.0, high=1.0)
        if self.beta == 1.0:
            raise ValueError("beta must be < 1 (with 1 the buffer never sees a displacement)")

    def init_state(self, state: State) -> None:
        p = state["params"]
        state["m_hat"] = torch.zeros_like(p)  # the quasi-global momentum buffer
        state["x_start"] = torch.zeros_like(p)  # the model the previous local step started from
        state["started"] = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)

    def local_step(self, state: State, learner: Learner) -> torch.Tensor:
        x = state["params"]
        with torch.no_grad():
            if learner.lr > 0:
                m = quasi_global_momentum(state["m_hat"], state["x_start"], x, beta=self.beta, lr=learner.lr)
                state["m_hat"] = torch.where(state["started"].unsqueeze(1), m, state["m_hat"])
            state["x_start"] = x.clone()
        loss, grad = learner.grad(x)
        with torch.no_grad():
            if learner.weight_decay:
                grad = grad + learner.weight_decay * x
            x.sub_(grad + self.beta * state["m_hat"], alpha=learner.lr)  # in place: may view the trainer's model
        state["started"] = torch.ones_like(state["started"])
        return loss

    @torch.no_grad()
    def merge(self, state: State, inbox: Inbox) -> None:
        state["params"] = inbox["params"]
