"""Exact averaging every H local steps on the complete graph is local SGD (FedAvg with every node).

Lock-step, one initial model on every node (``same_init``), uniform weights 1/n (Metropolis on
the complete graph), plain SGD, float64, combine-then-adapt order (a node's first step after a
merge takes its gradient at the average, as FedAvg's clients do; Lian's order would take that one
gradient at the model sent). The reference (`gossipfl.learning.fedavg.local_sgd`) trains each
node's own copy, with the node's own minibatches, for H steps and averages the copies; after m
cycles of H rounds the engines hold exactly the copies the reference holds before its m-th average.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from gossipfl.config import RunConfig
from gossipfl.learning.fedavg import local_sgd
from gossipfl.plan import resolve
from gossipfl.sim.vectorized import VectorizedSim

H, CYCLES, N = 6, 4, 8


def _cfg(**kw: object) -> RunConfig:
    base = {"nodes": N, "topology": "complete", "schedule": "sync", "steps": H * CYCLES, "eval_every": H,
            "gossip_every": H, "same_init": True, "momentum": 0.0, "dtype": "float64", "lr": 0.1,
            "algorithm_params": {"order": "cta"}}
    return RunConfig(**{**base, **kw})


def _local_sgd(cfg: RunConfig) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return local_sgd(cfg, H, CYCLES)


def test_the_vectorised_engine_is_local_sgd() -> None:
    cfg = _cfg(engine="vectorized")
    copies, globals_ = _local_sgd(cfg)
    sim = VectorizedSim(cfg, sampling="exact")
    sim.run(None)
    assert (sim.params - copies).abs().max() < 1e-10
    assert (sim.params.mean(0) - globals_[-1]).abs().max() < 1e-10
    # the global model moved: this is training, not a fixed point
    assert (globals_[-1] - globals_[0]).abs().max() > 1e-2


def test_the_local_cluster_is_local_sgd(tmp_path: Path) -> None:
    """Real node services over the in-memory transport: every merge is the exact FedAvg average."""
    from gossipfl.metrics import consensus_distance
    from gossipfl.sim.cluster import run_cluster

    cfg = _cfg(transport="memory")
    copies, _ = _local_sgd(cfg)
    summary = asyncio.run(run_cluster(cfg, tmp_path, progress=None))
    assert summary["consensus_distance"] == pytest.approx(consensus_distance(copies), rel=1e-10)
    trainer = resolve(cfg).trainer(0)
    for i, (nid, row) in enumerate(sorted(summary["per_node"].items())):
        assert row["accuracy"] == trainer.evaluate(copies[i])[1], nid  # each node holds its FedAvg copy
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("node") == "n00"] == [H * (c + 1) for c in range(CYCLES)]


def test_lians_order_is_not_local_sgd() -> None:
    """The same run in Lian's order differs: its first step after a merge uses the old gradient."""
    cfg = _cfg(engine="vectorized", algorithm_params={"order": "lian"})
    copies, _ = _local_sgd(cfg)
    sim = VectorizedSim(cfg, sampling="exact")
    sim.run(None)
    assert (sim.params - copies).abs().max() > 1e-6


def test_the_reference_refuses_nodes_that_do_not_start_from_one_model() -> None:
    with pytest.raises(ValueError, match="same_init"):
        local_sgd(_cfg(same_init=False), H, 1)
