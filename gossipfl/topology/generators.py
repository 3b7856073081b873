"""Graph generators: ring, line, torus, complete, star, hypercube, exponential, random graphs.

Generators take ``n`` and keyword-only parameters, return an ``nx.Graph`` (``nx.DiGraph``
for directed ones) over the integer nodes ``0..n-1`` in ascending insertion order, and
raise :class:`~gossipfl.errors.TopologyError` for every bad input. Random generators take
``seed`` and redraw with ``seed + attempt`` until the graph is connected, giving up after
:data:`MAX_ATTEMPTS` draws. :data:`GENERATORS` holds the static ones and
:data:`TIME_VARYING` the ones that give a new graph every round (see
:func:`~gossipfl.topology.schedules.build_schedule`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import networkx as nx

from gossipfl.topology._common import _check_int, _check_n, _check_prob, _check_round, _empty, _fail

MAX_ATTEMPTS = 100
"""Random generators redraw (seed, seed+1, ...) this many times for a connected graph."""


def _canonical(graph: nx.Graph) -> nx.Graph:
    """Same graph with nodes and edges inserted in sorted order.

    networkx generators insert in whatever order their algorithm visits; iteration order
    leaks into neighbour lists and weight dicts, so we pin it.
    """
    out = _empty(graph.number_of_nodes(), directed=graph.is_directed())
    if graph.is_directed():
        out.add_edges_from(sorted(graph.edges()))
    else:
        out.add_edges_from(sorted((min(u, v), max(u, v)) for u, v in graph.edges()))
    return out


# --------------------------------------------------------------------------------------
# static generators


def ring(n: int) -> nx.Graph:
    """Cycle ``i -- i+1 mod n``: degree 2, the slowest-mixing connected regular graph.

    The baseline every other topology is compared with. ``n=1``: one node, no edge;
    ``n=2``: a single edge (the 2-cycle collapses).
    """
    n = _check_n("ring", n)
    graph = _empty(n)
    if n > 1:
        graph.add_edges_from((i, (i + 1) % n) for i in range(n))
    return graph


def line(n: int) -> nx.Graph:
    """Path ``0 -- 1 -- ... -- n-1``: a ring with one link cut, the worst case for mixing.

    ``n=1``: one node, no edge.
    """
    n = _check_n("line", n)
    graph = _empty(n)
    graph.add_edges_from((i, i + 1) for i in range(n - 1))
    return graph


def _square_rows(n: int) -> int | None:
    """Largest divisor ``rows <= sqrt(n)`` with ``rows >= 3`` (then ``cols >= rows >= 3``)."""
    for rows in range(math.isqrt(n), 2, -1):
        if n % rows == 0:
            return rows
    return None


def _nearest(n: int, valid: Callable[[int], bool]) -> str:
    below = next((m for m in range(n - 1, 0, -1) if valid(m)), None)
    above = next(m for m in range(n + 1, 4 * n + 16) if valid(m))
    return f"{below} or {above}" if below is not None else str(above)


def torus(n: int, *, rows: int | None = None) -> nx.Graph:
    """2-D periodic grid ``rows x cols``: degree 4, diameter about ``sqrt(n)``.

    Node ``r * cols + c`` links to its right and lower neighbours with wrap-around. Both
    sides must be at least 3: with a side of 2 the wrap-around link repeats the inner link
    and the graph is no longer 4-regular. Without ``rows`` the most square factorisation is
    used (the largest divisor ``rows <= sqrt(n)`` with ``rows >= 3``); if ``n`` has none
    (a prime, or ``2 * prime``) this raises ``TopologyError`` naming the nearest valid sizes,
    rather than silently building another graph. ``n < 9`` is too small.
    """
    n = _check_n("torus", n, minimum=9, why="both sides of the grid must be >= 3")
    if rows is None:
        found = _square_rows(n)
        if found is None:
            near = _nearest(n, lambda m: m >= 9 and _square_rows(m) is not None)
            _fail(f"torus: n={n} has no factorisation rows x cols with both sides >= 3; nearest valid sizes: {near}")
        rows = found
    else:
        rows = _check_int("torus", "rows", rows, minimum=3)
        if n % rows != 0 or n // rows < 3:
            _fail(f"torus: rows={rows} must divide n={n} leaving at least 3 columns")
    cols = n // rows
    graph = _empty(n)
    for r in range(rows):
        for c in range(cols):
            node = r * cols + c
            graph.add_edge(node, r * cols + (c + 1) % cols)
            graph.add_edge(node, ((r + 1) % rows) * cols + c)
    return graph


def complete(n: int) -> nx.Graph:
    """Every pair linked: one round of Metropolis averaging reaches the exact mean (gap 1)."""
    n = _check_n("complete", n)
    graph = _empty(n)
    graph.add_edges_from((i, j) for i in range(n) for j in range(i + 1, n))
    return graph


def star(n: int) -> nx.Graph:
    """Hub ``0`` linked to every other node: the server-shaped graph, as a comparison point.

    ``n=1``: one node; ``n=2``: a single edge.
    """
    n = _check_n("star", n)
    graph = _empty(n)
    graph.add_edges_from((0, i) for i in range(1, n))
    return graph


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def hypercube(n: int) -> nx.Graph:
    """``log2(n)``-dimensional hypercube: ``i`` links to ``i XOR 2^b``.

    Logarithmic degree and diameter; Metropolis gap ``2 / (d + 1)``. ``n`` must be a power
    of two (``1`` is a single node, ``2`` a single edge); otherwise the error names the two
    nearest valid sizes.
    """
    n = _check_int("hypercube", "n (the node count)", n, minimum=1)
    if not _is_power_of_two(n):
        lower = 1 << (n.bit_length() - 1)
        _fail(f"hypercube: n={n} is not a power of two; nearest valid sizes: {lower} or {2 * lower}")
    dim = n.bit_length() - 1
    graph = _empty(n)
    graph.add_edges_from((i, i ^ (1 << b)) for i in range(n) for b in range(dim) if i < i ^ (1 << b))
    return graph


def _offsets(n: int) -> list[int]:
    """``2^j`` for every ``j`` with ``2^j < n`` (empty for ``n = 1``)."""
    return [1 << j for j in range((n - 1).bit_length())]


def exponential(n: int) -> nx.Graph:
    """Static exponential graph: ``i -- i + 2^j mod n`` for every ``2^j < n``, undirected.

    Degree about ``2 log2(n)`` with a large spectral gap: the usual choice for
    decentralised SGD at scale. ``n=1``: one node; ``n=2``: one edge.
    """
    n = _check_n("exponential", n)
    graph = _empty(n)
    graph.add_edges_from(sorted({(min(i, (i + s) % n), max(i, (i + s) % n)) for i in range(n) for s in _offsets(n)}))
    return graph


def exponential_directed(n: int) -> nx.DiGraph:
    """Directed exponential graph ``i -> i + 2^j mod n`` (every ``2^j < n``), for push-sum/SGP.

    Every node has the same in- and out-degree, so uniform weights are doubly stochastic.
    """
    n = _check_n("exponential_directed", n)
    graph = _empty(n, directed=True)
    graph.add_edges_from((i, (i + s) % n) for i in range(n) for s in _offsets(n))
    return graph


def _check_seed(where: str, seed: object) -> int:
    return _check_int(where, "seed", seed)


def erdos_renyi(n: int, *, p: float | None = None, seed: int = 0) -> nx.Graph:
    """G(n, p), redrawn with ``seed + attempt`` until connected.

    ``p`` defaults to ``min(1, 2 ln(n) / n)``, twice the connectivity threshold, so the
    redraw loop almost always stops at the first draw. ``p = 0`` is refused (no edges).
    """
    where = "erdos_renyi"
    n = _check_n(where, n)
    seed = _check_seed(where, seed)
    if n == 1:
        return _empty(1)
    prob = min(1.0, 2.0 * math.log(n) / n) if p is None else _check_prob(where, "p", p, allow_zero=False)
    for attempt in range(MAX_ATTEMPTS):
        graph = nx.fast_gnp_random_graph(n, prob, seed=seed + attempt)
        if nx.is_connected(graph):
            return _canonical(graph)
    _fail(
        f"{where}: no connected graph with n={n}, p={prob:g} in {MAX_ATTEMPTS} draws; "
        f"raise p above ln(n)/n = {math.log(n) / n:.3g}"
    )


def watts_strogatz(n: int, *, k: int = 4, p: float = 0.1, seed: int = 0) -> nx.Graph:
    """Small world: a ring lattice (``k`` nearest neighbours) with each link rewired with
    probability ``p``; redrawn with ``seed + attempt`` until connected.

    ``k`` must be even (``k/2`` on each side); ``n <= k`` is too small.
    """
    where = "watts_strogatz"
    k = _check_int(where, "k", k, minimum=2)
    if k % 2:
        _fail(f"{where}: k must be even (k/2 neighbours on each side), got {k}")
    prob = _check_prob(where, "p", p)
    seed = _check_seed(where, seed)
    n = _check_n(where, n, minimum=k + 1, why=f"more than k={k}")
    for attempt in range(MAX_ATTEMPTS):
        graph = nx.watts_strogatz_graph(n, k, prob, seed=seed + attempt)
        if nx.is_connected(graph):
            return _canonical(graph)
    _fail(f"{where}: no connected graph with n={n}, k={k}, p={prob:g} in {MAX_ATTEMPTS} draws")


def random_regular(n: int, *, k: int = 3, seed: int = 0) -> nx.Graph:
    """Uniformly random ``k``-regular graph, redrawn with ``seed + attempt`` until connected.

    Expanders in practice: constant degree with a gap that does not shrink with ``n``.
    Needs ``n > k`` and ``n * k`` even; ``k = 1`` is only connected for ``n = 2``.
    """
    where = "random_regular"
    k = _check_int(where, "k", k, minimum=1)
    seed = _check_seed(where, seed)
    n = _check_n(where, n, minimum=k + 1, why=f"more than k={k}")
    if (n * k) % 2:
        _fail(
            f"{where}: n*k must be even (every edge has two ends); with k={k} use an even "
            f"node count such as {n - 1} or {n + 1}"
        )
    if k == 1 and n > 2:
        _fail(f"{where}: k=1 is a perfect matching, never connected for n={n} > 2")
    for attempt in range(MAX_ATTEMPTS):
        graph = nx.random_regular_graph(k, n, seed=seed + attempt)
        if nx.is_connected(graph):
            return _canonical(graph)
    _fail(f"{where}: no connected graph with n={n}, k={k} in {MAX_ATTEMPTS} draws")


# --------------------------------------------------------------------------------------
# time-varying generators: one graph per round t


def one_peer_exponential(n: int, t: int) -> nx.DiGraph:
    """Round ``t`` of the one-peer exponential graph: ``i -> i + 2^(t mod m) mod n``.

    ``m`` is the number of offsets ``2^j < n`` (``log2(n)`` for a power of two). Each node
    sends to exactly one peer per round; for ``n`` a power of two, ``m`` consecutive rounds
    of uniform weights (``1/2`` self, ``1/2`` peer) reach the exact average. One round's graph
    is not connected by itself; the union over ``m`` rounds is :func:`exponential_directed`.
    """
    where = "one_peer_exponential"
    n = _check_n(where, n)
    t = _check_round(where, t)
    graph = _empty(n, directed=True)
    offsets = _offsets(n)
    if offsets:
        shift = offsets[t % len(offsets)]
        graph.add_edges_from((i, (i + shift) % n) for i in range(n))
    return graph


def random_matching(n: int, t: int, *, seed: int = 0) -> nx.Graph:
    """Round ``t`` of a random pairwise-gossip schedule: a random matching of the nodes.

    Every node is in at most one pair (one unmatched node when ``n`` is odd). The pairing
    is a function of ``(seed, t)`` only, so any node can compute round ``t`` on its own.
    """
    where = "random_matching"
    n = _check_n(where, n)
    t = _check_round(where, t)
    seed = _check_seed(where, seed)
    # A str seed is hashed with SHA-512 by `random`, stable across processes and versions.
    order = list(range(n))
    random.Random(f"random_matching:{seed}:{t}").shuffle(order)
    graph = _empty(n)
    graph.add_edges_from(sorted((min(order[i], order[i + 1]), max(order[i], order[i + 1])) for i in range(0, n - 1, 2)))
    return graph


GENERATORS: dict[str, Callable[..., nx.Graph]] = {
    "ring": ring,
    "line": line,
    "torus": torus,
    "complete": complete,
    "star": star,
    "hypercube": hypercube,
    "erdos_renyi": erdos_renyi,
    "watts_strogatz": watts_strogatz,
    "random_regular": random_regular,
    "exponential": exponential,
    "exponential_directed": exponential_directed,
}
"""Static generators by name: ``fn(n, **params)``."""

TIME_VARYING: dict[str, Callable[..., nx.Graph]] = {
    "one_peer_exponential": one_peer_exponential,
    "random_matching": random_matching,
}
