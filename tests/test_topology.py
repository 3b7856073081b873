"""Tests for gossipfl.topology: generators, files, mixing weights, spectra, membership."""

from __future__ import annotations

import math
import random
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch

from gossipfl import topology as T
from gossipfl.errors import ConfigError, TopologyError

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"


def edge_set(graph: nx.Graph) -> set[tuple]:
    if graph.is_directed():
        return set(graph.edges())
    return {tuple(sorted(e)) for e in graph.edges()}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ spectra: closed forms


@pytest.mark.parametrize("n", [3, 4, 5, 8, 17, 64])
def test_ring_metropolis_spectrum_matches_closed_form(n: int) -> None:
    W = T.mixing_matrix(T.ring(n))
    expected = np.sort(1 / 3 + 2 / 3 * np.cos(2 * np.pi * np.arange(n) / n))
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(W)), expected, atol=1e-12)
    slem = max(abs(1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / n)) for k in range(1, n))
    assert T.spectral_gap(W) == pytest.approx(1 - slem, abs=1e-12)
    assert T.graph_spectral_gap(T.ring(n)) == pytest.approx(1 - slem, abs=1e-12)


@pytest.mark.parametrize("n", [2, 5, 16])
def test_complete_graph_gap_is_one(n: int) -> None:
    W = T.mixing_matrix(T.complete(n))
    np.testing.assert_allclose(W, np.full((n, n), 1 / n), atol=1e-15)
    assert T.spectral_gap(W) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("dim", [1, 2, 3, 4, 5, 6])
def test_hypercube_gap_is_two_over_d_plus_one(dim: int) -> None:
    assert T.graph_spectral_gap(T.hypercube(2**dim)) == pytest.approx(2 / (dim + 1), abs=1e-12)


def test_slem_edge_cases() -> None:
    assert T.slem(np.ones((1, 1))) == 0.0
    assert T.spectral_gap(np.eye(3)) == pytest.approx(0.0)  # three isolated nodes never mix
    with pytest.raises(TopologyError, match="square"):
        T.slem(np.ones((2, 3)))


@pytest.mark.parametrize(
    ("graph", "kind"),
    [
        (T.ring(64), "metropolis"),
        (T.watts_strogatz(120, k=4, p=0.2, seed=1), "metropolis"),
        (T.star(40), "max_degree"),
        (T.star(40), "uniform"),  # not symmetric: the non-symmetric ARPACK path
        (T.exponential_directed(50), "push_sum"),
    ],
)
def test_iterative_spectral_gap_matches_dense(monkeypatch: pytest.MonkeyPatch, graph: nx.Graph, kind: str) -> None:
    dense = T.graph_spectral_gap(graph, kind)
    monkeypatch.setattr(T.spectral, "DENSE_EIG_LIMIT", 10)  # where the code reads it
    assert T.graph_spectral_gap(graph, kind) == pytest.approx(dense, abs=1e-8)


# ------------------------------------------------------------------ generators


@pytest.mark.parametrize(
    ("graph", "edges", "degrees"),
    [
        (T.ring(10), 10, {2}),
        (T.line(10), 9, {1, 2}),
        (T.torus(12), 24, {4}),
        (T.torus(24, rows=3), 48, {4}),
        (T.complete(7), 21, {6}),
        (T.star(9), 8, {1, 8}),
        (T.hypercube(16), 32, {4}),
        (T.exponential(16), 56, {7}),  # offsets ±1, ±2, ±4 and 8 (= -8)
        (T.exponential(10), 30, {6}),  # offsets 1, 2, 4, 8 = -2: {±1, ±2, ±4}
        (T.random_regular(20, k=3, seed=4), 30, {3}),
        (T.erdos_renyi(1), 0, {0}),
        (T.ring(1), 0, {0}),
        (T.ring(2), 1, {1}),
        (T.star(2), 1, {1}),
        (T.hypercube(1), 0, {0}),
        (T.hypercube(2), 1, {1}),
        (T.exponential(2), 1, {1}),
    ],
)
def test_generator_edge_and_degree_counts(graph: nx.Graph, edges: int, degrees: set[int]) -> None:
    assert list(graph.nodes()) == list(range(graph.number_of_nodes()))
    assert graph.number_of_edges() == edges
    assert {d for _, d in graph.degree()} == degrees
    assert nx.number_of_selfloops(graph) == 0


