"""A node's learner: the learning lock, the inbox, local steps, merges and outgoing frames.

Steps run in a worker thread, so the learning state (`NodeLearning`) is guarded by one lock
(``lock``). An exchange takes it from the event loop without blocking the loop (``acquire``);
the inbox has its own lock (``inbox_lock``), never held across an await or a computation, so
the event loop may take it while a step runs. Received messages wait in the inbox and are merged
at the start of the next step, never during one, so a step sees a consistent model.
"""

from __future__ import annotations

import asyncio
import random
import threading

from gossipfl import wire
from gossipfl.algorithms import Algorithm, Message
from gossipfl.algorithms.base import draw_targets
from gossipfl.metrics import StalenessTally
from gossipfl.node.buffers import Buffer, BufferPool, new_buffer
from gossipfl.node.clock import Clock, wall_time
from gossipfl.node.learner import NodeLearning
from gossipfl.node.replay import stamp
from gossipfl.node.view import NeighbourView

__all__ = ["INBOX_PER_NEIGHBOUR", "Outgoing", "Worker"]

INBOX_PER_NEIGHBOUR = 4  # queued messages per neighbour before the oldest is dropped (bounds memory)

# A gossip point's hand-off to the sender: (encoded frame, targets), or (None, [partner]) for an
# exchange the sender runs itself (pairwise algorithms).
Outgoing = tuple[memoryview | None, list[str]]


