"""Gradient exchange: neighbours share stochastic gradients and apply their weighted average.

Each node computes a stochastic gradient on its own data and sends it to its neighbours; it then
descends along the mixing-weighted average of the gradients it holds, its own included, and mixes
models with its neighbours every ``average_every`` gradient messages so that models cannot drift
apart (decentralized gradient averaging; with ``average_every = 1`` it is the "combine gradients,
combine models" form of diffusion / D-PSGD, Lian et al., "Can Decentralized Algorithms Outperform
Centralized Algorithms?", NeurIPS 2017, and Sayed, "Adaptation, Learning, and Optimization over
Networks", Foundations and Trends in ML, 2014). In lock-step rounds:

    x_i^r = sum_j W_ij x_j^{r-1}  -  lr * sum_j W_ij g_j(x_j^{r-1})     (model mix when sent)
    x_i^r = x_i^{r-1}             -  lr * sum_j W_ij g_j(x_j^{r-1})     (otherwise)

With a complete graph, uniform weights 1/N and identical initial models every node holds the
same model and the rule is exactly centralized minibatch SGD on the union of the N batches, one
round late: the gradient computed in round r is applied at the start of round r + 1, once the
neighbours' gradients of round r arrived. The descent goes through ``Trainer.apply_gradient``,
so the Trainer's momentum and weight decay apply to the averaged gradient as they would
centrally.

How the seam is used: ``local_step`` first applies the gradient accumulated for the previous
step, then computes a new gradient at the updated model and stores it WITHOUT applying it;
``message`` sends it (plus the model every ``average_every`` steps: ``Channel.every``); the
``grad`` channel (``weighted``, every message) hands ``merge`` the weighted sum of the received
gradients, which it adds to the accumulator, with the node's own gradient at the self weight
``1 - sum of the present senders' weights``; the ``params`` channel mixes models like D-PSGD.
A gradient that arrives after its round's accumulator was applied is applied with its weight at
the next step (an asynchronous, stale contribution): every received gradient counts exactly
once. A node that merged nothing applies its own gradient alone.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from gossipfl.algorithms._util import check_int
from gossipfl.algorithms.base import AlgorithmBase, Channel, Inbox, Learner, Requirements, Send, State, TensorSpecs

__all__ = ["GradientExchange", "accumulate_gradients"]


def accumulate_gradients(
    acc: torch.Tensor, own: torch.Tensor | None, others: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``acc + sum_k w_k g_k (+ (1 - sum_k w_k) own)``; others ``[..., K, D]``, weights ``[..., K]``.

    ``own`` is None once the node's own gradient was already accounted for.
    """
    out = acc + (weights.unsqueeze(-2) @ others).squeeze(-2)
    if own is not None:
        out = out + (1.0 - weights.sum(-1, keepdim=True)) * own
    return out


class GradientExchange(AlgorithmBase):
    """Exchange gradients every step and models every ``average_every`` steps (>= 1)."""

    name: ClassVar[str] = "gradex"
    requirements: ClassVar[Requirements] = Requirements(weights="symmetric", undirected=True)

    def __init__(self, *, average_every: int = 1) -> None:
        self.average_every = check_int("average_every", average_every, minimum=1)
        self.channels = (Channel("grad", "weighted", latest=False),
                         Channel("params", "mix", every=self.average_every))

    def tensor_specs(self, numel: int, dtype: torch.dtype) -> TensorSpecs:
        return {"grad": ((numel,), dtype), "params": ((numel,), dtype)}

    def init_state(self, state: State) -> None:
        p = state["params"]
        n = p.shape[0]
        state["grad"] = torch.zeros_like(p)  # own latest gradient (sent)
        state["acc"] = torch.zeros_like(p)  # weighted gradient sum to apply next
        state["own_pending"] = torch.zeros(n, dtype=torch.bool, device=p.device)  # own gradient not yet in acc
        state["have_acc"] = torch.zeros(n, dtype=torch.bool, device=p.device)  # acc holds something to apply

    def local_step(self, state: State, learner: Learner) -> torch.Tensor:
        pending = state["own_pending"]
        with torch.no_grad():
            acc = torch.where(pending.unsqueeze(1), state["acc"] + state["grad"], state["acc"])
            have = state["have_acc"] | pending  # nothing merged since the last step: own gradient alone
            if bool(have.any()):
                learner.apply(state["params"], acc, None if bool(have.all()) else have)
        loss, grad = learner.grad(state["params"])
        state["grad"] = grad
        state["acc"] = torch.zeros_like(grad)
        state["own_pending"] = torch.ones_like(pending)
        state["have_acc"] = torch.zeros_like(pending)
        return loss

    def message(self, state: State, send: Send) -> dict[str, torch.Tensor]:
        return {"grad": state["grad"], "params": state["params"]}  # params only every k steps (its channel)

    @torch.no_grad()
    def merge(self, state: State, inbox: Inbox) -> None:
        present = inbox.count["grad"] > 0
        own = (present & state["own_pending"]).to(state["grad"].dtype)
        self_w = (1.0 - inbox.weight["grad"]).to(state["grad"].dtype) * own  # each present sender once
        state["acc"] = state["acc"] + inbox["grad"] + self_w.unsqueeze(1) * state["grad"]
        state["own_pending"] = state["own_pending"] & ~present
        state["have_acc"] = state["have_acc"] | present
        state["params"] = inbox["params"]
