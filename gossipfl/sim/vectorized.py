"""The vectorised engine: thousands of nodes as rows of ``[N, ...]`` tensors, on a simulated clock.

It runs each algorithm's own code (`gossipfl.algorithms`) on all nodes at once and knows no
algorithm by name: the algorithm's state is a dict of ``[N, ...]`` tensors (``"params"`` the
``[N, D]`` flat models), its local step gets the batched `Learner` (one batched forward/backward
for a block of nodes: batched matmuls for the built-in MLP/logreg, ``torch.func`` for any other
model), its message is computed for all senders at once, and what arrived is combined as its
channels declare, one sparse product on the node axis per channel (`gossipfl.sim._combine`;
``each`` channels merge in waves, a receiver at most once per wave). The engine dispatches only on
the declared communication: pushes to targets (every out-neighbour, or random ones), neighbour-
local rounds (``requirements.rounds``), pairwise exchanges (``requirements.pairwise``,
`gossipfl.sim._pairwise`).

Two schedules, chosen by ``cfg.schedule``:

``sync``
    Lock-step rounds, exactly those of the local cluster's ``_run_lockstep``: in round r every
    node merges the messages of round r-1 (in sender-index order), takes one local step, and at
    gossip points sends. Simulated time is ``r * emulation.step_time``. A time-varying topology
    (`gossipfl.topology.build_schedule`) sends round r's messages on graph r, as the cluster's
    nodes do. Pairwise exchanges run at the end of the round in node order, in waves of disjoint pairs.
``async``
    Events on a simulated clock drawn from `gossipfl.emulation` (`gossipfl.sim._async`).

Randomness, chosen by ``sampling``: ``fast`` (default) draws minibatches, targets and the
algorithm's own draws for all nodes at once from one generator on the device; ``exact``
reproduces each node's own `Trainer` batch order (``seed * 7919 + i``), its target RNG
(``random.Random(seed * 31 + i)``), its algorithm generator (`gossipfl.algorithms._util.node_generator`)
and the node's float summation order when combining (`gossipfl.sim._combine.exact_inbox`), with
Python loops over nodes. For agreement tests and small runs.

Initial models are always node i's model of the local cluster (``build_trainer``'s seed). Node i
trains on shard ``i % shards`` of the partition. Run folder: the same ``metrics.jsonl`` and
summary as the local cluster, ``t`` in simulated seconds (`gossipfl.sim._record`). On a GPU
(``device="cuda"``) every tensor lives on the device; the loop reads back only scalars that steer
it, and copies data to the host only at metric points and in ``exact`` sampling.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch

from gossipfl.algorithms import Algorithm, Draws, Inbox, Send, State
from gossipfl.algorithms._util import node_generator
from gossipfl.algorithms.base import draw_targets
from gossipfl.attacks import NEIGHBOURS, dissensus_mix, dissensus_slots, neighbour_stats, poison
from gossipfl.build import check_algorithm_fits
from gossipfl.config import RunConfig
from gossipfl.errors import ConfigError
from gossipfl.learning import Dataset
from gossipfl.metrics import MetricsWriter
from gossipfl.plan import Plan, resolve
from gossipfl.sim import _record
from gossipfl.sim._combine import Arrivals, combine_inbox, exact_inbox, gather_slots, stack_slots
from gossipfl.sim._learner import BatchedLearner
from gossipfl.sim._links import Fanout, LinkCache, Links
from gossipfl.sim._memory import keep_freed_memory
from gossipfl.sim._setup import checked, device_of, learning, message_sizes, node_ids
from gossipfl.sim.events import merge_waves

if TYPE_CHECKING:
    from gossipfl.web.live import Live

__all__ = ["NODE_ROWS", "VectorizedSim", "check_config", "run_vectorized"]

NODE_ROWS = 64
"""Default number of nodes whose rows go to metrics.jsonl (evenly spaced ids); all nodes are evaluated."""


GATHER_BLOCK_FLOATS = 2**20  # a gathered block's stack: 4 MB of float32, about what L2 + L3 keep hot


@dataclass
class Outbox:
    """Messages of one send: per message its sender, receiver, the receiver's weight for the sender
    (float64) and the row of the senders' ``values``; per channel the values ``[S, ...]`` and which
    senders' messages carry it. ``alias``: the channels whose values are the state tensor itself."""

    send: torch.Tensor
    recv: torch.Tensor
    weight: torch.Tensor
    which: torch.Tensor
    values: dict[str, torch.Tensor]
    carried: dict[str, torch.Tensor]
    links: Links
    senders: int  # rows of ``values``
    everyone: bool  # every node sent to all its out-neighbours (the sync fused product applies)
    alias: frozenset[str] = frozenset()
    fan: Fanout | None = None  # the graph's fan-out, when these are its messages
    latency: torch.Tensor | None = None  # per message, its link's base latency (float64)