class Worker:
    """Lock, inbox and the algorithm calls of one node (``rng``: the algorithm's target draws)."""

    def __init__(self, *, node_id: str, cluster: str, fingerprint: str, secret: bytes | None,
                 state: NodeLearning, view: NeighbourView, staleness: StalenessTally, rng: random.Random,
                 clock: Clock) -> None:
        self.id, self.cluster, self.fingerprint, self.secret = node_id, cluster, fingerprint, secret
        self.address = ""  # ours, as peers should reach us (set once the server is bound)
        self.state = state
        self.algorithm: Algorithm = state.algorithm
        self.view = view
        self.staleness = staleness  # of every merged message, in local steps
        self._rng = rng
        self._clock = clock
        self.wall = wall_time(clock)  # signed messages carry the sender's time
        self.lock = threading.Lock()
        self.inbox_lock = threading.Lock()
        self.inbox: list[tuple[Message, bytes | Buffer]] = []  # message, and the buffer it aliases
        self.rx_pool = BufferPool(keep=4)
        self._tx_buf: Buffer = bytearray()  # reused for every outgoing frame (back-pressure: one send at a time)
        # an exchange request's own buffer: answering others meanwhile reuses _tx_buf, and a node has
        # at most one exchange of its own in flight, so this one is never overwritten while it travels
        self._exchange_buf: Buffer = bytearray()
        # replies to others' exchange requests: each its own buffer while it travels, recycled after
        # (a new 400 MB one per exchange costs ~100 000 page faults); small replies are not pooled
        self.reply_pool = BufferPool(keep=1)
        self.arrived = asyncio.Event()  # set on every queued message (neighbour-local rounds wait on it)
        # pairwise: our own exchange is in flight (snapshot sent, reply not yet applied); event-loop only
        self.exchanging = False
        self.settled = asyncio.Event()  # set whenever no exchange of ours is in flight
        self.settled.set()
        self.loss = float("nan")  # of the last local step

    def queue(self, msg: Message, body: bytes | Buffer) -> bool:
        """Queue an accepted message for the next merge; True if an older one was dropped for it:
        the sender's own oldest when it has `INBOX_PER_NEIGHBOUR` waiting (a fast or flooding
        peer cannot push the others' messages out), else the oldest of all."""
        self.arrived.set()
        with self.inbox_lock:
            mine = [k for k, (m, _) in enumerate(self.inbox) if m.sender == msg.sender]
            self.inbox.append((msg, body))
            if len(mine) >= INBOX_PER_NEIGHBOUR:
                del self.inbox[mine[0]]
                return True
            if len(self.inbox) > INBOX_PER_NEIGHBOUR * (len(self.view.neighbours) + 1):
                del self.inbox[0]  # a slow node keeps the newest messages, not an ever-growing queue
                return True
        return False

    def senders_since(self, r: int) -> set[str]:
        """Who has a message of round ``r`` or later waiting in the inbox."""
        with self.inbox_lock:
            return {m.sender for m, _ in self.inbox if m.round >= r}

    async def acquire(self, within: float) -> bool:
        """Take the state lock from the event loop without blocking it (cancellation-safe)."""
        deadline = self._clock.now() + within
        while not self.lock.acquire(blocking=False):
            if self._clock.now() > deadline:
                return False
            await self._clock.sleep(0.0005)
        return True

    def begin_exchange_locked(self) -> None:
        """Our exchange is in flight from its snapshot on (called under ``lock``, on the event loop)."""
        self.exchanging = True
        self.settled.clear()

    def end_exchange(self) -> None:
        """Our exchange has settled (reply applied, refused, failed): the requests it deferred go on
        (they wake before the training loop takes its next step, which waits for the send to finish)."""
        self.exchanging = False
        self.settled.set()

    async def acquire_to_answer(self, sender: str, within: float) -> str | None:
        """Take the lock to answer ``sender``'s exchange request: None when held, else why not.

        While our own exchange is in flight we answer nobody (the exchange stays an atomic average):
        a request from a lower id is refused at once ("exchanging"), one from a higher id waits
        until our exchange settles. Waits only point from higher to lower ids, so they form no cycle
        (`gossipfl.algorithms.adpsgd`). All of it within ``within`` seconds ("busy")."""
        deadline = self._clock.now() + within
        while True:
            if not await self.acquire(max(0.0, deadline - self._clock.now())):
                return "busy"
            if not self.exchanging:
                return None
            self.lock.release()
            if sender < self.id:
                return "exchanging"
            try:
                async with self._clock.timeout(max(0.0, deadline - self._clock.now())):
                    await self.settled.wait()
            except TimeoutError:
                return "busy"

    def merge_pending(self) -> int:
        with self.lock:
            return self.merge_pending_locked()

    def merge_pending_locked(self, max_round: int | None = None) -> int:
        """Merge queued messages (for round algorithms, only those of rounds <= ``max_round``)."""
        with self.inbox_lock:
            if max_round is None:
                inbox, self.inbox = self.inbox, []
            else:
                # a round's messages in (round, sender) order, not arrival order: the sum they
                # enter is then rounded the same way whatever the timing, so a run is reproducible
                # and equals the lock-step schedule's (which delivers in sender order)
                inbox = sorted((item for item in self.inbox if item[0].round <= max_round),
                               key=lambda item: (item[0].round, item[0].sender))
                self.inbox = [item for item in self.inbox if item[0].round > max_round]
        if inbox:
            messages = [m for m, _ in inbox]
            for m in messages:
                self.staleness.add(self.state.step - m.step)
            self.state.merge(messages, self.view.merge_weights(messages))
            del messages
        for _, body in inbox:  # merged: nothing references these buffers any more
            self.rx_pool.give(body)
        return len(inbox)

    def work(self, trains: bool, exchange_now: bool) -> Outgoing | None:
        """Merge what arrived and take one local step (worker thread).

        With ``exchange_now`` (a pairwise algorithm's gossip point) returns (None, [peer]), the
        partner of the exchange the gossip loop runs next; otherwise None.
        """
        with self.lock:
            rounds = self.algorithm.requirements.rounds
            self.merge_pending_locked(self.state.step if rounds else None)
            if trains:
                self.loss = self.state.local_step()
            self.state.step += 1
            return self._partner_locked() if exchange_now else None

    def partner(self) -> Outgoing | None:
        """(None, [peer]): the partner of a pairwise exchange drawn now, or None without neighbours."""
        with self.lock:
            return self._partner_locked()

    async def partner_async(self, within: float) -> Outgoing | None:
        """`partner` from the event loop without blocking it (None also if the lock stays taken)."""
        if not await self.acquire(within):
            return None
        try:
            return self._partner_locked()
        finally:
            self.lock.release()

    def _partner_locked(self) -> Outgoing | None:
        self.view.set_round(self.state.step)
        targets = draw_targets(self.algorithm.targets, self.view.neighbours, self._rng)
        return (None, targets[:1]) if targets else None

    def gossip_message(self) -> Outgoing | None:
        """This gossip point's message and its targets, or None (worker thread, send buffer free).

        Nothing merges between the step and this call (merges happen at step starts), so the
        message carries the model the step left. Encoding copies the parameters into the send
        buffer under the lock: that copy is the snapshot, so the next step may change the model
        while the frame is on its way.
        """
        with self.lock:
            self.view.set_round(self.state.step)
            targets = draw_targets(self.algorithm.targets, self.view.neighbours, self._rng)
            if not targets:
                return None
            body = self.encode_locked(self.state.message(len(targets)))
        return body, targets

    def linger_work(self) -> Outgoing | None:
        """After training: merge what arrived and push the model on (pairwise: initiate nothing)."""
        with self.lock:
            self.merge_pending_locked()
            self.view.set_round(self.state.step)
            targets = draw_targets(self.algorithm.targets, self.view.neighbours, self._rng)
            if not targets or self.algorithm.requirements.pairwise:
                return None  # pairwise: peers still exchange with us; we initiate nothing
            return self.encode_locked(self.state.message(len(targets))), targets

    def encode_locked(self, msg: Message, *, kind: str = "gossip") -> memoryview:
        """Frame ``msg`` into the send buffer (a view of it: valid until the next encode; an
        exchange request: until the node's next exchange request; a reply: its own new buffer,
        which lives as long as the view, so that answering never waits for a buffer to be free);
        signed frames carry their time and a nonce (`gossipfl.node.replay`)."""
        meta = {**msg.meta, "addr": self.address, "deg": self.view.degree}
        env = wire.Envelope(
            cluster=self.cluster, sender=self.id, algorithm=self.algorithm.name, kind=kind,
            fingerprint=self.fingerprint, step=msg.step, round=msg.round,
            meta=stamp(meta, self.wall) if self.secret is not None else meta,
            tensors=dict(msg.tensors),
        )
        if kind == "reply":  # give the view's buffer (``.obj``) to `reply_pool` once it is sent
            buf, n = wire.encode_reusing(env, bytearray(), self.reply_pool.take, secret=self.secret)
            return memoryview(buf)[:n]
        name = "_exchange_buf" if kind == "exchange" else "_tx_buf"
        # a new buffer when this one is too small: a large one without zeroing it under the GIL
        buf, n = wire.encode_reusing(env, getattr(self, name), new_buffer, secret=self.secret)
        setattr(self, name, buf)
        return memoryview(buf)[:n]

    def evaluate(self) -> tuple[float, float, tuple[float | None, int]]:
        """Test loss and accuracy of the model this node would deploy, and the consensus estimate
        among the models it has seen (`NodeLearning.seen_spread`)."""
        with self.lock:
            loss, acc = self.state.trainer.evaluate(self.state.model())
            return loss, acc, self.state.seen_spread()
