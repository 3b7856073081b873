"""What the vectorised engine reports: metric rows, staleness, progress line, run summary.

Every node is evaluated at each metric point for the cluster rows (consensus distance, averaged
model, mean accuracy); node rows and the summary's ``per_node`` cover the sampled nodes. Message
and byte counters are per node and mean what the local cluster's do: messages sent that the
network did not lose (a lost one is counted in ``lost``), bytes as the wire codec frames each one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

import torch

from gossipfl.algorithms.aggregation import COUNTERS
from gossipfl.convergence import consensus_summary
from gossipfl.learning.losses import score, spread_of
from gossipfl.metrics import STALENESS_KEYS, honest_accuracy, robust_counts, staleness_totals
from gossipfl.topology import summary_spectral_gap
from gossipfl.topology.spectral import predicted_round_rate

if TYPE_CHECKING:
    from gossipfl.sim.vectorized import VectorizedSim

__all__ = ["Progress", "Staleness", "log", "record", "summary"]

log = logging.getLogger("gossipfl.sim")


class Staleness:
    """Staleness of merged messages (receiver's step at merge - sender's step at send), per node."""

    def __init__(self, n: int, dev: torch.device) -> None:
        self.sum = torch.zeros(n, dtype=torch.int64, device=dev)
        self.behind = torch.zeros(n, dtype=torch.int64, device=dev)  # sum of max(0, lag)
        self.count = torch.zeros(n, dtype=torch.int64, device=dev)
        self.max = torch.full((n,), torch.iinfo(torch.int64).min, dtype=torch.int64, device=dev)
        self.min = torch.full((n,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=dev)
        self.row = (torch.zeros_like(self.sum), torch.zeros_like(self.count))  # at the last node rows

    def add(self, recv: torch.Tensor, staleness: torch.Tensor) -> None:
        self.sum.index_add_(0, recv, staleness)
        self.behind.index_add_(0, recv, staleness.clamp_min(0))
        self.count.index_add_(0, recv, torch.ones_like(staleness))
        self.max.scatter_reduce_(0, recv, staleness, reduce="amax")
        self.min.scatter_reduce_(0, recv, staleness, reduce="amin")

    def add_fresh(self, count: torch.Tensor, *, every: bool) -> None:
        """``count[i]`` messages of staleness 0 into node i (a lock-step round); ``every``: all counts > 0."""
        self.count.add_(count)
        if every:
            self.max.clamp_min_(0)
            self.min.clamp_max_(0)
        else:
            self.max = torch.where(count > 0, self.max.clamp_min(0), self.max)
            self.min = torch.where(count > 0, self.min.clamp_max(0), self.min)

    def since_row(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum, count) per node since the last node rows; starts a new row."""
        s, c = self.sum - self.row[0], self.count - self.row[1]
        self.row = (self.sum.clone(), self.count.clone())
        return s, c

    def totals(self) -> dict[str, float | int | None]:
        """Mean and maximum over every merged message, as the cluster reports them."""
        count = int(self.count.sum())
        if not count:
            return dict.fromkeys(STALENESS_KEYS)
        total, behind, seen = int(self.sum.sum()), int(self.behind.sum()), self.count > 0
        return staleness_totals(total, behind, count, int(self.max[seen].max()), int(self.min[seen].min()))


class Progress:
    """One status line: simulated time, node-steps per second, mean accuracy."""

    def __init__(self, stream: TextIO | None, total: int | None, duration: float | None) -> None:
        self.stream, self.total, self.duration = stream, total, duration
        self.tty = stream is not None and stream.isatty()
        self.t0 = time.monotonic()
        self.last = 0.0
        self.accuracy: float | None = None

    def __call__(self, sim_t: float, node_steps: int, mean_step: float, *, force: bool = False) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if not force and now - self.last < (0.5 if self.tty else 5.0):
            return
        self.last = now
        rate = node_steps / max(now - self.t0, 1e-9)
        goal = f"/{self.total}" if self.total else f" (of {self.duration:g}s)" if self.duration else ""
        acc = "  -  " if self.accuracy is None else f"{self.accuracy:.3f}"
        line = (f"sim t={sim_t:9.3f}s  step {mean_step:7.1f}{goal}  {rate:12,.0f} node-steps/s  "
                f"mean acc {acc}")
        print(("\r" if self.tty else "") + line, end="" if self.tty else "\n", file=self.stream, flush=True)

    def close(self) -> None:
        if self.stream is not None and self.tty:
            print(file=self.stream)