def test_torus_shape_and_default_factorisation() -> None:
    grid = T.torus(24)  # most square: 4 x 6
    assert nx.is_isomorphic(grid, nx.grid_2d_graph(4, 6, periodic=True))
    assert not nx.is_isomorphic(grid, nx.grid_2d_graph(3, 8, periodic=True))
    assert nx.is_isomorphic(T.torus(24, rows=3), nx.grid_2d_graph(3, 8, periodic=True))


def test_watts_strogatz_keeps_edge_count_and_rewires() -> None:
    graph = T.watts_strogatz(30, k=4, p=0.3, seed=2)
    assert graph.number_of_edges() == 60
    assert edge_set(graph) != edge_set(T.watts_strogatz(30, k=4, p=0.0))


def test_directed_generators() -> None:
    graph = T.exponential_directed(16)
    assert graph.is_directed()
    assert graph.number_of_edges() == 64
    assert {d for _, d in graph.out_degree()} == {4} == {d for _, d in graph.in_degree()}
    assert (3, 11) in graph.edges()
    assert (11, 3) in graph.edges()
    rounds = [T.one_peer_exponential(16, t) for t in range(5)]
    assert [sorted(g.successors(0)) for g in rounds] == [[1], [2], [4], [8], [1]]
    assert all({d for _, d in g.out_degree()} == {1} for g in rounds)
    assert T.one_peer_exponential(1, 3).number_of_edges() == 0


def test_one_peer_exponential_reaches_exact_average_in_log_n_rounds() -> None:
    schedule = T.build_schedule("one_peer_exponential", 16)
    assert schedule.period == 4
    assert schedule.directed
    product = np.eye(16)
    for t in range(schedule.period):
        product = T.mixing_matrix(schedule(t), "uniform") @ product
    np.testing.assert_allclose(product, np.full((16, 16), 1 / 16), atol=1e-12)


def test_random_matching_is_a_matching() -> None:
    for t in range(5):
        graph = T.random_matching(11, t, seed=3)
        degrees = [d for _, d in graph.degree()]
        assert max(degrees) == 1
        assert degrees.count(0) == 1
        assert graph.number_of_edges() == 5
    assert edge_set(T.random_matching(10, 0)) != edge_set(T.random_matching(10, 1))


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda s: T.erdos_renyi(30, p=0.2, seed=s), "erdos_renyi"),
        (lambda s: T.watts_strogatz(30, k=4, p=0.3, seed=s), "watts_strogatz"),
        (lambda s: T.random_regular(30, k=3, seed=s), "random_regular"),
        (lambda s: T.random_matching(30, 7, seed=s), "random_matching"),
    ],
)
def test_random_generators_deterministic_per_seed(make, name: str) -> None:
    assert edge_set(make(0)) == edge_set(make(0)), name
    assert list(make(5).edges()) == list(make(5).edges()), name  # same order too
    assert edge_set(make(0)) != edge_set(make(1)), name


