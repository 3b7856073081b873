"""The consensus-rate measurement (gossipfl.convergence) against closed-form theory: on pure
averaging the asymptotic per-round contraction of the consensus distance is rho^2, rho = |W - J|_2;
the complete graph with uniform weights averages exactly in one round. Both engines."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from gossipfl.config import RunConfig
from gossipfl.convergence import consensus_summary, floor_of
from gossipfl.sim.vectorized import run_vectorized

EPS32 = 1.1920928955078125e-07


def test_the_rate_of_a_sum_of_modes_is_the_slowest_modes_despite_a_strong_transient() -> None:
    """d(t) = 1 * 0.9^t + 5 * 0.8^t (the faster mode holds most of the spread): the later-half
    fit alone is off; the extrapolated rate is the slow mode's."""
    pts = [(t, 0.9**t + 5 * 0.8**t) for t in range(61)]
    out = consensus_summary(pts, eps=EPS32, predicted=0.9)
    assert out["consensus_rate"] == pytest.approx(0.9, rel=2e-4)
    assert abs(out["consensus_rate_fit"] - 0.9) > 3e-3  # the case has teeth
    assert out["consensus_rounds_to_1e-3"] == next(t for t, d in pts if d <= 6e-3)
    assert out["consensus_exact_after"] is None


def test_points_at_the_float_floor_do_not_enter_the_rate() -> None:
    """After the floor the distance stalls (rounding noise); a fit over every point from t = 0,
    as before, reads a rate near 1 there. The window stops above the floor."""
    d0 = 10.0
    floor = floor_of(d0, EPS32)
    pts = [(t, max(d0 * 0.36**t, floor * (0.5 + 0.1 * (t % 3)))) for t in range(100)]
    out = consensus_summary(pts, eps=EPS32)
    assert out["consensus_rate"] == pytest.approx(0.36, rel=1e-9)
    assert out["consensus_floor_after"] == next(t for t, d in pts if d <= floor)
    assert out["consensus_rate_window"][1] < out["consensus_floor_after"]


def test_exact_averaging_reads_as_exact_after_k_rounds() -> None:
    out = consensus_summary([(0, 4.0), (1, 3e-15), (2, 2e-15), (3, 4e-15)], eps=EPS32)
    assert out["consensus_rate"] == 0.0
    assert out["consensus_exact_after"] == 1
    assert out["consensus_rounds_to_1e-6"] == 1


TOPOLOGIES = ["ring", "torus", "hypercube", "exponential"]


@pytest.mark.parametrize("n", [16, 64])
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_the_vectorised_engines_rate_is_rho_squared_whatever_steps_and_eval_every(topology: str, n: int) -> None:
    """Pure averaging, lock-step, float32: the measured rate within 0.5 % of rho^2 after 60 and
    130 rounds (the rate comes from the per-round trace, not the metric rows)."""
    for steps, every in ((60, 10), (130, 1)):
        cfg = RunConfig(nodes=n, topology=topology, algorithm="averaging", engine="vectorized", schedule="sync",
                        steps=steps, eval_every=every)
        s = run_vectorized(cfg, None, progress=None)
        assert s["consensus_rate"] == pytest.approx(s["predicted_rate"], rel=5e-3), (steps, every)


def test_eval_every_does_not_enter_the_rate() -> None:
    base = RunConfig(nodes=16, topology="exponential", algorithm="averaging", engine="vectorized", schedule="sync",
                     steps=60)
    rates = {every: run_vectorized(base.replace(eval_every=every), None, progress=None)["consensus_rate"]
             for every in (1, 7, 10)}
    assert len(set(rates.values())) == 1, rates


def test_the_complete_graph_is_exact_after_one_round_in_both_engines(tmp_path: Path) -> None:
    from gossipfl.sim.cluster import run_cluster

    base = RunConfig(nodes=16, topology="complete", algorithm="averaging", schedule="sync", steps=60, eval_every=10)
    vec = run_vectorized(base.replace(engine="vectorized"), None, progress=None)
    clu = asyncio.run(run_cluster(base.replace(transport="memory"), tmp_path, progress=None))
    for s in (vec, clu):
        assert s["consensus_exact_after"] == 1
        assert s["consensus_rate"] == 0.0
        assert s["predicted_rate"] < 1e-20


@pytest.mark.parametrize(("topology", "n"), [("ring", 16), ("torus", 16), ("exponential", 16), ("hypercube", 16),
                                             pytest.param("hypercube", 64, marks=pytest.mark.slow)])
