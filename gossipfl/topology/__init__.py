"""Who talks to whom, and with which weight.

Everything here is a pure function of its arguments: the same name, node count, parameters
and seed give the same graph on every machine. That is what lets a cluster run without a
coordinator: each node sorts the membership it discovered, builds the graph over
``range(len(members))`` and relabels it (:func:`graph_for_members`), and so arrives at the
same neighbours as every other node that sees the same membership.

This package is the public API; each part lives in its own module:

``generators``
    the graphs (ring, torus, hypercube, exponential, random graphs, per-round graphs)
``names``
    generator names and aliases (:func:`topology_names`)
``graph_files``
    reading edge lists and GraphML
``specs``
    a name or file (``topologies/*.toml``) to a checked graph: :func:`build_graph`, :func:`check_spec`
``schedules``
    a graph per round: :class:`Schedule`, :func:`build_schedule`
``membership``
    the graph over discovered member ids: :func:`graph_for_members`, :func:`neighbours`
``weights``
    mixing weights and matrices (Metropolis-Hastings, max-degree, uniform, push-sum)
``spectral``
    SLEM and spectral gap
``summary``
    :func:`describe` and :func:`plot_graph`

Every bad input raises :class:`~gossipfl.errors.TopologyError`.
"""

from gossipfl.topology.generators import (
    GENERATORS,
    MAX_ATTEMPTS,
    TIME_VARYING,
    complete,
    erdos_renyi,
    exponential,
    exponential_directed,
    hypercube,
    line,
    one_peer_exponential,
    random_matching,
    random_regular,
    ring,
    star,
    torus,
    watts_strogatz,
)
from gossipfl.topology.graph_files import EDGE_LIST_SUFFIXES
from gossipfl.topology.membership import graph_for_members, neighbours
from gossipfl.topology.names import ALIASES, topology_names
from gossipfl.topology.schedules import Schedule, build_schedule
from gossipfl.topology.specs import build_graph, check_spec
from gossipfl.topology.spectral import (
    DENSE_EIG_LIMIT,
    graph_spectral_gap,
    slem,
    spectral_gap,
    summary_spectral_gap,
)
from gossipfl.topology.summary import DIAMETER_LIMIT, describe, plot_graph
from gossipfl.topology.weights import (
    DENSE_MATRIX_LIMIT,
    MIXING_KINDS,
    column_stochastic_weights,
    local_weights,
    mixing_matrix,
    mixing_matrix_sparse,
    mixing_weights,
    node_order,
)

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
    "summary_spectral_gap",
    "star",
    "topology_names",
    "torus",
    "watts_strogatz",
]