@pytest.mark.parametrize(
    "graph",
    [
        T.erdos_renyi(40, seed=1),
        T.watts_strogatz(40, p=0.5, seed=1),
        T.random_regular(40, k=3, seed=1),
        T.random_matching(40, 3),
        T.exponential(12),
    ],
)
def test_generators_insert_nodes_and_edges_in_sorted_order(graph: nx.Graph) -> None:
    # Iteration order leaks into neighbour lists and weight dicts; it must not depend on
    # the algorithm that drew the graph.
    assert list(graph.nodes()) == list(range(graph.number_of_nodes()))
    assert list(graph.edges()) == sorted((min(e), max(e)) for e in graph.edges())


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [2, 3, 9, 40])
def test_generators_connected(seed: int, n: int) -> None:
    for name in ["ring", "line", "complete", "star", "exponential", "erdos_renyi"]:
        assert nx.is_connected(T.build_graph(name, n, seed=seed)), name
    assert nx.is_strongly_connected(T.exponential_directed(n))
    if n > 4:
        assert nx.is_connected(T.watts_strogatz(n, k=4, p=0.5, seed=seed))
    if n > 3 and n % 2 == 0:
        assert nx.is_connected(T.random_regular(n, k=3, seed=seed))


def test_erdos_renyi_gives_up_on_hopeless_p() -> None:
    with pytest.raises(TopologyError, match=r"no connected graph.*raise p"):
        T.erdos_renyi(60, p=0.01)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: T.ring(0), "n"),
        (lambda: T.ring(-3), "n"),
        (lambda: T.ring(True), "integer"),
        (lambda: T.complete(2.5), "integer"),
        (lambda: T.torus(8), "at least 9"),
        (lambda: T.torus(10), "9 or 12"),
        (lambda: T.torus(13), "12 or 15"),
        (lambda: T.torus(12, rows=5), "rows"),
        (lambda: T.torus(12, rows=2), "rows"),
        (lambda: T.hypercube(12), "8 or 16"),
        (lambda: T.hypercube(0), "n"),
        (lambda: T.watts_strogatz(20, k=3), "even"),
        (lambda: T.watts_strogatz(4, k=4), "at least 5"),
        (lambda: T.watts_strogatz(20, p=1.5), "p"),
        (lambda: T.random_regular(15, k=3), "even"),
        (lambda: T.random_regular(3, k=3), "at least 4"),
        (lambda: T.random_regular(6, k=1), "k=1"),
        (lambda: T.erdos_renyi(10, p=0), "p"),
        (lambda: T.erdos_renyi(10, seed="x"), "seed"),
        (lambda: T.one_peer_exponential(8, -1), "round"),
    ],
)
def test_bad_generator_input_raises_topology_error(call, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        call()


# ------------------------------------------------------------------ build_graph and names


def test_build_graph_names_and_aliases() -> None:
    for alias, name, params in [
        ("er", "erdos_renyi", {"p": 0.3}),
        ("ws", "watts_strogatz", {}),
        ("regular", "random_regular", {}),
        ("Watts-Strogatz", "watts_strogatz", {}),
    ]:
        a = T.build_graph(alias, 20, seed=3, **params)
        b = T.build_graph(name, 20, seed=3, **params)
        assert edge_set(a) == edge_set(b)
    assert edge_set(T.build_graph("torus", 16, rows=4)) == edge_set(T.torus(16, rows=4))


def test_build_graph_errors() -> None:
    with pytest.raises(TopologyError, match=r"unknown topology 'rign'.*ring.*torus"):
        T.build_graph("rign", 8)
    with pytest.raises(TopologyError, match="foo"):
        T.build_graph("ring", 8, foo=1)
    with pytest.raises(TopologyError, match="build_schedule"):
        T.build_graph("one_peer_exponential", 8)
    with pytest.raises(TopologyError, match="required"):
        T.build_graph("ring")
    with pytest.raises(TopologyError, match="nodes"):
        T.build_graph("ring", 0)
    with pytest.raises(TopologyError, match="not found"):
        T.build_graph("no/such/file.toml", 8)
    with pytest.raises(TopologyError, match="name or a file path"):
        T.build_graph(42, 8)  # type: ignore[arg-type]
    assert issubclass(TopologyError, ConfigError)


def test_build_schedule_static_and_time_varying() -> None:
    static = T.build_schedule("ring", 6)
    assert static.period == 1
    assert static(0) is static(9)
    matching = T.build_schedule("random_matching", 8, seed=2)
    assert matching.period is None
    assert edge_set(matching(3)) == edge_set(T.random_matching(8, 3, seed=2))
    with pytest.raises(TopologyError, match="round"):
        matching(-1)


# ------------------------------------------------------------------ mixing weights


UNDIRECTED = {
    "ring": T.ring(12),
    "star": T.star(9),
    "torus": T.torus(12),
    "er": T.erdos_renyi(25, p=0.2, seed=1),
    "ws": T.watts_strogatz(20, seed=2),
    "two_clusters": T.build_graph(TOPOLOGIES / "two_clusters.toml"),
}


@pytest.mark.parametrize("name", list(UNDIRECTED))
@pytest.mark.parametrize("kind", ["metropolis", "max_degree"])
def test_symmetric_weights_are_doubly_stochastic(name: str, kind: str) -> None:
    W = T.mixing_matrix(UNDIRECTED[name], kind)
    np.testing.assert_allclose(W, W.T, atol=1e-15)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-12)
    assert W.min() >= 0.0
    assert np.count_nonzero(W - np.diag(np.diag(W))) == 2 * UNDIRECTED[name].number_of_edges()


