"""The local-cluster engine: N real `Node` services in one process.

Nodes talk over loopback HTTP (real sockets, real aiohttp) or an in-memory network (same node
code, no sockets). Each node only knows the others' addresses, exactly as with ``--peer`` on a
LAN; topology and weights come from each node's own membership view. A monitor samples every
node's model periodically to measure what no single node can: consensus distance and the
accuracy of the averaged model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch

from gossipfl.config import RunConfig
from gossipfl.convergence import consensus_summary
from gossipfl.errors import ConfigError
from gossipfl.metrics import (
    STALENESS_KEYS,
    MetricsWriter,
    consensus_distance,
    honest_accuracy,
    robust_counts,
    staleness_totals,
)
from gossipfl.node import HttpTransport, MemoryNetwork, Node
from gossipfl.plan import Plan, resolve
from gossipfl.sim.netem import EmulatedTransport
from gossipfl.sim.wakeups import wakeups
from gossipfl.topology import Schedule, summary_spectral_gap
from gossipfl.topology.spectral import predicted_round_rate

if TYPE_CHECKING:
    from gossipfl.algorithms import Algorithm
    from gossipfl.web.live import Live

__all__ = ["run_cluster"]

log = logging.getLogger("gossipfl.sim")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def node_ids(n: int) -> list[str]:
    width = max(2, len(str(n - 1)))
    return [f"n{i:0{width}d}" for i in range(n)]


class _Monitor:
    """Samples all nodes: consensus distance, averaged-model accuracy, mean accuracy."""

    def __init__(self, nodes: list[Node], metrics: Callable[[dict[str, Any]], None], t0: float,
                 attackers: frozenset[int] = frozenset()) -> None:
        self.nodes, self.metrics, self.t0 = nodes, metrics, t0
        self.history: list[dict[str, Any]] = []
        self.trace: list[tuple[int, float]] = []  # lock-step without training: (mixings, d) every round
        self.mixings = 0
        self.sync = False  # lock-step: rows carry the mixing rounds done
        self.honest = [i for i in range(len(nodes)) if i not in attackers] if attackers else None

    async def snapshot(self) -> torch.Tensor:
        return torch.stack([await n.model_snapshot() for n in self.nodes])

    async def sample(self) -> dict[str, Any]:
        params = await self.snapshot()
        _, avg_acc = self.nodes[0].trainer.evaluate(params.mean(0))
        accs = [n.accuracy for n in self.nodes if not math.isnan(n.accuracy)]
        row = {
            "node": None,
            "t": round(time.monotonic() - self.t0, 4),
            "mean_step": sum(n.state.step for n in self.nodes) / len(self.nodes),
            **({"mixings": self.mixings} if self.sync else {}),
            "bytes": sum(n.bytes_out for n in self.nodes),  # sent so far (bytes to a target accuracy)
            "consensus_distance": consensus_distance(params),
            "avg_model_accuracy": avg_acc,
            "mean_accuracy": sum(accs) / len(accs) if accs else None,
            "min_accuracy": min(accs) if accs else None,
        }
        if self.honest is not None:  # an attack: how far apart the honest models are
            row["honest_consensus_distance"] = consensus_distance(params[self.honest]) if self.honest else None
        self.metrics(row)
        self.history.append(row)
        return row


def _progress_line(row: dict[str, Any], nodes: list[Node], cfg: RunConfig) -> str:
    total = cfg.steps if cfg.duration is None else None
    steps = f"{row['mean_step']:.0f}" + (f"/{total}" if total else "")
    acc = row["mean_accuracy"]
    msgs = sum(n.msgs_out for n in nodes)
    return (f"t={row['t']:6.1f}s  step {steps:>9}  mean acc "
            f"{'  -  ' if acc is None else f'{acc:.3f}'}  consensus {row['consensus_distance']:.2e}  msgs {msgs}")


def _consensus_rates(monitor: _Monitor, schedule: Schedule, gap: float | None, eps: float,
                     algorithm: Algorithm) -> dict[str, Any]:
    """The consensus-rate figures (`gossipfl.convergence`) over the lock-step trace (d after each
    mixing round) or the monitor's samples against the mean step, vs what theory predicts where
    it applies (`predicted_round_rate`: a fixed symmetric W, or randomized gossip)."""
    points = monitor.trace or [(h["mean_step"], h["consensus_distance"]) for h in monitor.history]
    req = algorithm.requirements
    predicted = None
    if schedule.period == 1:
        predicted = predicted_round_rate(schedule(0), gap, pairwise=req.pairwise, random_wakes=req.wakes == "random",
                                         mix=getattr(algorithm, "mix", 0.5))
    return consensus_summary(points, eps=eps, predicted=predicted)


async def run_cluster(cfg: RunConfig | Plan, out: Path, *, progress: TextIO | None = sys.stderr,
                      monitor_every: float = 0.5, live: Live | None = None) -> dict[str, Any]:
    """Run ``cfg.nodes`` nodes to completion; write metrics.jsonl and return the summary dict.

    ``cfg``: a config or its resolved `gossipfl.plan.Plan` (then nothing is parsed or built again);
    ``live``: the page of ``gossipfl sim --live`` (`gossipfl.web.live`) gets every monitor sample."""
    plan = resolve(cfg)
    cfg = plan.cfg
    if plan.attack is not None and plan.attack.kind == "dissensus" and plan.attack.nodes:
        raise ConfigError("attack.kind: dissensus crafts each receiver's message from that receiver's whole inbox, "
                          "which only the vectorised engine's omniscient adversary sees (--engine vectorized)")
    network = MemoryNetwork() if cfg.transport == "memory" else None
    ids = node_ids(cfg.nodes)
    # node i trains on shard i % shards, as in the vectorised engine (one shard per node by default);
    # user errors surface here
    trainers = [plan.trainer(i) for i in range(cfg.nodes)]
    writer = MetricsWriter(out / "metrics.jsonl")
    t0 = time.monotonic()
    emulation = plan.emulation
    step_seconds = emulation.step_seconds(cfg.nodes, seed=cfg.seed).tolist() if not emulation.ideal else None
    index_of: dict[str, int] = {}  # filled once addresses are bound; emulated links look peers up here
    nodes = [
        Node(cfg.replace(listen="127.0.0.1:0", peers=()), node_id=nid, trainer=trainers[i],
             algorithm=plan.new_algorithm(), network=network, metrics=writer, t0=t0, seed=cfg.seed * 31 + i,
             transport=None if emulation.ideal else EmulatedTransport(
                 network.transport() if network else HttpTransport(), src=i, index_of=index_of,
                 emulation=emulation, seed=cfg.seed),
             min_step_seconds=step_seconds[i] if step_seconds else 0.0, linger=cfg.schedule == "async",
             attack=plan.attack if plan.attack is not None and i in plan.attack.nodes else None)
        for i, nid in enumerate(ids)
    ]
    if live is not None:
        live.names = ids
        live.probe = lambda idx: ([_finite(nodes[i].accuracy) for i in idx], [nodes[i].state.step for i in idx])
    monitor = _Monitor(nodes, writer if live is None else live.tap(writer), t0,
                       frozenset(plan.attack.nodes) if plan.attack is not None else frozenset())
    is_tty = progress is not None and progress.isatty()
    try:
        async with contextlib.AsyncExitStack() as stack:
            for n in nodes:
                await n.start(hold=True)
                stack.push_async_callback(n.aclose)
            index_of.update({n.address: i for i, n in enumerate(nodes)})
            for n in nodes:  # each node learns the others' addresses, as --peer would tell it
                for other in nodes:
                    if other is not n:
                        n.membership.add_static(other.address)
            await monitor.sample()  # the starting point: distinct random models, nothing learned
            if cfg.schedule == "sync":
                final = await _run_lockstep(cfg, nodes, monitor, progress)
                return _summary(plan, nodes, monitor, final, time.monotonic() - t0)
            for n in nodes:
                n.go.set()
            last_print = 0.0
            while not all(n.finished.is_set() for n in nodes):
                done = asyncio.gather(*(n.finished.wait() for n in nodes))
                try:
                    await asyncio.wait_for(asyncio.shield(done), monitor_every)
                except TimeoutError:
                    pass
                finally:
                    done.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await done
                row = await monitor.sample()
                if progress is not None and (is_tty or row["t"] - last_print >= 5.0):
                    last_print = row["t"]
                    print(("\r" if is_tty else "") + _progress_line(row, nodes, cfg),
                          end="" if is_tty else "\n", file=progress, flush=True)
            final = await monitor.sample()
            if progress is not None and is_tty:
                print(file=progress)
    finally:
        writer.close()
    return _summary(plan, nodes, monitor, final, time.monotonic() - t0)


async def _run_lockstep(cfg: RunConfig, nodes: list[Node], monitor: _Monitor,
                        progress: TextIO | None) -> dict[str, Any]:
    """Synchronous rounds: every node merges round r-1's messages, steps, then all messages move.

    Messages still go through the transport, the codec and each node's validation; deliveries
    happen in node-id order, so merges are deterministic and the vectorised engine can match them.
    """
    if cfg.duration is not None:
        from gossipfl.errors import ConfigError

        raise ConfigError("duration: the sync schedule counts rounds; give steps instead")
    for n in nodes:
        await n.probe_peers()
    trace = not nodes[0].algorithm.requirements.trains
    pairwise = nodes[0].algorithm.requirements.pairwise
    ticks = pairwise and nodes[0].algorithm.requirements.wakes == "random"  # randomized gossip's clock
    monitor.sync = True
    if trace:
        monitor.trace.append((0, consensus_distance(await monitor.snapshot())))
    sent = False
    for r in range(1, cfg.steps + 1):
        gossip = r % cfg.gossip_every == 0
        outs = [await n.work_round(gossip=gossip and not ticks) for n in nodes]
        if gossip and ticks:  # N ticks, each waking one node drawn uniformly (gossipfl.sim.wakeups)
            for w in wakeups(cfg.seed, r, len(nodes)):
                await nodes[w].wake_exchange()
        if sent or (gossip and pairwise):  # this round merged what the last one sent (pairwise: its own)
            monitor.mixings += 1
            if trace:
                monitor.trace.append((monitor.mixings, consensus_distance(await monitor.snapshot())))
        sent = any(out is not None for out in outs)
        for n, out in zip(nodes, outs, strict=True):
            await n.send_round(out)
        if r % cfg.eval_every == 0 or r == cfg.steps:
            await asyncio.gather(*(n.evaluate_now() for n in nodes))
            row = await monitor.sample()
            if progress is not None:
                print(_progress_line(row, nodes, cfg), file=progress, flush=True)
    for n in nodes:
        n.finished.set()
    return monitor.history[-1]


def _staleness(nodes: list[Node]) -> dict[str, float | int | None]:
    """Mean and maximum staleness (local steps) over every message any node merged."""
    count = sum(n.staleness.count for n in nodes)
    if not count:
        return dict.fromkeys(STALENESS_KEYS)
    tallies = [n.staleness for n in nodes if n.staleness.count]
    return staleness_totals(sum(t.total for t in tallies), sum(t.behind for t in tallies), count,
                            max(t.max for t in tallies if t.max is not None),
                            min(t.min for t in tallies if t.min is not None))


def _robust_totals(nodes: list[Node]) -> dict[str, int]:
    """Every node's neighbour contributions its robust rule clipped and discarded, summed."""
    counts = [robust_counts(n.state.state) for n in nodes]
    return {k: sum(c[k] for c in counts) for k in counts[0]} if counts else {}


