"""Randomized gossip (`pairwise_averaging`, Boyd et al. 2006) against its closed form, in float64.

On the complete graph each clock tick removes on average V / (n - 1) of V = sum_i ||x_i - mean||^2,
so E V_k = (1 - 1/(n-1))^k V_0 exactly; a lock-step round is n ticks. Exchanges conserve the sum.
"""

from __future__ import annotations

import statistics

import networkx as nx
import pytest
import torch

from gossipfl.config import RunConfig
from gossipfl.metrics import consensus_distance
from gossipfl.sim.vectorized import VectorizedSim
from gossipfl.sim.wakeups import wakeups
from gossipfl.topology.spectral import randomized_gossip_rate


def _cfg(n: int, seed: int = 0, **kw: object) -> RunConfig:
    base = {"nodes": n, "topology": "complete", "algorithm": "pairwise_averaging", "steps": 2, "seed": seed,
            "dtype": "float64", "eval_every": 1, "schedule": "sync"}
    return RunConfig(**{**base, **kw})


@pytest.mark.parametrize("n", [16, pytest.param(64, marks=pytest.mark.slow)])
def test_second_moment_decays_as_theory_states_over_400_runs(n: int) -> None:
    """400 independent trials: each starts from fresh random models and runs two lock-step rounds
    (2n ticks; every round draws its own wakeups and partners), so the runs share only the set-up."""
    sim = VectorizedSim(_cfg(n, steps=800))
    gen = torch.Generator().manual_seed(n)
    after: dict[int, list[float]] = {n: [], 2 * n: []}
    for _ in range(400):
        sim.state["params"].copy_(torch.randn(sim.params.shape, generator=gen, dtype=torch.float64))
        v0 = consensus_distance(sim.params)
        total = sim.params.sum(0)
        for k in (n, 2 * n):
            sim.rounds(1)  # n clock ticks
            after[k].append(consensus_distance(sim.params) / v0)
        assert torch.allclose(sim.params.sum(0), total, rtol=0, atol=1e-12 * float(total.abs().max()))
    for k, ratios in after.items():
        theory = (1 - 1 / (n - 1)) ** k
        assert statistics.fmean(ratios) == pytest.approx(theory, rel=0.10), (n, k)


def test_the_summary_predicts_the_per_round_rate_from_the_expected_exchange() -> None:
    summary = VectorizedSim(_cfg(16, steps=40)).run()
    assert summary["predicted_rate"] == pytest.approx((1 - 1 / 15) ** 16, rel=1e-9)
    assert randomized_gossip_rate(nx.complete_graph(16)) == pytest.approx((1 - 1 / 15) ** 16, rel=1e-12)
    # on a ring it is Boyd's bound lambda_2(E[W^T W])^n: slower, and a single run mixes no faster
    ring = randomized_gossip_rate(nx.cycle_graph(16))
    assert (1 - 1 / 15) ** 16 < ring < 1
    measured = VectorizedSim(_cfg(16, topology="ring", steps=60)).run()
    assert measured["consensus_rate"] == pytest.approx(ring, rel=0.1)


def test_wakeups_are_uniform_and_the_same_for_every_engine() -> None:
    draws = [w for r in range(1, 201) for w in wakeups(7, r, 8)]
    assert wakeups(7, 3, 8) == wakeups(7, 3, 8) != wakeups(7, 4, 8)
    counts = [draws.count(i) for i in range(8)]
    assert min(counts) > 150  # 200 expected per node
    assert max(counts) < 250


def test_the_local_cluster_runs_the_same_ticks_as_the_vectorised_engine(tmp_path) -> None:
    import asyncio

    from gossipfl.sim.cluster import run_cluster

    cfg = _cfg(8, steps=3, transport="memory", schedule="sync")
    sim = VectorizedSim(cfg, sampling="exact")
    sim.run()
    asyncio.run(run_cluster(cfg, tmp_path, progress=None))
    import json

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    final = [r["consensus_distance"] for r in rows if r.get("node") is None][-1]
    assert final == pytest.approx(consensus_distance(sim.params), rel=1e-9)


def test_repeated_metric_times_keep_the_newest_point_instead_of_failing() -> None:
    from gossipfl.convergence import consensus_summary

    out = consensus_summary([(0, 1.0), (1, 0.5), (2, 0.25), (3, 0.125), (3, 0.125)], eps=2.0 ** -52)
    assert out["consensus_rate"] == pytest.approx(0.5)
