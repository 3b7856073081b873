"""A graph's summary figures (:func:`describe`) and picture (:func:`plot_graph`).

For ``gossipfl topology`` and run reports. matplotlib is imported only when a graph is drawn.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from gossipfl.topology._common import _fail
from gossipfl.topology.spectral import _graph_slem, _NoConvergence
from gossipfl.topology.weights import _default_kind, node_order

DIAMETER_LIMIT = 5000
""":func:`describe` reports ``diameter=None`` above this many nodes (all-pairs BFS is O(n*m))."""


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
