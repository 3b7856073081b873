"""Pairwise exchanges in the vectorised engine (``requirements.pairwise``: AD-PSGD), as the node does them.

An exchange is three calls of the algorithm's own code: the initiator's ``message`` (it keeps a
snapshot of what it sent), the responder's ``respond`` (atomic, returns the reply) and the
initiator's ``apply_reply``. Many exchanges run at once in waves of disjoint pairs, in the order
the node service would run them.

Sync: the exchanges of a round run after every node's step, one after another in node order.
Async, the node's protocol (`gossipfl.node.protocol.Protocol.exchange`, ``rpc_exchange``,
`gossipfl.node.worker.Worker.acquire_to_answer`), which keeps every exchange an atomic average:

- an initiator is *in flight* from the end of its step (when it sends its snapshot) until its
  reply is in, over [``idle_from``, ``idle_to``); it takes no step and answers nobody meanwhile:
  a request from a lower id is refused at once (423), one from a higher id is *deferred* and
  answered the moment the initiator's own exchange settles, before its next step;
- a computing responder answers when its step ends -- unless it then starts its own exchange:
  the request meets it in flight at that instant (refused or deferred as above);
- a deferred or queued request still waiting ``timeout / 2`` after it arrived is refused (busy);
  an offline responder loses the request (the initiator waits out ``timeout``), a finished one
  answers 503;
- an initiator refused by a partner in flight settles (answers what it deferred), then sends a
  fresh snapshot to a fresh random partner, up to `EXCHANGE_TRIES` requests per gossip point.

No deadlock: a request only ever waits for an in-flight initiator with a lower id, so a chain of
waits has strictly decreasing ids and cannot close into a cycle; its last initiator is answered,
refused or timed out without waiting for anyone in flight, then the chain unwinds link by link
(within one `deliver`, which repeats passes until nothing settles). A reply, which may be lost,
frees the initiator and is applied before it answers anyone or steps. Nothing changes an
initiator between its snapshot and its reply, so both sides end exactly at their average.
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

# A request's state, kept in its `Messages.weight` (pairwise exchanges carry no mixing weight)
FRESH, QUEUED, DEFERRED = 0.0, 1.0, 2.0

EXCHANGE_TRIES = 3
"""Requests an initiator sends for one exchange when partners refuse it for being in flight
themselves (each to a fresh random partner); the node's `gossipfl.node.protocol.EXCHANGE_TRIES`."""


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
        self.tries = torch.zeros(n, dtype=torch.int64, device=dev)  # requests sent for this gossip point
        self.retry_at = torch.full((n,), math.inf, dtype=torch.float64, device=dev)  # refused: when it tries again
        self.refused = 0  # requests refused (423): in flight with a lower id, or busy past timeout / 2
        self.deferred = 0  # requests that met their responder in flight and waited for it to settle
        self.seen_until = 0.0  # requests arriving before this were looked at in a time slice

    @property
    def exchanging(self) -> torch.Tensor:
        """Nodes whose gossip point is not over: waiting for a reply, or refused and about to retry."""
        return self.waiting | (self.retry_at < math.inf)

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

    def request(self, senders: torch.Tensor, sent_at: torch.Tensor, *, retry: bool = False) -> None:
        """Initiators (after their step; sorted): pick a neighbour, send the request, wait for the
        reply. A lost request leaves the initiator waiting out ``timeout``. ``retry``: initiators
        whose partner refused them, being in flight itself, try again with a fresh partner."""
        sim = self.sim
        if not senders.numel():
            return
        if not retry:
            self.tries[senders] = 0
        self.tries[senders] += 1
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
        self.idle_from[init] = at  # in flight from now: it defers or refuses requests (module docstring)
        self.idle_to[init] = torch.where(ok, math.inf, at + timeout)  # a lost one: the timeout
        self.waiting[init[ok]] = True
        zero = torch.zeros_like(init)
        new = Messages(resp, init, zero, zero, arrive, torch.zeros(init.shape[0], dtype=torch.float64, device=dev),
                       sim.step.index_select(0, init), torch.full_like(init, sim.msg_bytes)).select(ok)
        self.requests = self.requests.extend(new)

    def next_events(self, nxt: torch.Tensor) -> torch.Tensor:
        """``nxt`` with the times requests must be looked at: on arrival (or at once, if it arrived
        within a slice already done); a request waiting for a computing responder's lock when that
        lock frees; a deferred one when its responder's exchange settles; either when its wait runs
        out (busy)."""
        req = self.requests
        retry = self.retry_at.min().clamp_min(self.seen_until)
        nxt = torch.minimum(nxt, torch.stack([retry, retry]))
        if not len(req):
            return nxt
        inf = torch.tensor(math.inf, dtype=torch.float64, device=nxt.device)
        j, state = req.recv, req.weight
        waiting = self.waiting[j]
        wait_end = req.arrive + self.sim.cfg.timeout / 2
        release = torch.where(waiting, self.idle_from[j], inf)  # (a stepping one's: its t_next, in nxt)
        settle = torch.where(waiting, inf, self.idle_to[j])
        due = torch.where(state == FRESH, req.arrive,
                          torch.minimum(wait_end, torch.where(state == QUEUED, release, settle)))
        due = due.clamp_min(self.seen_until)
        return torch.minimum(nxt, torch.stack([due.min(), req.arrive.min()]))

    def deliver(self, t_next: torch.Tensor, t_end: float, up: torch.Tensor, closed: torch.Tensor) -> torch.Tensor:
        """Requests that reached their responder by this time slice (the node's ``rpc_exchange``),
        until none settles any more: an exchange that settles frees its initiator, which then
        answers the requests it deferred (so a chain of deferrals unwinds within one slice).
        Returns ``t_next`` with the freed initiators' next step times."""
        self.seen_until = t_end
        t_next = t_next.clone()
        while True:
            while len(self.requests) and self._deliver_pass(t_next, t_end, up, closed):
                pass
            if not self._retry(t_next, t_end):
                return t_next

    def _deliver_pass(self, t_next: torch.Tensor, t_end: float, up: torch.Tensor, closed: torch.Tensor) -> bool:
        """One pass over the requests in flight (see the module docstring for the rules); updates
        ``t_next`` in place and returns whether any request settled. A request's ``weight`` holds
        its state: FRESH, QUEUED (it arrived while its responder computed) or DEFERRED (it met its
        responder's own exchange in flight). Timeouts of lost replies count from the request's
        arrival: a latency late."""
        sim = self.sim
        from gossipfl.sim._async import delay

        req = self.requests
        timeout, inf = sim.cfg.timeout, math.inf
        j, i, arrive, state = req.recv, req.send, req.arrive, req.weight
        here = arrive < t_end
        gone = here & ~up[j]
        done = here & ~gone & closed[j]
        live = here & ~gone & ~done
        wait_end = arrive + timeout / 2  # rpc_exchange's wait for the lock (or the settle)
        waiting = self.waiting[j]
        in_flight = (arrive >= self.idle_from[j]) & (arrive < self.idle_to[j])
        # (a queued request is looked at again: a responder that retried meanwhile may have been
        # in flight when it arrived)
        looks = live & (state != DEFERRED)
        meet = torch.where(looks & in_flight, arrive, inf)  # when it meets its responder in flight
        # a computing responder's lock frees at the end of its step: it then starts its own exchange
        # (if it initiates: in flight from that instant) or answers before its next step
        queued = looks & ~in_flight
        release = torch.where(waiting, self.idle_from[j], t_next[j])
        locked = queued & (release >= arrive) & (release <= wait_end) & (release < t_end)
        meet = torch.where(locked & waiting, release, meet)
        answer_at = torch.where(locked & ~waiting, release, inf)
        refuse_at = torch.where(queued & ~locked & (wait_end < t_end) & (release > wait_end), wait_end, inf)
        # an initiator in flight refuses a lower id at once and defers a higher one until it settles
        met = meet < inf
        lower = i < j
        refuse_at = torch.where(met & lower, meet, refuse_at)
        deferred = (met & ~lower) | (live & (state == DEFERRED))
        settle = torch.where(waiting, inf, self.idle_to[j])
        unwound = deferred & (settle <= wait_end) & (settle < t_end)
        answer_at = torch.where(unwound, settle, answer_at)
        refuse_at = torch.where(deferred & ~unwound & (wait_end < t_end) & (settle > wait_end), wait_end, refuse_at)
        refused = refuse_at < inf
        answer = answer_at < inf
        self.refused += int(refused.sum())
        self.deferred += int((met & ~lower).sum())
        free = torch.full_like(arrive, inf)
        free = torch.where(refused, refuse_at + delay(sim, j, i, sim.msg_bytes), free)  # a refusal's way back
        # refused by an exchange in flight: it tries a fresh partner once the refusal is back
        again = met & lower & (self.tries[i] < EXCHANGE_TRIES)
        free = torch.where(done, arrive + delay(sim, j, i, sim.msg_bytes), free)
        free = torch.where(gone, arrive + timeout, free)
        sim.lost += gone.sum()
        if bool(answer.any()):
            ex = answer.nonzero().squeeze(1)
            ok = torch.ones(ex.shape[0], dtype=torch.bool, device=sim.device)
            if sim.emulation.loss:
                ok = torch.rand(ex.shape[0], generator=sim.gen, device=sim.device) >= sim.emulation.loss
                sim.lost += (~ok).sum()
            at = answer_at[ex]
            order = torch.argsort(at, stable=True)  # answered in time order
            ex, at, ok = ex[order], at[order], ok[order]
            ii, jj = i[ex], j[ex]
            self._answer(ii, jj, merge_waves(jj, at, ii), ok)
            free[ex] = torch.where(ok, at + delay(sim, jj, ii, sim.msg_bytes), arrive[ex] + timeout)
        settled = refused | gone | done | answer
        who = i[settled]
        t_next[who] = torch.where(again, inf, free)[settled]  # (a retrying one takes no step)
        self.retry_at[i[again]] = free[again]
        self.waiting[who] = False
        self.idle_to[who] = free[settled]  # in flight (deferring, refusing) until its reply is in
        req.weight = torch.where(deferred, DEFERRED, torch.where(queued, QUEUED, state))
        self.requests = req.select(~settled)
        return bool(settled.any())

    def _retry(self, t_next: torch.Tensor, t_end: float) -> bool:
        """Initiators refused by a partner in flight, whose refusal came back before ``t_end``,
        send a new request (after answering what they deferred: `_deliver_pass` runs first).
        One whose new request is lost (or finds no neighbour) steps again after its timeout."""
        due = (self.retry_at < t_end).nonzero().squeeze(1)
        if not due.numel():
            return False
        at = self.retry_at[due]
        self.retry_at[due] = math.inf
        self.request(due, at, retry=True)
        free = ~self.waiting[due]
        t_next[due[free]] = torch.maximum(at, self.idle_to[due])[free]
        return True

    def _answer(self, init: torch.Tensor, resp: torch.Tensor, waves: list[torch.Tensor], ok: torch.Tensor) -> None:
        """Responders answer wave by wave (a responder at most once per wave): they move towards
        the snapshot each initiator sent; the initiator's reply waits until it arrives
        (`apply_replies`), and is dropped where it was lost (the responder moved, the initiator not)."""
        for wave in waves:
            i, j = init[wave], resp[wave]
            self.apply_replies(j)  # a responder's own reply is in by now: it answers with it applied
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
