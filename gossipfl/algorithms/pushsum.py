"""Push-sum gossip and Stochastic Gradient Push (SGP), for directed and time-varying graphs.

Push-sum: Kempe, Dobra, Gehrke, "Gossip-Based Computation of Aggregate Information", FOCS 2003.
SGP: Assran, Loizou, Ballas, Rabbat, "Stochastic Gradient Push for Distributed Deep Learning",
ICML 2019. Every node holds a numerator ``x_i`` (``state["params"]``) and a weight ``w_i``
(``state["weight"]``, float64, 1 at the start); its model is the de-biased ``z_i = x_i / w_i``.
One step:

    x_i <- w_i (z_i - lr u_i),  u_i the optimiser's direction at z_i   local_step (SGP; not in pure push-sum)
    keep a share p_ii of (x_i, w_i), push p_ji (x_i, w_i) to each out-neighbour j     message
    x_i <- x_i + sum of received x;  w_i <- w_i + sum of received w                     merge (``sum`` channels)

The shares of each sender sum to one (column-stochastic weights; default ``p = 1/(d+1)`` for d
targets, or ``self_weight`` kept and the rest split evenly), so no row balancing is needed and
the graph may be directed and change every round (one-peer exponential graphs). Total mass,
``sum_i x_i`` and ``sum_i w_i`` over nodes plus messages in flight, never changes; pure push-sum
therefore drives every ``x_i / w_i`` to the exact average of the initial vectors on any strongly
connected (or jointly strongly connected) graph, also when messages arrive late, since a delayed
message only holds mass in flight for a while. A LOST message takes its mass with it: the
de-biased models still agree, on a weighted average that is no longer the uniform one.

The local step is taken in z-space (the momentum buffer too): it moves z by exactly what SGD
would. Asynchronously, w at step time depends on how many shares have arrived since the last
push; an x-space step would move z by lr g / w (the local cluster diverged with it).
``state["params"]`` holds the numerator ``x``, not the model: engines evaluate ``model(state)``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from gossipfl.algorithms._util import check_real
from gossipfl.algorithms.base import (
    AlgorithmBase,
    Channel,
    Inbox,
    Learner,
    Requirements,
    Send,
    State,
    TensorSpecs,
)

__all__ = ["PushSum", "PushSumAveraging", "debias", "push_share", "push_shares"]


def push_share(n_targets: int, self_weight: float = 0.0) -> tuple[float, float]:
    """(share kept, share sent to each target); ``self_weight`` 0 means uniform ``1/(d+1)``."""
    if n_targets == 0:
        return 1.0, 0.0
    if self_weight <= 0.0:
        share = 1.0 / (n_targets + 1)
        return share, share
    return self_weight, (1.0 - self_weight) / n_targets


def push_shares(n_targets: torch.Tensor, self_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`push_share` for a tensor of target counts: (kept ``[n]``, sent per target ``[n]``), float64.

    With no target nothing is sent: the "sent" share of such a node is not used (not 0 here)."""
    d = n_targets.to(torch.float64)
    if self_weight <= 0.0:  # a node with no target keeps 1 / (0 + 1) = all; what it "sends" goes nowhere
        share = (d + 1.0).reciprocal_()
        return share, share
    keep = torch.where(d > 0, torch.full_like(d, self_weight), torch.ones_like(d))
    return keep, torch.where(d > 0, (1.0 - self_weight) / d.clamp_min(1.0), torch.zeros_like(d))


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
    channels = (Channel("params", "sum", latest=False), Channel("weight", "sum", latest=False))

    def __init__(self, *, self_weight: float = 0.0) -> None:
        self.self_weight = check_real("self_weight", self_weight, low=0.0, high=1.0)
        if self.self_weight == 1.0:
            raise ValueError("self_weight must be < 1 (a node that keeps all its mass never mixes)")

    def tensor_specs(self, numel: int, dtype: torch.dtype) -> TensorSpecs:
        return {"params": ((numel,), dtype), "weight": ((), torch.float64)}

    def init_state(self, state: State) -> None:
        p = state["params"]
        state["weight"] = torch.ones(p.shape[0], dtype=torch.float64, device=p.device)

    def _w(self, state: State) -> torch.Tensor:
        return state["weight"].to(state["params"].dtype).unsqueeze(1)

    def model(self, state: State) -> torch.Tensor:
        return debias(state["params"], self._w(state))

    def local_step(self, state: State, learner: Learner) -> torch.Tensor:
        w = self._w(state)
        z = debias(state["params"], w)
        loss = learner.sgd_step(z)  # the step (and the momentum) in z-space
        torch.mul(z, w, out=state["params"])
        return loss

    @torch.no_grad()
    def message(self, state: State, send: Send) -> dict[str, torch.Tensor]:
        keep, share = push_shares(send.targets, self.self_weight)
        p, dt = state["params"], state["params"].dtype
        sent = share.to(dt).unsqueeze(1)
        out = p * sent
        p.mul_(sent if keep is share else keep.to(dt).unsqueeze(1))
        w_out = state["weight"] * share
        state["weight"] = state["weight"] * keep
        return {"params": out, "weight": w_out}

    @torch.no_grad()
    def merge(self, state: State, inbox: Inbox) -> None:
        state["params"].add_(inbox["params"])
        state["weight"] = state["weight"] + inbox["weight"]


class PushSumAveraging(PushSum):
    """Pure push-sum averaging, no training: every x / w converges to the average of the x_i(0)."""

    name: ClassVar[str] = "pushsum_averaging"
    requirements: ClassVar[Requirements] = Requirements(weights="column", undirected=False, trains=False)