@torch.no_grad()
def evaluate_all(sim: VectorizedSim) -> tuple[torch.Tensor, torch.Tensor]:
    """Test loss and accuracy of every node's model (device tensors ``[N]``)."""
    losses, accs = [], []
    y, loss, spread = sim.y_test, sim.model.loss, spread_of(sim.y_test)
    for a in range(0, sim.n, sim.eval_block):
        out = sim.model.logits(sim.models(a, a + sim.eval_block), sim.x_test)
        k, t, c = out.shape
        losses.append(loss.per_sample(out.reshape(k * t, c), y.repeat(k)).view(k, t).mean(1))
        accs.append(score(out, y, spread).mean(1))  # float64: k / n_test as the node computes it (or R^2)
    return torch.cat(losses), torch.cat(accs)


@torch.no_grad()
def mean_model(sim: VectorizedSim, among: torch.Tensor | None = None) -> torch.Tensor:
    """The average of every node's deployed model (``among``: ``[N]`` bool, those nodes only),
    float64, a block at a time."""
    total = torch.zeros(sim.layout.numel, dtype=torch.float64, device=sim.device)
    for a in range(0, sim.n, sim.eval_block):
        block = sim.models(a, a + sim.eval_block).double()
        total += block.sum(0) if among is None else block[among[a:a + sim.eval_block]].sum(0)
    return total / (sim.n if among is None else max(int(among.sum()), 1))


@torch.no_grad()
def consensus_distance(sim: VectorizedSim, among: torch.Tensor | None = None) -> float:
    """(1/N) sum_i ||x_i - x_bar||^2 in float64, in blocks (as `gossipfl.metrics.consensus_distance`);
    ``among``: over those nodes only (and their own average)."""
    mean = mean_model(sim, among)
    acc = torch.zeros((), dtype=torch.float64, device=sim.device)
    for a in range(0, sim.n, sim.eval_block):
        d = ((sim.models(a, a + sim.eval_block).double() - mean) ** 2).sum(1)
        acc += d.sum() if among is None else d[among[a:a + sim.eval_block]].sum()
    return float(acc / (sim.n if among is None else max(int(among.sum()), 1)))


@torch.no_grad()
def average_model_accuracy(sim: VectorizedSim) -> float:
    mean = mean_model(sim).to(sim.params.dtype).unsqueeze(0)
    out = sim.model.logits(mean, sim.x_test)[0]
    return float(score(out, sim.y_test, spread_of(sim.y_test)).mean())


def record(sim: VectorizedSim, writer: Callable[[dict[str, Any]], None], t: float, *, node_rows: bool,
           evaluate: bool = True) -> dict[str, Any]:
    """Evaluate every node and write node rows (sampled) and one cluster row; a metric point."""
    if evaluate:
        sim.test_loss, sim.accuracy = evaluate_all(sim)
    if node_rows and sim.sample:
        idx = torch.tensor(sim.sample, device=sim.device)
        stale_sum, stale_count = sim.tally.since_row()
        cols = [sim.step, sim.test_loss, sim.last_loss, sim.accuracy, sim.msgs_out, sim.msgs_in,
                sim.bytes_out, sim.bytes_in, stale_sum, stale_count]
        step, loss, train_loss, acc, mo, mi, bo, bi, ss, sc = (c[idx].tolist() for c in cols)
        counts = {k: sim.state[k][idx].tolist() for k in COUNTERS if k in sim.state}
        for k, i in enumerate(sim.sample):
            writer({
                "node": sim.ids[i], "t": round(t, 6), "step": step[k], "loss": loss[k],
                "train_loss": train_loss[k], "accuracy": acc[k], "bytes_out": bo[k], "bytes_in": bi[k],
                "msgs_out": mo[k], "msgs_in": mi[k], "staleness": ss[k] / sc[k] if sc[k] else None,
                **{c: v[k] for c, v in counts.items()},
            })
    evaluated = bool(torch.isfinite(sim.accuracy).any())
    row = {
        "node": None, "t": round(t, 6),
        "mean_step": float(sim.step.double().mean()),
        **({"mixings": sim.mixings} if sim.cfg.schedule == "sync" else {}),
        "bytes": int(sim.bytes_out.sum()),  # sent so far, by every node (bytes to a target accuracy)
        "consensus_distance": consensus_distance(sim),
        "avg_model_accuracy": average_model_accuracy(sim),
        "mean_accuracy": float(sim.accuracy.nanmean()) if evaluated else None,
        "min_accuracy": float(sim.accuracy[torch.isfinite(sim.accuracy)].min()) if evaluated else None,
    }
    if sim.attack is not None:  # an attack: how far apart the honest models are
        row["honest_consensus_distance"] = consensus_distance(sim, ~sim.attackers)
    writer(row)
    sim.history.append(row)
    return row


