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

Every child process runs with this checkout first on ``PYTHONPATH``, so it measures this
checkout's code even when another copy of gossipfl is pip-installed (editable or not).

``--baseline REV`` compares this checkout's engine with the one at git revision ``REV`` (the
acceptance check for an engine rewrite: the new one at least 0.95x the old at every point). The
script checks ``REV`` out as a detached git worktree under ``.bench-baseline/<commit>`` in the
repository root (git-ignored; reused by later runs; ``git worktree remove`` it when done) and
measures ``VectorizedSim(cfg)`` and ``sim.rounds(1)`` only (public API that both engines have)
at N = 256 and 4096 on 1 and 2 threads, nothing else. Each point alternates the two engines,
each in its own fresh process with its own checkout on ``PYTHONPATH`` (current, baseline,
baseline, current, current, ... for ``--repeats`` rounds), and keeps each engine's best. The
``spread`` columns show how far each engine's repeats varied ((best - worst) / best): a spread
above a few percent, or the warning printed when the load average is >= 0.5 at the start, means
the verdict is within the noise. The last line says whether every ratio is >= ``--min-ratio``,
and the exit status is 1 if not. Uncommitted changes in this checkout are measured as they are.

    python scripts/bench_sim.py               # N = 16, 256, 4096, 16384; naive at 16, 256; 1 and 2 threads
    python scripts/bench_sim.py --quick       # shorter timing blocks
    python scripts/bench_sim.py --baseline 0785ddf           # this checkout against commit 0785ddf
    python scripts/bench_sim.py --baseline 0785ddf --quick   # a rougher check, ~3 minutes on 2 cores
    python scripts/bench_sim.py --baseline HEAD~3 --repeats 7  # more alternations on a noisy machine
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
from pathlib import Path
from typing import Any

import torch

VECTOR_N = (16, 256, 4096, 16384)
NAIVE_N = (16, 256)
FUNC_N = (256, 4096)
THREADS = (1, 2)
BLOCKS = 5
COMPARE_N = (256, 4096)  # the --baseline points, on each of THREADS
ROOT = Path(__file__).resolve().parent.parent  # this checkout: the current engine
BASELINE_DIR = ".bench-baseline"  # under the repository root, git-ignored


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


def _vectorized(n: int, kernel: str | None, seconds: float) -> float:
    """``kernel`` None: the constructor's defaults, nothing but ``VectorizedSim(cfg)`` (for --baseline)."""
    from gossipfl.sim.vectorized import VectorizedSim

    sim = VectorizedSim(_config(n)) if kernel is None else VectorizedSim(_config(n), kernel=kernel)
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
    import gossipfl

    where = Path(gossipfl.__file__).resolve()
    if args.root and not where.is_relative_to(Path(args.root).resolve()):
        raise SystemExit(f"bench_sim: imported gossipfl from {where}, not from {args.root}")
    torch.set_num_threads(args.threads)
    rate = _naive(args.n, args.seconds) if args.engine == "naive" else _vectorized(args.n, args.engine, args.seconds)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rate": rate, "peak_mb": peak_kb / 1024}))


