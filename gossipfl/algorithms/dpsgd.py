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
``trimmed_mean`` with ``b``, ``krum`` with ``f`` and ``m``, ``clipped_gossip`` with ``tau``); the
channel then gathers every fresh neighbour's model (``gather``) and the rule folds them in.
``mean`` (default) is the mix above. The coordinate-wise rules and Krum compare models entry by
entry: start the nodes from one model (``same_init = true``), or they mix unrelated hidden units
(median from independent initial models stays at chance on digits).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from gossipfl.algorithms._util import check_choice, check_int, check_real
from gossipfl.algorithms.base import AlgorithmBase, Channel, Inbox, Requirements, State
from gossipfl.algorithms.inbox import latest_per_sender, mix
from gossipfl.algorithms.robust import AGGREGATORS

# each rule's parameters: name -> (checker, default)
_RULE_PARAMS: dict[str, dict[str, tuple[Any, Any]]] = {
    "mean": {}, "median": {},
    "trimmed_mean": {"b": (lambda k, v: check_int(k, v, minimum=0), 1)},
    "krum": {"f": (lambda k, v: check_int(k, v, minimum=0), 1), "m": (lambda k, v: check_int(k, v, minimum=1), 1)},
    "clipped_gossip": {"tau": (lambda k, v: math.inf if v in ("inf", math.inf) else check_real(k, v, low=0.0,
                                                                                               low_open=True), 1.0)},
}

__all__ = ["DPSGD", "Averaging", "latest_per_sender", "mix"]


class DPSGD(AlgorithmBase):
    """Push the model to every neighbour each gossip point; mix fresh neighbour models."""

    name: ClassVar[str] = "dpsgd"
    requirements: ClassVar[Requirements] = Requirements(weights="symmetric", undirected=True)
    channels = (Channel("params", "mix"),)

    def __init__(self, *, aggregator: str = "mean", b: int | None = None, f: int | None = None,
                 m: int | None = None, tau: float | str | None = None) -> None:
        self.aggregator = check_choice("aggregator", aggregator, list(AGGREGATORS))
        given = {k: v for k, v in (("b", b), ("f", f), ("m", m), ("tau", tau)) if v is not None}
        known = _RULE_PARAMS[aggregator]
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"{unknown[0]} is not a parameter of aggregator {aggregator!r}"
                             + (f" (it takes {', '.join(known)})" if known else " (it takes none)"))
        self.rule_params = {k: check(k, given.get(k, default)) for k, (check, default) in known.items()}
        if aggregator != "mean":
            self.channels = (Channel("params", "gather"),)

    @torch.no_grad()
    def merge(self, state: State, inbox: Inbox) -> None:
        if self.aggregator == "mean":
            state["params"] = inbox["params"]
            return
        own, others = state["params"], inbox["params"]  # [R, D], [R, K, D]
        if others.shape[1] == 0:
            return
        mask = torch.arange(others.shape[1], device=own.device).unsqueeze(0) < inbox.count["params"].unsqueeze(1)
        weights = inbox.weight["params"].to(own.dtype)
        state["params"] = AGGREGATORS[self.aggregator](own, others, mask, weights, **self.rule_params)


class Averaging(DPSGD):
    """Pure gossip averaging (no training): the consensus-rate experiment of the mixing matrix."""

    name: ClassVar[str] = "averaging"
    requirements: ClassVar[Requirements] = Requirements(weights="symmetric", trains=False)