@pytest.mark.parametrize("name", list(UNDIRECTED))
@pytest.mark.parametrize("kind", ["metropolis", "max_degree", "uniform"])
def test_weight_dicts_local_weights_and_matrices_agree(name: str, kind: str) -> None:
    graph = UNDIRECTED[name]
    W = T.mixing_matrix(graph, kind)
    rows = T.mixing_weights(graph, kind)
    for i, row in rows.items():
        assert sum(row.values()) == pytest.approx(1.0)
        dense_row = {j: W[i, j] for j in np.flatnonzero(W[i])}
        assert row.keys() == dense_row.keys()
        assert all(row[j] == pytest.approx(dense_row[j], abs=1e-15) for j in row)
        own, others = T.local_weights(graph, i, kind)
        assert own == pytest.approx(row[i])
        assert set(others) == set(row) - {i}
    sparse = T.mixing_matrix_sparse(graph, kind)
    assert sparse.layout == torch.sparse_csr
    assert sparse.dtype == torch.float32
    np.testing.assert_allclose(sparse.to_dense().numpy(), W, atol=1e-7)


def test_metropolis_weight_values() -> None:
    own, others = T.local_weights(T.star(5), 0)
    assert others == dict.fromkeys([1, 2, 3, 4], 1 / 5)
    assert own == pytest.approx(1 / 5)
    own, others = T.local_weights(T.star(5), 3)
    assert others == {0: 1 / 5}
    assert own == pytest.approx(4 / 5)
    own, others = T.local_weights(T.star(5), 3, "max_degree")
    assert others == {0: 1 / 5}
    with pytest.raises(TopologyError, match="max_degree"):
        T.local_weights(T.star(5), 0, "max_degree", max_degree=2)
    with pytest.raises(TopologyError, match="not in the graph"):
        T.local_weights(T.star(5), 9)


IRREGULAR_DIGRAPH = nx.DiGraph([(0, 1), (1, 2), (2, 0), (0, 2), (0, 3), (3, 0), (3, 1)])


@pytest.mark.parametrize(
    "graph",
    [T.exponential_directed(10), T.star(6), T.one_peer_exponential(12, 2), IRREGULAR_DIGRAPH],
)
def test_push_sum_weights_are_column_stochastic(graph: nx.Graph) -> None:
    shares = T.column_stochastic_weights(graph)
    P = T.mixing_matrix(graph, "push_sum")
    np.testing.assert_allclose(P.sum(axis=0), 1.0, atol=1e-12)
    for sender, row in shares.items():
        assert sum(row.values()) == pytest.approx(1.0)
        for receiver, share in row.items():
            assert P[receiver, sender] == pytest.approx(share)
    np.testing.assert_allclose(T.mixing_matrix_sparse(graph, "push_sum").to_dense().numpy(), P, atol=1e-7)


