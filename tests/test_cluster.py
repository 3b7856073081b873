"""The local-cluster engine end to end: real node services learning together, no coordinator."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gossipfl.config import RunConfig
from gossipfl.metrics import read_metrics
from gossipfl.sim.cluster import run_cluster


def run(cfg: RunConfig, out: Path) -> dict:
    return asyncio.run(run_cluster(cfg, out, progress=None))


@pytest.mark.slow
def test_default_sim_reaches_target_accuracy_and_consensus(tmp_path: Path) -> None:
    """The acceptance run: `gossipfl sim` defaults (8 nodes, ring, digits, MLP, loopback HTTP)."""
    s = run(RunConfig(), tmp_path)
    assert s["mean_accuracy"] >= 0.92, s["mean_accuracy"]
    # distinct random initial models, pulled together by gossip
    assert s["initial_consensus_distance"] > 1.0
    assert s["consensus_distance"] < s["initial_consensus_distance"] / 10
    assert s["messages"] > 8 * 300
    assert s["rejected"] == 0
    assert s["node_steps"] == 8 * 300


def test_four_node_loopback_cluster_learns_with_gossip_learning(tmp_path: Path) -> None:
    s = run(RunConfig(nodes=4, algorithm="gossip", topology="complete", steps=250), tmp_path)
    assert s["min_accuracy"] >= 0.9, s["per_node"]
    # one target per gossip point: about one message per node-step, not one per neighbour
    assert 0.8 * s["node_steps"] <= s["messages"] <= 1.15 * s["node_steps"]  # + lingering at the end


def test_memory_transport_runs_the_same_node_code(tmp_path: Path) -> None:
    s = run(RunConfig(nodes=4, transport="memory", steps=200), tmp_path)
    assert s["mean_accuracy"] >= 0.9
    assert s["bytes"] > 0
    assert s["consensus_distance"] < s["initial_consensus_distance"] / 10


@pytest.mark.slow
def test_gossip_is_what_makes_non_iid_nodes_agree(tmp_path: Path) -> None:
    """Each node sees ~2 classes: alone it cannot exceed ~0.3; with gossip the cluster learns all ten."""
    cfg = RunConfig(nodes=8, partition="shards:2", transport="memory", steps=300, topology="complete")
    s = run(cfg, tmp_path / "gossip")
    alone = run(cfg.replace(topology="ring", algorithm="gossip", gossip_every=10_000), tmp_path / "alone")
    assert alone["messages"] == 0
    assert alone["mean_accuracy"] < 0.45
    assert s["avg_model_accuracy"] > 0.75
    assert s["mean_accuracy"] > 0.7


def test_pure_averaging_contracts_at_the_rate_the_mixing_matrix_predicts(tmp_path: Path) -> None:
    """x <- W x on a ring: the consensus distance shrinks by SLEM(W)^2 per round, asymptotically."""
    cfg = RunConfig(nodes=8, algorithm="averaging", schedule="sync", transport="memory",
                    steps=40, eval_every=1)
    s = run(cfg, tmp_path)
    assert s["predicted_rate"] == pytest.approx(0.6476, abs=1e-3)  # (1/3 + 2/3 cos(2 pi / 8))^2
    assert s["consensus_rate"] == pytest.approx(s["predicted_rate"], abs=0.02)
    assert s["consensus_distance"] < 1e-6 * s["initial_consensus_distance"]


def test_metrics_rows_follow_the_contract(tmp_path: Path) -> None:
    run(RunConfig(nodes=3, steps=40, eval_every=10, transport="memory"), tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    node_rows = [r for r in rows if r["node"] is not None]
    cluster_rows = [r for r in rows if r["node"] is None]
    assert {r["node"] for r in node_rows} == {"n00", "n01", "n02"}
    for r in node_rows:
        assert {"t", "step", "loss", "accuracy", "bytes_out", "bytes_in", "msgs_out", "msgs_in"} <= set(r)
    assert {r["step"] for r in node_rows} >= {0, 10, 20, 30, 40}
    for r in cluster_rows:
        assert {"t", "consensus_distance", "avg_model_accuracy", "mean_accuracy"} <= set(r)
    ts = [r["t"] for r in cluster_rows]
    assert ts == sorted(ts)
    assert len(cluster_rows) >= 2


def test_cluster_honours_emulated_loss_latency_and_stragglers(tmp_path: Path) -> None:
    emulation = {"latency": "uniform:0.001:0.004", "jitter": 0.001, "loss": 0.2, "step_time": 0.002,
                 "stragglers": 0.25, "straggler_slowdown": 5.0}
    cfg = RunConfig(nodes=8, steps=120, transport="memory", emulation=emulation)
    s = run(cfg, tmp_path)
    attempts = s["messages"] + s["lost"]
    assert 0.12 < s["lost"] / attempts < 0.28  # 20 % of requests dropped, as configured
    assert s["mean_accuracy"] >= 0.9  # D-PSGD shrugs off lost messages
    # two stragglers (5x slower steps) take visibly longer than 120 steps at full speed
    assert s["wall_seconds"] > 120 * 0.002 * 5 * 0.8
    assert s["node_steps"] == 8 * 120
    # the models stay together despite the losses: measured 0.003-0.011 of the start (the step's
    # message waits for the previous send, so merges are about a step stale)
    assert s["consensus_distance"] < s["initial_consensus_distance"] / 50


def test_nodes_that_finish_first_linger_until_the_stragglers_are_done(tmp_path: Path) -> None:
    """Two 5x stragglers: the fast nodes finish early and keep merging and gossiping (no more
    training) until the last node is done, so the stragglers are not left to drift. Measured:
    consensus 0.003 of the start and ~1600 messages; nodes that stop at their last step leave
    0.31 and ~390."""
    # step_time well above a step's real compute on a busy 2-core machine (at 0.01 s, 70 % of steps
    # overran it there, and the fast nodes hardly outpaced the stragglers)
    cfg = RunConfig(nodes=8, steps=30, eval_every=15, transport="memory",
                    emulation={"step_time": 0.03, "stragglers": 0.25, "straggler_slowdown": 5.0})
    s = run(cfg, tmp_path)
    assert s["node_steps"] == 8 * 30  # lingering is no training
    assert s["messages"] > 1.5 * 2 * 8 * 30  # ring: 2 per step, and more while lingering
    assert s["consensus_distance"] < s["initial_consensus_distance"] / 30


def test_lossless_algorithm_is_refused_on_a_lossy_network(tmp_path: Path) -> None:
    from gossipfl.algorithms import AlgorithmBase, Requirements
    from gossipfl.build import check_requirements
    from gossipfl.errors import ConfigError

    class Fragile(AlgorithmBase):
        name = "fragile"
        requirements = Requirements(lossless=True, rounds=True)

    with pytest.raises(ConfigError, match="lossless"):
        check_requirements(RunConfig(emulation={"loss": 0.01}), Fragile(), directed=False, time_varying=False)
    check_requirements(RunConfig(), Fragile(), directed=False, time_varying=False)  # no loss: fine
    with pytest.raises(ConfigError, match="undirected"):
        check_requirements(RunConfig(topology="exponential_directed"), Fragile(), directed=True, time_varying=False)


def test_cluster_says_when_it_cannot_keep_the_emulated_speeds(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A step time far below the real compute time cannot be honoured: the summary and a warning say so."""
    cfg = RunConfig(nodes=3, topology="ring", steps=20, eval_every=10, transport="memory",
                    emulation={"step_time": 1e-6, "latency": 0.001})
    with caplog.at_level("WARNING", logger="gossipfl.sim"):
        summary = asyncio.run(run_cluster(cfg, tmp_path, progress=None))
    assert summary["step_overruns"] > 0.9
    assert "emulated speeds were not kept" in caplog.text
