"""Where the page draws each node: a spring layout computed once per graph on the server (the
browser only draws), and a sample of a large graph's nodes (a few hundred stay readable)."""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence

import networkx as nx

__all__ = ["Layout", "sample_nodes"]

MAX_DRAWN = 300


def sample_nodes(nodes: Sequence[Hashable], limit: int = MAX_DRAWN, seed: int = 0) -> list[Hashable]:
    """All ``nodes`` up to ``limit``, else a fixed random sample of ``limit`` of them (in order)."""
    if len(nodes) <= limit:
        return list(nodes)
    keep = set(random.Random(seed).sample(range(len(nodes)), limit))
    return [v for i, v in enumerate(nodes) if i in keep]


class Layout:
    """Positions in [0, 1]^2 for the nodes of a graph, kept while the graph stays the same."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._key: tuple[frozenset[Hashable], frozenset[tuple[Hashable, Hashable]]] | None = None
        self._pos: dict[Hashable, tuple[float, float]] = {}

    def positions(self, nodes: Sequence[Hashable],
                  edges: Sequence[tuple[Hashable, Hashable]]) -> dict[Hashable, tuple[float, float]]:
        key = (frozenset(nodes), frozenset(tuple(sorted((a, b), key=str)) for a, b in edges))
        if key == self._key:
            return self._pos
        g = nx.Graph()
        g.add_nodes_from(nodes)  # in the caller's order
        g.add_edges_from(e for e in edges if e[0] in g and e[1] in g)
        if g.number_of_nodes() == 0:
            pos: dict[Hashable, tuple[float, float]] = {}
        elif g.number_of_nodes() <= 12 or max(d for _, d in g.degree()) <= 2:  # a few nodes, a ring: a circle
            order = [v for part in nx.connected_components(g) for v in nx.dfs_preorder_nodes(g.subgraph(part))] \
                if max(d for _, d in g.degree()) <= 2 else list(g.nodes())  # neighbours side by side
            ring = nx.circular_layout(order)
            pos = {k: (float(ring[k][0]), float(ring[k][1])) for k in order}
        else:
            raw = nx.spring_layout(g, seed=self.seed, iterations=60)
            pos = {k: (float(v[0]), float(v[1])) for k, v in raw.items()}
        if pos:  # into [0.05, 0.95]^2
            xs, ys = [p[0] for p in pos.values()], [p[1] for p in pos.values()]
            sx, sy = max(xs) - min(xs) or 1.0, max(ys) - min(ys) or 1.0
            pos = {k: (0.05 + 0.9 * (x - min(xs)) / sx, 0.05 + 0.9 * (y - min(ys)) / sy) for k, (x, y) in pos.items()}
        self._key, self._pos = key, pos
        return pos