def test_directed_uniform_weights_and_refusals() -> None:
    graph = T.exponential_directed(16)
    W = T.mixing_matrix(graph, "uniform")
    np.testing.assert_allclose(W.sum(axis=0), 1.0, atol=1e-12)  # regular digraph:
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-12)  # doubly stochastic
    assert W[11, 3] == pytest.approx(1 / 5)
    assert W[3, 11] == pytest.approx(1 / 5)
    assert W[4, 3] == pytest.approx(1 / 5)
    assert W[3, 4] == 0.0
    # On an irregular digraph, node i averages itself with the nodes it hears from.
    W = T.mixing_matrix(IRREGULAR_DIGRAPH, "uniform")
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-12)
    for i, row in T.mixing_weights(IRREGULAR_DIGRAPH, "uniform").items():
        assert set(row) == {i, *IRREGULAR_DIGRAPH.predecessors(i)}
        assert all(W[i, j] == pytest.approx(w) for j, w in row.items())
    with pytest.raises(TopologyError, match="undirected"):
        T.mixing_matrix(graph, "metropolis")
    with pytest.raises(TopologyError, match="column_stochastic_weights"):
        T.mixing_weights(T.ring(5), "push_sum")
    with pytest.raises(TopologyError, match=r"unknown mixing kind.*metropolis"):
        T.mixing_matrix(T.ring(5), "laplacian")


def test_sparse_matrix_for_large_graph_without_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    graph = T.ring(20_000)
    sparse = T.mixing_matrix_sparse(graph, dtype=torch.float64)
    assert sparse.shape == (20_000, 20_000)
    assert sparse.values().numel() == 60_000
    ones = torch.ones(20_000, 1, dtype=torch.float64)
    torch.testing.assert_close(sparse @ ones, ones)
    monkeypatch.setattr(T.weights, "DENSE_MATRIX_LIMIT", 100)  # where the code reads it
    with pytest.raises(TopologyError, match="mixing_matrix_sparse"):
        T.mixing_matrix(graph)


# ------------------------------------------------------------------ describe and plot


def test_describe_ring_and_broken_digraph() -> None:
    info = T.describe(T.ring(16))
    assert info["nodes"] == 16
    assert info["edges"] == 16
    assert info["diameter"] == 8
    assert info["degree_min"] == info["degree_max"] == 2
    assert info["connected"]
    assert info["mixing"] == "metropolis"
    assert not info["directed"]
    assert info["slem"] == pytest.approx(1 / 3 + 2 / 3 * math.cos(2 * math.pi / 16))
    assert info["predicted_rate"] == pytest.approx(info["slem"] ** 2)
    assert info["spectral_gap"] == pytest.approx(1 - info["slem"])
    one_way = nx.DiGraph([(0, 1), (1, 2)])
    info = T.describe(one_way)
    assert info["mixing"] == "push_sum"
    assert not info["connected"]
    assert info["diameter"] is None
    assert T.describe(T.ring(1))["spectral_gap"] == 1.0
    directed = T.describe(T.exponential_directed(16), "metropolis")  # the CLI's default
    assert directed["mixing"] == "push_sum"
    assert directed["diameter"] == 4
    assert T.describe(T.exponential_directed(16), "uniform")["mixing"] == "uniform"


def test_plot_graph_writes_images(tmp_path: Path) -> None:
    for name, graph in [
        ("ring", T.ring(12)),
        ("ws", T.watts_strogatz(30, seed=1)),
        ("digraph", T.exponential_directed(8)),
        ("members", T.graph_for_members("ring", ["a", "b", "c"])),
    ]:
        target = tmp_path / f"{name}.png"
        T.plot_graph(graph, target, title=name)
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(TopologyError, match="cannot plot"):
        T.plot_graph(T.ring(5), tmp_path / "ring.xyz")


# ------------------------------------------------------------------ topology files


SHIPPED = sorted(TOPOLOGIES.glob("*.toml"))


