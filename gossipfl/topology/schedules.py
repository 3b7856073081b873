"""Time-varying topologies: a :class:`Schedule` gives the graph of each round ``t``.

:func:`build_schedule` accepts every spec :func:`~gossipfl.topology.specs.build_graph` does,
plus the per-round generators in :data:`~gossipfl.topology.generators.TIME_VARYING`, so a
simulator treats static and time-varying topologies alike.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import networkx as nx

from gossipfl.topology._common import _check_round
from gossipfl.topology.generators import TIME_VARYING, _offsets
from gossipfl.topology.specs import _generate, _resolve, build_graph


@dataclass(frozen=True)
class Schedule:
    """The graph for each round ``t``: ``schedule(t)``.

    ``period`` is the number of rounds after which graphs repeat (1 for a static topology,
    ``m`` for the one-peer exponential graph, ``None`` for random matchings). A static
    schedule returns the same graph object every round: treat it as read-only.
    """

    name: str
    n: int
    period: int | None
    directed: bool
    _graph_at: Callable[[int], nx.Graph]

    def __call__(self, t: int) -> nx.Graph:
        return self._graph_at(_check_round(self.name, t))


def build_schedule(spec: str | os.PathLike[str], n: int | None = None, *, seed: int = 0, **params: Any) -> Schedule:
    """A per-round graph schedule for any spec; static specs give the same graph each round.

    Lets a simulator treat static and time-varying topologies alike. Static graphs are
    checked for connectivity as in :func:`build_graph`; a time-varying graph is not
    connected in a single round by design.
    """
    resolved = _resolve(spec, n, seed, params)
    if resolved.generator in TIME_VARYING:
        first = _generate(resolved, t=0)  # validates n and parameters once, up front
        count = first.number_of_nodes()
        period = max(1, len(_offsets(count))) if resolved.generator == "one_peer_exponential" else None
        return Schedule(
            resolved.source,
            count,
            period,
            first.is_directed(),
            lambda t: _generate(resolved, t=t),
        )
    graph = build_graph(spec, n, seed=seed, **params)
    return Schedule(resolved.source, graph.number_of_nodes(), 1, graph.is_directed(), lambda t: graph)
