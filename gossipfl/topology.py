"""Who talks to whom, and with which weight.

Everything here is a pure function of its arguments: the same name, node count, parameters
and seed give the same graph on every machine. That is what lets a cluster run without a
coordinator: each node sorts the membership it discovered, builds the graph over
``range(len(members))`` and relabels it (:func:`graph_for_members`), and so arrives at the
same neighbours as every other node that sees the same membership.

Graphs
    Generators take ``n`` and keyword-only parameters, return an ``nx.Graph`` (``nx.DiGraph``
    for directed ones) over the integer nodes ``0..n-1`` in ascending insertion order, and
    raise :class:`~gossipfl.errors.TopologyError` for every bad input. Random generators take
    ``seed`` and redraw with ``seed + attempt`` until the graph is connected, giving up after
    :data:`MAX_ATTEMPTS` draws. :data:`GENERATORS` holds the static ones and
    :data:`TIME_VARYING` the ones that give a new graph every round (:func:`build_schedule`).

Topology files (``topologies/*.toml``), read with :mod:`tomllib`::

    # exactly one of these three:
    generator = "watts_strogatz"       # a generator name (or alias) ...
    [params]                           # ... with its keyword parameters
    k = 4
    p = 0.1

    edges = [[0, 1], [1, 2], [2, 0]]   # explicit edges; node count = max id + 1
    directed = false                   # optional, edges/file only (default false)

    file = "my_graph.graphml"          # relative to this TOML file; the suffix picks the
                                       # format: .graphml, or an edge list (.txt/.edges/.edgelist)

    # optional with any of them:
    nodes = 16                         # default: the node count asked for (--nodes);
                                       # if both are given they must agree
    seed = 3                           # pins a random graph; default: the run's seed

Unknown keys, wrong types, missing files, self-loops and node ids that are not ``0..n-1``
raise ``TopologyError`` naming the file and the key. An edge-list file holds one ``u v``
pair of non-negative integers per line (whitespace or a comma between them); ``#`` starts a
comment. GraphML node ids that are all integers must be exactly ``0..n-1``; other string ids
are relabelled ``0..n-1`` in natural sort order (``n2`` before ``n10``).

Mixing weights
    ``W[i, j]`` is the weight node ``i`` gives to node ``j``'s value in ``x_i <- sum_j W[i, j] x_j``
    (row-stochastic, self weight included). Kinds: ``"metropolis"`` (Metropolis-Hastings,
    symmetric and doubly stochastic on any undirected graph), ``"max_degree"`` (same property,
    one global weight), ``"uniform"`` (average of self and in-neighbours; doubly stochastic
    only on regular graphs) and ``"push_sum"`` (column-stochastic: each node splits its mass
    equally among itself and its out-neighbours, ``P[i, j]`` = the share ``j`` sends to ``i``).
    Directed graphs admit only ``"uniform"`` and ``"push_sum"``.

Spectral gap
    ``1 - SLEM``, the second largest eigenvalue modulus of the mixing matrix. In synchronous
    gossip the mean squared distance to the average shrinks by about ``SLEM**2`` per round.
    Up to :data:`DENSE_EIG_LIMIT` nodes the eigenvalues are computed densely; above it with
    ARPACK (``scipy.sparse.linalg``, a dependency of scikit-learn), which raises
    ``TopologyError`` if it does not converge (very small gaps on very large graphs).
"""

from __future__ import annotations

import inspect
import math
import os
import random
import re
import tomllib
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import networkx as nx
import numpy as np

from gossipfl.errors import TopologyError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ALIASES",
    "DENSE_EIG_LIMIT",
    "DENSE_MATRIX_LIMIT",
    "DIAMETER_LIMIT",
    "EDGE_LIST_SUFFIXES",
    "GENERATORS",
    "MAX_ATTEMPTS",
    "MIXING_KINDS",
    "TIME_VARYING",
    "Schedule",
    "build_graph",
    "build_schedule",
    "check_spec",
    "column_stochastic_weights",
    "complete",
    "describe",
    "erdos_renyi",
    "exponential",
    "exponential_directed",
    "graph_for_members",
    "graph_spectral_gap",
    "hypercube",
    "line",
    "local_weights",
    "mixing_matrix",
    "mixing_matrix_sparse",
    "mixing_weights",
    "neighbours",
    "node_order",
    "one_peer_exponential",
    "plot_graph",
    "random_matching",
    "random_regular",
    "ring",
    "slem",
    "spectral_gap",
    "star",
    "topology_names",
    "torus",
    "watts_strogatz",
]

MIXING_KINDS: tuple[str, ...] = ("metropolis", "max_degree", "uniform", "push_sum")
_ROW_KINDS = ("metropolis", "max_degree", "uniform")

