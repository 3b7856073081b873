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

Mapping on the contract, in round r: ``merge`` mixes the received models into ``x`` and the
received trackers into a separate ``y_mix`` (the node's own unmixed ``y`` is still needed);
``local_step`` takes ``x <- x - lr y`` (plain SGD with the Trainer's ``lr``; weight decay, if
set, is part of every ``g``; momentum is not used, it would break the tracking invariant), then
computes ``g`` at the new ``x`` and sets ``y <- y_mix + g - g_prev``; ``message`` sends ``x``
and ``y``. The very first ``local_step`` only computes ``y^0 = g(x^0)``. Needs neighbour-local
rounds and lossless delivery (a lost tracker breaks the invariant).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from gossipfl.algorithms._util import check_real
from gossipfl.algorithms.base import AlgorithmBase, LocalState, Message, Requirements, TensorSpecs
from gossipfl.algorithms.dpsgd import latest_per_sender, mix

if TYPE_CHECKING:
    from gossipfl.learning.trainer import Trainer

__all__ = ["DIGing", "tracker_update"]


def tracker_update(y_mix: torch.Tensor, grad: torch.Tensor, grad_prev: torch.Tensor) -> torch.Tensor:
    """``y_mix + grad - grad_prev`` (any leading node axes)."""
    return y_mix + grad - grad_prev


class DIGing(AlgorithmBase):
    """Gradient tracking. Hyperparameter: ``lr`` (0: use the Trainer's learning rate)."""

    name: ClassVar[str] = "diging"
    requirements: ClassVar[Requirements] = Requirements(rounds=True, lossless=True, weights="symmetric")

    def __init__(self, *, lr: float = 0.0) -> None:
        self.lr = check_real("lr", lr, low=0.0)

    def tensor_specs(self, numel: int, dtype: torch.dtype) -> TensorSpecs:
        return {"params": ((numel,), dtype), "y": ((numel,), dtype)}

    def init_state(self, state: LocalState) -> None:
        state.extra["y"] = torch.zeros_like(state.params)
        state.extra["y_mix"] = torch.zeros_like(state.params)
        state.extra["g"] = torch.zeros_like(state.params)
        state.extra["started"] = torch.zeros((), dtype=torch.bool)
        state.extra["mixed"] = torch.zeros((), dtype=torch.bool)

    def _grad(self, trainer: Trainer) -> tuple[float, torch.Tensor]:
        loss, grad = trainer.loss_and_grad()
        if trainer.weight_decay:
            grad = grad + trainer.weight_decay * trainer.params.detach()
        trainer.steps += 1
        trainer.last_loss = loss
        return loss, grad

    def local_step(self, state: LocalState, trainer: Trainer) -> float:
        ex = state.extra
        if not bool(ex["started"]):
            loss, grad = self._grad(trainer)
            ex["y"].copy_(grad)
            ex["g"].copy_(grad)
            ex["started"].fill_(True)
            ex["mixed"].fill_(False)
            return loss
        with torch.no_grad():
            y_mix = ex["y_mix"] if bool(ex["mixed"]) else ex["y"]
            y_mix = y_mix.clone()
            state.params.sub_(ex["y"], alpha=self.lr or trainer.lr)
        loss, grad = self._grad(trainer)
        ex["y"].copy_(tracker_update(y_mix, grad, ex["g"]))
        ex["g"].copy_(grad)
        ex["mixed"].fill_(False)
        return loss

    def message(self, state: LocalState, *, targets: Sequence[str] = ()) -> Message:
        return Message(tensors={"params": state.params, "y": state.extra["y"]},
                       step=state.step, round=state.step, age=state.age)

    @torch.no_grad()
    def merge(self, state: LocalState, messages: Sequence[Message], weights: Mapping[str, float]) -> None:
        fresh = latest_per_sender(messages)
        senders = [s for s in fresh if s in weights]
        if not senders:
            return
        w = torch.tensor([weights[s] for s in senders], dtype=state.params.dtype)
        xs = torch.stack([fresh[s].tensors["params"] for s in senders])
        ys = torch.stack([fresh[s].tensors["y"] for s in senders])
        base = state.extra["y_mix"] if bool(state.extra["mixed"]) else state.extra["y"]
        state.extra["y_mix"].copy_(mix(base, ys, w))
        state.extra["mixed"].fill_(True)
        state.params.copy_(mix(state.params, xs, w))