def summary(sim: VectorizedSim, wall: float) -> dict[str, Any]:
    """The run's summary, with the local cluster's keys (and the engine's own: lost, expired, ...)."""
    final = sim.history[-1]
    acc, loss, steps = sim.accuracy.cpu(), sim.test_loss.cpu(), sim.step.cpu()
    mo, mi, bo, bi = sim.msgs_out.cpu(), sim.msgs_in.cpu(), sim.bytes_out.cpu(), sim.bytes_in.cpu()
    stale_sum, stale_count = sim.tally.sum.tolist(), sim.tally.count.tolist()
    out: dict[str, Any] = {
        "engine": "vectorized",
        "transport": "simulated",
        "schedule": sim.cfg.schedule,
        "device": str(sim.device),
        "sampling": sim.sampling,
        "kernel": sim.model.kind,
        "nodes": sim.n,
        "score": "r2" if sim.plan.data.regression else "accuracy",  # what the accuracy figures are
        "mean_accuracy": float(acc.mean()),
        "min_accuracy": float(acc.min()),
        "max_accuracy": float(acc.max()),
        **honest_accuracy(acc.tolist(), set(sim.attack.nodes) if sim.attack is not None else set()),
        "avg_model_accuracy": final["avg_model_accuracy"],
        "consensus_distance": final["consensus_distance"],
        "initial_consensus_distance": sim.history[0]["consensus_distance"],
        **({"honest_consensus_distance": final["honest_consensus_distance"]}
           if "honest_consensus_distance" in final else {}),
        **{k: int(sim.state[k].sum()) for k in COUNTERS if k in sim.state},
        "messages": int(mo.sum()),
        "bytes": int(bo.sum()),
        "linger_messages": int(sim.linger_msgs),
        "linger_bytes": int(sim.linger_bytes),
        "messages_per_node_step": (int(mo.sum()) - int(sim.linger_msgs)) / max(1, int(steps.sum())),
        "rejected": 0,
        "lost": int(sim.lost),
        "expired": int(sim.expired),
        "round_timeouts": 0,  # neighbour-local rounds always wait (see gossipfl.sim._async)
        "step_overruns": 0.0,  # simulated steps take exactly their emulated time
        **sim.tally.totals(),
        "wall_seconds": round(wall, 3),
        "simulated_seconds": sim.sim_time,
        "node_steps": int(steps.sum()),
        "node_steps_per_second": int(steps.sum()) / max(wall, 1e-9),
        "per_node_sampled": len(sim.sample) < sim.n,
        "per_node": {
            sim.ids[i]: {
                "accuracy": float(acc[i]), "loss": float(loss[i]), "steps": int(steps[i]),
                "msgs_out": int(mo[i]), "msgs_in": int(mi[i]), "bytes_out": int(bo[i]), "bytes_in": int(bi[i]),
                "staleness": stale_sum[i] / stale_count[i] if stale_count[i] else None,
                **robust_counts(sim.state, i),
            }
            for i in sim.sample
        },
    }
    if not sim.trains:
        out.update(consensus_rates(sim))
    elif not sim.time_varying:
        out["spectral_gap"] = summary_spectral_gap(sim.graph, _mixing_kind(sim))
    return out


def _mixing_kind(sim: VectorizedSim) -> str:
    # column-stochastic algorithms push uniform shares; the others mix with the configured weights
    return "push_sum" if sim.algorithm.requirements.weights == "column" else sim.cfg.weights


def consensus_rates(sim: VectorizedSim) -> dict[str, Any]:
    """The consensus-rate figures (`gossipfl.convergence`): over the per-round trace in lock-step,
    over the metric points against the mean step otherwise; and SLEM(W)^2 of the graph."""
    points = sim.trace if sim.trace else [(h["mean_step"], h["consensus_distance"]) for h in sim.history]
    predicted = gap = None
    if not sim.time_varying:  # no single graph's spectral gap predicts a changing one
        gap = summary_spectral_gap(sim.graph, _mixing_kind(sim), always=True)
        if gap is None:  # the iterative eigensolver may give up on huge graphs
            log.warning("predicted consensus rate unavailable: the eigensolver did not converge")
        else:
            req = sim.algorithm.requirements
            predicted = predicted_round_rate(sim.graph, gap, pairwise=req.pairwise, random_wakes=req.wakes == "random",
                                             mix=getattr(sim.algorithm, "mix", 0.5))
    return {**consensus_summary(points, eps=torch.finfo(sim.params.dtype).eps, predicted=predicted),
            **({"spectral_gap": gap} if gap is not None else {})}


def probe(sim: VectorizedSim, idx: Sequence[int]) -> tuple[list[float | None], list[int]]:
    """The live page's per-node readings (accuracy at the last metric point, step) of nodes ``idx``."""
    at = torch.tensor(list(idx), dtype=torch.int64, device=sim.device)
    acc = [a if math.isfinite(a) else None for a in sim.accuracy.index_select(0, at).tolist()]
    return acc, sim.step.index_select(0, at).tolist()