MAX_ATTEMPTS = 100
"""Random generators redraw (seed, seed+1, ...) this many times for a connected graph."""
DENSE_EIG_LIMIT = 2000
"""Above this many nodes the spectral gap is computed iteratively (ARPACK), not densely."""
DENSE_MATRIX_LIMIT = 20_000
""":func:`mixing_matrix` refuses larger graphs (n*n float64); use the sparse variant."""
DIAMETER_LIMIT = 5000
""":func:`describe` reports ``diameter=None`` above this many nodes (all-pairs BFS is O(n*m))."""
EDGE_LIST_SUFFIXES: tuple[str, ...] = (".txt", ".edges", ".edgelist")
_GRAPHML_SUFFIXES = (".graphml",)
_TOML_KEYS = frozenset({"generator", "params", "edges", "directed", "file", "nodes", "seed"})

_N = TypeVar("_N", bound=Hashable)


class _NoConvergence(TopologyError):
    """The iterative eigensolver gave up; :func:`describe` reports None instead of failing."""


class _TooFewNodes(TopologyError):
    """The generator needs more nodes than it got.

    A distinct (private) type so :func:`graph_for_members` can tell "the cluster is still
    small" apart from a real configuration mistake and fall back to a complete graph.
    """

    def __init__(self, message: str, minimum: int) -> None:
        super().__init__(message)
        self.minimum = minimum


# --------------------------------------------------------------------------------------
# validation helpers


def _fail(message: str) -> NoReturn:
    raise TopologyError(message)


def _is_int(value: object) -> bool:
    # bool is an int subclass; `nodes = true` in a TOML file is a mistake, not 1.
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_int(where: str, name: str, value: object, *, minimum: int | None = None) -> int:
    if not _is_int(value):
        _fail(f"{where}: {name} must be an integer, got {value!r}")
    number = int(value)  # type: ignore[call-overload]
    if minimum is not None and number < minimum:
        _fail(f"{where}: {name} must be >= {minimum}, got {number}")
    return number