def test_shipped_topology_files_exist() -> None:
    names = {p.stem for p in SHIPPED}
    for required in [
        "ring",
        "torus",
        "complete",
        "star",
        "hypercube",
        "erdos_renyi",
        "watts_strogatz",
        "random_regular",
        "exponential",
        "two_clusters",
    ]:
        assert required in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_topology_files_load(path: Path) -> None:
    assert path.read_text(encoding="utf-8").startswith("#"), "needs an explanatory header"
    graph = T.build_graph(path, 16)
    assert graph.number_of_nodes() == 16
    assert nx.is_connected(graph)
    assert edge_set(T.build_graph(str(path), 16)) == edge_set(graph)


def test_shipped_examples_have_the_advertised_shape() -> None:
    clusters = T.build_graph(TOPOLOGIES / "two_clusters.toml")
    assert clusters.number_of_edges() == 2 * 28 + 1
    assert list(nx.bridges(clusters)) == [(7, 8)]
    cliques = T.build_graph(TOPOLOGIES / "ring_of_cliques.toml", 16)
    assert cliques.number_of_edges() == 28
    assert edge_set(cliques) == edge_set(T.build_graph(TOPOLOGIES / "ring_of_cliques.edges"))
    assert T.describe(clusters)["spectral_gap"] < T.describe(T.complete(16))["spectral_gap"] / 10


def test_toml_params_seed_and_overrides(tmp_path: Path) -> None:
    ws = write(tmp_path, "ws.toml", 'generator = "ws"\n[params]\nk = 4\np = 0.2\n')
    assert {d for _, d in T.build_graph(ws, 16, k=6, p=0.0).degree()} == {6}  # CLI wins
    pinned = write(tmp_path, "er.toml", 'generator = "er"\nseed = 5\nnodes = 20\n[params]\np = 0.3\n')
    expected = edge_set(T.erdos_renyi(20, p=0.3, seed=5))
    assert edge_set(T.build_graph(pinned, seed=0)) == expected
    assert edge_set(T.build_graph(pinned, 20, seed=99)) == expected  # the file pins the seed


def test_toml_directed_edges(tmp_path: Path) -> None:
    path = write(tmp_path, "cycle.toml", "directed = true\nedges = [[0, 1], [1, 2], [2, 0]]\n")
    graph = T.build_graph(path, 3)
    assert graph.is_directed()
    assert sorted(graph.edges()) == [(0, 1), (1, 2), (2, 0)]
    one_way = write(tmp_path, "path.toml", "directed = true\nedges = [[0, 1], [1, 2]]\n")
    with pytest.raises(TopologyError, match="not strongly connected"):
        T.build_graph(one_way)


