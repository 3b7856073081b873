"""A robust rule in place of an algorithm's plain model average: which rule, its checked
parameters, and the merge that applies it and counts what it clipped or discarded.

The model-averaging algorithms (D-PSGD and pure averaging, Epidemic Learning, gossip learning)
take ``aggregator`` and the rule's parameters among their own (``[algorithm_params]``, or the
run's top-level ``aggregator`` and ``[aggregator_params]``). With a rule other than ``mean`` the
model channel gathers every fresh neighbour's model (``gather``) and `RobustRule.merge` folds them
in with `gossipfl.algorithms.robust`; the state then carries per-node counters ``clipped`` and
``discarded`` (int64, cumulative), read by ``/status``, metrics rows and the summary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from gossipfl.algorithms._util import check_int, check_real
from gossipfl.algorithms.base import Edges, Inbox, State
from gossipfl.algorithms.robust import AGGREGATORS, clipped_gossip_edges

__all__ = ["COUNTERS", "RULE_PARAMS", "RobustRule", "gathering"]

COUNTERS = ("clipped", "discarded")


def _tau(key: str, value: Any) -> float | str:
    if value in ("inf", math.inf):
        return math.inf
    if value == "auto":
        return "auto"
    return check_real(key, value, low=0.0, low_open=True)


def _nonneg(key: str, value: Any) -> float:
    return check_real(key, value, low=0.0)


# each rule's parameters: name -> (checker, default); "horizon" (BALANCE's T) defaults to the run's steps
RULE_PARAMS: dict[str, dict[str, tuple[Any, Any]]] = {
    "mean": {}, "median": {},
    "trimmed_mean": {"b": (lambda k, v: check_int(k, v, minimum=0), 1)},
    "krum": {"f": (lambda k, v: check_int(k, v, minimum=0), 1), "m": (lambda k, v: check_int(k, v, minimum=1), 1)},
    "clipped_gossip": {"tau": (_tau, 1.0), "delta": (lambda k, v: check_real(k, v, low=0.0, high=0.99), 0.1)},
    "balance": {"gamma": (_nonneg, 0.5), "kappa": (_nonneg, 1.0), "alpha": (lambda k, v: check_real(
        k, v, low=0.0, high=1.0), 0.5), "horizon": (lambda k, v: check_int(k, v, minimum=1), 300)},
}


class RobustRule:
    """``aggregator`` with its parameters checked (ValueError names the key); ``allowed``: the rules
    the algorithm composes with."""

    def __init__(self, aggregator: str, params: Mapping[str, Any], *, allowed: tuple[str, ...] = tuple(AGGREGATORS),
                 algorithm: str = "") -> None:
        if aggregator not in AGGREGATORS:
            raise ValueError(f"aggregator must be one of {', '.join(map(repr, AGGREGATORS))}, got {aggregator!r}")
        if aggregator not in allowed:
            raise ValueError(f"aggregator {aggregator!r} does not compose with {algorithm} "
                             f"(it takes {', '.join(allowed)}; see the README's robust aggregation table)")
        known = RULE_PARAMS[aggregator]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"{unknown[0]} is not a parameter of aggregator {aggregator!r}"
                             + (f" (it takes {', '.join(known)})" if known else " (it takes none)"))
        self.name = aggregator
        self.params = {k: check(k, params.get(k, default)) for k, (check, default) in known.items()}
        if aggregator == "clipped_gossip" and self.params["tau"] != "auto" and "delta" not in params:
            del self.params["delta"]  # a fixed radius: delta does not enter

    @property
    def plain(self) -> bool:
        """The plain average: the algorithm keeps its own combine (no gather, no counters)."""
        return self.name == "mean"

    def init_state(self, state: State) -> None:
        if self.plain:
            return
        n, dev = state["params"].shape[0], state["params"].device
        for key in COUNTERS:
            state.setdefault(key, torch.zeros(n, dtype=torch.int64, device=dev))
        if self.name == "balance":
            state.setdefault("merges", torch.zeros(n, dtype=torch.int64, device=dev))

    @property
    def sparse(self) -> bool:
        """The rule has an edge-list form (`Edges`): clipped gossip with a fixed radius."""
        return self.name == "clipped_gossip" and self.params["tau"] != "auto"

    def merge(self, state: State, inbox: Inbox, key: str = "params", *, uniform: bool = False) -> None:
        """Fold the gathered slots of channel ``key`` into ``state[key]``; ``uniform``: every slot
        (and the receiver) weighs 1 / (1 + count), Epidemic Learning's plain average."""
        got = inbox.values[key]
        if isinstance(got, Edges):
            self._merge_edges(state, got, inbox.count[key], key, uniform)
            return
        own, others = state[key], got  # [R, D], [R, K, D]
        if others.shape[1] == 0:
            return
        count = inbox.count[key]
        mask = torch.arange(others.shape[1], device=own.device).unsqueeze(0) < count.unsqueeze(1)
        if uniform:
            weights = (mask.to(own.dtype) / (1.0 + count.to(own.dtype)).unsqueeze(1))
        else:
            weights = inbox.weight[key].to(own.dtype)
        state[key] = self.apply(state, own, others, mask, weights)

    def _merge_edges(self, state: State, edges: Edges, count: torch.Tensor, key: str, uniform: bool) -> None:
        if not self.sparse:
            raise TypeError(f"aggregator {self.name!r} has no edge-list form")
        own = state[key]
        w = (1.0 / (1.0 + count.double()))[edges.r] if uniform else edges.w
        stats: dict[str, torch.Tensor] = {}
        state[key] = clipped_gossip_edges(own, edges.values, edges.r, edges.col, w, tau=self.params["tau"],
                                          stats=stats)
        for name in COUNTERS:
            state[name] = state[name] + stats[name].to(state[name].device)

    def apply(self, state: State, own: torch.Tensor, others: torch.Tensor, mask: torch.Tensor,
              weights: torch.Tensor) -> torch.Tensor:
        """The rule on ``own`` ``[R, D]`` and the slots ``others`` ``[R, K, D]`` (``mask``, ``weights``
        ``[R, K]``); adds what it clipped and discarded to the state's counters."""
        params = dict(self.params)
        if self.name == "balance":
            horizon = params.pop("horizon")
            params["progress"] = state["merges"].to(own.dtype) / horizon
            state["merges"] = state["merges"] + 1
        stats: dict[str, torch.Tensor] = {}
        out = AGGREGATORS[self.name](own, others, mask, weights, stats=stats, **params)
        for name in COUNTERS:
            state[name] = state[name] + stats[name].to(state[name].device)
        return out


def gathering(algorithm: Any, aggregator: str, rule_params: Mapping[str, Any]) -> RobustRule:
    """Give ``algorithm`` its checked rule (``.rule``, ``.aggregator``); a rule other than the plain
    average makes its model channel gather every fresh neighbour's model."""
    from gossipfl.algorithms.base import Channel

    rule = RobustRule(aggregator, rule_params, algorithm=algorithm.name)
    algorithm.rule, algorithm.aggregator = rule, aggregator
    if not rule.plain:
        algorithm.channels = (Channel("params", "gather"),)
    return rule
