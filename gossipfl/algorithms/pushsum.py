"""Push-sum gossip and Stochastic Gradient Push (SGP), for directed and time-varying graphs.

Push-sum: Kempe, Dobra, Gehrke, "Gossip-Based Computation of Aggregate Information", FOCS 2003.
SGP: Assran, Loizou, Ballas, Rabbat, "Stochastic Gradient Push for Distributed Deep Learning",
ICML 2019. Every node holds a numerator ``x_i`` (``state.params``) and a weight ``w_i``
(``state.weight``, 1 at the start); its model is the de-biased ``z_i = x_i / w_i``. One step:

    x_i <- x_i - lr w_i g_i(z_i)                           local_step (SGP; skipped by pure push-sum)
    keep a share p_ii of (x_i, w_i), push p_ji (x_i, w_i) to each out-neighbour j     message
    x_i <- x_i + sum of received x;  w_i <- w_i + sum of received w                     merge

The shares of each sender sum to one (column-stochastic weights; default ``p = 1/(d+1)`` for d
targets, or ``self_weight`` kept and the rest split evenly), so no row balancing is needed and
the graph may be directed and change every round (one-peer exponential graphs). Total mass,
``sum_i x_i`` and ``sum_i w_i`` over nodes plus messages in flight, never changes; pure push-sum
therefore drives every ``x_i / w_i`` to the exact average of the initial vectors on any strongly
connected (or jointly strongly connected) graph, also when messages arrive late, since a delayed
message only holds mass in flight for a while. A LOST message takes its mass with it: the
de-biased models still agree, on a weighted average that is no longer the uniform one.

``state.params`` holds the numerator ``x``, not the model: engines evaluate ``model(state)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from gossipfl.algorithms._util import check_real
from gossipfl.algorithms.base import AlgorithmBase, LocalState, Message, Requirements

if TYPE_CHECKING:
    from gossipfl.learning.trainer import Trainer

__all__ = ["PushSum", "PushSumAveraging", "debias", "push_share"]


def push_share(n_targets: int, self_weight: float = 0.0) -> tuple[float, float]:
    """(share kept, share sent to each target); ``self_weight`` 0 means uniform ``1/(d+1)``."""
    if n_targets == 0:
        return 1.0, 0.0
    if self_weight <= 0.0:
        share = 1.0 / (n_targets + 1)
        return share, share
    return self_weight, (1.0 - self_weight) / n_targets


def debias(x: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """The push-sum model ``x / w`` (``w`` a float or ``[..., 1]``)."""
    return x / w


class PushSum(AlgorithmBase):
    """Stochastic Gradient Push: SGD at the de-biased model, push-sum mixing of (x, w).

    Hyperparameter: ``self_weight`` (share of the mass a node keeps at each push; 0 = uniform
    ``1/(d+1)`` with its d targets).
    """

    name: ClassVar[str] = "pushsum"
    requirements: ClassVar[Requirements] = Requirements(weights="column", undirected=False)

    def __init__(self, *, self_weight: float = 0.0) -> None:
        self.self_weight = check_real("self_weight", self_weight, low=0.0, high=1.0)
        if self.self_weight == 1.0:
            raise ValueError("self_weight must be < 1 (a node that keeps all its mass never mixes)")

    def model(self, state: LocalState) -> torch.Tensor:
        return debias(state.params, state.weight)

    def local_step(self, state: LocalState, trainer: Trainer) -> float:
        z = debias(state.params, state.weight)
        loss, grad = trainer.loss_and_grad(params=z)
        # Step in z-space: x -= lr * w * u moves z = x / w by exactly -lr * u, where u is the
        # (momentum-averaged) gradient, kept in z-space too. Synchronous SGP on a regular graph has
        # w near 1 at every step, where this is the published rule. Asynchronously, w at step time
        # depends on how many shares have arrived since the last push; an x-space step (or an
        # x-space momentum buffer) then moves z by lr * g / w: the local cluster diverged with it.
        if trainer.weight_decay:
            grad = grad + trainer.weight_decay * z
        if trainer.momentum:
            u = state.extra.setdefault("velocity", torch.zeros_like(grad))
            u.mul_(trainer.momentum).add_(grad)
            grad = u
        with torch.no_grad():
            state.params.sub_(grad, alpha=trainer.lr * state.weight)
        trainer.steps += 1
        trainer.last_loss = loss
        return loss

    @torch.no_grad()
    def message(self, state: LocalState, *, targets: Sequence[str] = ()) -> Message:
        keep, send = push_share(len(targets), self.self_weight)
        out = state.params * send
        state.params.mul_(keep)
        w_out = state.weight * send
        state.weight *= keep
        return Message(tensors={"params": out}, step=state.step, round=state.step, age=state.age, weight=w_out)

    @torch.no_grad()
    def merge(self, state: LocalState, messages: Sequence[Message], weights: Mapping[str, float]) -> None:
        # The mass shares travel with the messages; ``weights`` (row weights) do not apply.
        for m in messages:
            state.params.add_(m.tensors["params"])
            state.weight += m.weight


class PushSumAveraging(PushSum):
    """Pure push-sum averaging, no training: every x / w converges to the average of the x_i(0)."""

    name: ClassVar[str] = "pushsum_averaging"
    requirements: ClassVar[Requirements] = Requirements(weights="column", undirected=False, trains=False)

    def local_step(self, state: LocalState, trainer: Trainer) -> float:
        return float("nan")
