"""What gossipfl measures against what theory says, where theory has a closed form.

Each line: the check, the theory's value, the measured one, and the verdict. Pure averaging's
consensus distance contracts by rho^2 per mixing round, rho = |W - J|_2 (both engines, lock-step,
float32, 60 rounds; `gossipfl.convergence`); the complete graph with uniform weights averages
exactly in one round; D-PSGD and push-sum send one message per out-neighbour per training step
whatever the emulated network (64 nodes, asynchronous); push-sum reaches the exact average on a
directed graph; averaging keeps the nodes' mean (float32 rounding, and float64 without it);
randomized gossip's second moment decays as (1 - 1/(n-1))^k on the complete graph; exact
averaging every H steps is local SGD (FedAvg); on per-node least squares D-SGD's three update
orders reach their closed-form fixed points and DIGing the exact minimiser. The output goes in
the README ("Fidelity to theory").

    python scripts/check_theory.py            # about two minutes on 2 cores
    python scripts/check_theory.py --quick    # the vectorised engine only
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import torch

from gossipfl.config import RunConfig
from gossipfl.sim.vectorized import VectorizedSim, run_vectorized

ROWS: list[tuple[str, str, str, bool]] = []


def check(name: str, theory: float | str, measured: float | str, ok: bool, spec: str = ".6f") -> None:
    t = theory if isinstance(theory, str) else format(theory, spec)
    m = measured if isinstance(measured, str) else format(measured, spec)
    ROWS.append((name, t, m, ok))


def rates(quick: bool) -> None:
    from gossipfl.sim.cluster import run_cluster

    for topology in ("ring", "torus", "hypercube", "exponential"):
        for n in (16, 64):
            cfg = RunConfig(nodes=n, topology=topology, algorithm="averaging", schedule="sync", steps=60, eval_every=10)
            s = run_vectorized(cfg.replace(engine="vectorized"), None, progress=None)
            rel = abs(s["consensus_rate"] - s["predicted_rate"]) / s["predicted_rate"]
            check(f"rate rho^2, {topology} n={n}, vectorised", s["predicted_rate"], s["consensus_rate"], rel < 5e-3)
            if not quick and n == 16:
                with tempfile.TemporaryDirectory() as d:
                    c = asyncio.run(run_cluster(cfg.replace(transport="memory"), Path(d), progress=None))
                rel = abs(c["consensus_rate"] - c["predicted_rate"]) / c["predicted_rate"]
                check(f"rate rho^2, {topology} n={n}, local cluster", c["predicted_rate"], c["consensus_rate"],
                      rel < 5e-3)
    s = run_vectorized(RunConfig(nodes=64, topology="complete", algorithm="averaging", engine="vectorized",
                                 schedule="sync", steps=60), None, progress=None)
    check("complete graph n=64: exact after k rounds", "1", str(s["consensus_exact_after"]),
          s["consensus_exact_after"] == 1)


def messages() -> None:
    for emulation, label in (({}, "ideal"), ({"speed": "lognormal:0.5"}, "lognormal speeds"),
                             ({"loss": 0.1}, "10 % loss")):
        for algorithm, topology, degree in (("dpsgd", "exponential", 11), ("pushsum", "exponential_directed", 6)):
            cfg = RunConfig(nodes=64, topology=topology, algorithm=algorithm, engine="vectorized", schedule="async",
                            steps=60, emulation=emulation)
            s = run_vectorized(cfg, None, progress=None)
            check(f"messages per node-step, {algorithm} n=64, {label}", float(degree), s["messages_per_node_step"],
                  s["messages_per_node_step"] == degree, ".3f")


def averages() -> None:
    for dtype, bound in (("float32", 1e-5), ("float64", 1e-12)):
        cfg = RunConfig(nodes=64, topology="exponential_directed", algorithm="pushsum_averaging", engine="vectorized",
                        schedule="sync", steps=200, dtype=dtype)
        sim = VectorizedSim(cfg)
        start = sim.models().double().mean(0)
        sim.run(None)
        err = float((sim.models().double() - start).norm(dim=1).max() / start.norm())
        check(f"push-sum, directed n=64, {dtype}: max |x_i - avg(x_0)| / |avg(x_0)|", 0.0, err, err < bound, ".2e")
    for dtype, bound in (("float32", 1e-5), ("float64", 1e-14)):
        cfg = RunConfig(nodes=64, topology="ring", algorithm="averaging", engine="vectorized", schedule="sync",
                        steps=200, dtype=dtype)
        sim = VectorizedSim(cfg)
        start = sim.models().double().mean(0)
        sim.run(None)
        drift = float((sim.models().double().mean(0) - start).norm() / start.norm())
        check(f"averaging keeps the mean, ring n=64, {dtype}", 0.0, drift, drift < bound, ".2e")
    cfg = RunConfig(nodes=16, topology="ring", algorithm="averaging", engine="vectorized", schedule="sync", steps=100,
                    dtype="float64")
    s = run_vectorized(cfg, None, progress=None)
    rel = abs(s["consensus_rate"] - s["predicted_rate"]) / s["predicted_rate"]
    check("rate rho^2, ring n=16, float64", s["predicted_rate"], s["consensus_rate"], rel < 1e-6, ".10f")


def randomized_gossip() -> None:
    """Boyd's randomized gossip on the complete graph: 400 runs (own seed each: own initial models,
    wakeups and partners), E V_k / V_0 = (1 - 1/(n-1))^k after k = n and 2n ticks, sum kept."""
    from gossipfl.build import build_data
    from gossipfl.metrics import consensus_distance

    for n in (16, 64):
        cfg = RunConfig(nodes=n, topology="complete", algorithm="pairwise_averaging", engine="vectorized",
                        schedule="sync", steps=2, dtype="float64")
        data = build_data(cfg)
        ratios: dict[int, list[float]] = {n: [], 2 * n: []}
        drift = 0.0
        for seed in range(400):
            sim = VectorizedSim(cfg.replace(seed=seed), data=data)
            v0, total = consensus_distance(sim.params), sim.params.sum(0)
            for k in ratios:
                sim.rounds(1)  # n ticks
                ratios[k].append(consensus_distance(sim.params) / v0)
            drift = max(drift, float((sim.params.sum(0) - total).abs().max() / total.abs().max()))
        for k, r in ratios.items():
            theory, mean = (1 - 1 / (n - 1)) ** k, sum(r) / len(r)
            check(f"randomized gossip, complete n={n}: E V_{k} / V_0 (400 runs)", theory, mean,
                  abs(mean - theory) < 0.1 * theory)
        check(f"randomized gossip, complete n={n}, float64: sum drift", 0.0, drift, drift < 1e-12, ".2e")


def fedavg() -> None:
    """Exact averaging every H = 6 steps on the complete graph (cta order, plain SGD, float64) is
    local SGD: the engine's models against `gossipfl.learning.fedavg.local_sgd`."""
    from gossipfl.learning.fedavg import local_sgd

    cfg = RunConfig(nodes=8, topology="complete", engine="vectorized", schedule="sync", steps=24, gossip_every=6,
                    same_init=True, momentum=0.0, dtype="float64", algorithm_params={"order": "cta"})
    copies, _ = local_sgd(cfg, 6, 4)
    sim = VectorizedSim(cfg, sampling="exact")
    sim.run(None)
    err = float((sim.params - copies).abs().max())
    check("local SGD / FedAvg, complete n=8, H=6, float64: max |x - x_fedavg|", 0.0, err, err < 1e-10, ".2e")


