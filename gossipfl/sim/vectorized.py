"""The vectorised engine: thousands of nodes as rows of one ``[N, D]`` tensor, on a simulated clock.

Every node's flat parameter vector is a row of ``params`` (and its momentum a row of
``velocity``). A local step of many nodes is one batched forward/backward
(`gossipfl.sim._batched_models`: batched matmuls for the built-in MLP/logreg, ``torch.func`` for
any other model). A D-PSGD merge is a sparse product on the node axis with the matrix that
`gossipfl.algorithms.dpsgd.mix` defines (mix is linear; `mix_self_weight` reads its diagonal off
mix itself), and gossip-learning merges are batched calls of
`gossipfl.algorithms.gossip.age_weighted_merge`; AD-PSGD's pairwise exchanges (`exchange_delta`) run
in waves of disjoint pairs. Push-sum / SGP (`gossipfl.algorithms.pushsum`)
keeps each node's mass ``w`` beside its row ``x``: a push scales the sender by its kept share
(`push_share`), a merge adds every share that arrived (x and w, one sparse product), and a local
step is SGD on ``z = x / w`` (the `PushSum.local_step` rule); metrics read the de-biased ``x / w``.
Epidemic Learning draws ``fanout`` distinct out-neighbours per sender (random keys per link, the
smallest kept) and merges by the plain average of `plain_average`, again one sparse product.
Gradient exchange keeps each node's own gradient and accumulator as ``[N, D]`` rows; messages
refer to a gradient ring and a model ring filled slot for slot, so every gradient that arrives
counts once (late ones are applied stale, as in `GradientExchange.merge`).
DIGing keeps the tracker ``y`` and last gradient ``g`` as rows; a round mixes models and trackers
with M and takes the tracking step (`tracker_update`). CHOCO keeps the public copies ``x_hat``
and ``s = W_off x_hat`` as rows; a send compresses every ``x - x_hat`` at once (the operators of
`gossipfl.algorithms.compression` take a leading node axis; ``exact`` sampling draws with each
node's own generator) and a merge is ``s += W_off q`` and `choco_consensus`. Gossip learning's
update-merge order gives every arrival one SGD step on its receiver's next minibatch (a batched
gradient per merge wave) after the own step; partitioned gossip keeps per-part ages ``[N, P]`` and
merges only the entries of the part a message carries (its index rides in the message's weight).
The algorithm math is reused unchanged.

Two schedules, chosen by ``cfg.schedule``:

``sync``
    Lock-step rounds, exactly those of the local cluster's ``_run_lockstep``: in round r every
    node merges the messages of round r-1 (in sender-index order), takes one SGD step, and at
    gossip points sends. Simulated time is ``r * emulation.step_time``. A time-varying topology
    (`gossipfl.topology.build_schedule`) sends round r's messages on graph r, as the cluster's
    nodes do (in ``async`` each sender on the graph of its own step, `VectorizedSim._round_groups`).
``async``
    Events on a simulated clock drawn from `gossipfl.sim.emulation` (per-node speeds,
    stragglers, per-link latency, jitter, loss, bandwidth, churn). At its start a step merges
    every message that has arrived; at its end, a gossip step's message goes out once the node's
    previous send is done (one message batch at a time, as the node service does; that send went
    on while the step computed), and the next step starts then: a step lasts the longer of its
    compute and the node's slowest link. Events are processed in batches: all steps that start within one time slice
    (``emulation.time_slice``, default the fastest node's step time, so no node steps twice in
    a slice) run as one vectorised batch. Messages sent within a batch are merged in a later
    one; everything else keeps its order. With an ideal emulation this reproduces ``sync``. As in
    the local cluster, a node that has done its ``steps`` lingers (merges and gossips at its own
    pace, no training) until the last node is done; with a ``duration`` all stop together.
    Round algorithms (DIGing, CHOCO) keep neighbour-local rounds instead: a node waits for every
    in-neighbour's message of the round, so their numbers are the sync schedule's and only the
    clock follows the emulation (`VectorizedSim._run_rounds_async`). AD-PSGD follows the node's
    exchange protocol: an initiator takes no step until its reply is in, and meanwhile answers
    requests at once; a computing responder answers when its step ends (busy if that is more than
    ``timeout / 2`` away); the initiator adds its delta when the reply arrives
    (`VectorizedSim._pair_deliver`).

Randomness, chosen by ``sampling``:

``fast`` (default)
    Minibatches for all nodes at once from one generator on the device: per node, shuffled
    passes over its shard (a new permutation when the next batch would overrun it, as the
    Trainer does), drawn as an ``argsort`` of random keys over ``[N, shard]``, no loop over nodes.
    Gossip targets are drawn the same way.
``exact``
    Reproduces each node's own `Trainer` batch order (``torch.Generator`` seeded
    ``seed * 7919 + i``) and its gossip-target RNG (``random.Random(seed * 31 + i)``), with a
    Python loop over nodes at epoch boundaries and sends. For agreement tests and small runs.

Initial models are always node i's model of the local cluster (``build_trainer``'s seed). Node i
trains on shard ``i % shards`` of the partition (``shards`` defaults to one per node, as in the
cluster; set it to run more nodes than there are training samples).

Run folder: the same ``metrics.jsonl`` and summary as the local cluster, with ``t`` in simulated
seconds. Every node is evaluated at each metric point (``eval_every`` local steps, i.e. every
``eval_every * step_time`` simulated seconds in ``async``) for the cluster rows, but node rows
and the summary's ``per_node`` cover at most ``node_rows`` nodes (default `NODE_ROWS`, evenly
spaced ids; ``per_node_sampled`` says when they are a sample). Message bytes are counted as the
size of one encoded envelope per message; ``msgs_out`` leaves out messages the emulation lost.

On a GPU (``device="cuda"``) every tensor lives on the device; the step loop reads back only
scalars that steer it (how many nodes step in a time slice, the next event time, how many merge
waves) and copies data to the host only at metric points. (Written for CUDA; tested on CPU only.)
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gossipfl import wire
from gossipfl.algorithms import Algorithm
from gossipfl.algorithms._util import generator as node_generator
from gossipfl.algorithms.adpsgd import ADPSGD, exchange_delta
from gossipfl.algorithms.base import LocalState
from gossipfl.algorithms.choco import CHOCO, choco_consensus
from gossipfl.algorithms.dpsgd import DPSGD, Averaging, mix
from gossipfl.algorithms.epidemic import EpidemicLearning
from gossipfl.algorithms.gossip import GossipLearning, PartitionedGossip, age_weighted_merge
from gossipfl.algorithms.gradex import GradientExchange
from gossipfl.algorithms.pushsum import PushSum, PushSumAveraging, push_share
from gossipfl.algorithms.tracking import DIGing, tracker_update
from gossipfl.build import build_algorithm, build_data, check_algorithm_fits, check_requirements, node_seed
from gossipfl.config import RunConfig
from gossipfl.errors import ConfigError
from gossipfl.learning import Dataset, build_model, param_layout, partition
from gossipfl.learning.models import BUILTIN_MODELS
from gossipfl.metrics import MetricsWriter
from gossipfl.sim._batched_models import BatchedModel, apply_sgd, batched_model
from gossipfl.sim.emulation import Emulation, parse_emulation
from gossipfl.sim.events import Messages, SnapshotRing, latest_per_pair, merge_waves
from gossipfl.topology import Schedule, build_schedule, graph_spectral_gap, mixing_matrix_sparse

__all__ = ["NODE_ROWS", "VectorizedSim", "check_config", "mix_self_weight", "run_vectorized"]

log = logging.getLogger("gossipfl.sim")

NODE_ROWS = 64
"""Default number of nodes whose rows go to metrics.jsonl (evenly spaced ids); all nodes are evaluated."""
MAX_RING = 64  # deepest snapshot ring (a sender's models that messages in flight may refer to)
RING_BYTES = 2**30  # memory the snapshot ring may take beyond two models per node


def node_ids(n: int) -> list[str]:
    """Same ids as the local cluster: n00, n01, ... (zero-padded, so sorted order is index order)."""
    width = max(2, len(str(n - 1)))
    return [f"n{i:0{width}d}" for i in range(n)]


def _device(spec: str) -> torch.device:
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: {spec!r} is not a torch device (use cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA GPU is available; use cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: {spec!r} is not supported; use cpu or cuda")
    return dev


def _csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from parts built here (valid by construction, so invariants go unchecked)."""
    with warnings.catch_warnings():
        # torch warns once per process that sparse CSR is "beta"; not a concern of our callers.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, val, size=size, check_invariants=False)


