"""AD-PSGD's pairwise exchanges are atomic averages in both engines (issue 14, item 5).

An exchange is atomic when nothing changes the initiator's model between the snapshot it sends and
the reply it applies: then ``apply_reply`` finds ``params == sent`` bit for bit (float64), and
both sides end exactly at their pre-exchange average. The protocol that makes it so, in both
engines: an initiator in flight answers nobody -- it refuses a lower id at once (423
"exchanging"; the refused initiator settles, then tries a fresh partner, `EXCHANGE_TRIES`
requests per gossip point) and defers a higher id until its own exchange settles. Deferrals point
from higher to lower ids, so no wait cycle (deadlock) can form.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from gossipfl.algorithms.adpsgd import ADPSGD
from gossipfl.config import RunConfig
from gossipfl.metrics import consensus_distance
from gossipfl.node import protocol
from gossipfl.sim import _pairwise, cluster
from gossipfl.sim.vectorized import VectorizedSim


@pytest.fixture
def moved() -> Iterator[list[float]]:
    """Every ``apply_reply`` records how far the initiator's model moved since its snapshot (0: atomic)."""
    out: list[float] = []
    original = ADPSGD.apply_reply

    def checked(self: ADPSGD, state: Any, reply: Any) -> None:
        drift = (state["params"] - state["sent"]).abs().amax(dim=-1)
        out.extend(drift.reshape(-1).tolist())
        original(self, state, reply)

    ADPSGD.apply_reply = checked  # type: ignore[method-assign]
    try:
        yield out
    finally:
        ADPSGD.apply_reply = original  # type: ignore[method-assign]


def _cfg(**kw: Any) -> RunConfig:
    base: dict[str, Any] = {"nodes": 16, "topology": "complete", "algorithm": "adpsgd", "lr": 0.0, "momentum": 0.0,
                            "steps": 6, "eval_every": 6, "dtype": "float64", "schedule": "async",
                            "transport": "memory"}
    return RunConfig(**{**base, **kw})


def _run_cluster(cfg: RunConfig, out: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], dict[str, Any]]:
    """The local cluster's summary, and what its nodes hold at the end (sum, flags, refusals)."""
    seen: dict[str, Any] = {}
    summary_fn = cluster._summary

    def capture(plan: Any, nodes: list, *rest: Any) -> dict[str, Any]:
        seen["sum"] = torch.stack([n.state.params for n in nodes]).sum(0)
        seen["in_flight"] = sum(n._worker.exchanging for n in nodes)
        return summary_fn(plan, nodes, *rest)

    monkeypatch.setattr(cluster, "_summary", capture)
    summary = asyncio.run(asyncio.wait_for(cluster.run_cluster(cfg, out, progress=None), 60))
    return summary, seen


def test_both_engines_try_the_same_number_of_times() -> None:
    assert _pairwise.EXCHANGE_TRIES == protocol.EXCHANGE_TRIES >= 2


def test_vectorised_exchanges_are_atomic_and_conserve_the_sum(moved: list[float]) -> None:
    """Heterogeneous speeds and latencies put many initiators in flight at once, so requests meet
    partners in flight (refused or deferred) and computing partners (queued): every reply still
    finds its initiator exactly at its snapshot (the old protocol answered others meanwhile)."""
    sim = VectorizedSim(_cfg(steps=20, emulation={"speed": "lognormal:0.5", "latency": "uniform:0.001:0.01"}))
    total = sim.params.sum(0)
    summary = sim.run(None)
    pair = sim.pairwise
    assert pair is not None
    assert pair.refused > 20
    assert pair.deferred > 20
    assert len(moved) == summary["messages"] // 2 >= 0.6 * 16 * 20
    assert max(moved) == 0.0
    assert torch.allclose(sim.params.sum(0), total, rtol=0, atol=1e-12)


def test_cluster_exchanges_are_atomic_and_conserve_the_sum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            moved: list[float]) -> None:
    """The node service on emulated links (a request takes 5 ms, so initiators are in flight
    together): every reply finds its initiator at its snapshot; refusals happen and are retried."""
    cfg = _cfg(nodes=8, steps=6, emulation={"latency": 0.005})
    start = VectorizedSim(cfg).params.sum(0)  # the same initial models
    summary, seen = _run_cluster(cfg, tmp_path, monkeypatch)
    assert len(moved) == summary["messages"] // 2 >= 0.8 * 8 * 6
    assert max(moved) == 0.0
    assert seen["in_flight"] == 0
    assert torch.allclose(seen["sum"], start, rtol=0, atol=1e-12)