def least_squares_points() -> None:
    """Per-node least squares, ring n = 16, full batch, float64: each D-SGD order at its closed-form
    fixed point, and DIGing at the minimiser of the sum (`gossipfl.convergence_ls`)."""
    import numpy as np

    from gossipfl.convergence_ls import least_squares

    base = RunConfig(nodes=16, topology="ring", schedule="sync", engine="vectorized", data="regression", loss="mse",
                     model="logreg", momentum=0.0, batch_size=10_000, lr=0.2, dtype="float64", steps=1500,
                     eval_every=500)
    problem = least_squares(base)
    for order in ("lian", "atc", "cta"):
        sim = VectorizedSim(base.replace(algorithm_params={"order": order}), sampling="exact")
        sim.run(None)
        want = problem.fixed_point(order, 0.2)
        err = float(np.abs(sim.models().double().numpy() - want).max() / np.abs(want).max())
        check(f"D-SGD {order} order, least squares ring n=16: |x - x*| / |x*|", 0.0, err, err < 1e-8, ".2e")
    sim = VectorizedSim(base.replace(algorithm="diging", lr=0.05, steps=3000), sampling="exact")
    sim.run(None)
    star = problem.optimum()
    err = float(np.abs(sim.models().double().numpy() - star).max() / np.abs(star).max())
    check("DIGing, least squares ring n=16: |x - argmin sum f_i| / |x*|", 0.0, err, err < 1e-8, ".2e")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the vectorised engine only")
    args = ap.parse_args()
    torch.manual_seed(0)
    rates(args.quick)
    messages()
    averages()
    randomized_gossip()
    fedavg()
    least_squares_points()
    width = max(len(r[0]) for r in ROWS)
    print(f"{'check':<{width}}  {'theory':>12}  {'measured':>12}  verdict")
    for name, theory, measured, ok in ROWS:
        print(f"{name:<{width}}  {theory:>12}  {measured:>12}  {'ok' if ok else 'FAIL'}")
    bad = sum(not r[3] for r in ROWS)
    print(f"{len(ROWS) - bad} of {len(ROWS)} checks agree with theory")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
