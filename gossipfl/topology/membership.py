"""From a discovered membership to the same graph on every node, and a node's peers in it.

Each node sorts the member ids it discovered, builds the graph over ``range(len(members))``
and relabels it (:func:`graph_for_members`), and so arrives at the same neighbours as every
other node that sees the same membership: no coordinator.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import networkx as nx

from gossipfl.topology._common import _N, _empty, _fail, _TooFewNodes
from gossipfl.topology.generators import complete
from gossipfl.topology.specs import _resolve, build_graph


def graph_for_members(
    spec: str | os.PathLike[str],
    members: Iterable[str],
    *,
    seed: int = 0,
    small_fallback: bool = True,
    **params: Any,
) -> nx.Graph:
    """The graph over discovered member ids that every member computes alike.

    Sorts the (deduplicated) ids, builds ``spec`` over ``range(len(ids))`` and relabels node
    ``i`` to ``ids[i]``: no coordinator, only the same membership view. One member gives a
    single node without edges for any spec. A membership smaller than the generator's
    minimum (torus < 9, Watts-Strogatz or random regular <= k) gives a complete graph while
    ``small_fallback`` is true, because a cluster grows one join at a time and must work
    meanwhile; sizes that are merely invalid (a hypercube of 6) still raise.
    """
    unique = set(members)
    for member in unique:
        if not isinstance(member, str) or not member:
            _fail(f"member ids must be non-empty strings, got {member!r}")
    ids = sorted(unique)
    if not ids:
        _fail("graph_for_members: no members")
    count = len(ids)
    if count == 1:
        # Validate the spec anyway (a typo should not wait for the second node to show up).
        resolved = _resolve(spec, None, seed, params)
        directed = (
            resolved.graph.is_directed()
            if resolved.graph is not None
            else (resolved.generator == "exponential_directed")
        )
        graph = _empty(1, directed=directed)
    else:
        try:
            graph = build_graph(spec, count, seed=seed, **params)
        except _TooFewNodes:
            if not small_fallback:
                raise
            graph = complete(count)
    return nx.relabel_nodes(graph, dict(enumerate(ids)), copy=True)


def neighbours(graph: nx.Graph, node_id: _N) -> list[_N]:
    """Sorted peers ``node_id`` sends to (its out-neighbours in a digraph)."""
    if node_id not in graph:
        _fail(f"node {node_id!r} is not in the graph")
    peers = graph.successors(node_id) if graph.is_directed() else graph.neighbors(node_id)
    return sorted(peers)
