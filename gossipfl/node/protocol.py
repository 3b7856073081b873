"""A node's protocol loops: training, gossip, lingering, round waits, sends and pairwise exchanges.

The training loop takes local steps (in a worker thread) at the node's own pace and hands each
gossip point's message to the gossip loop, which sends it while the next steps compute. There is
no barrier: a node sends one message batch at a time (a gossip point waits until its previous
send is done) and never waits for anyone else -- round algorithms excepted: they wait, bounded
by ``timeout``, for their in-neighbours' round messages. Pairwise algorithms (AD-PSGD) exchange
instead of sending: the initiator takes no step until the reply is in.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from gossipfl import wire
from gossipfl.errors import PeerError, WireError
from gossipfl.node.checkpoint import CHECKPOINT_EVERY, Checkpoints
from gossipfl.node.clock import Clock
from gossipfl.node.handlers import Validator
from gossipfl.node.peers import Peers
from gossipfl.node.transport import Reply, Transport
from gossipfl.node.util import WarnOnce, message_of
from gossipfl.node.view import NeighbourView
from gossipfl.node.worker import Outgoing, Worker

if TYPE_CHECKING:
    from gossipfl.node.node import Node

__all__ = ["EXCHANGE_TRIES", "Protocol"]

EXCHANGE_TRIES = 3
"""Requests a pairwise initiator sends at one gossip point when partners refuse it for being in
flight themselves, each to a fresh random partner (the vectorised engine's ``EXCHANGE_TRIES``)."""


class Protocol:
    """The loops of ``node`` and its requests to peers; counts traffic on the node."""

    def __init__(self, node: Node, *, worker: Worker, view: NeighbourView, peers: Peers, validator: Validator,
                 transport: Transport, checkpoints: Checkpoints | None, clock: Clock,
                 warn: WarnOnce, min_step: float, linger: bool) -> None:
        self._node = node
        self._clock = clock
        self._worker = worker
        self._view = view
        self._peers = peers
        self._validator = validator
        self._transport = transport
        self._checkpoints = checkpoints
        self._warn = warn
        self._min_step = min_step  # emulated compute speed: a step takes at least this long
        self._linger = linger
        # gossip hand-off: the newest encoded message, and whether a send is in flight
        self._outgoing: Outgoing | None = None
        self._outgoing_ready = asyncio.Event()
        self._send_idle = asyncio.Event()
        self._send_idle.set()

    def _hand_off(self, out: Outgoing) -> None:
        self._outgoing = out
        self._send_idle.clear()
        self._outgoing_ready.set()

    # ------------------------------------------------------------------ training

    async def train_loop(self) -> None:
        node, worker = self._node, self._worker
        cfg, clock = node.cfg, self._clock
        trains = node.algorithm.requirements.trains
        pairwise = node.algorithm.requirements.pairwise
        deadline = None if cfg.duration is None else clock.now() + cfg.duration
        target = cfg.steps if deadline is None else None
        await node.go.wait()
        await self._peers.probe_once()  # learn who is there before the first step
        await node.evaluate_now()
        done = 0
        began = clock.now()
        while True:
            if target is not None and done >= target:
                break
            if deadline is not None and clock.now() >= deadline:
                break
            self._view.refresh(node.state.step)
            if node.algorithm.requirements.rounds and node.state.step % cfg.gossip_every == 0:
                # only a gossip step sends a round message (with gossip_every > 1 the others do not)
                await self.wait_for_round(node.state.step)
            gossip_now = (node.state.step + 1) % cfg.gossip_every == 0
            if pairwise:  # an initiator takes no step until its exchange's reply is in
                await self._send_idle.wait()
            started = clock.now()
            out = await clock.to_thread(worker.work, trains, gossip_now and pairwise)
            done += 1
            if self._min_step:
                spare = self._min_step - (clock.now() - started)
                node.step_overruns += spare < -0.1 * self._min_step  # the emulated speed was not kept
                await clock.sleep(max(0.0, spare))
            if gossip_now and not pairwise:
                # This step's message waits for the previous send to finish (back-pressure, one send
                # buffer); that send went on while this step computed, so a step lasts the longer
                # of its compute and its slowest link, not their sum.
                await self._send_idle.wait()
                out = await clock.to_thread(worker.gossip_message)
            if out is not None:
                self._hand_off(out)
            if node.state.step % cfg.eval_every == 0:
                await node.evaluate_now()
            if self._checkpoints is not None and node.state.step % CHECKPOINT_EVERY == 0:
                await clock.to_thread(self._checkpoints.save)
            if not trains:
                await clock.sleep(0)  # pure averaging does no compute; let messages arrive
        await self._send_idle.wait()
        await node.evaluate_now()
        node.finished.set()
        node.log.info("finished %d steps: accuracy %.4f", node.state.step, node.accuracy)
        if self._linger and done:
            await self._linger_loop(period=(clock.now() - began) / done * cfg.gossip_every)

    async def _linger_loop(self, *, period: float) -> None:
        """Keep merging what arrives and pushing the model at the pace training had; runs until closed."""
        while True:
            await self._clock.sleep(max(period, 0.001))
            await self._send_idle.wait()
            out = await self._clock.to_thread(self._worker.linger_work)
            if out is not None:
                self._hand_off(out)

    async def wait_for_round(self, r: int) -> None:
        """Neighbour-local round: wait (bounded) until every in-neighbour's round-r message is here.

        No barrier and no coordinator: a node only waits for the peers that send to it, and only
        up to ``timeout`` seconds; a neighbour that stays silent is dropped by membership later.
        """
        if r < 1:
            return
        node, clock = self._node, self._clock
        expected = set(node.algorithm.expected_senders(self._view.in_neighbours(r), round=r))
        deadline = clock.now() + node.cfg.timeout
        while True:
            missing = expected - self._worker.senders_since(r)
            missing &= set(node.membership.ids())  # peers that left are not waited for
            if not missing:
                return
            remaining = deadline - clock.now()
            if remaining <= 0:
                node.round_timeouts += 1
                self._warn(f"round-timeout-{sorted(missing)}", "round %d: no message from %s within %.1f s; "
                           "going on without", r, ", ".join(sorted(missing)), node.cfg.timeout)
                return
            self._worker.arrived.clear()
            try:
                async with clock.timeout(min(remaining, 0.5)):
                    await self._worker.arrived.wait()
            except TimeoutError:
                pass

    # ------------------------------------------------------------------ gossip

    async def gossip_loop(self) -> None:
        while True:
            await self._outgoing_ready.wait()
            self._outgoing_ready.clear()
            out, self._outgoing = self._outgoing, None
            try:
                if out is not None:
                    body, targets = out
                    if body is None:
                        await self.exchange(targets[0])
                    else:
                        await asyncio.gather(*(self.send(t, body) for t in targets))
            finally:
                self._send_idle.set()

    async def _post(self, peer_id: str, address: str, path: str,
                    body: bytes | bytearray | memoryview) -> Reply | None:
        """One POST to a peer; a failure counts against its membership and returns None."""
        try:
            return await self._transport.request(address, "POST", path, body, timeout=self._node.cfg.timeout)
        except PeerError as exc:
            self._peers.contact_failed(peer_id, exc)
            return None

    async def send(self, peer_id: str, body: bytes | bytearray | memoryview) -> None:
        """Deliver one gossip message to ``peer_id``; refusals are logged once, failures counted."""
        node = self._node
        address = node.membership.address(peer_id)
        if address is None:
            return
        if node.finished.is_set():  # lingering: counted apart, whether or not it arrives
            node.linger_msgs += 1
            node.linger_bytes += len(body)
        reply = await self._post(peer_id, address, "/gossip", body)
        if reply is None:
            return
        if reply.status == 200:
            node.count_out(peer_id, len(body))
            node.membership.seen(peer_id, address)
        elif reply.status == 503:  # the peer finished training: not an error, it just stops merging
            node.log.debug("peer %s has finished; message not delivered", peer_id)
        else:
            self._warn(f"refused-{peer_id}-{reply.status}", "peer %s refused our message (%d): %s",
                       peer_id, reply.status, reply.body[:200].decode(errors="replace"))

    async def exchange(self, peer_id: str) -> None:
        """Pairwise (AD-PSGD): one atomic exchange (`exchange_once`); a partner that refuses us
        because its own exchange is in flight is replaced by a fresh random one, up to
        `EXCHANGE_TRIES` requests. Between tries our exchange has settled: the requests we
        deferred are answered first."""
        for _ in range(EXCHANGE_TRIES - 1):
            if not await self.exchange_once(peer_id):
                return
            await self._clock.sleep(0)  # the requests we deferred run now, before our next snapshot
            out = await self._worker.partner_async(self._node.cfg.timeout)
            if out is None:
                return
            peer_id = out[1][0]
        await self.exchange_once(peer_id)

    async def exchange_once(self, peer_id: str) -> bool:
        """Snapshot our model, send it, add the reply's delta -- atomically. True if the partner
        refused because its own exchange was in flight (worth another partner).

        From the snapshot until the reply is applied our exchange is in flight: we answer no other
        exchange meanwhile (`Worker.acquire_to_answer`: a lower id is refused, a higher one waits
        until this returns), so nothing changes our model between the snapshot and the reply and
        the two sides end exactly at their average. The lock is held only to take the snapshot and
        to apply the reply. Both sides move by deltas against what was sent (`ADPSGD.respond` /
        `apply_reply`), so the sum of the models is conserved whatever happens. The training loop
        takes no step until this returns.
        """
        node, worker = self._node, self._worker
        address = node.membership.address(peer_id)
        if address is None or not await worker.acquire(node.cfg.timeout):
            return False
        try:
            worker.begin_exchange_locked()
            try:  # the exchange request's own buffer: answering others meanwhile reuses the send buffer
                body = worker.encode_locked(worker.state.message(1), kind="exchange")
            finally:
                worker.lock.release()
            reply = await self._post(peer_id, address, "/exchange", body)
            env = self._exchange_reply(peer_id, reply)
            if env is None or not await worker.acquire(node.cfg.timeout):
                return reply is not None and _refused_in_flight(reply)  # the snapshot is dropped
            try:
                reply_msg = message_of(env)
                worker.staleness.add(worker.state.step - reply_msg.step)
                worker.state.apply_reply(reply_msg)
            finally:
                worker.lock.release()
        finally:
            worker.end_exchange()
        node.count_out(peer_id, len(body))
        assert reply is not None  # a decoded reply came in it
        node.count_in(peer_id, len(reply.body))
        node.membership.seen(peer_id, address)
        return False

    def _exchange_reply(self, peer_id: str, reply: Reply | None) -> wire.Envelope | None:
        """The decoded reply to our exchange request, or None (refused, failed, malformed)."""
        if reply is None:
            return None
        if reply.status == 423:
            self._node.busy_replies += 1
            return None
        if reply.status == 503:  # the peer finished training; not an error
            return None
        if reply.status != 200:
            self._warn(f"xrefused-{peer_id}-{reply.status}", "peer %s refused the exchange (%d): %s",
                       peer_id, reply.status, reply.body[:200].decode(errors="replace"))
            return None
        try:
            return self._validator.accept(reply.body)
        except WireError as exc:
            self._warn(f"xbad-{peer_id}", "bad exchange reply from %s: %s", peer_id, exc)
            return None


def _refused_in_flight(reply: Reply) -> bool:
    """A 423 whose reason says the partner's own exchange was in flight (`Worker.acquire_to_answer`)."""
    if reply.status != 423:
        return False
    try:
        return bool(json.loads(reply.body).get("reason") == "exchanging")
    except (ValueError, AttributeError):
        return False
