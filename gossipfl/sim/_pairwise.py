"""Pairwise exchanges in the vectorised engine (``requirements.pairwise``: AD-PSGD), as the node does them.

An exchange is three calls of the algorithm's own code: the initiator's ``message`` (it keeps a
snapshot of what it sent), the responder's ``respond`` (atomic, returns the reply) and the
initiator's ``apply_reply``. Many exchanges run at once in waves of disjoint pairs, in the order
the node service would run them.

Sync: the exchanges of a round run after every node's step, one after another in node order.
Async, the node's protocol (``Node._exchange`` / ``rpc_exchange``): an initiator takes no step
until its reply is in, and meanwhile answers requests at once (its lock is free); a computing
responder answers when its step ends, busy (423) if that is more than ``timeout / 2`` after the
request arrived; an offline responder loses the request (the initiator waits out ``timeout``), a
finished one answers 503. The reply, which may be lost, frees the initiator, which applies it at
its next step start.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from gossipfl.algorithms import Send
from gossipfl.sim._links import Links
from gossipfl.sim.events import Messages, merge_waves
from gossipfl.sim.wakeups import wakeups

if TYPE_CHECKING:
    from gossipfl.sim.vectorized import VectorizedSim

__all__ = ["Pairwise", "pair_waves"]


def pair_waves(init: torch.Tensor, resp: torch.Tensor) -> list[torch.Tensor]:
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


class Pairwise:
    """The exchanges of one run: requests in flight, waiting initiators, replies to apply."""

    def __init__(self, sim: VectorizedSim) -> None:
        self.sim = sim
        n, dev = sim.n, sim.device
        self.requests = Messages.empty(dev)
        self.waiting = torch.zeros(n, dtype=torch.bool, device=dev)
        self._hold = torch.zeros(n, dtype=torch.float64, device=dev)  # earliest next step
        # An initiator does not compute from its request until its reply (or refusal, or timeout)
        # is in: over [idle_from, idle_to) its lock is free and it answers requests at once.
        self.idle_from = torch.full((n,), math.inf, dtype=torch.float64, device=dev)
        self.idle_to = torch.full((n,), -math.inf, dtype=torch.float64, device=dev)
        self.sent: dict[str, torch.Tensor] = {}  # per initiator: the request it sent (rows of [N, ...])
        self.replies: dict[str, torch.Tensor] = {}  # per initiator: its reply, applied at its next step
        self.reply_due = torch.zeros(n, dtype=torch.bool, device=dev)
        self.tried = 0
        self.seen_until = 0.0  # requests arriving before this were looked at in a time slice

    # ------------------------------------------------------------------ the exchange itself

    def _message(self, init: torch.Tensor) -> dict[str, torch.Tensor]:
        """The initiators' requests (``message``; they keep their snapshots in their state)."""
        sim = self.sim
        sub = sim.rows_of(init)
        ones = torch.ones_like(init)
        out = sim.algorithm.message(sub, Send(targets=ones, step=sim.step.index_select(0, init), rng=sim.draws(init)))
        sim.keep(init, sub)
        return {k: v.clone() for k, v in out.items()}

    def _respond(self, resp: torch.Tensor, incoming: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sim = self.sim
        sub = sim.rows_of(resp)
        reply = sim.algorithm.respond(sub, incoming)
        sim.keep(resp, sub)
        return reply

    def _apply(self, init: torch.Tensor, reply: dict[str, torch.Tensor]) -> None:
        sim = self.sim
        sub = sim.rows_of(init)
        sim.algorithm.apply_reply(sub, reply)
        sim.keep(init, sub)

    def _count(self, init: torch.Tensor, resp: torch.Tensor, ok: torch.Tensor) -> None:
        """Counters as the node keeps them: the responder counts the request and its reply, the
        initiator both once the reply is in; staleness of the request and of the reply."""
        sim = self.sim
        size = torch.full_like(init, sim.msg_bytes)
        gap = sim.step.index_select(0, resp) - sim.step.index_select(0, init)
        sim.tally.add(resp, gap)
        sim.tally.add(init[ok], -gap[ok])
        for c, who in ((sim.msgs_in, resp), (sim.msgs_out, resp)):
            c.index_add_(0, who, torch.ones_like(who))
        for c in (sim.bytes_in, sim.bytes_out):
            c.index_add_(0, resp, size)
        okl = ok.long()
        sim.msgs_out.index_add_(0, init, okl)
        sim.msgs_in.index_add_(0, init, okl)
        sim.bytes_out.index_add_(0, init, size * okl)
        sim.bytes_in.index_add_(0, init, size * okl)

    def sync_round(self, links: Links) -> None:
        """This round's exchanges, one after another in node order (a node may be in several), or
        in the order of the round's clock ticks where the algorithm wakes nodes at random."""
        sim = self.sim
        if sim.algorithm.requirements.wakes == "random":  # N clock ticks, one uniform node each
            senders = torch.tensor(wakeups(sim.cfg.seed, sim.round, sim.n), dtype=torch.int64, device=sim.device)
        else:
            senders = torch.arange(sim.n, device=sim.device)
        which, link = sim.targets(senders, links)
        init, resp = senders[which], links.send_col[link]
        for wave in pair_waves(init, resp):
            i, j = init[wave], resp[wave]
            request = self._message(i)
            self._apply(i, self._respond(j, request))
        self._count(init, resp, torch.ones_like(init, dtype=torch.bool))

    # ------------------------------------------------------------------ async protocol

    def request(self, senders: torch.Tensor, sent_at: torch.Tensor) -> None:
        """Initiators (after their step): pick a neighbour, send the request, wait for the reply.
        A lost request leaves the initiator waiting out ``timeout``."""
        sim = self.sim
        if not senders.numel():
            return
        emu, dev, timeout = sim.emulation, sim.device, sim.cfg.timeout
        from gossipfl.sim._async import _round_groups, delay

        pairs = []
        for links, group in _round_groups(sim, senders):  # partners on each initiator's round graph
            which, link = sim.targets(group, links)
            pairs.append((group[which], links.send_col[link]))
        init, resp = (torch.cat(c) for c in zip(*pairs, strict=True))
        if not init.numel():
            return
        order = torch.argsort(init)
        init, resp = init[order], resp[order]
        self.tried += init.shape[0]
        at = sent_at[torch.searchsorted(senders, init)]
        arrive = at + delay(sim, init, resp, sim.msg_bytes)
        ok = torch.ones_like(init, dtype=torch.bool)
        if emu.loss:
            ok = torch.rand(init.shape[0], generator=sim.gen, device=dev) >= emu.loss
            sim.lost += (~ok).sum()
        self._hold[init[~ok]] = at[~ok] + timeout
        request = self._message(init)  # the snapshot the request carries
        for k, v in request.items():
            buf = self.sent.setdefault(k, torch.zeros(sim.n, *v.shape[1:], dtype=v.dtype, device=dev))
            buf.index_copy_(0, init, v)
        self.idle_from[init] = at  # from now its lock is free: it answers others' requests at once
        self.idle_to[init] = torch.where(ok, math.inf, at + timeout)  # a lost one: the timeout
        self.waiting[init[ok]] = True
        zero = torch.zeros_like(init)
        new = Messages(resp, init, zero, zero, arrive, torch.zeros(init.shape[0], dtype=torch.float64, device=dev),
                       sim.step.index_select(0, init), torch.full_like(init, sim.msg_bytes)).select(ok)
        self.requests = self.requests.extend(new)

    def next_events(self, nxt: torch.Tensor) -> torch.Tensor:
        """``nxt`` with the times requests must be looked at: on arrival (or at once, if it arrived
        within a slice already done) and, if it waits for a computing responder's lock, when that
        lock frees or its wait runs out (busy)."""
        req = self.requests
        if not len(req):
            return nxt
        inf = torch.tensor(math.inf, dtype=torch.float64, device=nxt.device)
        queued = req.weight > 0.5
        release = torch.where(self.waiting[req.recv], self.idle_from[req.recv], inf)
        wait_end = torch.minimum(req.arrive + self.sim.cfg.timeout / 2, release)
        due = torch.where(queued, wait_end, req.arrive).clamp_min(self.seen_until)
        return torch.minimum(nxt, torch.stack([due.min(), req.arrive.min()]))

    def deliver(self, t_next: torch.Tensor, t_end: float, up: torch.Tensor, closed: torch.Tensor) -> torch.Tensor:
        """Requests that reached their responder by this time slice (the node's ``rpc_exchange``).
        Requests answered in one slice exchange in the order they are answered. (A request's
        ``weight`` marks it as already looked at: it arrived while its responder computed.
        Timeouts of lost requests' replies count from the request's arrival: a latency late.)
        Returns ``t_next`` with the freed initiators' next step times."""
        sim = self.sim
        from gossipfl.sim._async import delay

        req = self.requests
        self.seen_until = t_end
        if not len(req):
            return t_next
        timeout = sim.cfg.timeout
        j, i, arrive = req.recv, req.send, req.arrive
        here = arrive < t_end
        queued = req.weight > 0.5
        idle = here & ~queued & (arrive >= self.idle_from[j]) & (arrive < self.idle_to[j])
        # when a computing responder's lock frees: the end of its step
        release = torch.where(self.waiting[j], self.idle_from[j], t_next[j])
        waited = arrive + timeout / 2  # rpc_exchange's wait for the lock
        computing = here & ~idle
        gone = here & ~up[j]
        done = here & ~gone & closed[j]
        live = ~gone & ~done
        late = computing & live & (release < t_end) & (release >= arrive) & (release <= waited)
        answer = (idle & live) | late
        busy = computing & live & ~late & (waited < t_end) & (release > waited)
        at = torch.where(idle, arrive, release)  # when the responder answers
        back = torch.where(busy, waited, arrive) + delay(sim, j, i, sim.msg_bytes)  # a refusal's way back
        free = torch.full_like(arrive, math.inf)
        free = torch.where(busy | done, back, free)
        free = torch.where(gone, arrive + timeout, free)
        sim.lost += gone.sum()
        if bool(answer.any()):
            ex = answer.nonzero().squeeze(1)
            ok = torch.ones(ex.shape[0], dtype=torch.bool, device=sim.device)
            if sim.emulation.loss:
                ok = torch.rand(ex.shape[0], generator=sim.gen, device=sim.device) >= sim.emulation.loss
                sim.lost += (~ok).sum()
            ii, jj = i[ex], j[ex]
            order = torch.argsort(at[ex], stable=True)  # answered in time order
            ex, ii, jj, ok = ex[order], ii[order], jj[order], ok[order]
            self._answer(ii, jj, merge_waves(jj, at[ex], ii), ok)
            reply = at[ex] + delay(sim, jj, ii, sim.msg_bytes)
            free[ex] = torch.where(ok, reply, arrive[ex] + timeout)
        settled = busy | gone | done | answer
        t_next = t_next.clone()
        t_next[i[settled]] = free[settled]
        self.waiting[i[settled]] = False
        self.idle_to[i[settled]] = free[settled]  # idle (answering at once) until its reply is in
        req.weight = torch.where(here, 1.0, req.weight)  # the rest wait for their responder's lock
        self.requests = req.select(~settled)
        return t_next

    def _answer(self, init: torch.Tensor, resp: torch.Tensor, waves: list[torch.Tensor], ok: torch.Tensor) -> None:
        """Responders answer wave by wave (a responder at most once per wave): they move towards
        the snapshot each initiator sent; the initiator's reply waits until it arrives
        (`apply_replies`), and is dropped where it was lost (the responder moved, the initiator not)."""
        for wave in waves:
            i, j = init[wave], resp[wave]
            incoming = {k: v.index_select(0, i) for k, v in self.sent.items()}
            reply = self._respond(j, incoming)
            good = ok[wave]
            gi = i[good]
            for k, v in reply.items():
                buf = self.replies.setdefault(k, torch.zeros(self.sim.n, *v.shape[1:], dtype=v.dtype,
                                                             device=v.device))
                buf.index_copy_(0, gi, v[good])
            self.reply_due[gi] = True
        self._count(init, resp, ok)

    def apply_replies(self, rows: torch.Tensor | None = None) -> None:
        """Replies that are in, applied by their initiators (rows: those nodes; None: all)."""
        idx = self.reply_due.nonzero().squeeze(1) if rows is None else rows[self.reply_due[rows]]
        if idx.numel():
            self._apply(idx, {k: v.index_select(0, idx) for k, v in self.replies.items()})
            self.reply_due[idx] = False

    def hold(self, t_next: torch.Tensor, inf: torch.Tensor) -> torch.Tensor:
        """An initiator waits for its reply (inf until the responder answers), a refused one its back-off."""
        out = torch.where(self.waiting, inf, torch.maximum(t_next, self._hold))
        self._hold.zero_()
        return out

    def finish(self) -> None:
        """The last replies (the node waits for them before it stops), and a warning if nothing mixed."""
        self.apply_replies()
        sim = self.sim
        if self.tried and not int(sim.msgs_out.sum()):
            from gossipfl.sim._record import log

            log.warning("%s: none of %d exchanges completed (partners computing for more than timeout / 2, "
                        "offline, or links lost them); the models never mixed", sim.algorithm.name, self.tried)
