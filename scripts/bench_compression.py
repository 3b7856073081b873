"""CHOCO-SGD compression: bytes on the wire per message, and the accuracy training still reaches.

Each row is one local-cluster run (`gossipfl.sim.cluster.run_cluster`: real `Node`s, in-memory
transport, lock-step ``sync`` schedule) of CHOCO-SGD with one compression operator. Bytes per
message are what the nodes actually sent (every frame from ``wire.encode``, envelope and padding
included) divided by the messages sent; the ratio is against the same run without compression
(``compression = "none"``), and ``nominal`` is the operator's payload ratio (2k/D for top-k and
random-k, bits/32 for QSGD). D-PSGD is shown as the uncompressed reference, and "no mixing"
(CHOCO with gamma ~ 0: every node trains alone on its non-IID shard) as the floor that shows the
target needs working consensus. ``target`` is the accuracy every node (the minimum) must reach.

    python scripts/bench_compression.py                 # 8 nodes, ring, MLP 64-256-10 on digits
    python scripts/bench_compression.py --quick         # fewer steps, fewer rows
    python scripts/bench_compression.py --gammas 0.1 0.3 0.6 --only topk:0.01   # tune gamma
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gossipfl.algorithms import get_algorithm
from gossipfl.config import RunConfig
from gossipfl.learning import build_model, load_data, param_layout
from gossipfl.sim.cluster import run_cluster

ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("no mixing", "choco", {"compression": "none", "gamma": 1e-9}),  # local training only: the floor
    ("dpsgd", "dpsgd", {}),
    ("none", "choco", {"compression": "none"}),
    ("qsgd:8", "choco", {"compression": "qsgd", "bits": 8}),
    ("qsgd:4", "choco", {"compression": "qsgd", "bits": 4}),
    ("qsgd:2", "choco", {"compression": "qsgd", "bits": 2}),
    ("topk:0.1", "choco", {"compression": "topk", "fraction": 0.1}),
    ("topk:0.01", "choco", {"compression": "topk", "fraction": 0.01}),
    ("randomk:0.1", "choco", {"compression": "randomk", "fraction": 0.1}),
]
QUICK = {"no mixing", "dpsgd", "none", "qsgd:8", "qsgd:4", "topk:0.1", "randomk:0.1"}


def run(cfg: RunConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        return asyncio.run(run_cluster(cfg, Path(out), progress=None))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--topology", default="ring")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--partition", default="dirichlet:0.5", help="non-IID by default: consensus has to work")
    p.add_argument("--target", type=float, default=0.9, help="accuracy every node must reach")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="200 steps and the main operators only")
    p.add_argument("--only", nargs="+", help="row labels to run (e.g. topk:0.01 qsgd:4)")
    p.add_argument("--gammas", type=float, nargs="+", help="run each CHOCO row with these gamma values")
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    steps = 200 if args.quick else args.steps

    data = load_data("digits", seed=args.seed)
    numel = param_layout(build_model("mlp", input_shape=data.input_shape, n_classes=data.n_classes,
                                     hidden=(args.hidden,))).numel
    base = RunConfig(nodes=args.nodes, topology=args.topology, schedule="sync", transport="memory", steps=steps,
                     eval_every=steps, model="mlp", hidden=(args.hidden,), partition=args.partition, lr=0.1,
                     momentum=0.9, seed=args.seed)
    rows = [r for r in ROWS if (args.only is None or r[0] in args.only) and (not args.quick or r[0] in QUICK)]
    print(f"CHOCO-SGD compression: {args.nodes} nodes, {args.topology}, MLP 64-{args.hidden}-10 on digits "
          f"(D = {numel} float32), partition {args.partition}, {steps} lock-step rounds, lr 0.1, momentum 0.9; "
          "local cluster, memory transport")
    header = (f"{'operator':<12} {'gamma':>5} {'bytes/msg':>10} {'ratio':>7} {'nominal':>7} "
              f"{'min acc':>7} {'mean acc':>8} {'target':>6} {'wall s':>6}")
    print(header)
    print("-" * len(header))
    dense_bytes: float | None = None
    for label, name, params in rows:
        gammas: list[float | None] = [None]
        if name == "choco" and args.gammas:
            gammas = list(args.gammas)
        for gamma in gammas:
            kw = dict(params) if gamma is None else {**params, "gamma": gamma}
            algo = get_algorithm(name, **kw)
            cfg = base.replace(algorithm=name, algorithm_params=kw)
            t0 = time.perf_counter()
            summary = run(cfg)
            wall = time.perf_counter() - t0
            per_msg = summary["bytes"] / max(1, summary["messages"])
            if label in ("none", "dpsgd", "no mixing") and dense_bytes is None or label == "none":
                dense_bytes = per_msg
            ratio = per_msg / dense_bytes if dense_bytes else float("nan")
            nominal = algo.compressor.nominal_ratio(numel, torch.float32) if name == "choco" else 1.0
            g = getattr(algo, "gamma", None)
            ok = "yes" if summary["min_accuracy"] >= args.target else "NO"
            print(f"{label:<12} {'' if g is None else f'{g:.2f}':>5} {per_msg:>10.0f} {ratio:>7.4f} {nominal:>7.4f} "
                  f"{summary['min_accuracy']:>7.3f} {summary['mean_accuracy']:>8.3f} {ok:>6} {wall:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