class _Batches:
    """Minibatch indices for many nodes: per node, shuffled passes over its shard (see module doc)."""

    def __init__(self, shards: Sequence[torch.Tensor], batch_size: int, *, device: torch.device,
                 generator: torch.Generator, seeds: Sequence[int] | None) -> None:
        n = len(shards)
        lengths = torch.tensor([len(s) for s in shards], dtype=torch.int64)
        smax = int(lengths.max())
        idx = torch.zeros(n, smax, dtype=torch.int64)
        for i, s in enumerate(shards):
            idx[i, : len(s)] = s
        self.exact = seeds is not None
        home = torch.device("cpu") if self.exact else device  # exact mode keeps its state on the host
        self.device = device
        self.idx = idx.to(device)
        self.n = lengths.to(home)
        self.b = lengths.clamp_max(batch_size).to(home)
        self.bmax = int(self.b.max())
        self.full = bool((self.b == self.bmax).all())
        self.pad = (torch.arange(smax) >= lengths.unsqueeze(1)).to(home)
        self.order = torch.zeros(n, smax, dtype=torch.int64, device=home)
        self.pos = self.n.clone()  # every node starts with a new epoch, like a fresh Trainer
        self.ar = torch.arange(self.bmax, device=home)
        self.gen = generator
        self.smax = smax
        if seeds is not None:
            self.gens = [torch.Generator().manual_seed(s) for s in seeds]
            self.lengths = lengths.tolist()

    def next(self, rows: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Global training-set indices ``[n, bmax]`` for ``rows``, and a 0/1 weight if batches differ."""
        if self.exact and isinstance(rows, torch.Tensor):  # exact mode keeps its state on the host
            rows = rows.cpu()
        n, b, pos = self.n[rows], self.b[rows], self.pos[rows]
        need = pos + b > n
        if self.exact:
            r = torch.arange(self.n.shape[0])[rows] if isinstance(rows, slice) else rows
            for i in r[need].tolist():  # epoch boundaries only: the Trainer's own randperm
                self.order[i, : self.lengths[i]] = torch.randperm(self.lengths[i], generator=self.gens[i])
            rows_h: slice | torch.Tensor = rows if isinstance(rows, slice) else r
            pos = torch.where(need, 0, pos)
            local = self.order[rows_h].gather(1, (pos.unsqueeze(1) + self.ar).clamp_max(self.smax - 1))
            self.pos[rows_h] = pos + b
            local = local.to(self.device)
        else:
            keys = torch.rand(b.shape[0], self.smax, generator=self.gen, device=self.device)
            perm = keys.masked_fill_(self.pad[rows], 2.0).argsort(1)
            order = torch.where(need.unsqueeze(1), perm, self.order[rows])
            self.order[rows] = order
            pos = torch.where(need, 0, pos)
            local = order.gather(1, (pos.unsqueeze(1) + self.ar).clamp_max(self.smax - 1))
            self.pos[rows] = pos + b
        gidx = self.idx[rows].gather(1, local)
        if self.full:
            return gidx, None
        weight = (self.ar.to(self.device) < b.to(self.device).unsqueeze(1)).float()
        return gidx, weight


class _Progress:
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


class VectorizedSim:
    """All nodes of a run as stacked tensors: build with a config, `run`, then read `params`.

    ``sampling``: ``fast`` or ``exact`` (module docstring). ``kernel``: ``auto``, ``batched``
    (built-in MLP/logreg only) or ``func`` (torch.func, any model). ``block``: nodes per batched
    step (default: sized to the CPU cache, or all nodes on a GPU). ``node_rows``: how many nodes
    (evenly spaced ids) get rows in metrics.jsonl and entries in the summary's ``per_node``; every
    node is still evaluated for the cluster rows. ``data``: a prebuilt dataset (else from cfg).
    """

    def __init__(self, cfg: RunConfig, *, device: str | None = None, sampling: str = "fast",
                 kernel: str = "auto", block: int | None = None, node_rows: int = NODE_ROWS,
                 data: Dataset | None = None) -> None:
        if sampling not in ("fast", "exact"):
            raise ConfigError(f"sampling: {sampling!r} is not one of fast, exact")
        if device is not None:
            cfg = cfg.replace(device=device)
        self.cfg = cfg
        self.device = _device(cfg.device)
        self.n = n = cfg.nodes
        self.ids = node_ids(n)
        self.sampling = sampling
        self.algorithm, self.rule, self.emulation, self.schedule = _checked(cfg)
        # a time-varying topology: a node sends round r's messages on graph r
        self.time_varying = self.schedule.period != 1
        self.graph = self.schedule(0)
        self.trains = self.algorithm.requirements.trains
        self.data = data if data is not None else build_data(cfg)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 1_000_003 + 17)
        self._links()
        self._learning(kernel, block)
        self._extra_state()
        dev = self.device
        self.step = torch.zeros(n, dtype=torch.int64, device=dev)
        self.age = torch.zeros(n, dtype=self.params.dtype, device=dev)
        # push-sum mass w (float64, as the node's Python float); params then hold x, the model is x / w
        self.weight = torch.ones(n, dtype=torch.float64, device=dev)
        self.last_loss = torch.full((n,), float("nan"), device=dev)
        self.accuracy = torch.full((n,), float("nan"), device=dev)
        self.test_loss = torch.full((n,), float("nan"), device=dev)
        self.msgs_out = torch.zeros(n, dtype=torch.int64, device=dev)
        self.msgs_in = torch.zeros(n, dtype=torch.int64, device=dev)
        self.lost = torch.zeros((), dtype=torch.int64, device=dev)
        # staleness of merged messages (`gossipfl.metrics`): per node sum, count, max; and at the last row
        self.stale_sum = torch.zeros(n, dtype=torch.int64, device=dev)
        self.stale_count = torch.zeros(n, dtype=torch.int64, device=dev)
        self.stale_max = torch.full((n,), torch.iinfo(torch.int64).min, dtype=torch.int64, device=dev)
        self._stale_row = (torch.zeros_like(self.stale_sum), torch.zeros_like(self.stale_count))
        self._pending_in: torch.Tensor | None = None  # sync: messages each node merges next round
        # async: when each node's last send completes (the node sends one message batch at a time: a
        # gossip step's message waits for the previous send, as `Node._send_idle` makes it), and the
        # earliest start of its next step (a sender's next step starts once its message went out)
        self._send_done = torch.full((n,), -math.inf, dtype=torch.float64, device=dev)
        self._next_start = torch.full((n,), -math.inf, dtype=torch.float64, device=dev)
        self.expired = torch.zeros((), dtype=torch.int64, device=dev)
        self.sim_time = 0.0
        self.node_steps = 0
        self.round = 0  # sync schedule: rounds done
        self._pending: tuple[torch.Tensor, ...] | None = None  # sync: what the last round sent
        k = min(max(node_rows, 0), n)
        self.sample = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)}) if k else []
        self.msg_bytes = self._message_bytes()
        if sampling == "exact":
            self.rngs = [random.Random(cfg.seed * 31 + i) for i in range(n)]

    # ------------------------------------------------------------------ setup

    def _links(self) -> None:
        """Out-neighbour lists (CSR by sender) and, for D-PSGD, mixing weights (CSR by receiver),
        of ``self.graph`` (rebuilt at every gossip round when the topology is time-varying)."""
        n, g = self.n, self.graph
        pairs = np.array(list(g.edges()), dtype=np.int64).reshape(-1, 2)
        src, dst = pairs[:, 0], pairs[:, 1]
        if not g.is_directed():
            src, dst = np.concatenate([src, dst]), np.concatenate([dst, src])
        order = np.lexsort((dst, src))
        src, dst = src[order], dst[order]
        deg = np.bincount(src, minlength=n)
        ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(deg, out=ptr[1:])
        dev = self.device
        self.send_ptr = torch.from_numpy(ptr).to(dev)
        self.send_col = torch.from_numpy(dst).to(dev)
        self.send_deg = torch.from_numpy(deg).to(dev)
        self.recv_deg = torch.from_numpy(np.bincount(dst, minlength=n)).to(dev)
        self.neighbour_lists = [dst[ptr[i]:ptr[i + 1]].tolist() for i in range(n)] \
            if self.sampling == "exact" else []
        self.send_weight = torch.zeros(len(dst), dtype=torch.float32, device=dev)
        self.mixing: torch.Tensor | None = None
        if not hasattr(self, "_spare"):  # the mixing product's output buffer, kept across graphs
            self._spare: torch.Tensor | None = None
        if self.rule == "push":
            self._push_links(src, dst, deg)
            return
        if self.rule not in ("mix", "grad", "track", "choco"):
            return
        w = mixing_matrix_sparse(g, self.cfg.weights, dtype=torch.float64)
        crow, col, val = w.crow_indices().numpy(), w.col_indices().numpy(), w.values().numpy()
        row = np.repeat(np.arange(n), np.diff(crow))
        off = row != col
        row, col, val64 = row[off], col[off], val[off]  # W[receiver, sender]; rows sorted, then columns
        val = val64.astype(np.float32)
        # the weight a receiver gives each message, looked up per (sender -> receiver) link
        key = row * n + col
        at = np.searchsorted(key, dst * n + src)
        self.send_weight = torch.from_numpy(val[at]).to(dev)
        # M with M @ params == mix(own, neighbours, weights) row by row (all neighbours fresh)
        wsum = torch.zeros(n, dtype=torch.float32).index_add_(0, torch.from_numpy(row), torch.from_numpy(val))
        self.weight_sum = wsum.to(dev)  # CHOCO: sum_j w_ij over all in-neighbours
        if self.rule == "choco":  # s_i += sum_j w_ij q_j: the off-diagonal part alone
            self.mix_off = _csr_from(row, col, val, n, dev)
            if self.sampling == "exact":  # the node's own float arithmetic (QSGD rounding is discontinuous)
                ptr = np.searchsorted(row, np.arange(n + 1))
                self.choco_in = [(col[ptr[i]:ptr[i + 1]].tolist(), val64[ptr[i]:ptr[i + 1]].tolist())
                                 for i in range(n)]
                self.weight_sum = torch.tensor([sum(w) for _, w in self.choco_in], dtype=torch.float32,
                                               device=dev)
        diag = np.arange(n)
        self.mixing = _csr_from(np.concatenate([row, diag]), np.concatenate([col, diag]),
                                np.concatenate([val, mix_self_weight(wsum).numpy()]), n, dev)

    def _use_round(self, r: int | None) -> None:
        """Make round ``r``'s graph of a time-varying topology the current one (links and weights),
        from a small cache: a periodic schedule has few graphs, and async senders sit at nearby rounds.
        ``None``: a static topology, nothing to do."""
        if r is None:
            return
        key = r % self.schedule.period if self.schedule.period else r
        if key == getattr(self, "_round_key", None):
            return
        cache: dict[int, dict[str, Any]] = self.__dict__.setdefault("_round_cache", {})
        if key not in cache:
            self.graph = self.schedule(key)
            self._links()
            if len(cache) >= 32:
                cache.pop(next(iter(cache)))
            cache[key] = {a: getattr(self, a) for a in _LINK_ATTRS if hasattr(self, a)}
        self.__dict__.update(cache[key])
        self._round_key = key

    def _round_groups(self, senders: torch.Tensor) -> list[tuple[int | None, torch.Tensor]]:
        """(round, positions in ``senders``) of the senders that send on one graph: all of them for
        a static topology (round None); for a time-varying one, one group per round, since a node
        sends round s's message on graph s (`_use_round` makes it current)."""
        if not self.time_varying:
            return [(None, torch.arange(senders.shape[0], device=senders.device))]
        rounds = self.step.index_select(0, senders)
        return [(r, (rounds == r).nonzero().squeeze(1)) for r in torch.unique(rounds).tolist()]

    def _message_rows(self, senders: torch.Tensor, idx: torch.Tensor, r: int | None,
                      parts: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(sender, receiver, weight, position in ``senders``) of every message that the senders at
        positions ``idx`` send on round ``r``'s graph: to all out-neighbours (D-PSGD, push-sum,
        gradient exchange) or to drawn targets (gossip, epidemic)."""
        self._use_round(r)
        dev = self.device
        sub = senders.index_select(0, idx)
        if self.rule in ("mix", "push", "grad"):
            deg = self.send_deg[sub]
            which = torch.repeat_interleave(torch.arange(sub.shape[0], device=dev), deg)
            first = torch.cumsum(deg, 0) - deg
            link = self.send_ptr[sub][which] + torch.arange(which.shape[0], device=dev) - first[which]
            return sub[which], self.send_col[link], self.send_weight[link], idx[which]
        send, recv = self._targets(sub)
        which = idx[torch.searchsorted(sub, send)]
        weight = torch.zeros(send.shape[0], dtype=torch.float32, device=dev)
        if parts is not None:  # gossip has no mixing weight: the slot carries the part index
            weight = parts[which].to(torch.float32)
        return send, recv, weight, which

    def _push_links(self, src: np.ndarray, dst: np.ndarray, deg: np.ndarray) -> None:
        """Push-sum shares: node i keeps ``keep_i`` of its mass and pushes ``send_i`` to each target.

        A message carries no copy of the sender's mass: it refers to the sender's x (and w) after
        it kept its own share, scaled by ``send_i / keep_i`` (the link's ``send_weight``). In
        lock-step rounds every node pushes, so the merge is one sparse product with ``I + M``,
        ``M[j, i] = send_i / keep_i`` for each link i -> j.
        """
        n, dev = self.n, self.device
        assert isinstance(self.algorithm, PushSum)
        shares = [push_share(int(d), self.algorithm.self_weight) for d in deg]
        keep = np.array([k for k, _ in shares], dtype=np.float64)
        ratio = np.array([s / k for k, s in shares], dtype=np.float64)
        self.keep = torch.from_numpy(keep).to(dev)
        self.send_weight = torch.from_numpy(ratio[src].astype(np.float32)).to(dev)
        self._push_ratio = torch.from_numpy(ratio[src]).to(dev)  # float64 for the mass w
        diag = np.arange(n)
        rows, cols = np.concatenate([dst, diag]), np.concatenate([src, diag])
        vals = np.concatenate([ratio[src], np.ones(n)])
        self.mixing = _csr_from(rows, cols, vals.astype(np.float32), n, dev)
        self._mixing64 = _csr_from(rows, cols, vals, n, dev)

    def _learning(self, kernel: str, block: int | None) -> None:
        cfg, data, n, dev = self.cfg, self.data, self.n, self.device
        n_shards = cfg.shards or n
        shards = partition(data.y_train, n_shards, cfg.partition, seed=cfg.seed)
        model = build_model(cfg.model, input_shape=data.input_shape, n_classes=data.n_classes,
                            hidden=cfg.hidden, seed=node_seed(cfg, 0))
        self.layout = param_layout(model)
        self.params = _initial_params(cfg, data, model, self.layout, n).to(dev)
        trains = self.algorithm.requirements.trains
        self.velocity = torch.zeros_like(self.params) if cfg.momentum and trains else None
        if self.rule == "grad":  # GradientExchange.init_state, one row per node
            self.grad = torch.zeros_like(self.params)  # own latest gradient (what it sends)
            self.acc = torch.zeros_like(self.params)  # weighted gradient sum to apply at the next step
            self.own_pending = torch.zeros(n, dtype=torch.bool, device=dev)  # own gradient not yet in acc
            self.have_acc = torch.zeros(n, dtype=torch.bool, device=dev)  # acc holds something to apply
            self._sent_params = False  # sync: whether the last round's messages carried models
        self._model_ring: SnapshotRing | None = None  # async gradient exchange: the models sent
        self.model: BatchedModel = batched_model(model.to(dev), self.layout, kernel)
        self.x_train, self.y_train = data.x_train.to(dev), data.y_train.to(dev)
        self.x_test, self.y_test = data.x_test.to(dev), data.y_test.to(dev)
        seeds = [cfg.seed * 7919 + i for i in range(n)] if self.sampling == "exact" else None
        self.batches = _Batches([shards[i % n_shards] for i in range(n)], cfg.batch_size, device=dev,
                                generator=self.gen, seeds=seeds)
        width = max(math.prod(data.input_shape), 1) + sum(cfg.hidden) + data.n_classes
        # floats of activations per block: about what the CPU caches hold, per thread
        budget = 2**20 * torch.get_num_threads() if dev.type == "cpu" else 2**27
        self.block = block or max(16, min(n, budget // (self.batches.bmax * width)))
        self.blocks = [(a, min(a + self.block, n)) for a in range(0, n, self.block)]
        tsize = max(1, data.x_test.shape[0])
        self.eval_block = max(1, min(n, (2**22 if dev.type == "cpu" else 2**28) // (tsize * width)))

    def _extra_state(self) -> None:
        """Rows of what DIGing, CHOCO, partitioned gossip and AD-PSGD keep beside the model (their
        ``init_state``, one row per node; AD-PSGD: its exchanges in flight)."""
        n, alg = self.n, self.algorithm
        # gossip learning variants: update-merge order; partitioned (per-part ages [N, P], float64)
        self.update_merge = isinstance(alg, GossipLearning) and alg.order == "update_merge"
        self.partitions = alg.partitions if isinstance(alg, PartitionedGossip) else 0
        check_algorithm_fits(alg, self.params[0])  # e.g. more gossip partitions than parameters
        if self.partitions:
            assert isinstance(alg, PartitionedGossip)
            self.part_ages = torch.zeros(n, self.partitions, dtype=torch.float64, device=self.device)
            self._part_of = torch.arange(self.layout.numel, device=self.device) % self.partitions
            if self.sampling == "exact":
                self.part_gens = self._node_generators(alg.seed)
        if self.rule == "track":  # tracker y, last gradient g; y_mix: the mixed trackers this round
            self.y = torch.zeros_like(self.params)
            self.g = torch.zeros_like(self.params)
            self.y_mix: torch.Tensor | None = None
            self._started = False  # the first step only computes y = g(x)
            self.velocity = None  # DIGing takes plain steps (momentum would break the tracking)
        if self.rule == "pair":  # AD-PSGD async: requests in flight, initiators waiting for their reply
            self._requests = Messages.empty(self.device)
            self.waiting = torch.zeros(n, dtype=torch.bool, device=self.device)
            self._hold = torch.zeros(n, dtype=torch.float64, device=self.device)  # earliest next step
            # An initiator does not compute from its request until its reply (or refusal, or
            # timeout) is in: over [_idle_from, _idle_to) its lock is free and it answers requests
            # at once. It sends a snapshot of its model (`_sent`) and, once answered, adds the
            # reply's delta (`_reply_delta`) when the reply arrives, i.e. at its next step start.
            self._idle_from = torch.full((n,), math.inf, dtype=torch.float64, device=self.device)
            self._idle_to = torch.full((n,), -math.inf, dtype=torch.float64, device=self.device)
            if self.cfg.schedule == "async":
                self._sent = torch.zeros_like(self.params)
                self._reply_delta = torch.zeros_like(self.params)
            self._reply_due = torch.zeros(n, dtype=torch.bool, device=self.device)
            self.exchanges_tried = 0
            self._seen_until = 0.0  # requests arriving before this were looked at in a time slice
        if self.rule == "choco":  # public copy x_hat, s = sum_j w_ij x_hat_j, last decoded q
            self.x_hat = torch.zeros_like(self.params)
            self.s = torch.zeros_like(self.params)
            self._choco_q: torch.Tensor | None = None
            if self.sampling == "exact":
                assert isinstance(self.algorithm, CHOCO)
                self.choco_gens = self._node_generators(self.algorithm.seed)

    def _node_generators(self, seed: int) -> list[torch.Generator]:
        """Each node's algorithm generator (`_util.generator` for the node's state seed), for the
        ``exact`` sampling of CHOCO's compression and partitioned gossip's part choice."""
        base = self.cfg.seed * 31  # the local cluster's per-node state seed is seed * 31 + i
        return [node_generator(LocalState(params=torch.zeros(0), seed=base + i), seed) for i in range(self.n)]

    def _message_bytes(self) -> int:
        """Size of one encoded gossip message, as the wire codec would frame it."""
        deg = int(self.send_deg.max()) if self.n else 0
        tensors = {"params": torch.zeros(self.layout.numel, dtype=self.layout.dtype)}
        if self.rule in ("track", "choco") or self.partitions:  # and tracker; CHOCO: q; partitioned: a part
            specs = self.algorithm.tensor_specs(self.layout.numel, self.layout.dtype)
            tensors = {k: torch.zeros(shape, dtype=dt) for k, (shape, dt) in specs.items()}
        env = wire.Envelope(
            cluster=self.cfg.cluster, sender=self.ids[0], algorithm=self.algorithm.name,
            fingerprint=self.layout.fingerprint, step=self.cfg.steps, age=float(self.cfg.steps),
            meta={"addr": "127.0.0.1:65535", "deg": deg},
            tensors=tensors,
        )
        return wire.encoded_size(env)

    # ------------------------------------------------------------------ learning

    def _train(self, p: torch.Tensor, v: torch.Tensor | None, rows: slice | torch.Tensor) -> None:
        """One local SGD step, in place on ``p`` (and ``v``), for the nodes ``rows``."""
        x, y, weight = self._minibatch(rows)
        cfg = self.cfg
        if self.rule == "push":
            # SGP (`PushSum.local_step`): SGD at z = x / w, momentum in z-space, x -= lr w u, i.e.
            # one SGD step on z and x = w z again.
            w = self.weight[rows].to(p.dtype).unsqueeze(1)
            z = p / w
            loss = self.model.sgd_step(z, v, x, y, weight, lr=cfg.lr, momentum=cfg.momentum,
                                       weight_decay=cfg.weight_decay)
            torch.mul(z, w, out=p)
        elif self.rule == "grad":
            loss = self._gradex_step(p, v, rows, x, y, weight)
        elif self.rule == "track":
            loss = self._track_step(p, rows, x, y, weight)
        else:
            loss = self.model.sgd_step(p, v, x, y, weight, lr=cfg.lr, momentum=cfg.momentum,
                                       weight_decay=cfg.weight_decay)
        self.last_loss[rows] = loss.detach()

    def _minibatch(self, rows: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The next minibatch of each node ``rows``: inputs ``[k, B, ...]``, labels ``[k, B]``, 0/1 weights."""
        gidx, weight = self.batches.next(rows)
        k, b = gidx.shape
        flat = gidx.reshape(-1)
        x = self.x_train.index_select(0, flat).view(k, b, *self.x_train.shape[1:])
        return x, self.y_train.index_select(0, flat).view(k, b), weight

    def _gradex_step(self, p: torch.Tensor, v: torch.Tensor | None, rows: slice | torch.Tensor, x: torch.Tensor,
                     y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """`GradientExchange.local_step` for the nodes ``rows``: apply the accumulated gradient
        (the own one alone if nothing merged since the last step), then compute a new gradient at
        the updated model and keep it, unapplied, for the next messages."""
        cfg = self.cfg
        pending = self.own_pending[rows]
        acc = torch.where(pending.unsqueeze(1), self.acc[rows] + self.grad[rows], self.acc[rows])
        have = self.have_acc[rows] | pending
        if bool(have.all()):
            apply_sgd(p, v, acc, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        elif bool(have.any()):  # first steps: only nodes that hold a gradient move
            idx = have.nonzero().squeeze(1)
            sub = p.index_select(0, idx)
            sub_v = None if v is None else v.index_select(0, idx)
            apply_sgd(sub, sub_v, acc.index_select(0, idx), lr=cfg.lr, momentum=cfg.momentum,
                      weight_decay=cfg.weight_decay)
            p.index_copy_(0, idx, sub)
            if v is not None and sub_v is not None:
                v.index_copy_(0, idx, sub_v)
        loss, grad = self.model.loss_and_grad(p, x, y, weight)
        self.grad[rows] = grad
        self.acc[rows] = 0.0
        self.own_pending[rows] = True
        self.have_acc[rows] = False
        return loss

    def _track_step(self, p: torch.Tensor, rows: slice | torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    weight: torch.Tensor | None) -> torch.Tensor:
        """`DIGing.local_step` for the nodes ``rows``: ``x -= lr y``, then the gradient at the new x
        and ``y = y_mix + g - g_prev`` (the very first step only sets ``y = g = g(x)``)."""
        assert isinstance(self.algorithm, DIGing)
        cfg = self.cfg
        if self._started:
            p.sub_(self.y[rows], alpha=self.algorithm.lr or cfg.lr)
        loss, grad = self.model.loss_and_grad(p, x, y, weight)
        if cfg.weight_decay:
            grad = grad + cfg.weight_decay * p
        if self._started:
            base = self.y if self.y_mix is None else self.y_mix
            self.y[rows] = tracker_update(base[rows], grad, self.g[rows])
        else:
            self.y[rows] = grad
        self.g[rows] = grad
        return loss

    def _train_rows(self, p: torch.Tensor, v: torch.Tensor | None, rows: torch.Tensor) -> None:
        """Step the nodes ``rows`` whose parameters are the rows of ``p`` (all nodes: ``p`` is params)."""
        full = rows.shape[0] == self.n
        for a in range(0, rows.shape[0], self.block):
            b = a + self.block
            self._train(p[a:b], None if v is None else v[a:b], slice(a, b) if full else rows[a:b])

    def _train_some(self, p: torch.Tensor, rows: torch.Tensor, which: torch.Tensor) -> None:
        """Step only the nodes ``rows[which]`` (rows ``which`` of ``p``); the others linger."""
        if not which.numel():
            return
        nodes = rows.index_select(0, which)
        sub = p.index_select(0, which)
        v = None if self.velocity is None else self.velocity.index_select(0, nodes)
        self._train_rows(sub, v, nodes)
        p.index_copy_(0, which, sub)
        if self.velocity is not None and v is not None:
            self.velocity.index_copy_(0, nodes, v)

    def _tally(self, recv: torch.Tensor, staleness: torch.Tensor) -> None:
        """Count merged messages' staleness (receiver's step at merge - sender's step at send)."""
        self.stale_sum.index_add_(0, recv, staleness)
        self.stale_count.index_add_(0, recv, torch.ones_like(staleness))
        self.stale_max.scatter_reduce_(0, recv, staleness, reduce="amax")

    @torch.no_grad()
    def _age_merge(self, p: torch.Tensor, age: torch.Tensor, recv: torch.Tensor,
                   models: torch.Tensor, ages: torch.Tensor, waves: list[torch.Tensor],
                   parts: torch.Tensor | None = None, part_ages: torch.Tensor | None = None) -> None:
        """Gossip learning: each receiver folds its messages in, one after another, in wave order.

        Partitioned gossip (``parts``: each message's part, ``part_ages``: the receivers' ages per
        part) merges only the entries of the message's part, with that part's ages
        (`merge_partition`)."""
        for wave in waves:
            r = recv[wave]
            if parts is None or part_ages is None:
                merged, a = age_weighted_merge(p[r], age[r], models[wave], ages[wave])
                p[r] = merged
                age[r] = a
                continue
            k = parts[wave]
            merged, a = age_weighted_merge(p[r], part_ages[r, k], models[wave], ages[wave])
            p[r] = torch.where(self._part_of == k.unsqueeze(1), merged, p[r])
            part_ages[r, k] = torch.as_tensor(a).to(part_ages.dtype)

    def _update_merge(self, p: torch.Tensor, age: torch.Tensor, nodes: torch.Tensor, recv: torch.Tensor,
                      models: torch.Tensor, ages: torch.Tensor, waves: list[torch.Tensor]) -> None:
        """Gossip learning, update-merge order (`GossipLearning.local_step`), after the own step:
        each arrived model takes one plain SGD step on its receiver's next minibatch, then is
        merged with ages counting that update. ``nodes[i]`` is the node of row i of ``p``."""
        lr = self.cfg.lr
        if not waves:
            return
        cur = age.clone()
        recvd = torch.zeros(age.shape[0], dtype=torch.bool, device=age.device)
        recvd[recv] = True
        cur += recvd.to(cur.dtype)  # the own step (the engine adds its 1 later)
        for wave in waves:
            r = recv[wave]
            xb, yb, weight = self._minibatch(nodes.index_select(0, r))
            _, grad = self.model.loss_and_grad(models[wave], xb, yb, weight)
            with torch.no_grad():
                updated = models[wave] - lr * grad
                merged, a = age_weighted_merge(p[r], cur[r], updated, ages[wave] + 1)
                p[r] = merged
                cur[r] = a
        age.copy_(torch.where(recvd, cur - 1, age))

    def _send_parts(self, senders: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Partitioned gossip: the part each sender sends and that part's age (`PartitionedGossip.message`).

        Only senders with an out-neighbour (in their own round's graph) draw: a node with no target
        builds no message."""
        has = torch.empty(senders.shape[0], dtype=torch.bool, device=self.device)
        for rnd, idx in self._round_groups(senders):
            self._use_round(rnd)
            has[idx] = self.send_deg.index_select(0, senders.index_select(0, idx)) > 0
        if self.sampling == "exact":
            drawn = [int(torch.randint(self.partitions, (), generator=self.part_gens[i])) if h else 0
                     for i, h in zip(senders.tolist(), has.tolist(), strict=True)]
            parts = torch.tensor(drawn, dtype=torch.int64, device=self.device)
        else:
            parts = torch.randint(self.partitions, senders.shape, generator=self.gen, device=self.device)
        return parts, self.part_ages[senders, parts]

    # ------------------------------------------------------------------ evaluation

    def models(self, a: int = 0, b: int | None = None) -> torch.Tensor:
        """Rows ``a:b`` of the models the nodes would deploy: ``params``, or x / w for push-sum."""
        p = self.params[a:b]
        return p / self.weight[a:b].to(p.dtype).unsqueeze(1) if self.rule == "push" else p

    @torch.no_grad()
    def evaluate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Test loss and accuracy of every node's model (device tensors ``[N]``)."""
        losses, accs = [], []
        y = self.y_test
        for a in range(0, self.n, self.eval_block):
            out = self.model.logits(self.models(a, a + self.eval_block), self.x_test)
            k, t, c = out.shape
            losses.append(F.cross_entropy(out.reshape(k * t, c), y.repeat(k), reduction="none").view(k, t).mean(1))
            accs.append((out.argmax(-1) == y).float().mean(1))
        return torch.cat(losses), torch.cat(accs)

    @torch.no_grad()
    def consensus_distance(self) -> float:
        """(1/N) sum_i ||x_i - x_bar||^2 in float64, in blocks (as `gossipfl.metrics.consensus_distance`)."""
        total = torch.zeros(self.layout.numel, dtype=torch.float64, device=self.device)
        for a in range(0, self.n, self.eval_block):
            total += self.models(a, a + self.eval_block).double().sum(0)
        mean = total / self.n
        acc = torch.zeros((), dtype=torch.float64, device=self.device)
        for a in range(0, self.n, self.eval_block):
            acc += ((self.models(a, a + self.eval_block).double() - mean) ** 2).sum()
        return float(acc / self.n)

    @torch.no_grad()
    def average_model_accuracy(self) -> float:
        if self.rule == "push":  # the average of the de-biased models x / w, a block at a time
            total = torch.zeros(self.layout.numel, dtype=torch.float64, device=self.device)
            for a in range(0, self.n, self.eval_block):
                total += self.models(a, a + self.eval_block).double().sum(0)
            mean = (total / self.n).to(self.params.dtype).unsqueeze(0)
        else:
            mean = self.params.mean(0, keepdim=True)
        out = self.model.logits(mean, self.x_test)[0]
        return float((out.argmax(-1) == self.y_test).float().mean())

    def _record(self, writer: Callable[[dict[str, Any]], None], t: float, *, node_rows: bool,
                evaluate: bool = True) -> dict[str, Any]:
        """Evaluate every node and write node rows (sampled) and one cluster row; a metric point."""
        if evaluate:
            self.test_loss, self.accuracy = self.evaluate()
        if node_rows and self.sample:
            idx = torch.tensor(self.sample, device=self.device)
            row_sum, row_count = self._stale_row
            cols = [self.step, self.test_loss, self.last_loss, self.accuracy, self.msgs_out, self.msgs_in,
                    self.stale_sum - row_sum, self.stale_count - row_count]
            step, loss, train_loss, acc, mo, mi, ss, sc = (c[idx].tolist() for c in cols)
            self._stale_row = (self.stale_sum.clone(), self.stale_count.clone())
            for k, i in enumerate(self.sample):
                writer({
                    "node": self.ids[i], "t": round(t, 6), "step": step[k], "loss": loss[k],
                    "train_loss": train_loss[k], "accuracy": acc[k],
                    "bytes_out": mo[k] * self.msg_bytes, "bytes_in": mi[k] * self.msg_bytes,
                    "msgs_out": mo[k], "msgs_in": mi[k], "staleness": ss[k] / sc[k] if sc[k] else None,
                })
        evaluated = bool(torch.isfinite(self.accuracy).any())
        row = {
            "node": None, "t": round(t, 6),
            "mean_step": float(self.step.double().mean()),
            "consensus_distance": self.consensus_distance(),
            "avg_model_accuracy": self.average_model_accuracy(),
            "mean_accuracy": float(self.accuracy.nanmean()) if evaluated else None,
        }
        writer(row)
        self.history.append(row)
        return row

    # ------------------------------------------------------------------ running

    def run(self, out: Path | None = None, *, progress: TextIO | None = None) -> dict[str, Any]:
        """Run to completion; write ``out/metrics.jsonl`` (if ``out``) and return the summary."""
        cfg = self.cfg
        writer = MetricsWriter(None if out is None else Path(out) / "metrics.jsonl")
        self.history: list[dict[str, Any]] = []
        self.progress = _Progress(progress, cfg.steps if cfg.duration is None else None, cfg.duration)
        wall0 = time.monotonic()
        try:
            if cfg.schedule == "sync":
                self._run_sync(writer)
            else:
                self._run_async(writer)
        finally:
            writer.close()
            self.progress.close()
        return self._summary(time.monotonic() - wall0)

    def _tick(self, *, force: bool = False) -> None:
        if self.progress.stream is not None:
            self.progress(self.sim_time, self.node_steps, self.node_steps / self.n, force=force)

    def _after_metric(self, row: dict[str, Any]) -> None:
        self.progress.accuracy = row["mean_accuracy"]
        self._tick(force=True)

    # ---------------------------------------------------------- sync schedule

    def _run_sync(self, writer: Callable[[dict[str, Any]], None]) -> None:
        cfg = self.cfg
        if not self.emulation.ideal:
            log.warning("the sync schedule ignores the emulation table (speeds, latency, loss, churn); "
                        "use schedule = \"async\" to apply it")
        self._record(writer, 0.0, node_rows=False, evaluate=False)
        for r in range(1, cfg.steps + 1):
            self.rounds(1)
            if r % cfg.eval_every == 0 or r == cfg.steps:
                self._after_metric(self._record(writer, self.sim_time, node_rows=True))
            else:
                self._tick()

    def rounds(self, k: int) -> None:
        """Run ``k`` rounds of the lock-step schedule, without metrics (what `scripts/bench_sim.py` times).

        Round r: merge round r-1's messages, one local step, then send if r is a gossip point.
        """
        for _ in range(k):
            self.round += 1
            if self._pending is not None and self._pending_in is not None:  # round r-1's messages: staleness 0
                self.stale_count += self._pending_in
                self.stale_max = torch.where(self._pending_in > 0, self.stale_max.clamp_min(0), self.stale_max)
                self._pending_in = None
            if self.rule == "mix":
                self._sync_mix_round(self._pending is not None)
            elif self.rule == "push":
                self._sync_push_round(self._pending is not None)
            elif self.rule == "grad":
                self._sync_grad_round(self._pending is not None)
            elif self.rule == "track":
                self._sync_track_round(self._pending is not None)
            elif self.rule == "choco":
                self._sync_choco_round(self._pending is not None)
            else:
                pending, arrived = self._pending, None
                if pending is not None and self.rule == "avg":
                    self._sync_avg_merge(*pending)
                elif pending is not None and self.update_merge:  # merged after the own step
                    arrived = (pending[1], self.params[pending[0]], self.age[pending[0]], pending[0])
                elif pending:  # (AD-PSGD exchanged within its round: nothing pending)
                    self._sync_age_merge(*pending)
                if self.trains:
                    self._sync_train()
                if arrived is not None:
                    recv, models, ages, send = arrived
                    self._update_merge(self.params, self.age, torch.arange(self.n, device=self.device), recv,
                                       models, ages, merge_waves(recv, send))
            self._pending = None
            self.step += 1
            if self.trains:
                self.age += 1
                if self.partitions:
                    self.part_ages += 1
            self.node_steps += self.n
            self.sim_time = self.round * self.emulation.step_time
            if self.round % self.cfg.gossip_every == 0:
                if self.time_varying:  # this round's graph; the next round merges with its weights
                    self._use_round(self.round)
                self._pending = self._sync_send()

    def _sync_train(self) -> None:
        v = self.velocity
        for a, b in self.blocks:
            self._train(self.params[a:b], None if v is None else v[a:b], slice(a, b))

    def _sync_mix_round(self, merging: bool) -> None:
        """Merge round r-1's models with one sparse product ``M @ params``, then step every node.

        Round r-1's messages are the models as they were at the end of round r-1, i.e. ``params``
        now, and every neighbour sent, so the merge is the mixing matrix M (see `mix_self_weight`)
        applied to all rows at once (one product beats per-block products on 1-2 cores and GPUs).
        """
        if merging:
            assert self.mixing is not None  # built for every mixing algorithm
            if self._spare is None:
                self._spare = torch.empty_like(self.params)
            out = self._spare
            torch.addmm(out, self.mixing, self.params, beta=0.0, out=out)
            self.params, self._spare = out, self.params
        if self.trains:
            self._sync_train()

    def _sync_push_round(self, merging: bool) -> None:
        """Push-sum round: fold in round r-1's shares (x and w through ``I + M``), then step.

        At the end of round r-1 every node kept its share, so its messages are its rows now
        scaled by ``send / keep``: one sparse product, as for D-PSGD."""
        if merging:
            assert self.mixing is not None
            if self._spare is None:
                self._spare = torch.empty_like(self.params)
            out = self._spare
            torch.addmm(out, self.mixing, self.params, beta=0.0, out=out)
            self.params, self._spare = out, self.params
            self.weight = (self._mixing64 @ self.weight.unsqueeze(1)).squeeze(1)
        if self.trains:
            self._sync_train()

    def _sync_grad_round(self, merging: bool) -> None:
        """Gradient exchange round: every in-neighbour's gradient of round r-1 arrived, so the
        accumulator is ``M @ grads`` (own gradient on the diagonal, `GradientExchange.merge`), and
        models mix like D-PSGD when round r-1's messages carried them; then the local step."""
        if merging:
            assert self.mixing is not None
            self.acc = self.mixing @ self.grad  # acc was applied and zeroed at the last step
            self.own_pending.fill_(False)
            self.have_acc.fill_(True)
            if self._sent_params:
                self.params = self.mixing @ self.params
        if self.trains:
            self._sync_train()

    def _sync_track_round(self, merging: bool) -> None:
        """DIGing round: mix round r-1's models and trackers (`DIGing.merge`: both with M, the own
        unmixed tracker kept for the step), then every node's tracking step."""
        if merging:
            assert self.mixing is not None
            self.y_mix = self.mixing @ self.y
            self.params = self.mixing @ self.params
        if self.trains:
            self._sync_train()
        self._started = True
        self.y_mix = None

    def _sync_choco_round(self, merging: bool) -> None:
        """CHOCO round: ``s += W_off q`` with round r-1's decoded differences, the consensus step
        (`choco_consensus`), then every node's SGD step; `_choco_send` makes this round's q."""
        if merging and self._choco_q is not None:
            assert isinstance(self.algorithm, CHOCO)
            if self.sampling == "exact":  # message by message, in sender order, as `CHOCO.merge`
                for i, (senders, weights) in enumerate(self.choco_in):
                    for j, w in zip(senders, weights, strict=True):
                        self.s[i].add_(self._choco_q[j], alpha=w)
            else:
                self.s.addmm_(self.mix_off, self._choco_q)
            self.params = choco_consensus(self.params, self.x_hat, self.s, self.weight_sum.unsqueeze(1),
                                          self.algorithm.gamma)
        self._choco_q = None
        if self.trains:
            self._sync_train()

    @torch.no_grad()
    def _choco_send(self) -> None:
        """`CHOCO.message` for every node: ``q = Q(x - x_hat)``, ``x_hat += q`` (decoded, as received)."""
        alg = self.algorithm
        assert isinstance(alg, CHOCO)
        comp, numel, dtype = alg.compressor, self.layout.numel, self.params.dtype
        diff = self.params - self.x_hat
        if self.sampling == "exact":  # node by node, each with its own generator
            q = torch.empty_like(diff)
            host = diff.cpu()  # the nodes' generators live on the host, like the nodes' own
            for i in range(self.n):
                wire_q = comp.compress(host[i], self.choco_gens[i], contract=alg.rescale)
                q[i] = comp.decompress(wire_q, numel, dtype, contract=alg.rescale).to(q.device)
        else:
            q = comp.decompress(comp.compress(diff, self.gen, contract=alg.rescale), numel, dtype,
                                contract=alg.rescale)
        self.x_hat += q
        self._choco_q = q

    def _targets(self, senders: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gossip learning: one random out-neighbour per sender; returns (senders, receivers).

        Epidemic Learning: ``fanout`` distinct random out-neighbours per sender (`_fanout_targets`)."""
        if self.rule == "avg":
            return self._fanout_targets(senders)
        deg = self.send_deg[senders]
        if self.sampling == "exact":
            recv = [self.rngs[i].choice(self.neighbour_lists[i]) if self.neighbour_lists[i] else -1
                    for i in senders.tolist()]
            r = torch.tensor(recv, dtype=torch.int64, device=self.device)
        elif not self.send_col.numel():
            r = torch.full_like(senders, -1)
        else:
            u = torch.rand(senders.shape[0], generator=self.gen, device=self.device, dtype=torch.float64)
            k = (u * deg).long().clamp_max((deg - 1).clamp_min(0))
            link = (self.send_ptr[senders] + k).clamp_max(self.send_col.shape[0] - 1)
            r = torch.where(deg > 0, self.send_col[link], -1)
        keep = r >= 0
        return senders[keep], r[keep]

    def _sync_send(self) -> tuple[torch.Tensor, ...]:
        """Count this round's messages; for gossip learning, return (senders, receivers)."""
        if self.rule in ("mix", "push", "grad", "track", "choco"):
            self.msgs_out += self.send_deg
            self.msgs_in += self.recv_deg
            self._pending_in = self.recv_deg.clone()
            if self.rule == "choco":
                self._choco_send()
            if self.rule == "grad":
                assert isinstance(self.algorithm, GradientExchange)
                self._sent_params = self.round % self.algorithm.average_every == 0
            if self.rule == "push":  # every sender keeps its own share (PushSum.message)
                self.params.mul_(self.keep.to(self.params.dtype).unsqueeze(1))
                self.weight.mul_(self.keep)
            return ()
        send, recv = self._targets(torch.arange(self.n, device=self.device))
        if self.rule == "pair":  # AD-PSGD: the exchanges of this round, one after another in node order
            self._exchange(send, recv, _pair_waves(send, recv))
            return ()
        self.msgs_out.index_add_(0, send, torch.ones_like(send))
        self.msgs_in.index_add_(0, recv, torch.ones_like(recv))
        self._pending_in = torch.bincount(recv, minlength=self.n)
        if self.partitions:  # one sender, one target: the part and its age as sent now
            return (send, recv, *self._send_parts(send))
        return send, recv

    def _fanout_targets(self, senders: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`EpidemicLearning.targets` for many senders: (senders, receivers), one row per message."""
        alg = self.algorithm
        assert isinstance(alg, EpidemicLearning)
        if self.sampling == "exact":  # each node's own random.Random, as the node draws them
            send_l: list[int] = []
            recv_l: list[int] = []
            for i in senders.tolist():
                peers = self.neighbour_lists[i]
                picked = alg.targets(peers, self.rngs[i])  # node indices here, not ids
                send_l += [i] * len(picked)
                recv_l.extend(int(j) for j in picked)
            return (torch.tensor(send_l, dtype=torch.int64, device=self.device),
                    torch.tensor(recv_l, dtype=torch.int64, device=self.device))
        deg = self.send_deg[senders]
        if alg.fanout:
            s = deg.clamp_max(alg.fanout)
        else:  # ceil(log2(deg + 1)), at least 1, at most deg (`fanout_for`)
            s = torch.minimum(torch.log2(deg.double() + 1).ceil().long().clamp_min(1), deg)
        # every out-link of every sender gets a random key; a sender keeps its s smallest
        which = torch.repeat_interleave(torch.arange(senders.shape[0], device=self.device), deg)
        first = torch.cumsum(deg, 0) - deg
        link = self.send_ptr[senders][which] + torch.arange(which.shape[0], device=self.device) - first[which]
        keys = torch.rand(which.shape[0], generator=self.gen, device=self.device, dtype=torch.float64)
        order = torch.argsort(which.double() + keys)  # by sender, then by key (keys are < 1)
        by = which[order]
        rank = torch.arange(order.shape[0], device=self.device) - first[by]  # place in its sender's draw
        keep = order[rank < s[by]]
        return senders[which[keep]], self.send_col[link[keep]]

    def _sync_avg_merge(self, send: torch.Tensor, recv: torch.Tensor) -> None:
        """Epidemic Learning: every receiver becomes the plain average of its own model and the
        models that arrived (`plain_average`), all receivers in one sparse product."""
        n, p = self.n, self.params
        count = torch.bincount(recv, minlength=n).to(p.dtype)
        own = 1.0 / (1.0 + count)
        order, crow = _by_row(recv, send, n, n)
        out = torch.sparse.mm(_csr(crow, send[order], own[recv[order]], (n, n)), p)
        self.params = out.addcmul_(p, own.unsqueeze(1))

    @torch.no_grad()
    def _exchange(self, init: torch.Tensor, resp: torch.Tensor, waves: list[torch.Tensor],
                  reply_ok: torch.Tensor | None = None) -> None:
        """AD-PSGD exchanges (`ADPSGD.respond` / `apply_reply`), wave by wave (a node appears at most
        once per wave): the responder moves towards the initiator's model, the initiator towards
        the responder's model before it moved.

        Sync (``reply_ok`` None): both at once, the initiator's model as it is now. Async: the
        responder moves towards the snapshot the initiator sent (`_sent`); the initiator's delta
        against that snapshot waits in `_reply_delta` for the reply's arrival (`_apply_replies`),
        and is dropped where ``reply_ok`` is False (the reply was lost: the responder moved, the
        initiator does not)."""
        alg = self.algorithm
        assert isinstance(alg, ADPSGD)
        p = self.params
        for wave in waves:
            i, j = init[wave], resp[wave]
            xj = p[j]
            if reply_ok is None:
                xi = p[i]
                p[j] = xj + exchange_delta(xj, xi, alg.mix)
                p[i] = xi + exchange_delta(xi, xj, alg.mix)
                continue
            xi = self._sent[i]
            p[j] = xj + exchange_delta(xj, xi, alg.mix)
            ok = reply_ok[wave]
            self._reply_delta[i[ok]] = exchange_delta(xi[ok], xj[ok], alg.mix)
            self._reply_due[i[ok]] = True
        ok = torch.ones_like(init) if reply_ok is None else reply_ok.long()
        gap = self.step.index_select(0, resp) - self.step.index_select(0, init)
        self._tally(resp, gap)  # the responder merges the request ...
        replied = ok.bool()
        self._tally(init[replied], -gap[replied])  # ... and the initiator the reply
        # as the node counts: the responder its request and reply, the initiator both once the reply is in
        self.msgs_in.index_add_(0, resp, torch.ones_like(resp))
        self.msgs_out.index_add_(0, resp, torch.ones_like(resp))
        self.msgs_out.index_add_(0, init, ok)
        self.msgs_in.index_add_(0, init, ok)

    def _pair_request(self, senders: torch.Tensor, sent_at: torch.Tensor) -> None:
        """AD-PSGD initiators (after their step): pick a neighbour, send the request, and wait for
        the reply. A lost request leaves the initiator waiting out ``timeout``."""
        if not senders.numel():
            return
        emu, dev = self.emulation, self.device
        pairs = []
        for r, idx in self._round_groups(senders):  # partners on each initiator's round graph
            self._use_round(r)
            pairs.append(self._targets(senders.index_select(0, idx)))
        init, resp = (torch.cat(c) for c in zip(*pairs, strict=True))
        self.exchanges_tried += init.shape[0]
        at = sent_at[torch.searchsorted(senders, init)]
        arrive = at + self._delay(init, resp)
        ok = torch.ones_like(init, dtype=torch.bool)
        if emu.loss:
            ok = torch.rand(init.shape[0], generator=self.gen, device=dev) >= emu.loss
            self.lost += (~ok).sum()
        self._hold[init[~ok]] = at[~ok] + self.cfg.timeout
        self._sent[init] = self.params[init]  # the snapshot the request carries
        self._idle_from[init] = at  # from now its lock is free: it answers others' requests at once
        self._idle_to[init] = torch.where(ok, math.inf, at + self.cfg.timeout)  # a lost one: the timeout
        self.waiting[init[ok]] = True
        zero = torch.zeros_like(init)
        new = Messages(resp, init, zero, zero, arrive, torch.zeros(init.shape[0], device=dev),
                       self.step.index_select(0, init)).select(ok)
        self._requests = self._requests.extend(new)

    def _delay(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        """One message's delay on each link src -> dst: latency, jitter, transfer of a model."""
        emu = self.emulation
        delay = emu.link_latency(src, dst, seed=self.cfg.seed)
        if emu.jitter:  # uniform in +-jitter, never negative
            u = torch.rand(src.shape[0], dtype=torch.float64, generator=self.gen, device=src.device)
            delay = (delay + (2 * u - 1) * emu.jitter).clamp_min(0.0)
        return delay + emu.transfer_seconds(self.msg_bytes)

    def _pair_deliver(self, t_next: torch.Tensor, t_end: float, up: torch.Tensor, closed: torch.Tensor) -> torch.Tensor:
        """AD-PSGD requests that reached their responder by this time slice (the node's
        ``rpc_exchange``). A responder whose lock is free when the request arrives (it waits for
        its own exchange's reply, `_idle_from` to `_idle_to`) answers at once. One that is
        computing answers when its step ends: its next step start, or the moment it sent its own
        request if it did; if that is more than ``timeout / 2`` after the arrival, it answers
        busy (423). An offline responder loses the request (the initiator waits out
        ``timeout``); a finished one answers 503. Requests answered in one slice exchange in the
        order they are answered; the reply, which may be lost, frees the initiator. (A request's
        ``weight`` marks it as already looked at: it arrived while its responder computed.
        Timeouts of lost requests' replies count from the request's arrival: a latency late.)
        Returns ``t_next`` with the freed initiators' next step times."""
        req = self._requests
        self._seen_until = t_end
        if not len(req):
            return t_next
        j, i, arrive = req.recv, req.send, req.arrive
        here = arrive < t_end
        queued = req.weight > 0.5
        idle = here & ~queued & (arrive >= self._idle_from[j]) & (arrive < self._idle_to[j])
        # when a computing responder's lock frees: the end of its step
        release = torch.where(self.waiting[j], self._idle_from[j], t_next[j])
        waited = arrive + self.cfg.timeout / 2  # rpc_exchange's wait for the lock
        computing = here & ~idle
        gone = here & ~up[j]
        done = here & ~gone & closed[j]
        live = ~gone & ~done
        late = computing & live & (release < t_end) & (release >= arrive) & (release <= waited)
        answer = (idle & live) | late
        busy = computing & live & ~late & (waited < t_end) & (release > waited)
        at = torch.where(idle, arrive, release)  # when the responder answers
        back = torch.where(busy, waited, arrive) + self._delay(j, i)  # a refusal's way back
        free = torch.full_like(arrive, math.inf)
        free = torch.where(busy | done, back, free)
        free = torch.where(gone, arrive + self.cfg.timeout, free)
        self.lost += gone.sum()
        if bool(answer.any()):
            ex = answer.nonzero().squeeze(1)
            ok = torch.ones(ex.shape[0], dtype=torch.bool, device=self.device)
            if self.emulation.loss:
                ok = torch.rand(ex.shape[0], generator=self.gen, device=self.device) >= self.emulation.loss
                self.lost += (~ok).sum()
            ii, jj = i[ex], j[ex]
            order = torch.argsort(at[ex], stable=True)  # answered in time order
            ex, ii, jj, ok = ex[order], ii[order], jj[order], ok[order]
            self._exchange(ii, jj, merge_waves(jj, at[ex], ii), ok)
            reply = at[ex] + self._delay(jj, ii)
            free[ex] = torch.where(ok, reply, arrive[ex] + self.cfg.timeout)
        settled = busy | gone | done | answer
        t_next = t_next.clone()
        t_next[i[settled]] = free[settled]
        self.waiting[i[settled]] = False
        self._idle_to[i[settled]] = free[settled]  # idle (answering at once) until its reply is in
        req.weight = torch.where(here, 1.0, req.weight)  # the rest wait for their responder's lock
        self._requests = req.select(~settled)
        return t_next

    def _apply_replies(self, rows: torch.Tensor | None = None) -> None:
        """AD-PSGD async: add the deltas of replies that are in (rows: those nodes; None: all)."""
        idx = self._reply_due.nonzero().squeeze(1) if rows is None else rows[self._reply_due[rows]]
        if idx.numel():
            self.params.index_add_(0, idx, self._reply_delta.index_select(0, idx))
            self._reply_due[idx] = False

    def _sync_age_merge(self, send: torch.Tensor, recv: torch.Tensor, parts: torch.Tensor | None = None,
                        part_age: torch.Tensor | None = None) -> None:
        # What each sender sent at the end of round r-1 is its model now, before anyone merges.
        models, ages = self.params[send], self.age[send] if part_age is None else part_age
        self._age_merge(self.params, self.age, recv, models, ages, merge_waves(recv, send), parts,
                        self.part_ages if self.partitions else None)

    # ---------------------------------------------------------- async schedule

    def _run_async(self, writer: Callable[[dict[str, Any]], None]) -> None:
        if self.algorithm.requirements.rounds:
            self._run_rounds_async(writer)
            return
        cfg, emu, n, dev = self.cfg, self.emulation, self.n, self.device
        dur_h = emu.step_seconds(n, seed=cfg.seed)
        dur = dur_h.to(dev)
        width = emu.slice_width(dur_h)
        delay_max = emu.max_latency + emu.jitter + emu.transfer_seconds(self.msg_bytes)
        # How many of a sender's recent models a message may still need: those it sends during the
        # longest delay plus one time slice (D-PSGD merges only the newest that arrived); gossip
        # learning and push-sum merge every message, so also those sent while a slow receiver
        # finishes its step.
        fastest, slowest = float(dur_h.min()), float(dur_h.max())
        span = delay_max + width + (slowest if self.rule in ("age", "push", "grad") else 0.0)
        depth = 1 if emu.ideal or self.rule == "pair" else 2 + math.ceil(span / fastest)  # AD-PSGD: no ring
        cap = max(2, min(MAX_RING, RING_BYTES // max(1, n * self.layout.numel * self.params.element_size())))
        if depth > cap:
            log.warning("the snapshot ring keeps the last %d models per node, not the %d these delays "
                        "need (memory limit); messages that refer to older ones count as expired", cap, depth)
            depth = cap
        ring = SnapshotRing(depth, n, self.layout.numel, dtype=self.params.dtype, device=dev)
        # gradient exchange: `ring` holds the gradients sent (age slot: 1 if the model went too),
        # this one the models, slot for slot
        self._model_ring = SnapshotRing(depth, n, self.layout.numel, dtype=self.params.dtype, device=dev) \
            if self.rule == "grad" else None
        inflight = Messages.empty(dev)
        t_next = torch.zeros(n, dtype=torch.float64, device=dev)
        up = torch.ones(n, dtype=torch.bool, device=dev)
        mean_up, mean_down = emu.churn_means()
        churn = emu.churn > 0
        t_toggle = self._exponential(n, mean_up) if churn else None
        eval_dt = cfg.eval_every * emu.step_time
        next_eval = eval_dt
        self._record(writer, 0.0, node_rows=True)
        inf = torch.tensor(math.inf, dtype=torch.float64, device=dev)
        # As in the local cluster, a node that has done its steps lingers (merges and gossips at its
        # own pace, no training) until the last node is done; with a duration all stop together.
        linger = cfg.duration is None and not self.algorithm.requirements.rounds
        while True:
            training = (t_next < cfg.duration) if cfg.duration is not None else (self.step < cfg.steps)
            active = torch.ones_like(training) if linger else training
            nxt = torch.stack([torch.where(up & active, t_next, inf).min(),
                               torch.where(up & training, t_next, inf).min()])
            if t_toggle is not None:
                nxt = torch.minimum(nxt, torch.stack([torch.where(active, t_toggle, inf).min(),
                                                      torch.where(training, t_toggle, inf).min()]))
            if self.rule == "pair" and len(self._requests):  # requests still to look at, and replies to wait for
                req = self._requests
                # a request is looked at when it arrives (or at once, if it arrived within a slice
                # already done) and, if it waits for a computing responder's lock, when that lock
                # frees (the responder's step end: its next step start, an event anyway, or the
                # moment it sent a request of its own) or when its wait runs out (busy)
                queued = req.weight > 0.5
                release = torch.where(self.waiting[req.recv], self._idle_from[req.recv], inf)
                wait_end = torch.minimum(req.arrive + cfg.timeout / 2, release)
                due = torch.where(queued, wait_end, req.arrive).clamp_min(self._seen_until)
                nxt = torch.minimum(nxt, torch.stack([due.min(), req.arrive.min()]))
            t0, t_train = nxt.tolist()  # the next event times: one read per time slice
            if math.isinf(t_train):  # nobody trains any more: the run is over
                break
            if math.isinf(t0):  # cannot happen: someone trains, so someone has a next event
                raise RuntimeError("vectorised engine: no next event while nodes still train (a bug)")
            while t0 >= next_eval:  # nothing has happened between next_eval and t0
                self.sim_time = next_eval
                self._after_metric(self._record(writer, next_eval, node_rows=True))
                next_eval += eval_dt
            if t_toggle is not None:
                flip = (t_toggle <= t0) & active
                coming = flip & ~up
                t_next = torch.where(coming, torch.maximum(t_next, t_toggle), t_next)
                up = up ^ flip
                mean = torch.where(up, mean_up, mean_down).to(torch.float64)
                t_toggle = torch.where(flip, t_toggle + self._exponential(n, 1.0) * mean, t_toggle)
            t_end = t0 + width
            self.sim_time = t0
            if self.rule == "pair":  # exchanges happen at the responder's step start, before the batch
                # a node waiting for its reply (t_next = inf) has not finished, whatever `training` says
                t_next = self._pair_deliver(t_next, t_end, up, ~active & ~self.waiting)
            stepping = up & active & (t_next < t_end)
            inflight = self._async_batch(stepping, training, t_next, t_end, dur, up, ~active, ring, inflight)
            tick = torch.where(training, dur, dur * cfg.gossip_every)  # a lingering node's gossip period
            # a sender's next step starts when its message went out (after its previous send)
            t_next = torch.where(stepping, torch.maximum(t_next + tick, self._next_start), t_next)
            if self.rule == "pair":  # an initiator waits for its reply (inf until the responder answers)
                t_next = torch.where(self.waiting, inf, torch.maximum(t_next, self._hold))
                self._hold.zero_()
            self._tick()
        self.sim_time = float(t_next.max()) if cfg.duration is None else cfg.duration
        if self.rule == "pair":
            self._apply_replies()  # the last replies (the node waits for them before it stops)
            if self.exchanges_tried and not int(self.msgs_out.sum()):
                log.warning("adpsgd: none of %d exchanges completed (partners computing for more than "
                            "timeout / 2, offline, or links lost them); the models never mixed",
                            self.exchanges_tried)
        while next_eval < self.sim_time:
            self._after_metric(self._record(writer, next_eval, node_rows=True))
            next_eval += eval_dt
        self._after_metric(self._record(writer, self.sim_time, node_rows=True))

    def _run_rounds_async(self, writer: Callable[[dict[str, Any]], None]) -> None:
        """Round algorithms (DIGing, CHOCO) on the event clock: neighbour-local rounds.

        A node starts step s + 1 when its step s is done and, after a gossip round, when every
        in-neighbour's round-s message has arrived (the local cluster's ``_wait_for_round``); a
        gossip step's message goes out once the node's own previous send is done (one send at a
        time), and the next step starts after that.
        Delivery is lossless and every node merges exactly its in-neighbours' round-s messages,
        so the numbers are those of the sync schedule whatever the speeds and delays; only the
        clock differs: with ``out_i(s) = max(end_i(s), send_done_i(s-1))`` the moment node i's
        round-s message leaves, ``start_i(s+1) = max(out_i(s), max_j out_j(s) + delay_ji)``.
        Nodes are therefore advanced round by round, and a metric row after round r carries the
        time the last node finished it. (The cluster's bounded wait, ``timeout``, is not modelled:
        a neighbour is always waited for.)
        """
        cfg, emu, n, dev = self.cfg, self.emulation, self.n, self.device
        dur = emu.step_seconds(n, seed=cfg.seed).to(dev)
        start = torch.zeros(n, dtype=torch.float64, device=dev)
        self._record(writer, 0.0, node_rows=True)  # as the other async runs: the initial models too
        for r in range(1, cfg.steps + 1):
            self.rounds(1)  # round r's messages went out on the current links (graph r if time-varying)
            end = start + dur
            start = end
            if r % cfg.gossip_every == 0 and self.send_col.numel():
                src = torch.repeat_interleave(torch.arange(n, device=dev), self.send_deg)
                dst = self.send_col
                out = torch.maximum(end, self._send_done)  # the message waits for the previous send
                arrive = out[src] + self._delay(src, dst)
                start = out.scatter_reduce(0, dst, arrive, reduce="amax")  # the in-neighbours' messages
                self._send_done = out.scatter_reduce(0, src, arrive, reduce="amax")  # its own sends
            self.sim_time = float(end.max())
            if r % cfg.eval_every == 0 or r == cfg.steps:
                self._after_metric(self._record(writer, self.sim_time, node_rows=True))
            else:
                self._tick()

    def _gradex_merge(self, p: torch.Tensor, rows: torch.Tensor, r: torch.Tensor, got: Messages,
                      ring: SnapshotRing) -> None:
        """`GradientExchange.merge` for the receivers ``rows`` (``p`` their models, ``r`` each
        message's receiver position in ``rows``): every gradient that arrived counts once, with
        its sender's weight; a receiver's own pending gradient gets the weight its present senders
        leave; the newest model of each sender that sent one is mixed in like D-PSGD."""
        if not len(got):
            return
        count, n, dev = rows.shape[0], self.n, self.device
        depth_n = ring.depth * n
        order, crow = _by_row(r, ring.rows(got), count, depth_n)
        rr, cols, w = r[order], ring.rows(got)[order], got.weight[order]
        acc = self.acc.index_select(0, rows).addmm_(_csr(crow, cols, w, (count, depth_n)), ring.flat)
        # own gradient: weight 1 - sum over present senders (each counted once)
        fresh = latest_per_pair(got, n)
        wsum = torch.zeros(count, dtype=w.dtype, device=dev).index_add_(0, pos_of(fresh.recv, rows), fresh.weight)
        present = torch.zeros(count, dtype=torch.bool, device=dev)
        present[rr] = True
        own = present & self.own_pending.index_select(0, rows)
        acc.addcmul_(self.grad.index_select(0, rows), (own.to(w.dtype) * (1.0 - wsum)).unsqueeze(1))
        self.acc.index_copy_(0, rows, acc)
        self.own_pending.index_copy_(0, rows, self.own_pending.index_select(0, rows) & ~present)
        self.have_acc.index_copy_(0, rows, self.have_acc.index_select(0, rows) | present)
        # models: the newest of each sender whose message carried one
        assert self._model_ring is not None
        models = fresh.select(ring.age.view(-1)[ring.rows(fresh)] > 0.5)
        if len(models):
            mr = pos_of(models.recv, rows)
            order, crow = _by_row(mr, ring.rows(models), count, depth_n)
            mr, cols, w = mr[order], ring.rows(models)[order], models.weight[order]
            wsum = torch.zeros(count, dtype=w.dtype, device=dev).index_add_(0, mr, w)
            p.mul_(mix_self_weight(wsum).unsqueeze(1))
            p.addmm_(_csr(crow, cols, w, (count, depth_n)), self._model_ring.flat)

    def _exponential(self, k: int, mean: float) -> torch.Tensor:
        return torch.empty(k, dtype=torch.float64, device=self.device).exponential_(generator=self.gen) * mean

    def _async_batch(self, stepping: torch.Tensor, training: torch.Tensor, t_next: torch.Tensor, t_end: float,
                     dur: torch.Tensor, up: torch.Tensor, closed: torch.Tensor, ring: SnapshotRing,
                     inflight: Messages) -> Messages:
        """All steps that start in one time slice: deliver, merge, step, send.

        ``training`` marks nodes with steps left (the others linger: merge and send, no step);
        ``closed`` marks nodes that have stopped and refuse messages.
        """
        n, dev, emu = self.n, self.device, self.emulation
        rows = stepping.nonzero().squeeze(1)  # host sync: the batch size
        count = rows.shape[0]
        if not count:
            return inflight
        if self.rule == "pair":  # replies that came in: their delta, before the step (as the node)
            self._apply_replies(rows)
        tr = training.index_select(0, rows)
        everyone_trains = bool(tr.all())  # host sync; False only near the end of a run
        self.node_steps += int(tr.sum()) if not everyone_trains else count
        full = count == n  # every node steps (identical nodes): work on the state itself, no copies
        p = self.params if full else self.params.index_select(0, rows)
        age = self.age if full else self.age.index_select(0, rows)
        part_ages = None
        if self.partitions:
            part_ages = self.part_ages if full else self.part_ages.index_select(0, rows)
        arrived: tuple[torch.Tensor, ...] | None = None
        # deliveries: messages that arrived by the start of their receiver's step
        if len(inflight):
            m = inflight
            deliver = stepping[m.recv] & (m.arrive <= t_next[m.recv])
            dropped = ~up[m.recv] & (m.arrive < t_end)  # the receiver is offline: lost
            self.lost += dropped.sum()
            done = closed[m.recv]  # the receiver has stopped (it would refuse the message)
            inflight = m.select(~(deliver | dropped | done))
            got = m.select(deliver)
            if len(got):
                self.msgs_in.index_add_(0, got.recv, torch.ones_like(got.recv))
                self._tally(got.recv, self.step.index_select(0, got.recv) - got.step)  # every one delivered
                pos = torch.full((n,), -1, dtype=torch.int64, device=dev)
                pos[rows] = torch.arange(count, device=dev)
                if self.rule in ("mix", "avg"):
                    got = latest_per_pair(got, n)
                ok = ring.valid(got)
                self.expired += (~ok).sum()
                got = got.select(ok)
                r = pos[got.recv]
                if self.rule == "grad":
                    self._gradex_merge(p, rows, r, got, ring)
                elif self.rule in ("mix", "push", "avg"):
                    order, crow = _by_row(r, ring.rows(got), count, ring.depth * n)
                    r, cols, w = r[order], ring.rows(got)[order], got.weight[order]
                    if self.rule == "avg":  # plain average: 1 / (1 + arrivals) for each model
                        w = (1.0 / (1.0 + torch.bincount(r, minlength=count).to(w.dtype)))[r]
                    if self.rule in ("mix", "avg"):
                        wsum = torch.zeros(count, dtype=w.dtype, device=dev).index_add_(0, r, w)
                        # mix: own model times mix's self weight, plus the fresh models' weighted sum
                        p.mul_(mix_self_weight(wsum).unsqueeze(1))
                    else:  # push-sum: add every share (x and w) that arrived; no message is dropped
                        mass = w.double() * ring.age.view(-1)[cols].double()
                        self.weight.index_add_(0, got.recv[order], mass)
                    p.addmm_(_csr(crow, cols, w, (count, ring.depth * n)), ring.flat)
                elif self.update_merge:  # merged after the own step, below
                    flat = ring.rows(got)
                    arrived = (r, ring.flat[flat], ring.age.view(-1)[flat], got.arrive, got.send)
                else:
                    waves = merge_waves(r, got.arrive, got.send)
                    flat = ring.rows(got)
                    parts = got.weight.long() if self.partitions else None  # the part rides in the weight
                    self._age_merge(p, age, r, ring.flat[flat], ring.age.view(-1)[flat], waves, parts, part_ages)
        if self.trains and everyone_trains:
            v = self.velocity
            if v is not None and not full:
                v = v.index_select(0, rows)
            self._train_rows(p, v, rows)
            if self.velocity is not None and v is not None and not full:
                self.velocity.index_copy_(0, rows, v)
        elif self.trains:
            self._train_some(p, rows, tr.nonzero().squeeze(1))
        if arrived is not None and self.trains:  # update-merge: only nodes that stepped (a lingering node has none)
            r, models, ages, at, sender = (a[tr.index_select(0, arrived[0])] for a in arrived)
            self._update_merge(p, age, rows, r, models, ages, merge_waves(r, at, sender))
        if self.trains:
            age += tr.to(age.dtype)
            if part_ages is not None:
                part_ages += tr.to(part_ages.dtype).unsqueeze(1)
        if not full:
            self.params.index_copy_(0, rows, p)
            self.age.index_copy_(0, rows, age)
            if part_ages is not None:
                self.part_ages.index_copy_(0, rows, part_ages)
        step = self.step.index_select(0, rows) + tr.long()
        self.step.index_copy_(0, rows, step)
        # sends, at the end of each step (a lingering node sends at every tick)
        if self.cfg.gossip_every == 1 and everyone_trains:
            senders, models, ages = rows, p, age
        else:
            which = ((step % self.cfg.gossip_every == 0) | ~tr).nonzero().squeeze(1)
            senders, models, ages = rows[which], p.index_select(0, which), age[which]
        if not senders.numel():
            return inflight
        if self.rule == "pair":  # only training nodes initiate (a lingering one still answers)
            keep = tr.index_select(0, which) if not (self.cfg.gossip_every == 1 and everyone_trains) else tr
            self._pair_request(senders[keep], (t_next + dur).index_select(0, senders[keep]))
            return inflight
        groups = self._round_groups(senders)
        if self.rule == "push":
            # PushSum.message: the sender keeps its own share of x and w; the ring holds what it
            # kept (its messages scale that by send / keep) and, in the age slot, its kept w.
            keep = torch.empty(senders.shape[0], dtype=torch.float64, device=dev)
            for rnd, idx in groups:  # shares of each sender's round graph
                self._use_round(rnd)
                keep[idx] = self.keep.index_select(0, senders.index_select(0, idx))
            models = models * keep.to(models.dtype).unsqueeze(1)
            self.params.index_copy_(0, senders, models)
            kept_w = self.weight.index_select(0, senders) * keep
            self.weight.index_copy_(0, senders, kept_w)
            ages = kept_w.to(ages.dtype)
        if self.rule == "grad":
            # GradientExchange.message: the gradient always, the model every average_every steps
            # (the flag rides in the gradient ring's age slot; both rings fill slot for slot)
            assert isinstance(self.algorithm, GradientExchange)
            assert self._model_ring is not None
            sent_step = self.step.index_select(0, senders)
            flag = (sent_step % self.algorithm.average_every == 0).to(ages.dtype)
            self._model_ring.record(senders, models, flag)
            models, ages = self.grad.index_select(0, senders), flag
        parts = None
        if self.partitions:  # PartitionedGossip.message: one random part, with that part's age
            parts, ages = self._send_parts(senders)
            ages = ages.to(models.dtype)
        slot, seq = ring.record(senders, models, ages)
        out = [self._message_rows(senders, idx, rnd, parts) for rnd, idx in groups]
        send, recv, weight, which = out[0] if len(out) == 1 else [torch.cat(c) for c in zip(*out, strict=True)]
        # After the step (a lingering node computes nothing), once the node's previous send is done
        # (`Node._send_idle`: one send buffer); the next step starts then, a linger tick later.
        sent_at = t_next + torch.where(training, dur, 0.0)
        out_at = torch.maximum(sent_at.index_select(0, senders), self._send_done.index_select(0, senders))
        sent_at = sent_at.index_copy(0, senders, out_at)
        linger_tick = torch.where(training[senders], 0.0, dur[senders] * self.cfg.gossip_every)
        self._next_start.index_copy_(0, senders, out_at + linger_tick)
        arrive = sent_at[send] + self._delay(send, recv)
        self._send_done.scatter_reduce_(0, send, arrive, reduce="amax")  # all targets at once, lost ones too
        keep = ~closed[recv]
        if emu.loss:
            lost = torch.rand(send.shape[0], generator=self.gen, device=dev) < emu.loss
            self.lost += (lost & keep).sum()
            keep &= ~lost
        self.msgs_out.index_add_(0, send, keep.long())
        sent_step = self.step.index_select(0, send)
        new = Messages(recv, send, slot[which], seq[which], arrive, weight, sent_step).select(keep)
        return inflight.extend(new)

    # ------------------------------------------------------------------ results

    def _summary(self, wall: float) -> dict[str, Any]:
        final = self.history[-1]
        acc = self.accuracy.cpu()
        loss = self.test_loss.cpu()
        steps = self.step.cpu()
        mo, mi = self.msgs_out.cpu(), self.msgs_in.cpu()
        stale_sum, stale_count = self.stale_sum.tolist(), self.stale_count.tolist()
        summary: dict[str, Any] = {
            "engine": "vectorized",
            "transport": "simulated",
            "schedule": self.cfg.schedule,
            "device": str(self.device),
            "sampling": self.sampling,
            "kernel": self.model.kind,
            "nodes": self.n,
            "mean_accuracy": float(acc.mean()),
            "min_accuracy": float(acc.min()),
            "max_accuracy": float(acc.max()),
            "avg_model_accuracy": final["avg_model_accuracy"],
            "consensus_distance": final["consensus_distance"],
            "initial_consensus_distance": self.history[0]["consensus_distance"],
            "messages": int(mo.sum()),
            "bytes": int(mo.sum()) * self.msg_bytes,
            "rejected": 0,
            "lost": int(self.lost),
            "expired": int(self.expired),
            "round_timeouts": 0,  # neighbour-local rounds always wait (see _run_rounds_async)
            "step_overruns": 0.0,  # simulated steps take exactly their emulated time
            **self._staleness_summary(),
            "wall_seconds": round(wall, 3),
            "simulated_seconds": self.sim_time,
            "node_steps": int(steps.sum()),
            "node_steps_per_second": int(steps.sum()) / max(wall, 1e-9),
            "per_node_sampled": len(self.sample) < self.n,
            "per_node": {
                self.ids[i]: {
                    "accuracy": float(acc[i]), "loss": float(loss[i]), "steps": int(steps[i]),
                    "msgs_out": int(mo[i]), "msgs_in": int(mi[i]),
                    "bytes_out": int(mo[i]) * self.msg_bytes, "bytes_in": int(mi[i]) * self.msg_bytes,
                    "staleness": stale_sum[i] / stale_count[i] if stale_count[i] else None,
                }
                for i in self.sample
            },
        }
        if not self.trains:
            summary.update(self._consensus_rates())
        return summary

    def _staleness_summary(self) -> dict[str, float | int | None]:
        """Mean and maximum staleness (local steps) over every merged message, as the cluster reports."""
        count = int(self.stale_count.sum())
        if not count:
            return {"staleness_mean": None, "staleness_max": None}
        return {"staleness_mean": float(self.stale_sum.sum()) / count,
                "staleness_max": int(self.stale_max[self.stale_count > 0].max())}

    def _consensus_rates(self) -> dict[str, float]:
        """Measured per-round contraction of the consensus distance, and SLEM(W)^2 of the graph."""
        pts = [(h["mean_step"], h["consensus_distance"]) for h in self.history if h["consensus_distance"] > 1e-20]
        out: dict[str, float] = {}
        if len(pts) >= 3:
            xs = torch.tensor([q[0] for q in pts], dtype=torch.float64)
            ys = torch.log(torch.tensor([q[1] for q in pts], dtype=torch.float64))
            denom = ((xs - xs.mean()) ** 2).sum()
            if denom > 0:
                out["consensus_rate"] = float(torch.exp(((xs - xs.mean()) * (ys - ys.mean())).sum() / denom))
        if self.time_varying:  # no single graph's spectral gap predicts a changing one
            return out
        try:
            kind = "push_sum" if self.rule == "push" else self.cfg.weights  # push-sum: uniform shares
            out["predicted_rate"] = (1.0 - graph_spectral_gap(self.graph, kind)) ** 2
        except ConfigError as exc:  # the iterative eigensolver may give up on huge graphs
            log.warning("predicted consensus rate unavailable: %s", exc)
        return out


def _checked(cfg: RunConfig) -> tuple[Algorithm, str, Emulation, Schedule]:
    """Everything about ``cfg`` the vectorised engine refuses, as ConfigErrors naming the key."""
    _device(cfg.device)
    algorithm = build_algorithm(cfg)
    if type(algorithm) in (DPSGD, Averaging):
        rule = "mix"
    elif type(algorithm) in (PushSum, PushSumAveraging):
        rule = "push"
    elif type(algorithm) is EpidemicLearning:
        rule = "avg"
    elif type(algorithm) is GradientExchange:
        rule = "grad"
    elif type(algorithm) is DIGing:
        rule = "track"
    elif type(algorithm) is CHOCO:
        rule = "choco"
    elif type(algorithm) in (GossipLearning, PartitionedGossip):
        rule = "age"
    elif type(algorithm) is ADPSGD:
        rule = "pair"
    else:
        raise ConfigError(f"algorithm: {cfg.algorithm!r} is not available in the vectorised engine "
                          "(it runs the built-in algorithms only); use engine = \"cluster\"")
    if cfg.schedule == "sync" and cfg.duration is not None:
        raise ConfigError("duration: the sync schedule counts rounds; give steps instead")
    emulation = parse_emulation(cfg.emulation)
    if algorithm.requirements.rounds and cfg.schedule == "async":
        if cfg.duration is not None:
            raise ConfigError(f"duration: {cfg.algorithm} runs in neighbour-local rounds, which the vectorised "
                              "engine advances round by round; give steps instead")
        if emulation.churn:
            raise ConfigError(f"emulation.churn: {cfg.algorithm} waits for every neighbour each round; the "
                              "vectorised engine does not model an offline neighbour's timeout (use "
                              "engine = \"cluster\")")
    emulation.node_speeds(cfg.nodes, seed=cfg.seed)  # per-node factors must match the node count
    schedule = build_schedule(cfg.topology, cfg.nodes, seed=cfg.seed)
    time_varying = schedule.period != 1
    check_requirements(cfg, algorithm, directed=schedule.directed, time_varying=time_varying)  # loss, direction
    return algorithm, rule, emulation, schedule


def check_config(cfg: RunConfig) -> None:
    """Refuse a configuration the vectorised engine cannot run, before anything is built or written."""
    _checked(cfg)


# what `_links` derives from a graph (a time-varying topology swaps these per round)
_LINK_ATTRS = ("graph", "send_ptr", "send_col", "send_deg", "recv_deg", "neighbour_lists", "send_weight", "mixing",
               "weight_sum", "keep", "_push_ratio", "_mixing64")


def _pair_waves(init: torch.Tensor, resp: torch.Tensor) -> list[torch.Tensor]:
    """Pairwise exchanges that run one after another, grouped into waves of disjoint pairs.

    Exchange k goes one wave after the last earlier exchange that touched either of its nodes, so
    every node sees its exchanges in the original order (a scan over exchanges, not over D)."""
    last: dict[int, int] = {}
    wave_of: list[int] = []
    for i, j in zip(init.tolist(), resp.tolist(), strict=True):
        k = max(last.get(i, -1), last.get(j, -1)) + 1
        last[i] = last[j] = k
        wave_of.append(k)
    if not wave_of:
        return []
    waves = torch.tensor(wave_of, device=init.device)
    return [(waves == k).nonzero().squeeze(1) for k in range(max(wave_of) + 1)]


def _csr_from(row: np.ndarray, col: np.ndarray, val: np.ndarray, n: int, dev: torch.device) -> torch.Tensor:
    """The ``n x n`` CSR matrix with ``val`` at (``row``, ``col``) (no duplicates), 32-bit indices
    where they fit: the sparse product is faster with them."""
    order = np.lexsort((col, row))
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=n), out=ptr[1:])
    index = torch.int32 if len(row) < 2**31 else torch.int64
    return _csr(torch.from_numpy(ptr).to(dev, index), torch.from_numpy(col[order]).to(dev, index),
                torch.from_numpy(val[order]).to(dev), (n, n))


def _by_row(r: torch.Tensor, cols: torch.Tensor, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries (row ``r``, column ``cols``) in CSR order: (sort order, row pointers of ``rows`` rows)."""
    order = torch.argsort(r * width + cols)
    crow = torch.zeros(rows + 1, dtype=torch.int64, device=r.device)
    crow[1:] = torch.cumsum(torch.bincount(r, minlength=rows), 0)
    return order, crow


def pos_of(nodes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Position of each of ``nodes`` in the sorted node list ``rows`` (every one must be there)."""
    return torch.searchsorted(rows, nodes)


def mix_self_weight(wsum: torch.Tensor) -> torch.Tensor:
    """The weight `mix` keeps on a node's own model when its fresh neighbours' weights sum to ``wsum``.

    `gossipfl.algorithms.dpsgd.mix` is linear in the models, so over the node axis it is a sparse
    matrix: off the diagonal the neighbours' weights, on it what mix keeps of the node's own model.
    Evaluating mix itself on ``x = 1, others = 0`` reads that diagonal off, so the engine's sparse
    products apply exactly mix's rule (a missing neighbour's weight stays with the node).
    """
    one = torch.ones(wsum.shape[0], 1, dtype=wsum.dtype, device=wsum.device)
    return mix(one, torch.zeros_like(one).unsqueeze(1), wsum.unsqueeze(1)).squeeze(1)


def _initial_params(cfg: RunConfig, data: Dataset, model: torch.nn.Module, layout: Any, n: int) -> torch.Tensor:
    """Row i = node i's initial model, the same numbers `build_trainer` gives node i in the cluster.

    Built-in models draw their weights only in their layers' ``reset_parameters`` (in module
    order), so re-seeding and resetting one module reproduces ``build_model(seed=...)`` without
    building N modules; user models are built once per node.
    """
    if cfg.same_init:
        return layout.flatten(dict(model.named_parameters())).unsqueeze(0).repeat(n, 1)
    out = torch.empty(n, layout.numel, dtype=layout.dtype)
    if cfg.model in BUILTIN_MODELS:
        resettable = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]  # in build order
        params = dict(model.named_parameters())
        with torch.no_grad():
            for i in range(n):
                # the CPU generator alone: what build_model's torch.manual_seed sets for a CPU model,
                # without torch.manual_seed's queued CUDA/XPU/MTIA seeding (a stack trace kept per
                # call: ~0.6 ms each, a minute and growing memory at 100 000 nodes)
                torch.default_generator.manual_seed(node_seed(cfg, i))
                for layer in resettable:
                    layer.reset_parameters()
                out[i] = layout.flatten(params)
        return out
    for i in range(n):
        m = build_model(cfg.model, input_shape=data.input_shape, n_classes=data.n_classes,
                        hidden=cfg.hidden, seed=node_seed(cfg, i))
        out[i] = layout.flatten(dict(m.named_parameters()))
    return out


def run_vectorized(cfg: RunConfig, out: Path | None, *, progress: TextIO | None = sys.stderr,
                   **options: Any) -> dict[str, Any]:
    """Run ``cfg`` in the vectorised engine; write ``out/metrics.jsonl`` and return the summary dict.

    ``options`` go to `VectorizedSim` (``sampling``, ``kernel``, ``block``, ``node_rows``, ``device``).
    """
    sim = VectorizedSim(cfg, **options)
    return sim.run(out, progress=progress)