def _summary(plan: Plan, nodes: list[Node], monitor: _Monitor, final: dict[str, Any],
             wall: float) -> dict[str, Any]:
    cfg = plan.cfg
    accs = [n.accuracy for n in nodes]
    lost = sum(getattr(n._transport, "lost", 0) for n in nodes)
    summary: dict[str, Any] = {
        "engine": "cluster",
        "transport": cfg.transport,
        "nodes": len(nodes),
        "score": "r2" if plan.data.regression else "accuracy",  # what the accuracy figures are
        "mean_accuracy": sum(accs) / len(accs),
        "min_accuracy": min(accs),
        "max_accuracy": max(accs),
        **honest_accuracy(accs, set(plan.attack.nodes) if plan.attack is not None else set()),
        "avg_model_accuracy": final["avg_model_accuracy"],
        "consensus_distance": final["consensus_distance"],
        "initial_consensus_distance": monitor.history[0]["consensus_distance"],
        **({"honest_consensus_distance": final["honest_consensus_distance"]}
           if "honest_consensus_distance" in final else {}),
        **_robust_totals(nodes),
        # every message sent: delivered (a node's msgs_out) and lost on the emulated network
        "messages": sum(n.msgs_out for n in nodes) + lost,
        "bytes": sum(n.bytes_out for n in nodes) + sum(getattr(n._transport, "lost_bytes", 0) for n in nodes),
        "linger_messages": sum(n.linger_msgs for n in nodes),
        "linger_bytes": sum(n.linger_bytes for n in nodes),
        "messages_per_node_step": (sum(n.msgs_out for n in nodes) + lost - sum(n.linger_msgs for n in nodes))
        / max(1, sum(n.state.step for n in nodes)),
        "rejected": sum(sum(n.rejected.values()) for n in nodes),
        "lost": lost,  # dropped by emulated loss
        "round_timeouts": sum(n.round_timeouts for n in nodes),  # round algorithms: waits that ran out
        # emulated speeds: the share of steps whose real compute outlasted their emulated step time
        "step_overruns": sum(n.step_overruns for n in nodes) / max(1, sum(n.state.step for n in nodes)),
        **_staleness(nodes),
        "wall_seconds": round(wall, 3),
        "node_steps": sum(n.state.step for n in nodes),
        "per_node": {
            n.id: {
                "accuracy": n.accuracy, "loss": n.loss, "steps": n.state.step,
                "msgs_out": n.msgs_out, "msgs_in": n.msgs_in,
                "bytes_out": n.bytes_out, "bytes_in": n.bytes_in, "staleness": n.staleness.mean,
                **robust_counts(n.state.state),
            }
            for n in nodes
        },
    }
    if summary["step_overruns"] > 0.1:
        log.warning("the emulated speeds were not kept: %.0f %% of steps took longer in real compute than their "
                    "emulated step time (emulation.step_time %g s); raise step_time to compare with the "
                    "vectorised engine", 100 * summary["step_overruns"], plan.emulation.step_time)
    req = nodes[0].algorithm.requirements
    gap = None
    if plan.schedule.period == 1:  # one fixed graph: the gap of the matrix the algorithm mixes with
        kind = "push_sum" if req.weights == "column" else cfg.weights  # as the vectorised engine's
        gap = summary["spectral_gap"] = summary_spectral_gap(plan.schedule(0), kind, always=not req.trains)
    if not req.trains:
        summary.update(_consensus_rates(monitor, plan.schedule, gap, torch.finfo(nodes[0].trainer.params.dtype).eps,
                                        nodes[0].algorithm))
    return summary