def test_every_node_initiating_at_once_settles_without_deadlock() -> None:
    """Identical nodes on an ideal network: all 16 finish every step at the same instant and all
    request at once, so every request meets a partner in flight. Lower ids refuse, higher ones
    wait, the chains unwind within the instant, refused initiators retry: every gossip point
    settles (nothing left in flight) and nearly all of them complete an exchange."""
    sim = VectorizedSim(_cfg(steps=10))
    sim.run(None)
    pair = sim.pairwise
    assert pair is not None
    assert not len(pair.requests)
    assert not bool(pair.waiting.any())
    assert math.isinf(float(pair.retry_at.min()))
    assert pair.refused > 0
    assert pair.deferred > 0
    assert int(sim.msgs_out.sum()) // 2 >= 0.9 * 16 * 10  # completed exchanges (each counted twice)


def test_cluster_with_every_node_initiating_at_once_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node service with instant steps and 20 ms requests: every node's first request is in
    flight while the others arrive. The run finishes (a wait cycle would hold it for ``timeout``
    per exchange), refusals happen, and every gossip point but a few completes an exchange."""
    cfg = _cfg(nodes=8, steps=4, timeout=30.0, emulation={"latency": 0.02})
    async def timed() -> tuple[dict[str, Any], float]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        summary = await asyncio.wait_for(cluster.run_cluster(cfg, tmp_path, progress=None), 20)
        return summary, loop.time() - t0

    summary_fn = cluster._summary
    seen: dict[str, int] = {}

    def capture(plan: Any, nodes: list, *rest: Any) -> dict[str, Any]:
        seen["refused"] = sum(n.busy_replies for n in nodes)
        seen["in_flight"] = sum(n._worker.exchanging for n in nodes)
        return summary_fn(plan, nodes, *rest)

    monkeypatch.setattr(cluster, "_summary", capture)
    summary, took = asyncio.run(timed())
    assert took < 10  # far below one 15 s wait (timeout / 2) for a deadlocked partner
    assert seen["refused"] > 0
    assert seen["in_flight"] == 0
    assert summary["messages"] // 2 >= 0.8 * 8 * 4


def _r2_and_efficiency(summary: dict[str, Any], v0: float, n: int) -> tuple[float, float]:
    """r^2 = V_end / V_0, and its log per completed exchange against an atomic uniform average's."""
    r2 = summary["consensus_distance"] / v0
    return r2, math.log(r2) / (summary["messages"] / 2) / math.log(1 - 1 / (n - 1))


@pytest.mark.slow
def test_engines_agree_on_the_contraction_of_atomic_exchanges(tmp_path: Path) -> None:
    """The issue's setting: n = 16, complete graph, lr 0, float64, async schedule, one step per
    node (16 gossip points), ideal emulation: the cluster's nodes run at wall speed (steps take
    microseconds; exchanges meet partners in flight only by chance), the vectorised ones exactly
    in step (every request meets a partner in flight). E r^2 over 8 seeds agrees within 10 %
    (before: 0.27 cluster, 0.48 vectorised), and per completed exchange both contract at least
    as an atomic average of a uniform pair does (efficiency 1; ~1.2 measured, since every node
    initiates once per step instead of at uniform random ticks; before: 0.6 vectorised)."""
    n, seeds = 16, range(8)
    got: dict[str, list[tuple[float, float]]] = {"vectorized": [], "cluster": []}
    for seed in seeds:
        cfg = _cfg(steps=1, eval_every=1, seed=seed)
        sim = VectorizedSim(cfg)
        v0 = consensus_distance(sim.params)
        got["vectorized"].append(_r2_and_efficiency(sim.run(None), v0, n))
        out = tmp_path / str(seed)
        out.mkdir()
        summary = asyncio.run(cluster.run_cluster(cfg, out, progress=None))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        start = next(r["consensus_distance"] for r in rows if r.get("node") is None)
        assert start == pytest.approx(v0, rel=1e-9)  # the same initial models
        got["cluster"].append(_r2_and_efficiency(summary, start, n))
    er2 = {k: statistics.fmean(r for r, _ in v) for k, v in got.items()}
    eff = {k: statistics.fmean(e for _, e in v) for k, v in got.items()}
    assert abs(er2["vectorized"] / er2["cluster"] - 1) < 0.10, (er2, eff)
    assert all(e > 0.95 for e in eff.values()), eff