def _check_prob(where: str, name: str, value: object, *, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        _fail(f"{where}: {name} must be a number in [0, 1], got {value!r}")
    prob = float(value)
    low_ok = prob >= 0.0 if allow_zero else prob > 0.0
    if not (low_ok and prob <= 1.0):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        _fail(f"{where}: {name} must be in {interval}, got {value!r}")
    return prob


def _check_n(where: str, n: object, *, minimum: int = 1, why: str = "") -> int:
    count = _check_int(where, "n (the node count)", n, minimum=1)
    if count < minimum:
        reason = f" ({why})" if why else ""
        raise _TooFewNodes(f"{where}: needs at least {minimum} nodes{reason}, got {count}", minimum)
    return count


def _prefix(error: TopologyError, where: str) -> TopologyError:
    """Prepend the file name to an error raised while building from that file (keeps the type)."""
    error.args = (f"{where}: {error}",)
    return error


def _empty(n: int, *, directed: bool = False) -> nx.Graph:
    graph: nx.Graph = nx.DiGraph() if directed else nx.Graph()
    graph.add_nodes_from(range(n))
    return graph


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


def _check_round(where: str, t: object) -> int:
    return _check_int(where, "t (the round)", t, minimum=0)


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
"""Per-round generators by name: ``fn(n, t, **params)``; see :func:`build_schedule`."""

ALIASES: dict[str, str] = {
    "er": "erdos_renyi",
    "ws": "watts_strogatz",
    "regular": "random_regular",
    "path": "line",
}


def topology_names() -> list[str]:
    """Every name :func:`build_graph` / :func:`build_schedule` accept, aliases included."""
    return sorted([*GENERATORS, *TIME_VARYING, *ALIASES])


def _lookup(name: str) -> str | None:
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    return key if key in GENERATORS or key in TIME_VARYING else None


def _call_generator(name: str, n: int, seed: int, params: Mapping[str, Any], *, t: int | None = None) -> nx.Graph:
    fn = GENERATORS.get(name) or TIME_VARYING[name]
    accepted = {p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    if "seed" in params:
        _fail(f"{name}: give the seed as the top-level seed, not as a parameter")
    unknown = sorted(set(params) - accepted)
    if unknown:
        valid = ", ".join(sorted(accepted - {"seed"})) or "none"
        _fail(f"{name}: unknown parameter {unknown[0]!r}; valid parameters: {valid}")
    kwargs = dict(params)
    if "seed" in accepted:
        kwargs["seed"] = seed
    return fn(n, **kwargs) if t is None else fn(n, t, **kwargs)


# --------------------------------------------------------------------------------------
# files


@dataclass(frozen=True)
class _Resolved:
    """A spec after parsing: either a generator call still to make, or a loaded graph."""

    source: str
    generator: str | None = None
    params: Mapping[str, Any] | None = None
    n: int | None = None
    seed: int = 0
    graph: nx.Graph | None = None


def _graph_from_pairs(pairs: list[tuple[str, object, object]], *, directed: bool, where: str) -> nx.Graph:
    """Build a graph from ``(label, u, v)`` triples; ``label`` names the entry in errors."""
    if not pairs:
        _fail(f"{where}: no edges")
    edges: list[tuple[int, int]] = []
    for label, u, v in pairs:
        if not (_is_int(u) and _is_int(v) and int(u) >= 0 and int(v) >= 0):  # type: ignore[call-overload]
            _fail(f"{where}: {label} must be a pair of non-negative integer node ids, got {[u, v]!r}")
        if u == v:
            _fail(f"{where}: {label} = {[u, v]!r} is a self-loop")
        edges.append((int(u), int(v)))  # type: ignore[call-overload]
    graph = _empty(max(max(e) for e in edges) + 1, directed=directed)
    graph.add_edges_from(edges)
    return graph


def _read_edge_list(path: Path, *, directed: bool, where: str) -> nx.Graph:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        _fail(f"{where}: file not found: {path}")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"{where}: cannot read {path}: {exc}")
    pairs: list[tuple[str, object, object]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        body = raw.split("#", 1)[0].replace(",", " ").split()
        if not body:
            continue
        label = f"{path.name} line {lineno}"
        if len(body) != 2 or not all(re.fullmatch(r"\d+", tok) for tok in body):
            _fail(f"{where}: {label} must be two non-negative integer node ids, got {raw.strip()!r}")
        pairs.append((label, int(body[0]), int(body[1])))
    return _graph_from_pairs(pairs, directed=directed, where=where)


def _natural_key(label: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", label)]


def _read_graphml(path: Path, *, directed: bool | None, where: str) -> nx.Graph:
    import xml.etree.ElementTree as ET

    if not path.is_file():
        _fail(f"{where}: file not found: {path}")
    try:
        raw = nx.read_graphml(path)
    except (OSError, ET.ParseError, nx.NetworkXError, KeyError, ValueError, TypeError) as exc:
        _fail(f"{where}: cannot read GraphML {path}: {exc}")
    if raw.number_of_nodes() == 0:
        _fail(f"{where}: {path.name} has no nodes")
    if directed is not None and directed != raw.is_directed():
        kind = "directed" if raw.is_directed() else "undirected"
        _fail(f"{where}: directed = {str(directed).lower()} but {path.name} is {kind}")
    labels = [str(node) for node in raw.nodes()]
    numeric = [bool(re.fullmatch(r"-?\d+", label)) for label in labels]
    if all(numeric):
        mapping = {node: int(str(node)) for node in raw.nodes()}
        if set(mapping.values()) != set(range(len(labels))):
            bad = sorted(set(mapping.values()) - set(range(len(labels))))
            _fail(f"{where}: node ids in {path.name} must be 0..{len(labels) - 1}, found {bad[:5]}")
    elif any(numeric):
        _fail(f"{where}: {path.name} mixes integer and non-integer node ids")
    else:
        ordered = sorted(raw.nodes(), key=lambda node: _natural_key(str(node)))
        mapping = {node: i for i, node in enumerate(ordered)}
    loops = list(nx.selfloop_edges(raw))
    if loops:
        _fail(f"{where}: {path.name} has a self-loop at node {loops[0][0]!r}")
    graph = _empty(len(labels), directed=raw.is_directed())
    # A multigraph's parallel edges collapse: gossip weights are per neighbour, not per link.
    graph.add_edges_from(sorted({(mapping[u], mapping[v]) for u, v in raw.edges()}))
    return graph


def _read_graph_file(path: Path, *, directed: bool | None, where: str) -> nx.Graph:
    suffix = path.suffix.lower()
    if suffix in _GRAPHML_SUFFIXES:
        return _read_graphml(path, directed=directed, where=where)
    if suffix in EDGE_LIST_SUFFIXES:
        return _read_edge_list(path, directed=bool(directed), where=where)
    valid = ", ".join([*_GRAPHML_SUFFIXES, *EDGE_LIST_SUFFIXES])
    _fail(f"{where}: unsupported graph file suffix {suffix!r} for {path.name}; use {valid}")


def _load_toml(path: Path, n: int | None, seed: int, params: Mapping[str, Any]) -> _Resolved:
    where = str(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        _fail(f"topology file not found: {path}")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        _fail(f"{where}: not valid TOML: {exc}")
    except OSError as exc:
        _fail(f"cannot read topology file {path}: {exc}")

    unknown = sorted(set(data) - _TOML_KEYS)
    if unknown:
        _fail(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(_TOML_KEYS))}")
    sources = [key for key in ("generator", "edges", "file") if key in data]
    if len(sources) != 1:
        found = f" (found {', '.join(sources)})" if sources else ""
        _fail(f"{where}: exactly one of 'generator', 'edges' or 'file' is required{found}")

    nodes: int | None = None
    if "nodes" in data:
        nodes = _check_int(where, "nodes", data["nodes"], minimum=1)
        if n is not None and nodes != n:
            _fail(f"{where}: nodes = {nodes} but {n} nodes were asked for (--nodes)")
    count = nodes if nodes is not None else n
    if "seed" in data:
        seed = _check_int(where, "seed", data["seed"])
    directed: bool | None = None
    if "directed" in data:
        if not isinstance(data["directed"], bool):
            _fail(f"{where}: directed must be true or false, got {data['directed']!r}")
        directed = data["directed"]

    if "generator" in data:
        name = data["generator"]
        if not isinstance(name, str):
            _fail(f"{where}: generator must be a string, got {name!r}")
        canonical = _lookup(name)
        if canonical is None:
            _fail(f"{where}: generator = {name!r} is not a known topology; valid names: {', '.join(topology_names())}")
        if directed is not None:
            _fail(f"{where}: directed only applies to edges/file; the generator decides it")
        table = data.get("params", {})
        if not isinstance(table, dict):
            _fail(f"{where}: params must be a table ([params]), got {table!r}")
        if "seed" in table:
            _fail(f"{where}: params.seed: give the seed as the top-level key 'seed'")
        merged = {**table, **params}  # caller's parameters (CLI) override the file's
        return _Resolved(where, generator=canonical, params=merged, n=count, seed=seed)

    if "params" in data:
        _fail(f"{where}: params only applies to generator topologies")
    if params:
        _fail(f"{where}: parameters {sorted(params)} only apply to generator topologies")
    if "edges" in data:
        edges = data["edges"]
        if not isinstance(edges, list) or not edges:
            _fail(f"{where}: edges must be a non-empty list of [u, v] pairs")
        pairs: list[tuple[str, object, object]] = []
        for i, edge in enumerate(edges):
            if not isinstance(edge, list) or len(edge) != 2:
                _fail(f"{where}: edges[{i}] must be a pair [u, v], got {edge!r}")
            pairs.append((f"edges[{i}]", edge[0], edge[1]))
        graph = _graph_from_pairs(pairs, directed=bool(directed), where=where)
        what = "edges (max id + 1)"
    else:
        target = data["file"]
        if not isinstance(target, str) or not target:
            _fail(f"{where}: file must be a non-empty string path, got {target!r}")
        file_path = path.parent / target
        if file_path.suffix.lower() == ".toml":
            _fail(f"{where}: file = {target!r}: a topology file cannot include another TOML file")
        graph = _read_graph_file(file_path, directed=directed, where=f"{where}: file")
        what = f"file {target!r}"
    if count is not None and graph.number_of_nodes() != count:
        asked = "nodes" if nodes is not None else "--nodes"
        _fail(f"{where}: {what} gives {graph.number_of_nodes()} nodes but {asked} is {count}")
    return _Resolved(where, graph=graph, n=graph.number_of_nodes(), seed=seed)


def _resolve(spec: str | os.PathLike[str], n: int | None, seed: int, params: Mapping[str, Any]) -> _Resolved:
    if n is not None:
        n = _check_int("topology", "nodes", n, minimum=1)
    seed = _check_int("topology", "seed", seed)
    if isinstance(spec, str):
        canonical = _lookup(spec)
        if canonical is not None:
            return _Resolved(canonical, generator=canonical, params=dict(params), n=n, seed=seed)
        path = Path(spec)
        known = (".toml", *EDGE_LIST_SUFFIXES, *_GRAPHML_SUFFIXES)
        if path.suffix.lower() not in known and "/" not in spec and os.sep not in spec:
            _fail(
                f"unknown topology {spec!r}; valid names: {', '.join(topology_names())}, "
                f"or a path to a {'/'.join(known)} file"
            )
    elif isinstance(spec, os.PathLike):
        path = Path(spec)
    else:
        _fail(f"a topology is a name or a file path, got {spec!r}")
    if path.suffix.lower() == ".toml":
        return _load_toml(path, n, seed, params)
    where = str(path)
    if params:
        _fail(f"{where}: parameters {sorted(params)} only apply to generator topologies")
    if not path.is_file():
        _fail(f"topology file not found: {path}")
    graph = _read_graph_file(path, directed=None, where=where)
    if n is not None and graph.number_of_nodes() != n:
        _fail(f"{where}: the graph has {graph.number_of_nodes()} nodes but --nodes is {n}")
    return _Resolved(where, graph=graph, n=graph.number_of_nodes(), seed=seed)


def _check_connected(graph: nx.Graph, where: str) -> None:
    if graph.is_directed():
        if not nx.is_strongly_connected(graph):
            parts = nx.number_strongly_connected_components(graph)
            _fail(f"{where}: the graph is not strongly connected ({parts} components)")
    elif not nx.is_connected(graph):
        parts = nx.number_connected_components(graph)
        _fail(f"{where}: the graph is not connected ({parts} components)")


def _generate(resolved: _Resolved, *, t: int | None = None) -> nx.Graph:
    assert resolved.generator is not None
    if resolved.n is None:
        _fail(f"{resolved.source}: the node count is required (--nodes or nodes = N)")
    try:
        return _call_generator(resolved.generator, resolved.n, resolved.seed, resolved.params or {}, t=t)
    except TopologyError as exc:
        if resolved.source != resolved.generator:
            raise _prefix(exc, resolved.source) from None
        raise


def build_graph(spec: str | os.PathLike[str], n: int | None = None, *, seed: int = 0, **params: Any) -> nx.Graph:
    """The connected graph a topology spec names.

    ``spec`` is a generator name or alias (see :func:`topology_names`), or a path to a
    ``.toml`` topology file, an edge list (``.txt``/``.edges``/``.edgelist``) or ``.graphml``.
    ``n`` is required for generators and, when given, must match a file's node count.
    ``params`` go to the generator (and override a TOML file's ``[params]``); a TOML file's
    ``seed`` overrides ``seed``. The result is checked to be connected (strongly connected
    for a digraph), so a run never starts on a graph that cannot reach consensus.
    Time-varying names raise ``TopologyError``: use :func:`build_schedule`.
    """
    resolved = _resolve(spec, n, seed, params)
    if resolved.graph is not None:
        graph = resolved.graph
    elif resolved.generator in TIME_VARYING:
        _fail(f"{resolved.source}: {resolved.generator} gives a new graph every round; use build_schedule()")
    else:
        graph = _generate(resolved)
    _check_connected(graph, resolved.source)
    return graph


def check_spec(spec: str | os.PathLike[str], *, seed: int = 0) -> None:
    """Check a topology spec without a node count (a name, or a file that exists and parses).

    For ``gossipfl node``, whose graph is laid over a membership that is not known yet: a typo in
    the name or a broken file is a ``TopologyError`` at start-up rather than a silent fallback later.
    """
    _resolve(spec, None, seed, {})


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


# --------------------------------------------------------------------------------------
# membership


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


def node_order(graph: nx.Graph) -> list[Any]:
    """Nodes in sorted order: row/column ``i`` of every mixing matrix is ``node_order(G)[i]``."""
    try:
        return sorted(graph.nodes())
    except TypeError:
        _fail("graph nodes must be mutually sortable (all integers or all strings)")


def neighbours(graph: nx.Graph, node_id: _N) -> list[_N]:
    """Sorted peers ``node_id`` sends to (its out-neighbours in a digraph)."""
    if node_id not in graph:
        _fail(f"node {node_id!r} is not in the graph")
    peers = graph.successors(node_id) if graph.is_directed() else graph.neighbors(node_id)
    return sorted(peers)


# --------------------------------------------------------------------------------------
# mixing weights


def _check_kind(kind: str, allowed: tuple[str, ...]) -> str:
    if kind not in allowed:
        _fail(f"unknown mixing kind {kind!r}; valid kinds: {', '.join(allowed)}")
    return kind


def _refuse_directed(graph: nx.Graph, kind: str) -> None:
    if graph.is_directed() and kind in ("metropolis", "max_degree"):
        _fail(
            f"{kind} weights need an undirected graph; for a directed graph use "
            "'uniform' (row-stochastic) or 'push_sum' (column-stochastic)"
        )


def _max_degree(graph: nx.Graph) -> int:
    return max((d for _, d in graph.degree()), default=0)


def local_weights(
    graph: nx.Graph, node: _N, kind: str = "metropolis", *, max_degree: int | None = None
) -> tuple[float, dict[_N, float]]:
    """``(self_weight, {neighbour: weight})`` for one node, from local degrees only.

    This is what a running node computes: Metropolis weights need only its own degree and
    its neighbours' (which they advertise), uniform weights only its own. ``max_degree``
    weights need the global maximum degree: pass it as ``max_degree`` (otherwise it is
    computed from ``graph``). For ``"push_sum"`` the weights are the shares of this node's
    own mass that it keeps and sends to each out-neighbour.
    """
    _check_kind(kind, MIXING_KINDS)
    _refuse_directed(graph, kind)
    if node not in graph:
        _fail(f"node {node!r} is not in the graph")
    directed = graph.is_directed()
    if kind == "push_sum":
        peers = sorted(graph.successors(node) if directed else graph.neighbors(node))
        share = 1.0 / (1 + len(peers))
        return share, dict.fromkeys(peers, share)
    if kind == "uniform":
        # x_i averages itself with the nodes it hears from: its in-neighbours.
        peers = sorted(graph.predecessors(node) if directed else graph.neighbors(node))
        share = 1.0 / (1 + len(peers))
        return share, dict.fromkeys(peers, share)
    peers = sorted(graph.neighbors(node))
    own = graph.degree(node)
    if kind == "metropolis":
        weights = {j: 1.0 / (1 + max(own, graph.degree(j))) for j in peers}
    else:
        top = _max_degree(graph) if max_degree is None else max_degree
        if top < own:
            _fail(f"max_degree={top} is below the degree {own} of node {node!r}")
        weights = dict.fromkeys(peers, 1.0 / (1 + top))
    return 1.0 - sum(weights.values()), weights


def mixing_weights(graph: nx.Graph, kind: str = "metropolis") -> dict[Any, dict[Any, float]]:
    """Row ``i`` of the mixing matrix as ``{i: {i: w_ii, j: w_ij, ...}}`` for every node.

    Metropolis and max-degree rows are symmetric and doubly stochastic on an undirected
    graph, so plain averaging preserves the mean. For push-sum use
    :func:`column_stochastic_weights`.
    """
    if kind == "push_sum":
        _fail("push_sum weights are column-stochastic: use column_stochastic_weights()")
    _check_kind(kind, _ROW_KINDS)
    _refuse_directed(graph, kind)
    top = _max_degree(graph)
    rows: dict[Any, dict[Any, float]] = {}
    for node in node_order(graph):
        own, weights = local_weights(graph, node, kind, max_degree=top)
        rows[node] = {node: own, **weights}
    return rows


def column_stochastic_weights(graph: nx.Graph) -> dict[Any, dict[Any, float]]:
    """Push-sum shares ``{sender: {sender: s, receiver: s, ...}}`` with ``s = 1/(1+outdeg)``.

    Each sender's shares sum to 1 (the matrix ``P[receiver, sender]`` is column-stochastic),
    so total mass is conserved even on a directed graph where rows cannot be balanced.
    An undirected graph counts each neighbour as an out-neighbour.
    """
    shares: dict[Any, dict[Any, float]] = {}
    for node in node_order(graph):
        own, weights = local_weights(graph, node, "push_sum")
        shares[node] = {node: own, **weights}
    return shares


def _coo(graph: nx.Graph, kind: str) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """``(n, rows, cols, values)`` of the mixing matrix, vectorised (no n x n intermediate).

    An independent implementation from :func:`local_weights`; the tests check they agree.
    """
    _check_kind(kind, MIXING_KINDS)
    _refuse_directed(graph, kind)
    order = node_order(graph)
    n = len(order)
    index = {node: i for i, node in enumerate(order)}
    pairs = np.array([(index[u], index[v]) for u, v in graph.edges()], dtype=np.int64)
    pairs = pairs.reshape(-1, 2)
    src, dst = pairs[:, 0], pairs[:, 1]
    diag_idx = np.arange(n, dtype=np.int64)
    if graph.is_directed():
        if kind == "uniform":  # row dst hears from src
            indeg = np.bincount(dst, minlength=n)
            rows, cols, vals = dst, src, 1.0 / (1 + indeg[dst])
            diag = 1.0 / (1 + indeg)
        else:  # push_sum: P[dst, src] = share src sends to dst
            outdeg = np.bincount(src, minlength=n)
            rows, cols, vals = dst, src, 1.0 / (1 + outdeg[src])
            diag = 1.0 / (1 + outdeg)
    else:
        rows = np.concatenate([src, dst])
        cols = np.concatenate([dst, src])
        deg = np.bincount(rows, minlength=n)
        if kind == "metropolis":
            vals = 1.0 / (1 + np.maximum(deg[rows], deg[cols]))
        elif kind == "max_degree":
            vals = np.full(rows.shape, 1.0 / (1 + (deg.max() if n else 0)))
        elif kind == "uniform":
            vals = 1.0 / (1 + deg[rows])
        else:  # push_sum: P[row, col] = share col sends to row
            vals = 1.0 / (1 + deg[cols])
        if kind in ("uniform", "push_sum"):
            diag = 1.0 / (1 + deg)
        else:
            diag = 1.0 - np.bincount(rows, weights=vals, minlength=n).astype(np.float64)
    return (
        n,
        np.concatenate([rows, diag_idx]),
        np.concatenate([cols, diag_idx]),
        np.concatenate([vals, diag]).astype(np.float64),
    )


def mixing_matrix(graph: nx.Graph, kind: str = "metropolis") -> np.ndarray:
    """Dense ``(n, n)`` float64 mixing matrix in :func:`node_order` (see module docstring).

    Refuses graphs over :data:`DENSE_MATRIX_LIMIT` nodes; use :func:`mixing_matrix_sparse`.
    """
    n = graph.number_of_nodes()
    if n > DENSE_MATRIX_LIMIT:
        _fail(f"a dense mixing matrix for {n} nodes needs {n * n * 8 / 2**30:.1f} GiB; use mixing_matrix_sparse()")
    n, rows, cols, vals = _coo(graph, kind)
    matrix = np.zeros((n, n), dtype=np.float64)
    matrix[rows, cols] = vals
    return matrix


def mixing_matrix_sparse(
    graph: nx.Graph, kind: str = "metropolis", *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Sparse CSR ``(n, n)`` mixing matrix (default float32) for the vectorised simulator.

    Built straight from the edge list, O(n + m) memory, so 100 000 nodes are fine.
    """
    import torch

    n, rows, cols, vals = _coo(graph, kind)
    order = np.lexsort((cols, rows))  # CSR wants entries by row, then column
    crow = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=crow[1:])
    with warnings.catch_warnings():
        # torch warns once per process that CSR is "beta"; that is not our caller's concern.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(crow),
            torch.from_numpy(np.ascontiguousarray(cols[order])),
            torch.from_numpy(np.ascontiguousarray(vals[order])).to(dtype or torch.float32),
            size=(n, n),
            check_invariants=True,
        )


# --------------------------------------------------------------------------------------
# spectra


def _second_modulus(eigenvalues: np.ndarray) -> float:
    moduli = np.sort(np.abs(eigenvalues))[::-1]
    return float(moduli[1])


def _slem_iterative(matrix: Any) -> float:
    """SLEM of a large scipy sparse matrix with ARPACK."""
    import scipy.sparse.linalg as sla

    n = matrix.shape[0]
    # A fixed start vector: ARPACK's own is random, which makes the last digits vary.
    # ncv=40 Lanczos vectors: about twice as fast as the default 20 on 1e5-node expanders,
    # where the extreme eigenvalues sit at the edge of a dense spectrum.
    start = np.random.default_rng(0).standard_normal(n)
    symmetric = abs(matrix - matrix.T).max() <= 1e-12
    stochastic = np.allclose(np.asarray(matrix.sum(axis=1)).ravel(), 1.0)
    try:
        if symmetric and stochastic:
            # Deflate the known top eigenpair (1, ones/sqrt(n)); the largest remaining
            # modulus is the SLEM, and Lanczos finds one extreme eigenvalue fast.
            unit = np.full(n, 1.0 / math.sqrt(n))
            deflated = sla.LinearOperator((n, n), matvec=lambda x: matrix @ x - unit * (unit @ x), dtype=np.float64)
            values = sla.eigsh(
                deflated,
                k=1,
                which="LM",
                v0=start,
                ncv=40,
                maxiter=2000,
                tol=1e-10,
                return_eigenvectors=False,
            )
            return float(abs(values[0]))
        if symmetric:
            values = sla.eigsh(
                matrix,
                k=2,
                which="LM",
                v0=start,
                ncv=40,
                maxiter=2000,
                tol=1e-10,
                return_eigenvectors=False,
            )
        else:
            values = sla.eigs(
                matrix,
                k=2,
                which="LM",
                v0=start,
                ncv=40,
                maxiter=2000,
                tol=1e-10,
                return_eigenvectors=False,
            )
    except sla.ArpackNoConvergence:
        raise _NoConvergence(
            f"spectral gap: ARPACK did not converge for n={n} (the gap is too small to "
            f"resolve iteratively); at most {DENSE_EIG_LIMIT} nodes are solved exactly"
        ) from None
    return _second_modulus(values)


def slem(matrix: Any) -> float:
    """Second largest eigenvalue modulus of a mixing matrix.

    The largest modulus of a stochastic matrix is 1 (the consensus direction); the second
    sets how fast everything else dies out. Dense arrays use ``eigvalsh`` when symmetric,
    ``eigvals`` otherwise (O(n^3)); scipy sparse matrices over :data:`DENSE_EIG_LIMIT` use
    ARPACK. One node has no second eigenvalue: 0.
    """
    import scipy.sparse as sp

    if sp.issparse(matrix):
        n = matrix.shape[0]
        if matrix.shape != (n, n):
            _fail(f"a mixing matrix must be square, got shape {matrix.shape}")
        if n > DENSE_EIG_LIMIT:
            return _slem_iterative(matrix.tocsr().astype(np.float64))
        matrix = matrix.toarray()
    dense = np.asarray(matrix, dtype=np.float64)
    if dense.ndim != 2 or dense.shape[0] != dense.shape[1] or dense.shape[0] == 0:
        _fail(f"a mixing matrix must be square and non-empty, got shape {dense.shape}")
    if dense.shape[0] == 1:
        return 0.0
    if np.allclose(dense, dense.T, rtol=0.0, atol=1e-12):
        return _second_modulus(np.linalg.eigvalsh(dense))
    return _second_modulus(np.linalg.eigvals(dense))


def spectral_gap(matrix: Any) -> float:
    """``1 - slem(matrix)``: 1 for perfect one-round mixing, 0 for a disconnected graph."""
    return 1.0 - slem(matrix)


def _default_kind(graph: nx.Graph, kind: str | None) -> str:
    if kind is None:
        return "push_sum" if graph.is_directed() else "metropolis"
    return _check_kind(kind, MIXING_KINDS)


def _graph_slem(graph: nx.Graph, kind: str) -> float:
    n = graph.number_of_nodes()
    if n <= DENSE_EIG_LIMIT:
        return slem(mixing_matrix(graph, kind))
    import scipy.sparse as sp

    n, rows, cols, vals = _coo(graph, kind)
    return slem(sp.csr_array((vals, (rows, cols)), shape=(n, n)))


def graph_spectral_gap(graph: nx.Graph, kind: str | None = None) -> float:
    """Spectral gap of ``graph``'s mixing matrix.

    ``kind=None`` means Metropolis for an undirected graph and push-sum for a directed one
    (the weights each would actually be gossiped with).
    """
    return 1.0 - _graph_slem(graph, _default_kind(graph, kind))


def _diameter(graph: nx.Graph) -> int | None:
    """Exact diameter by chunked BFS in C (scipy); None when disconnected or too large."""
    n = graph.number_of_nodes()
    if n > DIAMETER_LIMIT:
        return None
    if n == 1:
        return 0
    from scipy.sparse.csgraph import shortest_path

    adjacency = nx.to_scipy_sparse_array(graph, nodelist=node_order(graph), format="csr")
    longest = 0.0
    for start in range(0, n, 512):
        dist = shortest_path(
            adjacency,
            directed=graph.is_directed(),
            unweighted=True,
            indices=np.arange(start, min(n, start + 512)),
        )
        longest = max(longest, float(dist.max()))
    return None if math.isinf(longest) else int(longest)


def describe(graph: nx.Graph, kind: str | None = None) -> dict[str, Any]:
    """Summary of a graph for ``gossipfl topology`` and run reports.

    Degrees are out-degrees for a digraph, whose spectral figures use push-sum weights when
    ``kind`` is Metropolis or max-degree (undefined on a digraph); the ``mixing`` entry says
    which weights were used. ``predicted_rate`` is ``slem**2``: the factor by
    which synchronous gossip shrinks the mean squared distance to the average each round.
    ``diameter`` is None if the graph is not (strongly) connected or has more than
    :data:`DIAMETER_LIMIT` nodes; the spectral figures are None if ARPACK fails to converge.
    """
    kind = _default_kind(graph, kind)
    n = graph.number_of_nodes()
    if n == 0:
        _fail("describe: the graph has no nodes")
    directed = graph.is_directed()
    if directed and kind in ("metropolis", "max_degree"):
        kind = "push_sum"  # a summary should not fail on the default; "mixing" says what was used
    degrees = [d for _, d in (graph.out_degree() if directed else graph.degree())]
    connected = nx.is_strongly_connected(graph) if directed else nx.is_connected(graph)
    try:
        second = _graph_slem(graph, kind)
    except _NoConvergence:
        second = None
    return {
        "nodes": n,
        "edges": graph.number_of_edges(),
        "directed": directed,
        "degree_min": min(degrees),
        "degree_max": max(degrees),
        "degree_mean": sum(degrees) / n,
        "diameter": _diameter(graph) if connected else None,
        "connected": connected,
        "mixing": kind,
        "spectral_gap": None if second is None else 1.0 - second,
        "slem": second,
        "predicted_rate": None if second is None else second**2,
    }


# --------------------------------------------------------------------------------------
# plotting


def _is_circulant(graph: nx.Graph, order: list[Any]) -> bool:
    """True if the edge set is invariant under shifting positions by one (ring-like)."""
    n = len(order)
    if n < 3 or graph.number_of_edges() == 0:
        return False
    index = {node: i for i, node in enumerate(order)}
    offsets = {(index[v] - index[u]) % n for u, v in graph.edges()}
    if not graph.is_directed():
        offsets |= {(-s) % n for s in offsets}
    # Circulant iff every node has the same out-offsets, i.e. n * |offsets| directed arcs.
    arcs = graph.number_of_edges() * (1 if graph.is_directed() else 2)
    return arcs == n * len(offsets)


def plot_graph(graph: nx.Graph, path: str | os.PathLike[str], *, title: str | None = None) -> None:
    """Draw ``graph`` to an image file (format from the suffix) without a display.

    Ring-like (circulant) graphs are drawn on a circle in node order so their structure is
    visible; others use a spring layout seeded with 0, so the picture is reproducible.
    Uses matplotlib's object API with the Agg renderer, never pyplot's global state.
    An unsupported suffix raises ``TopologyError``; a file that cannot be written raises
    ``OSError``, left to the caller (the CLI reports it).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 6))
    FigureCanvasAgg(fig)
    target = Path(path)
    suffix = target.suffix.lower().lstrip(".")
    supported = fig.canvas.get_supported_filetypes()
    if suffix not in supported:
        _fail(f"cannot plot to {target.name}: use one of .{', .'.join(sorted(supported))}")

    order = node_order(graph)
    n = len(order)
    if _is_circulant(graph, order):
        layout = nx.circular_layout(order)
    else:
        layout = nx.spring_layout(graph, seed=0)
    xy = np.array([layout[node] for node in order], dtype=float).reshape(-1, 2)
    index = {node: i for i, node in enumerate(order)}
    ends = np.array([(index[u], index[v]) for u, v in graph.edges()], dtype=np.int64)
    ends = ends.reshape(-1, 2)

    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_aspect("equal")
    if graph.is_directed() and len(ends):
        start, stop = xy[ends[:, 0]], xy[ends[:, 1]]
        delta = (stop - start) * 0.85  # stop short of the head node's marker
        ax.quiver(
            start[:, 0],
            start[:, 1],
            delta[:, 0],
            delta[:, 1],
            angles="xy",
            scale_units="xy",
            scale=1,
            width=0.003,
            color="0.5",
        )
    elif len(ends):
        segments = [((*xy[u],), (*xy[v],)) for u, v in ends]
        ax.add_collection(LineCollection(segments, colors="0.6", linewidths=0.8))
    size = max(4.0, min(200.0, 4000.0 / max(n, 1)))
    ax.scatter(xy[:, 0], xy[:, 1], s=size, c="tab:blue", zorder=3)
    if n <= 40:
        for node, (x, y) in zip(order, xy, strict=True):
            ax.annotate(str(node), (x, y), ha="center", va="center", fontsize=7, zorder=4, color="white")
    ax.autoscale_view()
    ax.set_title(title or f"{n} nodes, {graph.number_of_edges()} edges")
    fig.savefig(target, dpi=120, bbox_inches="tight")
