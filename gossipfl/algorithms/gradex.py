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

How the contract is used: ``local_step`` first applies the gradient accumulated for the previous
step, then computes a new gradient at the updated model and stores it WITHOUT applying it;
``message`` sends it (plus the model every ``average_every`` steps); ``merge`` adds each received
gradient with its sender's weight to the accumulator, and the node's own gradient with the
self weight ``1 - sum of the present senders' weights``, then mixes received models like D-PSGD.
A gradient that arrives after its round's accumulator was applied is applied with its weight at
the next step (an asynchronous, stale contribution): every received gradient counts exactly
once. A node that merged nothing applies its own gradient alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from gossipfl.algorithms._util import check_int
from gossipfl.algorithms.base import AlgorithmBase, LocalState, Message, Requirements, TensorSpecs
from gossipfl.algorithms.dpsgd import latest_per_sender, mix

if TYPE_CHECKING:
    from gossipfl.learning.trainer import Trainer

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

    def tensor_specs(self, numel: int, dtype: torch.dtype) -> TensorSpecs:
        return {"grad": ((numel,), dtype), "params": ((numel,), dtype)}

    def init_state(self, state: LocalState) -> None:
        state.extra["grad"] = torch.zeros_like(state.params)  # own latest gradient (sent)
        state.extra["acc"] = torch.zeros_like(state.params)  # weighted gradient sum to apply next
        state.extra["own_pending"] = torch.zeros((), dtype=torch.bool)  # own gradient not yet in acc
        state.extra["have_acc"] = torch.zeros((), dtype=torch.bool)  # acc holds something to apply

    def local_step(self, state: LocalState, trainer: Trainer) -> float:
        ex = state.extra
        with torch.no_grad():
            if bool(ex["own_pending"]):  # nothing merged since the last step: own gradient alone
                ex["acc"].add_(ex["grad"])
                ex["own_pending"].fill_(False)
                ex["have_acc"].fill_(True)
            if bool(ex["have_acc"]):
                trainer.apply_gradient(ex["acc"])
                ex["acc"].zero_()
                ex["have_acc"].fill_(False)
        loss, grad = trainer.loss_and_grad()
        ex["grad"].copy_(grad)
        ex["own_pending"].fill_(True)
        trainer.steps += 1
        trainer.last_loss = loss
        return loss

    def message(self, state: LocalState, *, targets: Sequence[str] = ()) -> Message:
        tensors = {"grad": state.extra["grad"]}
        if state.step % self.average_every == 0:
            tensors["params"] = state.params
        return Message(tensors=tensors, step=state.step, round=state.step, age=state.age)

    @torch.no_grad()
    def merge(self, state: LocalState, messages: Sequence[Message], weights: Mapping[str, float]) -> None:
        ex = state.extra
        grads = [m for m in messages if m.sender in weights and "grad" in m.tensors]
        if grads:
            senders = {m.sender for m in grads}
            own = ex["grad"] if bool(ex["own_pending"]) else None
            w = torch.tensor([weights[m.sender] for m in grads], dtype=state.params.dtype)
            acc = accumulate_gradients(ex["acc"], None, torch.stack([m.tensors["grad"] for m in grads]), w)
            if own is not None:  # the self weight counts each present sender once
                acc.add_(own, alpha=1.0 - sum(weights[s] for s in senders))
                ex["own_pending"].fill_(False)
            ex["acc"].copy_(acc)
            ex["have_acc"].fill_(True)
        models = latest_per_sender([m for m in messages if m.sender in weights and "params" in m.tensors])
        if models:
            senders_p = list(models)
            others = torch.stack([models[s].tensors["params"] for s in senders_p])
            w = torch.tensor([weights[s] for s in senders_p], dtype=state.params.dtype)
            state.params.copy_(mix(state.params, others, w))