class VectorizedSim:
    """All nodes of a run as stacked tensors: build with a config, `run`, then read `state`.

    ``sampling``: ``fast`` or ``exact`` (module docstring). ``kernel``: ``auto``, ``batched``
    (built-in MLP/logreg only) or ``func`` (torch.func, any model). ``block``: nodes per batched
    step (default: sized to the CPU cache, or all nodes on a GPU). ``node_rows``: how many nodes
    (evenly spaced ids) get rows in metrics.jsonl and entries in the summary's ``per_node``; every
    node is still evaluated for the cluster rows. ``data``: a prebuilt dataset (else from cfg).
    """

    def __init__(self, cfg: RunConfig | Plan, *, device: str | None = None, sampling: str = "fast",
                 kernel: str = "auto", block: int | None = None, node_rows: int = NODE_ROWS,
                 data: Dataset | None = None) -> None:
        if sampling not in ("fast", "exact"):
            raise ConfigError(f"sampling: {sampling!r} is not one of fast, exact")
        plan = resolve(cfg, data=data)
        if device is not None:
            plan = dataclasses.replace(plan, cfg=plan.cfg.replace(device=device))
        checked(plan)
        self.plan = plan
        self.cfg = cfg = plan.cfg
        self.device = dev = device_of(cfg.device)
        if dev.type == "cpu":
            keep_freed_memory()  # rounds re-allocate MB-sized buffers: no page faults for them
        self.n = n = cfg.nodes
        self.ids = node_ids(n)
        self.sampling = sampling
        self.exact = sampling == "exact"
        self.algorithm: Algorithm = plan.algorithm
        self.emulation, self.schedule, self.data = plan.emulation, plan.schedule, plan.data
        req = self.algorithm.requirements
        self.trains = req.trains
        self.time_varying = plan.time_varying
        self.gen = torch.Generator(device=dev).manual_seed(cfg.seed * 1_000_003 + 17)
        self.links_at = LinkCache(self.schedule, n, weights=cfg.weights if req.weights == "symmetric" else None,
                                  device=dev, host_lists=self.exact)
        self.links = self.links_at.at(0)
        self.graph = self.links.graph
        built = learning(plan, dev, kernel, block, self.gen, exact=self.exact)
        self.layout, self.model = built.layout, built.model
        self.x_test, self.y_test = built.x_test, built.y_test
        self.eval_block = built.eval_block
        check_algorithm_fits(self.algorithm, built.params[0])  # e.g. more gossip partitions than parameters
        self.state: State = {"params": built.params}
        self.algorithm.init_state(self.state)
        velocity = torch.zeros_like(built.params) if cfg.momentum and self.trains else None
        self.learner = BatchedLearner(built.model, built.batches, built.x_train, built.y_train, lr=cfg.lr,
                                      momentum=cfg.momentum, weight_decay=cfg.weight_decay, velocity=velocity,
                                      block=built.block)
        self.each = all(c.combine == "each" for c in self.algorithm.channels)
        self.updates = [c.key for c in self.algorithm.channels if c.local_update]
        self.step = torch.zeros(n, dtype=torch.int64, device=dev)
        self.last_loss = torch.full((n,), float("nan"), device=dev)
        self.accuracy = torch.full((n,), float("nan"), dtype=torch.float64, device=dev)
        self.test_loss = torch.full((n,), float("nan"), device=dev)
        self.msgs_out = torch.zeros(n, dtype=torch.int64, device=dev)
        self.msgs_in = torch.zeros(n, dtype=torch.int64, device=dev)
        self.bytes_out = torch.zeros(n, dtype=torch.int64, device=dev)
        self.bytes_in = torch.zeros(n, dtype=torch.int64, device=dev)
        self.lost = torch.zeros((), dtype=torch.int64, device=dev)
        # async: sent after the sender's last step (a lingering node merges and gossips, no training)
        self.linger_msgs = torch.zeros((), dtype=torch.int64, device=dev)
        self.linger_bytes = torch.zeros((), dtype=torch.int64, device=dev)
        self.expired = torch.zeros((), dtype=torch.int64, device=dev)
        self.tally = _record.Staleness(n, dev)
        self.sim_time = 0.0
        self.node_steps = 0
        self.round = 0  # sync schedule: rounds done
        self.mixings = 0  # sync schedule: rounds that merged (round 1 has nothing to merge)
        # pure averaging in lock-step: d(t) after every mixing round (gossipfl.convergence)
        self.trace: list[tuple[int, float]] | None = [] if not req.trains and cfg.schedule == "sync" else None
        self._pending: Outbox | None = None  # sync: what the last round sent
        self._spare: dict[str, torch.Tensor] = {}  # sync fused mixing: output buffers, kept across rounds
        self._everyone = torch.arange(n, device=dev)
        k = min(max(node_rows, 0), n)
        self.sample = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)}) if k else []
        # bytes of one encoded message: with every channel, and without those sent every k-th step
        self.msg_bytes, self.msg_bytes_base = message_sizes(cfg, self.algorithm, self.layout, self.ids[0],
                                                            int(self.links.send_deg.max()) if n else 0)
        self.every = {c.key: c.every for c in self.algorithm.channels if c.every > 1}
        if self.exact:
            self.rngs = [random.Random(cfg.seed * 31 + i) for i in range(n)]
            self.algo_gens = [node_generator(self.algorithm.seed, cfg.seed * 31 + i) for i in range(n)]
        self.attack = plan.attack
        self.attackers = (plan.attack.mask(n, dev) if plan.attack is not None
                          else torch.zeros(n, dtype=torch.bool, device=dev))
        self.dissensus = dissensus_combine(plan, exact=self.exact)  # "mix" | "gather" under dissensus, else ""
        rule = getattr(self.algorithm, "rule", None)  # a robust rule with an edge-list form merges sparsely
        self.edge_rule = (not self.exact and rule is not None and rule.sparse
                          and any(c.combine == "gather" for c in self.algorithm.channels))
        self.pairwise = None
        if req.pairwise:
            from gossipfl.sim._pairwise import Pairwise

            self.pairwise = Pairwise(self)

    # ------------------------------------------------------------------ state of a set of nodes

    @property
    def params(self) -> torch.Tensor:
        """``[N, D]``: every node's flat parameters (push-sum: the numerators x, see `models`)."""
        return self.state["params"]

    def rows_of(self, rows: torch.Tensor | None) -> State:
        """The state of nodes ``rows`` (copies; None: the state itself)."""
        if rows is None:
            return self.state
        return {k: v.index_select(0, rows) for k, v in self.state.items()}

    def keep(self, rows: torch.Tensor | None, sub: State) -> None:
        """Write the state of nodes ``rows`` back (``sub`` may hold replaced or new tensors)."""
        if rows is None:
            self.state.update(sub)
            return
        for k, v in sub.items():
            self.state[k].index_copy_(0, rows, v)

    def draws(self, rows: torch.Tensor | None) -> Draws:
        """The algorithm's random draws for nodes ``rows``: their own generators in exact sampling."""
        if not self.exact:
            return Draws(self.gen)
        idx = range(self.n) if rows is None else rows.tolist()
        return Draws([self.algo_gens[i] for i in idx])

    def local_step(self, rows: torch.Tensor | None) -> None:
        """One local step of nodes ``rows`` (None: all)."""
        sub = self.rows_of(rows)
        loss = self.algorithm.local_step(sub, self.learner.rows(rows))
        self.keep(rows, sub)
        if rows is None:
            self.last_loss.copy_(loss)
        else:
            self.last_loss.index_copy_(0, rows, loss.to(self.last_loss.dtype))

    def models(self, a: int = 0, b: int | None = None) -> torch.Tensor:
        """Rows ``a:b`` of the models the nodes would deploy (the algorithm's ``model``)."""
        return self.algorithm.model({k: v[a:b] for k, v in self.state.items()})

    # ------------------------------------------------------------------ sending

    def targets(self, senders: torch.Tensor, links: Links) -> tuple[torch.Tensor, torch.Tensor]:
        """(position in ``senders``, link index) of every message the senders send on ``links``,
        drawn as the algorithm declares (every out-neighbour, one random one, a random sample)."""
        t = self.algorithm.targets
        if t.kind == "all":
            return links.out_links(senders)
        dev = self.device
        if self.exact:  # each node's own random.Random, as the node draws them
            pos_l: list[int] = []
            link_l: list[int] = []
            ptr = links.send_ptr.tolist()
            for p, i in enumerate(senders.tolist()):
                peers = links.lists[i]
                picked = draw_targets(t, [str(j) for j in peers], self.rngs[i]) if peers else []
                where = {j: k for k, j in enumerate(peers)}
                for j in picked:
                    pos_l.append(p)
                    link_l.append(ptr[i] + where[int(j)])
            return (torch.tensor(pos_l, dtype=torch.int64, device=dev),
                    torch.tensor(link_l, dtype=torch.int64, device=dev))
        which, link = links.out_links(senders)
        deg = links.send_deg[senders]
        k = t.numbers(deg)
        # every out-link of every sender gets a random key; a sender keeps its k smallest
        keys = torch.rand(which.shape[0], generator=self.gen, device=dev, dtype=torch.float64)
        order = torch.argsort(which.double() + keys)  # by sender, then by key (keys are < 1)
        first = torch.cumsum(deg, 0) - deg
        by = which[order]
        rank = torch.arange(order.shape[0], device=dev) - first[by]
        keep = order[rank < k[by]]
        keep = keep[torch.argsort(which[keep] * (links.send_col.shape[0] + 1) + link[keep])]
        return which[keep], link[keep]

    def send(self, senders: torch.Tensor, links: Links, everyone: bool = False) -> Outbox | None:
        """The gossip point of nodes ``senders`` (sorted) on ``links``: targets, message, counters.

        ``everyone``: every node sends (a lock-step round); when the algorithm sends to every
        out-neighbour, the messages are the graph's `Fanout`, the same each round."""
        return self.send_on([(links, senders)], everyone)

    def send_on(self, groups: list[tuple[Links, torch.Tensor]], everyone: bool = False) -> Outbox | None:
        """`send` for senders on several graphs at once: ``(links, senders)`` per graph (a node in
        at most one group; a time-varying topology's nodes at different rounds), one message
        computation for all of them. The outbox's ``links`` is the first group's."""
        links0 = groups[0][0]
        fan = links0.fanout() if everyone and len(groups) == 1 and self.algorithm.targets.kind == "all" else None
        latency = None
        if fan is not None and fan.every_sender:
            senders, which, n_targets = groups[0][1], fan.which, fan.n_targets
            send, recv, weight = fan.send, fan.recv, fan.weight
        else:
            fan = None
            senders, which, recv, weight, latency = self._targets_on(groups)
            if not which.numel():
                return None
            n_targets = torch.bincount(which, minlength=senders.shape[0])
            has = n_targets > 0
            if not bool(has.all()):  # a node with no target builds no message
                everyone = False
                pos = torch.cumsum(has.long(), 0) - 1
                senders, n_targets, which = senders[has], n_targets[has], pos[which]
            send = senders[which]
        full = everyone and senders.shape[0] == self.n
        rows = None if full else senders
        sub = self.rows_of(rows)
        step = self.step.index_select(0, senders)
        out = self.algorithm.message(sub, Send(targets=n_targets, step=step, rng=self.draws(rows)))
        self.keep(rows, sub)
        if self.attack is not None and self.attack.rewrites_message and "params" in out:  # poisoned models
            out["params"] = self._poisoned(out["params"], senders, step, groups)
        alias = frozenset(k for k, v in out.items() if full and v is self.state.get(k))
        carried = {k: step % e == 0 for k, e in self.every.items() if k in out}
        values = self.algorithm.decode(out, self.layout.numel, self.params.dtype)
        if fan is not None and not carried:  # every sender, every message of the same size
            self.msgs_out.add_(n_targets)
            self.bytes_out.add_(n_targets, alpha=self.msg_bytes)
        else:
            self.msgs_out.index_add_(0, send, torch.ones_like(send))
            self.bytes_out.index_add_(0, send, self.message_bytes(carried, which, step.shape[0]))
        return Outbox(send, recv, weight, which, values, carried, links0, senders.shape[0], everyone and full,
                      alias, fan, latency)

    def _poisoned(self, models: torch.Tensor, senders: torch.Tensor, step: torch.Tensor,
                  groups: list[tuple[Links, torch.Tensor]]) -> torch.Tensor:
        """The senders' models ``[S, D]`` with the attackers' rows poisoned (`gossipfl.attacks.poison`)."""
        attack = self.attack
        assert attack is not None
        attacking = self.attackers.index_select(0, senders) & (step >= attack.start)
        if not bool(attacking.any()):
            return models
        apos = attacking.nonzero().squeeze(1)  # positions in ``senders`` of those attacking now
        if self.exact and attack.kind == "gaussian":  # each attacker's noise from its own generator
            bad = torch.cat([poison(attack, models[k:k + 1], attacking[k:k + 1], self.algo_gens[i])
                             for k, i in zip(apos.tolist(), senders[apos].tolist(), strict=True)])
            return models.index_copy(0, apos, bad)
        stats = {}
        if attack.kind in NEIGHBOURS:  # omniscient: the honest neighbours' current models
            slot = torch.full((senders.shape[0],), -1, dtype=torch.int64, device=senders.device)
            slot[apos] = torch.arange(apos.shape[0], device=senders.device)
            owner_l, rows_l = [], []
            for links, grp in groups:  # each attacker's neighbours on the graph it sends on
                pos = torch.searchsorted(senders, grp).clamp_max(senders.shape[0] - 1)
                mine = (senders.index_select(0, pos) == grp) & (slot.index_select(0, pos) >= 0)
                which, link = links.out_links(grp[mine])
                nb = links.send_col[link]
                honest = ~self.attackers.index_select(0, nb)
                owner_l.append(slot[pos[mine]][which][honest])
                rows_l.append(nb[honest])
            owner, nbrs = torch.cat(owner_l), torch.cat(rows_l)
            mu, std, heard = neighbour_stats(self.params.index_select(0, nbrs), owner, apos.shape[0])
            stats = {"mu": mu, "std": std, "heard": heard}
        bad = poison(attack, models.index_select(0, apos), torch.ones_like(apos, dtype=torch.bool), self.gen,
                     **stats)
        return models.index_copy(0, apos, bad)

    def _targets_on(self, groups: list[tuple[Links, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        """Senders (sorted) and, per message by sender, its sender's position, receiver, weight and
        base latency, over every group's graph."""
        parts = []
        for links, grp in groups:
            which, link = self.targets(grp, links)
            parts.append((grp, which, links.send_col[link], links.send_weight64[link],
                          links.latency(self.emulation, self.cfg.seed).index_select(0, link)))
        if len(parts) == 1:
            return parts[0]
        sizes = torch.tensor([0] + [p[0].shape[0] for p in parts[:-1]], device=self.device).cumsum(0).tolist()
        senders = torch.cat([p[0] for p in parts])
        which = torch.cat([p[1] + off for p, off in zip(parts, sizes, strict=True)])
        perm = torch.argsort(senders)
        rank = torch.empty_like(perm)
        rank[perm] = torch.arange(perm.shape[0], device=self.device)
        which = rank[which]
        by = torch.argsort(which, stable=True)  # messages by sender, each sender's in its targets' order
        return (senders[perm], which[by], *(torch.cat([p[k] for p in parts])[by] for k in (2, 3, 4)))

    def message_bytes(self, carried: dict[str, torch.Tensor], which: torch.Tensor, senders: int) -> torch.Tensor:
        """Encoded size of each message (``which``: its sender's row): channels sent every k-th step
        only count when the message carries them."""
        full = torch.full((senders,), self.msg_bytes, dtype=torch.int64, device=self.device)
        if carried:
            every = torch.stack(list(carried.values())).all(0)
            full = torch.where(every, full, torch.full_like(full, self.msg_bytes_base))
        return full[which]

    # ------------------------------------------------------------------ merging

    def merge_arrivals(self, receivers: torch.Tensor, r: torch.Tensor, send: torch.Tensor, weight: torch.Tensor,
                       values: dict[str, torch.Tensor], col: torch.Tensor, carried: dict[str, torch.Tensor],
                       *, order: tuple[torch.Tensor, ...] = (), fresh: Callable[[torch.Tensor], torch.Tensor],
                       links: Links, fused: dict[str, torch.Tensor] | None = None,
                       full: bool = False) -> None:
        """Merge messages into nodes ``receivers`` (sorted): message m goes to ``receivers[r[m]]``
        from node ``send[m]``, its channel values at row ``col[m]`` of ``values``; ``carried[key]``
        (per message) marks channels it carries; ``fresh(mask)`` keeps, of the messages in ``mask``,
        each sender's newest per receiver; ``order``: the merge order of ``each`` channels (after the
        receiver); ``full``: ``receivers`` is every node."""
        alg = self.algorithm
        rows = None if full else receivers
        nw = links.neighbour_weight.index_select(0, receivers) if rows is not None else links.neighbour_weight
        if self.each:
            waves = merge_waves(r, *order)
            sub_all = self.rows_of(rows)
            vals = {k: v.index_select(0, col) for k, v in values.items()}  # what was sent, before anyone merges
            for wave in waves:
                rr = r[wave]
                sub = {k: v.index_select(0, rr) for k, v in sub_all.items()}
                got = {k: v.index_select(0, wave) for k, v in vals.items()}
                if self.updates:
                    learner = self.learner.rows(receivers.index_select(0, rr))
                    for key in self.updates:  # update-merge: one plain step of each arrival on our data
                        _, grad = learner.grad(got[key])
                        got[key] = got[key] - self.cfg.lr * grad
                one = torch.ones(rr.shape[0], dtype=torch.int64, device=rr.device)
                inbox = Inbox(values=got, count={k: one for k in got},
                              weight={k: weight.index_select(0, wave) for k in got},
                              neighbour_weight=nw.index_select(0, rr))
                alg.merge(sub, inbox)
                for k, v in sub.items():
                    sub_all[k].index_copy_(0, rr, v)
            self.keep(rows, sub_all)
            return
        arrivals: dict[str, Arrivals] = {}
        for c in alg.channels:
            mask = carried[c.key] if c.key in carried else torch.ones_like(r, dtype=torch.bool)
            keep = fresh(mask) if c.latest else mask.nonzero().squeeze(1)
            arrivals[c.key] = Arrivals(r[keep], col[keep], weight[keep], send[keep])
        present = torch.zeros(receivers.shape[0], dtype=torch.bool, device=r.device)
        for a in arrivals.values():
            present[a.r] = True
        dissent = self._dissent(arrivals, receivers.shape[0]) if self.dissensus else None
        if not bool(present.all()):  # merge only the receivers that got something
            idx = present.nonzero().squeeze(1)
            remap = torch.cumsum(present.long(), 0) - 1
            arrivals = {k: Arrivals(remap[a.r], a.col, a.w, a.send) for k, a in arrivals.items()}
            receivers, nw, rows, fused = receivers.index_select(0, idx), nw.index_select(0, idx), \
                receivers.index_select(0, idx), None
            if dissent is not None and dissent[0] == "mix":
                dissent = ("mix", dissent[1].index_select(0, idx))
        if dissent is None and self.edge_rule:  # clipped gossip as one sparse product, no stacks
            self._merge_rows(rows, arrivals, values, nw, fused, None, edges=True)
            return
        block = self._gather_block(arrivals, values, receivers.shape[0])
        if block < receivers.shape[0]:
            self._merge_blocks(receivers, arrivals, values, nw, dissent, block)
            return
        self._merge_rows(rows, arrivals, values, nw, fused, dissent)

    def _merge_blocks(self, receivers: torch.Tensor, arrivals: dict[str, Arrivals], values: dict[str, torch.Tensor],
                      nw: torch.Tensor, dissent: tuple[str, torch.Tensor] | None, block: int) -> None:
        """`_merge_rows` with the ``gather`` channels' stacks built ``block`` receivers at a time,
        so the robust rule works on what the caches hold (the inbox's bookkeeping is done once)."""
        alg = self.algorithm
        if any(v is self.state.get(k) for k, v in values.items()):
            values = {k: v.clone() for k, v in values.items()}  # what was sent, not what an earlier block merged
        sub = self.rows_of(receivers)
        inbox = combine_inbox(alg.channels, sub, arrivals, values, nw, self.n, stacks=False)
        gathered = {c.key for c in alg.channels if c.combine == "gather"}
        for lo in range(0, receivers.shape[0], block):
            hi = min(lo + block, receivers.shape[0])
            part = Inbox(values={k: stack_slots(arrivals[k], values[k], v[lo:hi]) if k in gathered else v[lo:hi]
                                 for k, v in inbox.values.items()},
                         count={k: v[lo:hi] for k, v in inbox.count.items()},
                         weight={k: v[lo:hi] for k, v in inbox.weight.items()}, neighbour_weight=nw[lo:hi])
            mine = {k: v[lo:hi] for k, v in sub.items()}
            if dissent is not None:
                kind, flags = dissent
                if kind == "mix":
                    self._craft_dissensus(mine["params"], part, ("mix", flags[lo:hi]), arrivals["params"])
                else:
                    idx = inbox.values["params"][lo:hi]
                    byz = flags[idx.clamp_min(0)] & (idx >= 0)
                    part.values["params"] = dissensus_slots(mine["params"], part.values["params"], idx >= 0,
                                                            part.weight["params"], byz, self._eps())
            alg.merge(mine, part)
            self.keep(receivers[lo:hi], mine)

    def _eps(self) -> float:
        assert self.attack is not None
        return self.attack.eps

    def _gather_block(self, arrivals: dict[str, Arrivals], values: dict[str, torch.Tensor], rows: int) -> int:
        """How many receivers to merge at once: all, unless a ``gather`` channel's padded stacks
        ``[R, K, ...]`` would outgrow the CPU caches (then the rule streams them from memory,
        several times slower); the algorithm's merge is row by row, so blocks change nothing."""
        if self.exact or self.device.type != "cpu":
            return rows
        width = 0
        for c in self.algorithm.channels:
            a = arrivals.get(c.key)
            if c.combine == "gather" and a is not None and a.r.numel():
                k = int(torch.bincount(a.r, minlength=rows).max())
                width = max(width, k * max(1, values[c.key][0].numel()))
        return rows if not width else max(1, min(rows, GATHER_BLOCK_FLOATS // width))

    def _merge_rows(self, rows: torch.Tensor | None, arrivals: dict[str, Arrivals], values: dict[str, torch.Tensor],
                    nw: torch.Tensor, fused: dict[str, torch.Tensor] | None,
                    dissent: tuple[str, torch.Tensor] | None, *, edges: bool = False) -> None:
        """Combine and merge the arrivals of receivers ``rows`` (None: every node, in place);
        ``edges``: gathered channels as edge lists (`RobustRule.sparse`)."""
        alg = self.algorithm
        sub = self.rows_of(rows)
        if self.exact:
            inbox = exact_inbox(alg.channels, sub, arrivals, values, nw)
        else:
            inbox = combine_inbox(alg.channels, sub, arrivals, values, nw, self.n, fused=fused, edges=edges)
        if dissent is not None:
            self._craft_dissensus(sub["params"], inbox, dissent, arrivals["params"])
        before = {k: sub[k] for k in (fused or {})}
        alg.merge(sub, inbox)
        self.keep(rows, sub)
        for k, old in before.items():  # the fused product's input buffer serves the next round's output
            if rows is None and self.state.get(k) is inbox.values[k]:
                self._spare[k] = old

    def _dissent(self, arrivals: dict[str, Arrivals], rows: int) -> tuple[str, torch.Tensor]:
        """Dissensus: which of the model arrivals come from attackers. For the mix, they leave the
        arrivals (`dissensus_mix` adds their closed form) and the result marks the receivers they
        reached ``[rows]``; for a gathered inbox it flags each arrival ``[M]``."""
        attack = self.attack
        assert attack is not None
        a = arrivals["params"]
        byz = self.attackers.index_select(0, a.send) & (self.step.index_select(0, a.send) >= attack.start)
        if self.dissensus == "gather":
            return "gather", byz
        hit = torch.zeros(rows, dtype=torch.bool, device=a.r.device)
        hit[a.r[byz]] = True
        keep = (~byz).nonzero().squeeze(1)
        arrivals["params"] = Arrivals(a.r[keep], a.col[keep], a.w[keep], a.send[keep])
        return "mix", hit

    def _craft_dissensus(self, own: torch.Tensor, inbox: Inbox, dissent: tuple[str, torch.Tensor],
                         a: Arrivals) -> None:
        """Put the omniscient attackers' per-receiver dissensus messages into ``inbox`` (module
        docstring of `gossipfl.attacks`)."""
        attack = self.attack
        assert attack is not None
        kind, flags = dissent
        if kind == "mix":
            inbox.values["params"] = dissensus_mix(own, inbox.values["params"], flags, attack.eps)
            return
        others, weights = inbox.values["params"], inbox.weight["params"]
        count = inbox.count["params"]
        slots = torch.arange(others.shape[1], device=own.device).unsqueeze(0) < count.unsqueeze(1)
        where = Arrivals(a.r, torch.arange(a.r.shape[0], device=a.r.device), a.w, a.send)
        byz = gather_slots(where, flags.to(own.dtype).unsqueeze(1), own.shape[0], count, self.n)[0].squeeze(2) > 0
        inbox.values["params"] = dissensus_slots(own, others, slots, weights, byz, attack.eps)

    # ------------------------------------------------------------------ sync schedule

    def rounds(self, k: int) -> None:
        """Run ``k`` rounds of the lock-step schedule, without metrics (what `scripts/bench_sim.py` times).

        Round r: merge round r-1's messages, one local step, then send if r is a gossip point.
        """
        if self.trace == []:  # the trace starts from the models before any merge
            self.trace.append((self.mixings, _record.consensus_distance(self)))
        for _ in range(k):
            self.round += 1
            pending, self._pending = self._pending, None
            if pending is not None:
                self._deliver_round(pending)
                self._mixed()
            if self.trains:
                self.local_step(None)
            self.step += 1
            self.node_steps += self.n
            self.sim_time = self.round * self.emulation.step_time
            if self.round % self.cfg.gossip_every == 0:
                links = self.links_at.at(self.round)  # this round's graph; the next round merges with its weights
                if self.pairwise is not None:
                    self.pairwise.sync_round(links)
                    self._mixed()
                else:
                    self._pending = out = self.send(self._everyone, links, everyone=True)
                    if out is None:
                        continue
                    # received now (a node counts what arrives), merged next round
                    if out.fan is not None and not out.carried:
                        self.msgs_in.add_(out.fan.in_count)
                        self.bytes_in.add_(out.fan.in_count, alpha=self.msg_bytes)
                    else:
                        self.msgs_in.index_add_(0, out.recv, torch.ones_like(out.recv))
                        self.bytes_in.index_add_(0, out.recv,
                                                 self.message_bytes(out.carried, out.which, out.senders))

    def _mixed(self) -> None:
        """One more mixing round; without training, its consensus distance joins the trace."""
        self.mixings += 1
        if self.trace is not None:
            self.trace.append((self.mixings, _record.consensus_distance(self)))

    def _deliver_round(self, out: Outbox) -> None:
        """Round r-1's messages into every receiver (staleness 0: lock-step)."""
        n, dev = self.n, self.device
        carried = {k: v.index_select(0, out.which) for k, v in out.carried.items()}
        if out.fan is not None:
            self.tally.add_fresh(out.fan.in_count, every=out.fan.covers)
            full = out.fan.covers
        else:
            self.tally.add(out.recv, torch.zeros_like(out.recv))
            got = torch.zeros(n, dtype=torch.bool, device=dev)
            got[out.recv] = True
            full = bool(got.all())
        receivers = self._everyone if full else torch.unique(out.recv)
        r = out.recv if full else torch.searchsorted(receivers, out.recv)
        fused = None
        if out.everyone and full and not self.exact and not self.dissensus:
            fused = {}
            for c in self.algorithm.channels:  # one product with M: the neighbours' mix and the own term
                if c.combine == "mix" and c.key in out.alias and c.key not in carried:
                    src = out.values[c.key]
                    spare = self._spare.pop(c.key, None)
                    if spare is None or spare.shape != src.shape:
                        spare = torch.empty_like(src)
                    fused[c.key] = torch.addmm(spare, out.links.mixing(src.dtype), src, beta=0.0, out=spare)
            if len(fused) == len(self.algorithm.channels):  # every neighbour sent every channel
                links = out.links
                inbox = Inbox(values=fused, count={k: links.recv_deg for k in fused},
                              weight={k: links.neighbour_weight for k in fused},
                              neighbour_weight=links.neighbour_weight)
                before = {k: self.state[k] for k in fused}
                self.algorithm.merge(self.state, inbox)
                for k, old in before.items():  # the product's input buffer serves the next round's output
                    if self.state.get(k) is fused[k]:
                        self._spare[k] = old
                return
        self.merge_arrivals(receivers, r, out.send, out.weight, out.values, out.which, carried,
                            order=(out.send,), fresh=lambda m: m.nonzero().squeeze(1), links=out.links,
                            fused=fused, full=full)

    # ------------------------------------------------------------------ running

    def run(self, out: Path | None = None, *, progress: TextIO | None = None,
            live: Live | None = None) -> dict[str, Any]:
        """Run to completion; write ``out/metrics.jsonl`` (if ``out``) and return the summary;
        ``live``: the page of ``gossipfl sim --live`` (`gossipfl.web.live`) gets every metric point."""
        cfg = self.cfg
        writer: Callable[[dict[str, Any]], None]
        writer = files = MetricsWriter(None if out is None else Path(out) / "metrics.jsonl")
        if live is not None:
            live.probe, live.names = (lambda idx: _record.probe(self, idx)), self.ids
            writer = live.tap(files)
        self.history: list[dict[str, Any]] = []
        self.progress = _record.Progress(progress, cfg.steps if cfg.duration is None else None, cfg.duration)
        wall0 = time.monotonic()
        try:
            if cfg.schedule == "sync":
                self._run_sync(writer)
            else:
                from gossipfl.sim._async import run_async

                run_async(self, writer)
        finally:
            files.close()
            self.progress.close()
        return _record.summary(self, time.monotonic() - wall0)

    def tick(self, *, force: bool = False) -> None:
        if self.progress.stream is not None:
            self.progress(self.sim_time, self.node_steps, self.node_steps / self.n, force=force)

    def metric_point(self, writer: Callable[[dict[str, Any]], None], t: float, *, node_rows: bool = True,
                     evaluate: bool = True) -> None:
        """Evaluate every node and write the rows of one metric point (`gossipfl.sim._record.record`)."""
        row = _record.record(self, writer, t, node_rows=node_rows, evaluate=evaluate)
        self.progress.accuracy = row["mean_accuracy"]
        self.tick(force=True)

    def _run_sync(self, writer: Callable[[dict[str, Any]], None]) -> None:
        cfg = self.cfg
        if not self.emulation.ideal:
            _record.log.warning("the sync schedule ignores the emulation table (speeds, latency, loss, churn); "
                                "use schedule = \"async\" to apply it")
        _record.record(self, writer, 0.0, node_rows=False, evaluate=False)
        for r in range(1, cfg.steps + 1):
            self.rounds(1)
            if r % cfg.eval_every == 0 or r == cfg.steps:
                self.metric_point(writer, self.sim_time)
            else:
                self.tick()


def check_config(cfg: RunConfig | Plan) -> None:
    """Refuse a configuration the vectorised engine cannot run, before anything is written."""
    plan = resolve(cfg)
    checked(plan)
    dissensus_combine(plan, exact=False)


def dissensus_combine(plan: Plan, *, exact: bool) -> str:
    """How the model channel combines when the run's attackers craft dissensus messages ("" when
    they do not): those enter each receiver's inbox, so only the mix and a gathered inbox take them."""
    attack, algorithm = plan.attack, plan.algorithm
    if attack is None or attack.kind != "dissensus" or not attack.nodes:
        return ""
    combine = next((c.combine for c in algorithm.channels if c.key == "params"), "")
    if combine not in ("mix", "gather") or algorithm.requirements.pairwise:
        raise ConfigError(f"attack.kind: dissensus crafts each receiver's model message, which needs an "
                          f"algorithm that mixes models (dpsgd and its orders, averaging); "
                          f"{algorithm.name!r} does not")
    if exact:
        raise ConfigError("attack.kind: dissensus runs with sampling = \"fast\" (exact sampling combines "
                          "each receiver's messages as a node does, and no node sees the others' inboxes)")
    return combine


def run_vectorized(cfg: RunConfig | Plan, out: Path | None, *, progress: TextIO | None = sys.stderr,
                   live: Live | None = None, **options: Any) -> dict[str, Any]:
    """Run ``cfg`` (a config or its resolved `gossipfl.plan.Plan`) in the vectorised engine; write
    ``out/metrics.jsonl`` and return the summary dict.

    ``options`` go to `VectorizedSim` (``sampling``, ``kernel``, ``block``, ``node_rows``, ``device``).
    """
    sim = VectorizedSim(cfg, **options)
    return sim.run(out, progress=progress, live=live)