def test_the_local_clusters_rate_is_rho_squared_and_the_vectorised_engines(tmp_path: Path, topology: str,
                                                                           n: int) -> None:
    """Real node services (in-memory transport), lock-step: the same figure as the vectorised
    engine, within 0.5 % of rho^2. 60 rounds; 40 for 64 nodes: hypercube 64 (rho^2 0.51) is at the
    float32 floor by round 35 (the vectorised test covers longer runs and other eval_every)."""
    from gossipfl.sim.cluster import run_cluster

    cfg = RunConfig(nodes=n, topology=topology, algorithm="averaging", transport="memory", schedule="sync",
                    steps=60 if n <= 16 else 40, eval_every=10)
    clu = asyncio.run(run_cluster(cfg, tmp_path, progress=None))
    vec = run_vectorized(cfg.replace(engine="vectorized"), None, progress=None)
    assert clu["consensus_rate"] == pytest.approx(clu["predicted_rate"], rel=5e-3)
    assert clu["consensus_rate"] == pytest.approx(vec["consensus_rate"], rel=1e-4)
    assert clu["consensus_rounds_to_1e-3"] == vec["consensus_rounds_to_1e-3"]


def test_k_lock_step_rounds_make_k_minus_one_mixings_and_rows_say_so(tmp_path: Path) -> None:
    """Round 1 has nothing to merge: ``mixings`` counts merges, so rounds-to-epsilon is not off by one."""
    import json

    from gossipfl.sim.cluster import run_cluster

    cfg = RunConfig(nodes=8, topology="ring", algorithm="averaging", schedule="sync", steps=20, eval_every=5)
    run_vectorized(cfg.replace(engine="vectorized"), tmp_path / "v", progress=None)
    asyncio.run(run_cluster(cfg.replace(transport="memory"), tmp_path / "c", progress=None))
    for sub in ("v", "c"):
        rows = [json.loads(line) for line in (tmp_path / sub / "metrics.jsonl").read_text().splitlines()]
        cluster_rows = [r for r in rows if r["node"] is None]
        assert cluster_rows[-1]["mean_step"] == 20
        assert cluster_rows[-1]["mixings"] == 19
    lam = 1 / 3 + 2 / 3 * math.cos(2 * math.pi / 8)
    s = run_vectorized(cfg.replace(engine="vectorized", steps=200), None, progress=None)
    # d(t) <= 1e-3 d(0) needs about log(1e-3) / log(lam^2) mixings (within the transient's few rounds)
    assert abs(s["consensus_rounds_to_1e-3"] - math.log(1e-3) / math.log(lam**2)) < 4


@pytest.mark.parametrize("emulation", [{}, {"speed": "lognormal:0.5"}, {"stragglers": 0.2, "straggler_slowdown": 5.0},
                                       {"loss": 0.1}, {"latency": 0.005, "jitter": 0.01}])
@pytest.mark.parametrize(("algorithm", "topology", "degree"), [("dpsgd", "exponential", 11),
                                                               ("pushsum", "exponential_directed", 6)])
def test_messages_are_what_the_graph_sends_with_and_without_emulation(emulation: dict, algorithm: str,
                                                                      topology: str, degree: int) -> None:
    """64 nodes, async: every training step sends one message per out-neighbour, whatever the
    emulation, so messages per node-step is the out-degree exactly; what lingering nodes send after
    their last step and what the network lost are counted apart (lost ones were sent too)."""
    cfg = RunConfig(nodes=64, topology=topology, algorithm=algorithm, engine="vectorized", schedule="async",
                    steps=60, emulation=emulation)
    s = run_vectorized(cfg, None, progress=None)
    assert (s["messages"] - s["linger_messages"]) == degree * s["node_steps"]
    assert s["messages_per_node_step"] == degree
    if emulation.get("loss"):
        assert s["lost"] / s["messages"] == pytest.approx(emulation["loss"], abs=0.02)
    else:
        assert s["lost"] == 0
    if "speed" in emulation or "stragglers" in emulation:
        assert s["linger_messages"] > 0  # fast nodes gossip on while the slow ones finish


@pytest.mark.parametrize("emulation", [{}, {"loss": 0.2}])
def test_the_local_cluster_counts_messages_as_the_vectorised_engine(tmp_path: Path, emulation: dict) -> None:
    """8 real nodes, ring, async (in-memory transport): messages per node-step is the degree,
    lost messages (not lost status probes) counted apart, as in the vectorised engine. (A send
    that fails outright, e.g. to a node already closed at the end, is neither sent nor lost: on a
    loaded machine a few lingering ones do.)"""
    from gossipfl.sim.cluster import run_cluster

    cfg = RunConfig(nodes=8, topology="ring", schedule="async", steps=60, emulation=emulation, transport="memory")
    s = asyncio.run(run_cluster(cfg, tmp_path, progress=None))
    training = s["messages"] - s["linger_messages"]
    assert 2 * s["node_steps"] - 10 <= training <= 2 * s["node_steps"]
    if emulation:
        assert s["lost"] / s["messages"] == pytest.approx(0.2, abs=0.06)
