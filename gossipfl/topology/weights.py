"""Mixing weights: who gives which weight to whose value, per node or as a matrix.

``W[i, j]`` is the weight node ``i`` gives to node ``j``'s value in ``x_i <- sum_j W[i, j] x_j``
(row-stochastic, self weight included). Kinds: ``"metropolis"`` (Metropolis-Hastings,
symmetric and doubly stochastic on any undirected graph), ``"max_degree"`` (same property,
one global weight), ``"uniform"`` (average of self and in-neighbours; doubly stochastic
only on regular graphs) and ``"push_sum"`` (column-stochastic: each node splits its mass
equally among itself and its out-neighbours, ``P[i, j]`` = the share ``j`` sends to ``i``).
Directed graphs admit only ``"uniform"`` and ``"push_sum"``. Row and column ``i`` of every
matrix is node ``node_order(graph)[i]``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np

from gossipfl.topology._common import _N, _fail

if TYPE_CHECKING:
    import torch


MIXING_KINDS: tuple[str, ...] = ("metropolis", "max_degree", "uniform", "push_sum")
_ROW_KINDS = ("metropolis", "max_degree", "uniform")

DENSE_MATRIX_LIMIT = 20_000
""":func:`mixing_matrix` refuses larger graphs (n*n float64); use the sparse variant."""


def node_order(graph: nx.Graph) -> list[Any]:
    """Nodes in sorted order: row/column ``i`` of every mixing matrix is ``node_order(G)[i]``."""
    try:
        return sorted(graph.nodes())
    except TypeError:
        _fail("graph nodes must be mutually sortable (all integers or all strings)")


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


def _default_kind(graph: nx.Graph, kind: str | None) -> str:
    if kind is None:
        return "push_sum" if graph.is_directed() else "metropolis"
    return _check_kind(kind, MIXING_KINDS)


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
