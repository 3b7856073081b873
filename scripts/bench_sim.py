"""Node-steps per second of the vectorised engine against a naive loop of one module per node.

A node-step is one local minibatch SGD step of one node, mixing included: D-PSGD on the static
exponential graph with Metropolis weights, the built-in MLP 64-32-10, batch 32, digits, in lock-step
rounds. Every node holds a full batch: the training set is cut into ``min(N, 1437 // 32)`` shards
and node i trains on shard ``i % shards``.

- ``vectorized``: `gossipfl.sim.vectorized.VectorizedSim` (batched matmuls with a hand-written
  backward pass for the built-in MLP, mixing as one sparse product), rounds timed without metrics.
- ``vectorized/func``: the same engine forced onto the ``torch.func`` path (vmap + grad) that user
  models take, to show why the built-in models get the fast path.
- ``naive``: N ``nn.Module``s with N ``torch.optim.SGD`` optimizers, a Python loop over nodes for
  the steps and another for the mixing (each node averages its neighbours' flat vectors).

Each figure is the best of five timed blocks of at least 1 s each, measured in a fresh
subprocess (so thread settings and peak memory are its own); ``peak RSS`` is that process's
maximum resident set (Python and torch included). The ratio compares with the naive loop at the
same N and thread count.

Where the time goes at N = 4096 (torch profiler, this 2-core VM, one round of 4096 node-steps):
on 1 thread about 90-100 ms: sparse mixing ~28 ms (memory-bound: each output row reads its 25
neighbours' rows, ~1 GB from L3 per round), the five batched matmuls per block ~30 ms (MKL
reaches 60-90 GFLOP/s on these 32x64 / 10x32 shapes in isolation, less in place), the momentum and
parameter updates ~8 ms, the minibatch shuffle (argsort of random keys) ~4 ms, the data gather
~4 ms; on 2 threads about 58-65 ms (mixing 9-13 ms, matmuls ~19 ms). Tried and rejected with
numbers: column-chunked mixing, mixing fused into each block's step, shifted adds for the
circulant exponential graph (3-5x slower than the CSR product), feature-major inputs, larger
or smaller blocks (+-5 %, noise), keeping freed memory (no page faults; noise-level gain).

    python scripts/bench_sim.py               # N = 16, 256, 4096, 16384; naive at 16, 256; 1 and 2 threads
    python scripts/bench_sim.py --quick       # shorter timing blocks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any

import torch

VECTOR_N = (16, 256, 4096, 16384)
NAIVE_N = (16, 256)
FUNC_N = (256, 4096)
THREADS = (1, 2)
BLOCKS = 5


def _config(n: int) -> Any:
    from gossipfl.config import RunConfig

    return RunConfig(nodes=n, topology="exponential", algorithm="dpsgd", model="mlp", hidden=(32,),
                     batch_size=32, data="digits", schedule="sync", shards=min(n, 1437 // 32),
                     steps=10**6, eval_every=10**6)


def _time(run_round: Any, seconds: float) -> float:
    """Best rounds-per-second over ``BLOCKS`` blocks of at least ``seconds`` (the least disturbed one)."""
    run_round()
    run_round()
    t = time.perf_counter()
    run_round()
    once = max(time.perf_counter() - t, 1e-6)
    k = max(1, int(seconds / once))
    best = 0.0
    for _ in range(BLOCKS):
        t = time.perf_counter()
        for _ in range(k):
            run_round()
        best = max(best, k / (time.perf_counter() - t))
    return best


def _vectorized(n: int, kernel: str, seconds: float) -> float:
    from gossipfl.sim.vectorized import VectorizedSim

    sim = VectorizedSim(_config(n), kernel=kernel)
    return n * _time(lambda: sim.rounds(1), seconds)


def _naive(n: int, seconds: float) -> float:
    """One nn.Module and one optimizer per node; Python loops over nodes for steps and mixing."""
    import torch.nn.functional as F
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    from gossipfl.build import build_data, node_seed
    from gossipfl.learning import build_model, partition
    from gossipfl.topology import build_graph, mixing_weights

    cfg = _config(n)
    data = build_data(cfg)
    shards = partition(data.y_train, cfg.shards, cfg.partition, seed=cfg.seed)
    models = [build_model("mlp", input_shape=data.input_shape, n_classes=10, hidden=(32,), seed=node_seed(cfg, i))
              for i in range(n)]
    opts = [torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=cfg.momentum) for m in models]
    xs = [data.x_train[shards[i % cfg.shards]] for i in range(n)]
    ys = [data.y_train[shards[i % cfg.shards]] for i in range(n)]
    rows = mixing_weights(build_graph(cfg.topology, n, seed=cfg.seed), cfg.weights)
    gen = torch.Generator().manual_seed(0)

    def run_round() -> None:
        for m, opt, x, y in zip(models, opts, xs, ys, strict=True):
            idx = torch.randperm(len(y), generator=gen)[: cfg.batch_size]
            opt.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            flat = [parameters_to_vector(m.parameters()) for m in models]
            for i, m in enumerate(models):
                vector_to_parameters(sum(w * flat[j] for j, w in rows[i].items()), m.parameters())

    return n * _time(run_round, seconds)


def _child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    rate = _naive(args.n, args.seconds) if args.engine == "naive" else _vectorized(args.n, args.engine, args.seconds)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rate": rate, "peak_mb": peak_kb / 1024}))


def _measure(engine: str, n: int, threads: int, seconds: float) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", engine, "--n", str(n), "--threads", str(threads),
           "--seconds", str(seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"bench_sim: {' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter timing blocks (noisier)")
    p.add_argument("--child", metavar="ENGINE", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.engine = {"vectorized": "batched", "vectorized/func": "func"}.get(args.child, args.child)
        _child(args)
        return
    seconds = args.seconds or (0.3 if args.quick else 1.0)
    print("gossipfl bench_sim: MLP 64-32-10, batch 32, digits, D-PSGD on the exponential graph (sparse mixing)")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"best of {BLOCKS} blocks of >= {seconds:g} s, each case in a fresh process, "
          f"load average {os.getloadavg()[0]:.2f} at the start\n")
    header = f"{'threads':>7}  {'engine':<16}{'N':>7}  {'node-steps/s':>13}  {'vs naive':>9}  {'peak RSS':>9}"
    print(header)
    print("-" * len(header))
    cases = [("naive", n) for n in NAIVE_N] + [("vectorized", n) for n in VECTOR_N] + \
            [("vectorized/func", n) for n in FUNC_N]
    for threads in THREADS:
        naive: dict[int, float] = {}
        for engine, n in cases:
            r = _measure(engine, n, threads, seconds)
            if engine == "naive":
                naive[n] = r["rate"]
            ratio = f"{r['rate'] / naive[n]:.1f}x" if n in naive else "-"
            print(f"{threads:>7}  {engine:<16}{n:>7}  {r['rate']:>13,.0f}  {ratio:>9}  {r['peak_mb']:>7.0f}MB",
                  flush=True)
        print()
    print(f"load average {os.getloadavg()[0]:.2f} at the end (other processes on the machine skew the figures)")


if __name__ == "__main__":
    main()
