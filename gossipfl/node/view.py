"""A node's neighbour view: the topology mapped onto its current members.

Every node sorts the member ids it knows (itself included) and maps them onto the configured
topology the same way, so nodes that agree on membership agree on the graph without a
coordinator. The view gives, per round (time-varying graphs) or once (static ones), who we send
to, who sends to us and with which mixing weight, and the weight of a sender outside the view.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import networkx as nx

from gossipfl.algorithms import Algorithm, Message
from gossipfl.config import RunConfig
from gossipfl.errors import TopologyError
from gossipfl.node.membership import Membership
from gossipfl.topology import Schedule, build_schedule, graph_for_members, local_weights, neighbours

__all__ = ["NeighbourView"]


class NeighbourView:
    """Neighbours, in-neighbours and weights of node ``node_id``, recomputed when membership changes."""

    def __init__(self, node_id: str, cfg: RunConfig, algorithm: Algorithm, membership: Membership, *,
                 log: logging.Logger, warn: Callable[..., None]) -> None:
        self.id = node_id
        self.cfg = cfg
        self.algorithm = algorithm
        self.membership = membership
        self.log = log
        self._warn = warn  # (key, fmt, *args): a warning logged once per key
        self._version = -1
        self.members: list[str] = [node_id]
        self.schedule: Schedule | None = None
        self._round: tuple[int, list[str], list[str], dict[str, float]] | None = None
        self.neighbours: list[str] = []  # whom we send to (this round)
        self.weights: dict[str, float] = {}  # in-neighbour -> mixing weight (this round)
        self.degree = 0
        self._alone: bool | None = None

    def refresh(self, step: int) -> None:
        """Map the current membership onto the topology; every node computes the same graphs."""
        if self._version == self.membership.version:
            return
        self._version = self.membership.version
        self.members = sorted([*self.membership.ids(), self.id])
        self.schedule = self._member_schedule(self.members)
        self._round = None
        old = set(self.neighbours)
        self.set_round(step)
        if set(self.neighbours) != old and self.schedule.period == 1:
            self.log.info("%d members; neighbours now %s", len(self.members), ", ".join(self.neighbours) or "none")
        alone = len(self.members) == 1
        if alone != self._alone:
            self._alone = alone
            if alone:
                self.log.warning("no peers reachable: training alone until one appears")
            else:
                self.log.info("gossiping: %d members", len(self.members))

    def _member_schedule(self, members: list[str]) -> Schedule:
        """The per-round graph over sorted member ids (static topologies: one graph for every round)."""
        labels = dict(enumerate(members))
        try:
            sched = build_schedule(self.cfg.topology, len(members), seed=self.cfg.seed) if len(members) > 1 else None
        except TopologyError:
            sched = None
        if sched is not None and sched.period != 1:
            return Schedule(sched.name, sched.n, sched.period, sched.directed,
                            lambda t: nx.relabel_nodes(sched(t), labels, copy=True))
        graph = self._member_graph(members)
        return Schedule(str(self.cfg.topology), len(members), 1, graph.is_directed(), lambda t: graph)

    def set_round(self, t: int) -> None:
        """Neighbours, in-neighbours and weights for round ``t`` (cached: static graphs never change)."""
        assert self.schedule is not None
        key = 0 if self.schedule.period == 1 else t
        if self._round is not None and self._round[0] == key:
            return
        graph = self.schedule(key)
        outs = neighbours(graph, self.id)
        ins = sorted(graph.predecessors(self.id)) if graph.is_directed() else outs
        if self.algorithm.requirements.weights == "symmetric" and not graph.is_directed():
            _, weights = local_weights(graph, self.id, self.cfg.weights)
        else:
            weights = {n: 1.0 / (1 + len(ins)) for n in ins}
        self._round = (key, outs, ins, weights)
        self.neighbours, self.weights, self.degree = outs, weights, len(outs)

    def in_neighbours(self, t: int) -> list[str]:
        """Who sends to us in round ``t`` (for a time-varying graph, the graph of round ``t``)."""
        assert self.schedule is not None
        key = 0 if self.schedule.period == 1 else t
        graph = self.schedule(key)
        return sorted(graph.predecessors(self.id)) if graph.is_directed() else neighbours(graph, self.id)

    def _member_graph(self, members: list[str]) -> nx.Graph:
        try:
            return graph_for_members(self.cfg.topology, members, seed=self.cfg.seed)
        except TopologyError as exc:
            # Membership sizes vary on a LAN (a hypercube of 3 does not exist): fall back loudly.
            fallback = "complete" if len(members) <= 3 else "ring"
            self._warn(f"topo-{len(members)}", "topology %r does not fit %d members (%s); using %s",
                       self.cfg.topology, len(members), exc, fallback)
            return graph_for_members(fallback, members, seed=self.cfg.seed)

    def merge_weights(self, messages: Sequence[Message]) -> dict[str, float]:
        """Mixing weight per sender; a sender outside our view gets Metropolis-Hastings from its degree."""
        weights = dict(self.weights)
        for m in messages:
            if m.sender not in weights:
                deg = m.meta.get("deg")
                d = int(deg) if isinstance(deg, int) and not isinstance(deg, bool) and deg >= 0 else self.degree
                weights[m.sender] = 1.0 / (1 + max(self.degree, d, 1))  # never more than a pairwise average
        senders = {m.sender for m in messages}
        total = sum(weights[s] for s in senders)
        if total > 1.0:  # transient view disagreement: keep the merge a convex combination
            weights = {s: w / total for s, w in weights.items()}
        return weights