@pytest.mark.parametrize(
    ("text", "n", "message"),
    [
        ('generator = "ring"\ncolour = "red"\n', 8, "unknown key 'colour'"),
        ('generator = "ring"\nnodes = "8"\n', None, "nodes must be an integer"),
        ('generator = "ring"\nnodes = true\n', None, "nodes must be an integer"),
        ('generator = "ring"\nnodes = 8\n', 16, "nodes = 8"),
        ('generator = "ring"\nseed = 1.5\n', 8, "seed must be an integer"),
        ("generator = 3\n", 8, "generator must be a string"),
        ('generator = "moebius"\n', 8, r"generator = 'moebius'.*ring"),
        ('generator = "ws"\n[params]\nk = "four"\n', 16, "k must be an integer"),
        ('generator = "ws"\n[params]\nq = 1\n', 16, "unknown parameter 'q'"),
        ('generator = "ws"\n[params]\nseed = 1\n', 16, "params.seed"),
        ('generator = "ws"\nparams = 3\n', 16, "params must be a table"),
        ('generator = "ring"\ndirected = true\n', 8, "directed"),
        ('generator = "torus"\n', 10, r"bad\.toml: torus.*9 or 12"),
        ("nodes = 4\n", None, "exactly one of"),
        ('generator = "ring"\nedges = [[0, 1]]\n', 2, r"exactly one of.*found generator, edges"),
        ('edges = [[0, 1]]\ndirected = "yes"\n', None, "directed must be true or false"),
        ("edges = []\n", None, "edges must be a non-empty list"),
        ("edges = [[0, 1], [1]]\n", None, r"edges\[1\]"),
        ("edges = [[0, 1], [1, 1]]\n", None, r"edges\[1\].*self-loop"),
        ('edges = [[0, 1], [1, "2"]]\n', None, r"edges\[1\]"),
        ("edges = [[0, 1], [1, -2]]\n", None, r"edges\[1\]"),
        ("edges = [[0, 1], [2, 3]]\n", None, "not connected"),
        ("edges = [[0, 1], [1, 2]]\n", 16, "gives 3 nodes but --nodes is 16"),
        ("edges = [[0, 1], [1, 2]]\nnodes = 4\n", None, "gives 3 nodes but nodes is 4"),
        ("edges = [[0, 1]]\n[params]\nk = 2\n", None, "params only applies"),
        ('file = "missing.edges"\n', None, r"file.*not found.*missing\.edges"),
        ('file = "other.toml"\n', None, "cannot include another TOML"),
        ('file = "graph.json"\n', None, "unsupported graph file suffix"),
        ("file = 7\n", None, "file must be a non-empty string"),
        ("generator = [\n", 8, "not valid TOML"),
    ],
)
def test_bad_toml_raises_topology_error_naming_the_key(tmp_path: Path, text: str, n: int | None, message: str) -> None:
    path = write(tmp_path, "bad.toml", text)
    with pytest.raises(TopologyError, match=message) as info:
        T.build_graph(path, n)
    assert "bad.toml" in str(info.value)


def test_params_for_explicit_graph_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "tri.toml", "edges = [[0, 1], [1, 2], [2, 0]]\n")
    with pytest.raises(TopologyError, match="only apply to generator"):
        T.build_graph(path, 3, k=4)


def test_edge_list_files(tmp_path: Path) -> None:
    write(tmp_path, "square.txt", "# a square\n0 1\n1,2\n\n2 3  # trailing comment\n3 0\n")
    graph = T.build_graph(tmp_path / "square.txt", 4)
    assert edge_set(graph) == {(0, 1), (1, 2), (2, 3), (0, 3)}
    write(tmp_path, "broken.edges", "0 1\n1 2 3\n")
    with pytest.raises(TopologyError, match="line 2"):
        T.build_graph(tmp_path / "broken.edges")
    write(tmp_path, "loop.edgelist", "0 1\n1 1\n")
    with pytest.raises(TopologyError, match="self-loop"):
        T.build_graph(tmp_path / "loop.edgelist")
    write(tmp_path, "empty.edges", "# nothing\n")
    with pytest.raises(TopologyError, match="no edges"):
        T.build_graph(tmp_path / "empty.edges")


def test_graphml_files(tmp_path: Path) -> None:
    labelled = nx.relabel_nodes(nx.cycle_graph(12), {i: f"n{i}" for i in range(12)})
    nx.write_graphml(labelled, tmp_path / "ring.graphml")
    graph = T.build_graph(tmp_path / "ring.graphml", 12)
    assert edge_set(graph) == edge_set(T.ring(12))  # natural order: n2 < n10
    write(tmp_path, "via.toml", 'file = "ring.graphml"\n')
    assert edge_set(T.build_graph(tmp_path / "via.toml", 12)) == edge_set(graph)
    write(tmp_path, "via_directed.toml", 'file = "ring.graphml"\ndirected = true\n')
    with pytest.raises(TopologyError, match="directed = true"):
        T.build_graph(tmp_path / "via_directed.toml")

    nx.write_graphml(nx.relabel_nodes(nx.path_graph(3), {0: 1, 1: 2, 2: 5}), tmp_path / "gap.graphml")
    with pytest.raises(TopologyError, match=r"0\.\.2"):
        T.build_graph(tmp_path / "gap.graphml")
    nx.write_graphml(nx.relabel_nodes(nx.path_graph(3), {0: "a"}), tmp_path / "mixed.graphml")
    with pytest.raises(TopologyError, match="mixes"):
        T.build_graph(tmp_path / "mixed.graphml")
    looped = nx.path_graph(3)
    looped.add_edge(1, 1)
    nx.write_graphml(looped, tmp_path / "loop.graphml")
    with pytest.raises(TopologyError, match="self-loop"):
        T.build_graph(tmp_path / "loop.graphml")
    write(tmp_path, "junk.graphml", "<graphml><graph")
    with pytest.raises(TopologyError, match="junk.graphml"):
        T.build_graph(tmp_path / "junk.graphml")


