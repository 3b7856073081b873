"""Spectral gap: how fast gossip over a mixing matrix reaches consensus.

The gap is ``1 - SLEM``, the second largest eigenvalue modulus of the mixing matrix. In
synchronous gossip the mean squared distance to the average shrinks by about ``SLEM**2`` per
round. Up to :data:`DENSE_EIG_LIMIT` nodes the eigenvalues are computed densely; above it
with ARPACK (``scipy.sparse.linalg``, a dependency of scikit-learn), which raises
:class:`~gossipfl.errors.TopologyError` if it does not converge (very small gaps on very
large graphs).
"""

from __future__ import annotations

import math
from typing import Any

import networkx as nx
import numpy as np

from gossipfl.errors import TopologyError
from gossipfl.topology._common import _fail
from gossipfl.topology.weights import _coo, _default_kind, mixing_matrix

DENSE_EIG_LIMIT = 2000
"""Above this many nodes the spectral gap is computed iteratively (ARPACK), not densely."""


class _NoConvergence(TopologyError):
    """The iterative eigensolver gave up; :func:`describe` reports None instead of failing."""


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
    # The same solver settings for every call below.
    arpack: dict[str, Any] = {"which": "LM", "v0": start, "ncv": 40, "maxiter": 2000, "tol": 1e-10}
    try:
        if symmetric and stochastic:
            # Deflate the known top eigenpair (1, ones/sqrt(n)); the largest remaining
            # modulus is the SLEM, and Lanczos finds one extreme eigenvalue fast.
            unit = np.full(n, 1.0 / math.sqrt(n))
            deflated = sla.LinearOperator((n, n), matvec=lambda x: matrix @ x - unit * (unit @ x), dtype=np.float64)
            values = sla.eigsh(deflated, k=1, return_eigenvectors=False, **arpack)
            return float(abs(values[0]))
        solver = sla.eigsh if symmetric else sla.eigs
        values = solver(matrix, k=2, return_eigenvectors=False, **arpack)
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


SUMMARY_GAP_LIMIT = 8192
"""A training run's summary reports its graph's spectral gap up to this many nodes (under a
second); pure averaging runs always compute it, as their predicted rate."""


def summary_spectral_gap(graph: nx.Graph, kind: str, *, always: bool = False) -> float | None:
    """The spectral gap a run's summary reports: 1 - SLEM of the matrix its algorithm mixes with
    (``kind``); None above :data:`SUMMARY_GAP_LIMIT` nodes (unless ``always``) or where ARPACK
    gives up, so that a table can show it without a large run paying for an eigensolve."""
    if not always and graph.number_of_nodes() > SUMMARY_GAP_LIMIT:
        return None
    try:
        return graph_spectral_gap(graph, kind)
    except TopologyError:  # ARPACK gave up, or weights this graph cannot take
        return None


def randomized_gossip_rate(graph: nx.Graph, mix: float = 0.5) -> float:
    """Per-round contraction of E||x - mean||^2 under randomized gossip: N clock ticks, each waking
    a uniform node that moves ``mix`` of the way towards a uniform neighbour (both sides).

    One tick applies W = I - mix P_ij with P_ij = (e_i - e_j)(e_i - e_j)^T, so
    E[W^T W] = I - (2 mix - 2 mix^2) / N * L, L the Laplacian with edge weights 1/d_i + 1/d_j, and
    E V_{k+1} <= lambda_2(E[W^T W]) E V_k (Boyd et al. 2006). The bound is equality on the
    complete graph, where it is 1 - 1/(n - 1) per tick at mix 1/2. Returns lambda_2(E[W^T W])^N.
    """
    import scipy.sparse as sp

    n = graph.number_of_nodes()
    if n < 2:
        return 0.0
    index = {v: k for k, v in enumerate(graph.nodes)}
    deg = dict(graph.degree())
    rows, cols, vals = [], [], []
    for u, v in graph.edges():
        if u == v:
            continue
        w = 1.0 / deg[u] + 1.0 / deg[v]
        a, b = index[u], index[v]
        rows += [a, b, a, b]
        cols += [b, a, a, b]
        vals += [-w, -w, w, w]
    laplacian = sp.csr_array((np.asarray(vals, dtype=np.float64), (rows, cols)), shape=(n, n))
    expected = sp.identity(n, format="csr") - (2.0 * mix - 2.0 * mix * mix) / n * laplacian
    # every eigenvalue of E[W^T W] lies in [0, 1] (lambda_max(L) <= 2n), so its SLEM is lambda_2
    return slem(expected) ** n


def predicted_round_rate(graph: nx.Graph, gap: float | None, *, pairwise: bool = False,
                         random_wakes: bool = False, mix: float = 0.5) -> float | None:
    """What theory predicts for a pure-averaging run's per-round contraction of the consensus
    distance: SLEM(W)^2 = (1 - gap)^2 for a fixed symmetric W; randomized gossip's
    `randomized_gossip_rate`; None where no closed form applies (directed graphs, pairwise
    exchanges in node order, whose rate depends on the order)."""
    if pairwise:
        return randomized_gossip_rate(graph, mix) if random_wakes else None
    if gap is None or graph.is_directed():
        return None
    return (1.0 - gap) ** 2