def _measure(engine: str, n: int, threads: int, seconds: float, root: Path = ROOT) -> dict[str, float]:
    """One fresh process that imports gossipfl from ``root`` (checked) and times ``engine`` there."""
    cmd = [sys.executable, __file__, "--child", engine, "--n", str(n), "--threads", str(threads),
           "--seconds", str(seconds), "--root", str(root)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise SystemExit(f"bench_sim: PYTHONPATH={root} {' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _git(*args: str, cwd: Path = ROOT, check: bool = True) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if check and out.returncode != 0:
        raise SystemExit(f"bench_sim: git {' '.join(args)} failed:\n{out.stderr.strip()}")
    return out.stdout.strip() if out.returncode == 0 else ""


def _baseline_tree(rev: str) -> tuple[Path, str]:
    """A detached worktree of ``rev`` under ``.bench-baseline/<commit>``, made or reused; and the commit."""
    top = Path(_git("rev-parse", "--show-toplevel"))
    sha = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    if not sha:
        raise SystemExit(f"bench_sim: --baseline {rev}: not a commit in {top}")
    tree = top / BASELINE_DIR / sha[:12]
    # reuse only a real worktree of that commit (a bare folder would answer with the enclosing checkout's HEAD)
    if (tree / ".git").is_file() and (tree / "gossipfl").is_dir() and \
            _git("rev-parse", "--show-toplevel", cwd=tree, check=False) == str(tree) and \
            _git("rev-parse", "HEAD", cwd=tree, check=False) == sha and \
            not _git("status", "--porcelain", "--untracked-files=no", cwd=tree, check=False):
        return tree, sha
    if tree.exists():
        _git("worktree", "remove", "--force", str(tree), cwd=top, check=False)
    if tree.exists():
        raise SystemExit(f"bench_sim: {tree} exists but is not a clean worktree of {sha[:12]}; remove it")
    _git("worktree", "prune", cwd=top)
    _git("worktree", "add", "--detach", "--quiet", str(tree), sha, cwd=top)
    return tree, sha


def _describe(tree: Path) -> str:
    head = _git("log", "-1", "--format=%h %s", cwd=tree, check=False)[:72]
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "gossipfl", cwd=tree, check=False)
    return f"{head}{' + uncommitted changes in gossipfl/' if dirty else ''} ({tree})"


def _compare(base: Path, seconds: float, repeats: int, min_ratio: float) -> bool:
    """This checkout against the worktree ``base`` at COMPARE_N x THREADS, alternating processes; True if all pass."""
    print(f"current:  {_describe(ROOT)}")
    print(f"baseline: {_describe(base)}")
    print(f"each point: {repeats} processes per engine, alternating (ABBA...), best of {BLOCKS} blocks of "
          f">= {seconds:g} s in each, best process kept; VectorizedSim(cfg) and sim.rounds(1) only\n")
    header = (f"{'threads':>7}{'N':>7}  {'current':>13}  {'baseline':>13}  {'current/base':>12}  "
              f"{'spread cur':>10}  {'spread base':>11}")
    print(header)
    print(f"{'':>14}  {'node-steps/s':>13}  {'node-steps/s':>13}")
    print("-" * len(header))
    worst = float("inf")
    for threads in THREADS:
        for n in COMPARE_N:
            rates: dict[str, list[float]] = {"current": [], "baseline": []}
            for rep in range(repeats):
                order = ("current", "baseline") if rep % 2 == 0 else ("baseline", "current")
                for side in order:
                    tree = ROOT if side == "current" else base
                    rates[side].append(_measure("default", n, threads, seconds, tree)["rate"])
            cur, old = max(rates["current"]), max(rates["baseline"])
            ratio = cur / old
            worst = min(worst, ratio)
            spread = {k: (max(v) - min(v)) / max(v) for k, v in rates.items()}
            flag = "" if ratio >= min_ratio else "  < " + f"{min_ratio:g}"
            print(f"{threads:>7}{n:>7}  {cur:>13,.0f}  {old:>13,.0f}  {ratio:>11.3f}x  {spread['current']:>9.0%}  "
                  f"{spread['baseline']:>10.0%}{flag}", flush=True)
    ok = worst >= min_ratio
    print(f"\n{'PASS' if ok else 'FAIL'}: current/baseline is {'>=' if ok else 'below'} {min_ratio:g}x "
          f"{'at every point' if ok else 'at some point'} (lowest {worst:.3f}x)")
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter timing blocks (noisier)")
    p.add_argument("--baseline", metavar="REV", default=None,
                   help="compare with the engine at git revision REV (e.g. 0785ddf, main, HEAD~1), checked out "
                        f"as a worktree under {BASELINE_DIR}/; N = {', '.join(map(str, COMPARE_N))} only")
    p.add_argument("--repeats", type=int, default=None,
                   help="with --baseline: processes per engine and point, alternated (default 3 with --quick, else 5)")
    p.add_argument("--min-ratio", type=float, default=0.95,
                   help="with --baseline: the lowest acceptable current/baseline (default 0.95)")
    p.add_argument("--child", metavar="ENGINE", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.engine = {"vectorized": "batched", "vectorized/func": "func", "default": None}.get(args.child, args.child)
        _child(args)
        return
    seconds = args.seconds or (0.3 if args.quick else 1.0)
    base = _baseline_tree(args.baseline)[0] if args.baseline else None  # a bad REV fails before any output
    print("gossipfl bench_sim: MLP 64-32-10, batch 32, digits, D-PSGD on the exponential graph (sparse mixing)")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"best of {BLOCKS} blocks of >= {seconds:g} s, each case in a fresh process, "
          f"load average {os.getloadavg()[0]:.2f} at the start\n")
    if base is not None:
        load = os.getloadavg()[0]
        repeats = args.repeats or (3 if args.quick else 5)
        ok = _compare(base, seconds, repeats, args.min_ratio)
        print(f"load average {os.getloadavg()[0]:.2f} at the end (other processes on the machine skew the figures)")
        if load >= 0.5:
            print(f"warning: load average {load:.2f} before the first measurement: something else was using the CPU; "
                  "rerun on an idle machine before trusting the verdict")
        sys.exit(0 if ok else 1)
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