# ------------------------------------------------------------------ membership


MEMBERS = [f"node-{c}" for c in "qwertyuiop"]


@pytest.mark.parametrize(
    ("spec", "params"),
    [
        ("ring", {}),
        ("er", {"p": 0.4}),
        ("ws", {}),
        ("exponential_directed", {}),
        (TOPOLOGIES / "random_regular.toml", {}),
    ],
)
def test_same_members_in_any_order_give_identical_graph(spec, params: dict) -> None:
    reference = T.graph_for_members(spec, MEMBERS, seed=7, **params)
    assert sorted(reference.nodes()) == sorted(MEMBERS)
    rng = random.Random(0)
    for _ in range(3):
        shuffled = MEMBERS + MEMBERS[:3]  # duplicates from discovery are harmless
        rng.shuffle(shuffled)
        graph = T.graph_for_members(spec, shuffled, seed=7, **params)
        assert edge_set(graph) == edge_set(reference)
        assert list(graph.nodes()) == list(reference.nodes())
        assert all(T.neighbours(graph, m) == T.neighbours(reference, m) for m in MEMBERS)


def test_ring_neighbours_follow_joins_and_leaves() -> None:
    members = ["a", "b", "c", "d", "e"]
    graph = T.graph_for_members("ring", members)
    assert T.neighbours(graph, "c") == ["b", "d"]
    assert T.neighbours(graph, "a") == ["b", "e"]
    graph = T.graph_for_members("ring", [*members, "ca"])  # joins between c and d
    assert T.neighbours(graph, "c") == ["b", "ca"]
    assert T.neighbours(graph, "d") == ["ca", "e"]
    graph = T.graph_for_members("ring", ["a", "b", "c", "e"])  # d leaves
    assert T.neighbours(graph, "c") == ["b", "e"]
    assert T.neighbours(graph, "e") == ["a", "c"]
    with pytest.raises(TopologyError, match="not in the graph"):
        T.neighbours(graph, "d")


def test_small_memberships() -> None:
    alone = T.graph_for_members("torus", ["solo"])
    assert list(alone.nodes()) == ["solo"]
    assert alone.number_of_edges() == 0
    assert T.neighbours(alone, "solo") == []
    assert list(T.graph_for_members("ring", ["b", "a"]).edges()) == [("a", "b")]
    small = T.graph_for_members("torus", ["a", "b", "c", "d"])  # complete while < 9
    assert small.number_of_edges() == 6
    with pytest.raises(TopologyError, match="at least 9"):
        T.graph_for_members("torus", ["a", "b", "c", "d"], small_fallback=False)
    with pytest.raises(TopologyError, match="8 or 16"):
        T.graph_for_members("hypercube", list("abcdefghij"))  # invalid, not small
    with pytest.raises(TopologyError, match="unknown topology"):
        T.graph_for_members("rign", ["solo"])  # a typo is caught even when alone
    directed = T.graph_for_members("exponential_directed", ["a", "b", "c", "d"])
    assert T.neighbours(directed, "a") == ["b", "c"]
    with pytest.raises(TopologyError, match="no members"):
        T.graph_for_members("ring", [])
    with pytest.raises(TopologyError, match="strings"):
        T.graph_for_members("ring", ["a", 3])  # type: ignore[list-item]
