"""Gradient tracking (DIGing): exchange models and a tracker of the network's average gradient.

Nedić, Olshevsky, Shi, "Achieving Geometric Convergence for Distributed Optimization over
Time-Varying Graphs", SIAM J. Optim. 27(4), 2017 (DIGing); with stochastic gradients, Pu and
Nedić, "Distributed stochastic gradient tracking methods", Math. Programming, 2021. With W doubly
stochastic (Metropolis weights, possibly a different graph every round):

    x_i^{k+1} = sum_j W_ij x_j^k - lr y_i^k
    y_i^{k+1} = sum_j W_ij y_j^k + g_i(x_i^{k+1}) - g_i(x_i^k),        y_i^0 = g_i(x_i^0)

so that ``sum_i y_i = sum_i g_i`` in every round: each node descends along an estimate of the
AVERAGE gradient, and with exact gradients a constant step size reaches the exact optimum of
``sum_i f_i`` (plain D-PSGD stops at a biased point on heterogeneous data).

Mapping on the seam, in round r: ``merge`` gets the mixed models (``params`` channel, ``mix``)
and the mixed trackers (``y`` channel, ``mix``), kept apart in ``y_mix`` (the node's own unmixed
``y`` is still needed); ``local_step`` takes ``x <- x - lr y`` (plain SGD with the learner's
``lr``; weight decay, if set, is part of every ``g``; momentum is not used, it would break the
tracking invariant), then computes ``g`` at the new ``x`` and sets ``y <- y_mix + g - g_prev``;
``message`` sends ``x`` and ``y``. The very first ``local_step`` only computes
``y^0 = g(x^0)``. Needs neighbour-local rounds and lossless delivery (a lost tracker breaks the
invariant).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from gossipfl.algorithms._util import check_real
from gossipfl.algorithms.base import AlgorithmBase, Channel, Inbox, Learner, Requirements, Send, State, TensorSpecs

__all__ = ["DIGing", "tracker_update"]


def tracker_update(y_mix: torch.Tensor, grad: torch.Tensor, grad_prev: torch.Tensor) -> torch.Tensor:
    """``y_mix + grad - grad_prev`` (any leading node axes)."""
    return y_mix + grad - grad_prev


class DIGing(AlgorithmBase):
    """Gradient tracking. Hyperparameter: ``lr`` (0: use the learner's learning rate)."""

    name: ClassVar[str] = "diging"
    requirements: ClassVar[Requirements] = Requirements(rounds=True, lossless=True, weights="symmetric")
    channels = (Channel("params", "mix"), Channel("y", "mix"))

    def __init__(self, *, lr: float = 0.0) -> None:
        self.lr = check_real("lr", lr, low=0.0)

    def tensor_specs(self, numel: int, dtype: torch.dtype) -> TensorSpecs:
        return {"params": ((numel,), dtype), "y": ((numel,), dtype)}

    def init_state(self, state: State) -> None:
        p = state["params"]
        state["y"] = torch.zeros_like(p)
        state["y_mix"] = torch.zeros_like(p)
        state["g"] = torch.zeros_like(p)
        state["started"] = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
        state["mixed"] = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)

    def _grad(self, state: State, learner: Learner) -> tuple[torch.Tensor, torch.Tensor]:
        loss, grad = learner.grad(state["params"])
        if learner.weight_decay:
            grad = grad + learner.weight_decay * state["params"]
        return loss, grad

    def local_step(self, state: State, learner: Learner) -> torch.Tensor:
        started = state["started"].unsqueeze(1)
        with torch.no_grad():
            y_mix = torch.where(state["mixed"].unsqueeze(1), state["y_mix"], state["y"])
            step = torch.where(started, state["y"], torch.zeros_like(state["y"]))
            state["params"].sub_(step, alpha=self.lr or learner.lr)
        loss, grad = self._grad(state, learner)
        # the very first step only sets y = g = g(x)
        state["y"] = torch.where(started, tracker_update(y_mix, grad, state["g"]), grad)
        state["g"] = grad
        state["started"] = torch.ones_like(state["started"])
        state["mixed"] = torch.zeros_like(state["mixed"])
        return loss

    def message(self, state: State, send: Send) -> dict[str, torch.Tensor]:
        return {"params": state["params"], "y": state["y"]}

    @torch.no_grad()
    def merge(self, state: State, inbox: Inbox) -> None:
        # inbox["y"] mixed the received trackers with our own y; a second merge in one step (a late
        # message) mixes into what the first one left instead
        again = state["mixed"].unsqueeze(1)
        self_w = (1.0 - inbox.weight["y"]).to(state["y"].dtype).unsqueeze(1)
        y_mix = torch.where(again, inbox["y"] + self_w * (state["y_mix"] - state["y"]), inbox["y"])
        state["y_mix"] = y_mix
        state["mixed"] = torch.ones_like(state["mixed"])
        state["params"] = inbox["params"]
