"""`Node`: one learner as an async service.

A node owns, inside one task group: an HTTP server (aiohttp, or a slot on an in-memory network),
a training loop (local steps run in a worker thread so the event loop keeps serving), a gossip
loop (sends the newest snapshot to the algorithm's targets), and a membership loop (probes
static peers, expires dead ones). Received messages are validated by the wire codec and queued;
they are merged between two local steps, never during one, so a step sees a consistent model.

There is no barrier: a node sends one message batch at a time (a gossip point waits until its
previous send is done; the send runs while the next steps compute), and never waits for anyone
else (round algorithms excepted: they wait, bounded, for their in-neighbours' round messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from aiohttp import web

from gossipfl import wire
from gossipfl.algorithms import Algorithm, Message
from gossipfl.algorithms.base import draw_targets
from gossipfl.config import RunConfig, parse_address
from gossipfl.errors import (
    BadSignature,
    ConfigError,
    FingerprintMismatch,
    GossipflError,
    MessageTooLarge,
    PeerError,
    TopologyError,
    WireError,
)
from gossipfl.learning.trainer import Trainer
from gossipfl.metrics import StalenessTally
from gossipfl.node.buffers import BufferPool
from gossipfl.node.discovery import Discovery, PeerInfo, _default_addresses
from gossipfl.node.learner import NodeLearning
from gossipfl.node.membership import Membership
from gossipfl.node.transport import HttpTransport, MemoryNetwork, Reply, Transport
from gossipfl.topology import Schedule, build_schedule, graph_for_members, local_weights, neighbours

__all__ = ["Node"]

PROBE_INTERVAL = 1.0  # seconds between membership passes
PEER_EXCHANGE_EVERY = 3  # membership passes between two view exchanges with a random member
RECENT_CONTACT = 3.0  # a peer heard from this recently is not probed
INBOX_PER_NEIGHBOUR = 4  # queued messages per neighbour before the oldest is dropped (bounds memory)
CHECKPOINT_EVERY = 50  # local steps between checkpoints when a state dir is set
_STATE = "state/"  # checkpoint tensor names of the algorithm state (NodeLearning.state_tensors)

_REASONS: list[tuple[type[WireError], str]] = [
    (MessageTooLarge, "too_large"),
    (FingerprintMismatch, "fingerprint"),
    (BadSignature, "signature"),
]


class _Rejected(WireError):
    """A well-formed message this node still refuses (other cluster or algorithm, bad shape)."""

    def __init__(self, reason: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.reason = reason
        self.http_status = status


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


class Node:
    """One gossip-learning node: ``async with Node(cfg, ...) as node: await node.finished.wait()``."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        node_id: str,
        trainer: Trainer,
        algorithm: Algorithm,
        network: MemoryNetwork | None = None,
        metrics: Callable[[dict[str, Any]], None] | None = None,
        secret: bytes | None = None,
        t0: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        state_dir: str | Path | None = None,
        seed: int = 0,
        mdns: bool = False,
        mdns_interfaces: Sequence[str] | None = None,
        transport: Transport | None = None,
        min_step_seconds: float = 0.0,
        linger: bool = False,
    ) -> None:
        self.cfg = cfg
        self.id = node_id
        self.trainer = trainer
        self.algorithm = algorithm
        self.state = NodeLearning(algorithm, trainer, seed=seed)  # learning state, the algorithm calls on it
        self.fingerprint = trainer.layout.fingerprint
        self.secret = secret
        self.log = logging.getLogger(f"gossipfl.node.{node_id}")
        self._network = network
        if transport is None:
            transport = network.transport() if network else HttpTransport()
        self._transport = transport
        self._min_step = min_step_seconds  # emulated compute speed: a step takes at least this long
        self.step_overruns = 0  # emulated steps whose real compute took longer than the emulated time
        # After its last step a lingering node keeps merging and gossiping (no more training) until
        # it is closed, so slower peers are not left to drift alone at the end of a simulation.
        self._linger = linger and not algorithm.requirements.rounds
        self._metrics = metrics or (lambda row: None)
        self._clock = clock
        self._t0 = t0
        self._rng = random.Random(seed)  # the algorithm's draws only (targets): engines replay them
        self._view_rng = random.Random(f"{seed}-views")  # whom to ask for its view of the members
        self._state_dir = Path(state_dir) if state_dir is not None else None
        self._mdns = mdns
        self._mdns_interfaces = list(mdns_interfaces) if mdns_interfaces else None
        self._discovery: Discovery | None = None
        self._discovered: set[str] = set()
        self.membership = Membership(node_id, peer_timeout=cfg.peer_timeout, clock=clock)
        for addr in cfg.peers:
            self.membership.add_static(addr)
        self.address = ""
        # learning state, guarded by _lock (worker thread vs. event loop)
        # _lock guards the learning state; an exchange holds it across awaits, so the event loop
        # never blocks on it (see _acquire). _inbox_lock guards only the queue and is never held
        # across an await or a computation, so the loop may take it.
        self._lock = threading.Lock()
        self._inbox_lock = threading.Lock()
        self._inbox: list[tuple[Message, bytes | bytearray]] = []  # message, and the buffer it aliases
        self._rx_pool = BufferPool(keep=4)
        self._tx_buf = bytearray()  # reused for every outgoing frame (back-pressure: one send at a time)
        self._templates = {
            name: (torch.Size(shape), dtype)
            for name, (shape, dtype) in algorithm.tensor_specs(trainer.layout.numel, trainer.params.dtype).items()
        }
        self._arrived = asyncio.Event()  # set on every accepted message (neighbour-local rounds wait on it)
        self.busy_replies = 0  # pairwise: exchanges a peer refused because it was busy
        self.round_timeouts = 0  # rounds: waits for neighbours that ran out
        # counters reported by /status and metrics
        self.bytes_in = self.bytes_out = self.msgs_in = self.msgs_out = 0
        self.dropped = 0
        self.rejected: Counter[str] = Counter()
        self.staleness = StalenessTally()  # of every merged message, in local steps
        self.loss = float("nan")
        self.accuracy = float("nan")
        self.finished = asyncio.Event()
        # gossip hand-off: the newest encoded message, and whether a send is in flight
        self._outgoing: tuple[memoryview | None, list[str]] | None = None
        self._outgoing_ready = asyncio.Event()
        self._send_idle = asyncio.Event()
        self._send_idle.set()
        # neighbour view, recomputed when membership changes
        self._view_version = -1
        self._members: list[str] = [node_id]
        self._schedule: Schedule | None = None
        self._round_view: tuple[int, list[str], list[str], dict[str, float]] | None = None
        self._neighbours: list[str] = []
        self._weights: dict[str, float] = {}
        self._degree = 0
        self._alone: bool | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._warned: set[str] = set()
        # the training loop waits for this, so a cluster can wire every node's peers first
        self.go = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self, *, hold: bool = False) -> None:
        """Bind the server, restore a checkpoint if any, start the loops. Starting twice is refused.

        With ``hold=True`` training waits until ``node.go`` is set (a cluster uses this to tell
        every node where its peers are before anyone takes a step).
        """
        if self._stack is not None or self._closed:
            raise RuntimeError(f"node {self.id} was already started")
        if self._t0 is None:
            self._t0 = self._clock()
        self._restore_checkpoint()
        stack = contextlib.AsyncExitStack()
        self._stack = stack
        try:
            await self._start_server(stack)
            stack.push_async_callback(self._transport.aclose)
            if self._mdns:
                await self._start_discovery(stack)
            tg = await stack.enter_async_context(asyncio.TaskGroup())
            stack.callback(self._cancel_tasks)  # runs before the task group waits for them
            self._tasks = [
                tg.create_task(self._membership_loop(), name=f"{self.id}-membership"),
                tg.create_task(self._gossip_loop(), name=f"{self.id}-gossip"),
                tg.create_task(self._train_loop(), name=f"{self.id}-train"),
            ]
        except BaseException:
            self._stack = None
            await stack.aclose()
            raise
        if not hold:
            self.go.set()
        self.log.info("node %s listening on %s (model %s, %d parameters)",
                      self.id, self.address, self.fingerprint, self.trainer.layout.numel)

    def _cancel_tasks(self) -> None:
        for t in self._tasks:
            t.cancel()

    async def aclose(self) -> None:
        """Stop loops, save a checkpoint, close the server; idempotent."""
        if self._closed:
            return
        self._closed = True
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()
        if self._state_dir is not None:
            await asyncio.to_thread(self._save_checkpoint)

    async def _start_server(self, stack: contextlib.AsyncExitStack) -> None:
        if self._network is not None:
            host, _ = parse_address(self.cfg.listen, key="listen")
            self.address = self._network.register(self.handle, host=host)
            stack.callback(self._network.unregister, self.address)
            return
        host, port = parse_address(self.cfg.listen, key="listen")
        app = web.Application(client_max_size=self.cfg.max_message_bytes + 2**20)
        app.router.add_route("*", "/{tail:.*}", self._http_entry)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"listen: cannot bind {host}:{port}: {exc.strerror or exc}") from None
        bound = runner.addresses[0]
        self.address = _advertised_address(host, bound[1])

    async def _start_discovery(self, stack: contextlib.AsyncExitStack) -> None:
        """Advertise over mDNS and feed what we hear into membership (closed before the server)."""
        # The bind address decides, not the advertised one: a wildcard bind runs mDNS on every
        # interface and advertises every LAN address (its advertised address is only a guess).
        host, _ = parse_address(self.cfg.listen, key="listen")
        _, port = parse_address(self.address, key="listen")
        specific = host not in ("0.0.0.0", "", "::")
        interfaces = self._mdns_interfaces or ([host] if specific else None)
        self._discovery = Discovery(
            node_id=self.id, cluster=self.cfg.cluster, port=port, fingerprint=self.fingerprint,
            protocol_version=wire.PROTOCOL_VERSION, addresses=[host] if specific else None,
            interfaces=interfaces, on_change=self._on_discovery, logger=self.log,
        )
        await self._discovery.start()
        stack.push_async_callback(self._discovery.aclose)

    def _on_discovery(self, view: Mapping[str, PeerInfo]) -> None:
        for peer_id, info in view.items():
            if self.membership.seen(peer_id, info.address):
                self.log.info("peer %s discovered at %s", peer_id, info.address)
            self._discovered.add(peer_id)
        for gone in self._discovered - set(view):
            self._discovered.discard(gone)
            if gone in self.membership.ids():
                self.membership.remove(gone)
                self.log.info("peer %s left (its mDNS service was withdrawn)", gone)

    def _peer_left(self, peer_id: str, why: str) -> None:
        self.log.warning("peer %s left: %s", peer_id, why)
        if self._discovery is not None:
            self._discovery.forget(peer_id)  # mDNS will report it again if it comes back
        self._discovered.discard(peer_id)

    # ------------------------------------------------------------------ serving

    async def _http_entry(self, request: web.Request) -> web.Response:
        """HTTP adapter around `handle`: enforce the size limit before reading the body."""
        limit = self.cfg.max_message_bytes
        if request.content_length is not None and request.content_length > limit:
            self.rejected["too_large"] += 1
            return _error_response(413, "too_large", f"body of {request.content_length} bytes exceeds {limit}")
        try:
            body = await _read_body(request, self._rx_pool)
        except web.HTTPRequestEntityTooLarge:
            self.rejected["too_large"] += 1
            return _error_response(413, "too_large", f"body exceeds {limit} bytes")
        status, out = await self.handle(request.method, request.path, body)
        binary = request.path == "/exchange" and status == 200
        return web.Response(status=status, body=out,
                            content_type="application/octet-stream" if binary else "application/json")

    async def handle(self, method: str, path: str, body: bytes | bytearray) -> tuple[int, bytes]:
        """The node's one entry point for requests, shared by HTTP and the in-memory network."""
        if path == "/status" and method == "GET":
            return 200, _json(self.status())
        if path in ("/gossip", "/exchange"):
            if method != "POST":
                return 405, _json({"error": f"use POST for {path}", "reason": "method"})
            return self.rpc_gossip(body) if path == "/gossip" else await self.rpc_exchange(body)
        return 404, _json({"error": f"no such endpoint: {method} {path}", "reason": "not_found"})

    def rpc_gossip(self, body: bytes | bytearray) -> tuple[int, bytes]:
        """Validate one message and queue it for the next merge; the model is untouched on error."""
        try:
            env = self._accept(body)
        except WireError as exc:
            self._rx_pool.give(body)
            reason = getattr(exc, "reason", None) or next(
                (r for cls, r in _REASONS if isinstance(exc, cls)), "malformed"
            )
            self.rejected[reason] += 1
            self._warn_once(f"reject-{reason}", "rejected a message (%s): %s", reason, exc)
            return exc.http_status, _json({"error": str(exc), "reason": reason})
        if self._closed_for_merges():
            del env
            self._rx_pool.give(body)
            return 503, _json({"error": f"node {self.id} has finished training", "reason": "finished"})
        self.bytes_in += len(body)
        self.msgs_in += 1
        addr = env.meta.get("addr")
        if isinstance(addr, str) and _valid_address(addr):
            if self.membership.seen(env.sender, addr):
                self.log.info("peer %s joined at %s (it messaged us)", env.sender, addr)
        msg = _message(env)
        del env
        self._arrived.set()
        with self._inbox_lock:
            self._inbox.append((msg, body))
            if len(self._inbox) > INBOX_PER_NEIGHBOUR * (len(self._neighbours) + 1):
                del self._inbox[0]  # a slow node keeps the newest messages, not an ever-growing queue
                self.dropped += 1
        return 200, _json({"ok": True})

    def _accept(self, body: bytes | bytearray) -> wire.Envelope:
        env = wire.decode(body, secret=self.secret, max_bytes=self.cfg.max_message_bytes,
                          fingerprint=self.fingerprint)
        if env.cluster != self.cfg.cluster:
            raise _Rejected("cluster", f"message for cluster {env.cluster!r}, this node is in "
                            f"{self.cfg.cluster!r}", 409)
        if env.algorithm != self.algorithm.name:
            raise _Rejected("algorithm", f"message from algorithm {env.algorithm!r}, this node runs "
                            f"{self.algorithm.name!r}", 409)
        if env.sender == self.id or not env.sender:
            raise _Rejected("sender", f"bad sender id {env.sender!r}")
        unknown = set(env.tensors) - set(self._templates)
        if unknown or not env.tensors:
            raise _Rejected("shape", f"expected tensors among {sorted(self._templates)}, got {sorted(env.tensors)}")
        for name, t in env.tensors.items():
            shape, dtype = self._templates[name]
            if t.shape != shape or t.dtype != dtype:
                raise _Rejected("shape", f"tensor {name!r} is {t.dtype}{list(t.shape)}, "
                                f"expected {dtype}{list(shape)}")
        try:
            wire.require_finite(env)
        except WireError as exc:
            raise _Rejected("nonfinite", str(exc)) from None
        return env

    def status(self) -> dict[str, Any]:
        """The `/status` document: identity, progress, peers and traffic counters."""
        return {
            "id": self.id,
            "cluster": self.cfg.cluster,
            "address": self.address,
            "algorithm": self.algorithm.name,
            "fingerprint": self.fingerprint,
            "topology": self.cfg.topology,
            "step": self.state.step,
            "loss": _finite_or_none(self.loss),
            "accuracy": _finite_or_none(self.accuracy),
            "peers": self.membership.snapshot(),
            "neighbours": list(self._neighbours),
            "alone": not self._neighbours,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "msgs_in": self.msgs_in,
            "msgs_out": self.msgs_out,
            "dropped": self.dropped,
            "rejected": dict(self.rejected),
            "staleness": self.staleness.mean,
            "finished": self.finished.is_set(),
        }

    # ------------------------------------------------------------------ neighbours

    def _refresh_view(self) -> None:
        """Map the current membership onto the topology; every node computes the same graphs."""
        if self._view_version == self.membership.version:
            return
        self._view_version = self.membership.version
        self._members = sorted([*self.membership.ids(), self.id])
        self._schedule = self._member_schedule(self._members)
        self._round_view = None
        old = set(self._neighbours)
        self._set_round(self.state.step)
        if set(self._neighbours) != old and self._schedule.period == 1:
            self.log.info("%d members; neighbours now %s", len(self._members), ", ".join(self._neighbours) or "none")
        alone = len(self._members) == 1
        if alone != self._alone:
            self._alone = alone
            if alone:
                self.log.warning("no peers reachable: training alone until one appears")
            else:
                self.log.info("gossiping: %d members", len(self._members))

    def _member_schedule(self, members: list[str]) -> Schedule:
        """The per-round graph over sorted member ids (static topologies: one graph for every round)."""
        labels = dict(enumerate(members))
        try:
            sched = build_schedule(self.cfg.topology, len(members), seed=self.cfg.seed) if len(members) > 1 else None
        except TopologyError:
            sched = None
        if sched is not None and sched.period != 1:
            return Schedule(sched.name, sched.n, sched.period, sched.directed,
                            lambda t: nx.relabel_nodes(sched(t), labels, copy=True))
        graph = self._member_graph(members)
        return Schedule(str(self.cfg.topology), len(members), 1, graph.is_directed(), lambda t: graph)

    def _set_round(self, t: int) -> None:
        """Neighbours, in-neighbours and weights for round ``t`` (cached: static graphs never change)."""
        assert self._schedule is not None
        key = 0 if self._schedule.period == 1 else t
        if self._round_view is not None and self._round_view[0] == key:
            return
        graph = self._schedule(key)
        outs = neighbours(graph, self.id)
        ins = sorted(graph.predecessors(self.id)) if graph.is_directed() else outs
        if self.algorithm.requirements.weights == "symmetric" and not graph.is_directed():
            _, weights = local_weights(graph, self.id, self.cfg.weights)
        else:
            weights = {n: 1.0 / (1 + len(ins)) for n in ins}
        self._round_view = (key, outs, ins, weights)
        self._neighbours, self._weights, self._degree = outs, weights, len(outs)

    def _in_neighbours(self, t: int) -> list[str]:
        """Who sends to us in round ``t`` (for a time-varying graph, the graph of round ``t``)."""
        assert self._schedule is not None
        key = 0 if self._schedule.period == 1 else t
        graph = self._schedule(key)
        return sorted(graph.predecessors(self.id)) if graph.is_directed() else neighbours(graph, self.id)

    def _member_graph(self, members: list[str]) -> nx.Graph:
        try:
            return graph_for_members(self.cfg.topology, members, seed=self.cfg.seed)
        except TopologyError as exc:
            # Membership sizes vary on a LAN (a hypercube of 3 does not exist): fall back loudly.
            fallback = "complete" if len(members) <= 3 else "ring"
            self._warn_once(f"topo-{len(members)}", "topology %r does not fit %d members (%s); using %s",
                            self.cfg.topology, len(members), exc, fallback)
            return graph_for_members(fallback, members, seed=self.cfg.seed)

    def _merge_weights(self, messages: Sequence[Message]) -> dict[str, float]:
        """Mixing weight per sender; a sender outside our view gets Metropolis-Hastings from its degree."""
        weights = dict(self._weights)
        for m in messages:
            if m.sender not in weights:
                deg = m.meta.get("deg")
                d = int(deg) if isinstance(deg, int) and not isinstance(deg, bool) and deg >= 0 else self._degree
                weights[m.sender] = 1.0 / (1 + max(self._degree, d, 1))  # never more than a pairwise average
        senders = {m.sender for m in messages}
        total = sum(weights[s] for s in senders)
        if total > 1.0:  # transient view disagreement: keep the merge a convex combination
            weights = {s: w / total for s, w in weights.items()}
        return weights

    # ------------------------------------------------------------------ loops

    def _now(self) -> float:
        assert self._t0 is not None
        return self._clock() - self._t0

    async def _train_loop(self) -> None:
        cfg = self.cfg
        trains = self.algorithm.requirements.trains
        pairwise = self.algorithm.requirements.pairwise
        deadline = None if cfg.duration is None else self._clock() + cfg.duration
        target = cfg.steps if deadline is None else None
        await self.go.wait()
        await self._probe_once()  # learn who is there before the first step
        await asyncio.to_thread(self._evaluate_and_record)
        done = 0
        began = self._clock()
        while True:
            if target is not None and done >= target:
                break
            if deadline is not None and self._clock() >= deadline:
                break
            self._refresh_view()
            if self.algorithm.requirements.rounds and self.state.step % cfg.gossip_every == 0:
                # only a gossip step sends a round message (with gossip_every > 1 the others do not)
                await self._wait_for_round(self.state.step)
            gossip_now = (self.state.step + 1) % cfg.gossip_every == 0
            if pairwise:  # an initiator takes no step until its exchange's reply is in
                await self._send_idle.wait()
            started = self._clock()
            out = await asyncio.to_thread(self._work, trains, gossip_now and pairwise)
            done += 1
            if self._min_step:
                spare = self._min_step - (self._clock() - started)
                self.step_overruns += spare < -0.1 * self._min_step  # the emulated speed was not kept
                await asyncio.sleep(max(0.0, spare))
            if gossip_now and not pairwise:
                # This step's message waits for the previous send to finish (back-pressure, one send
                # buffer); that send went on while this step computed, so a step lasts the longer
                # of its compute and its slowest link, not their sum.
                await self._send_idle.wait()
                out = await asyncio.to_thread(self._gossip_message)
            if out is not None:
                self._outgoing = out
                self._send_idle.clear()
                self._outgoing_ready.set()
            if self.state.step % cfg.eval_every == 0:
                await asyncio.to_thread(self._evaluate_and_record)
            if self._state_dir is not None and self.state.step % CHECKPOINT_EVERY == 0:
                await asyncio.to_thread(self._save_checkpoint)
            if not trains:
                await asyncio.sleep(0)  # pure averaging does no compute; let messages arrive
        await self._send_idle.wait()
        await asyncio.to_thread(self._evaluate_and_record)
        self.finished.set()
        self.log.info("finished %d steps: accuracy %.4f", self.state.step, self.accuracy)
        if self._linger and done:
            await self._linger_loop(period=(self._clock() - began) / done * cfg.gossip_every)

    async def _linger_loop(self, *, period: float) -> None:
        """Keep merging what arrives and pushing the model at the pace training had; runs until closed."""
        while True:
            await asyncio.sleep(max(period, 0.001))
            await self._send_idle.wait()
            out = await asyncio.to_thread(self._linger_work)
            if out is not None:
                self._outgoing = out
                self._send_idle.clear()
                self._outgoing_ready.set()

    def _linger_work(self) -> tuple[memoryview | None, list[str]] | None:
        with self._lock:
            self._merge_pending_locked()
            self._set_round(self.state.step)
            targets = draw_targets(self.algorithm.targets, self._neighbours, self._rng)
            if not targets or self.algorithm.requirements.pairwise:
                return None  # pairwise: peers still exchange with us; we initiate nothing
            return self._encode_locked(self.state.message(len(targets))), targets

    def _closed_for_merges(self) -> bool:
        return self.finished.is_set() and not self._linger

    async def _wait_for_round(self, r: int) -> None:
        """Neighbour-local round: wait (bounded) until every in-neighbour's round-r message is here.

        No barrier and no coordinator: a node only waits for the peers that send to it, and only
        up to ``timeout`` seconds; a neighbour that stays silent is dropped by membership later.
        """
        if r < 1:
            return
        expected = set(self.algorithm.expected_senders(self._in_neighbours(r), round=r))
        deadline = self._clock() + self.cfg.timeout
        while True:
            with self._inbox_lock:
                have = {m.sender for m, _ in self._inbox if m.round >= r}
            missing = expected - have
            missing &= set(self.membership.ids())  # peers that left are not waited for
            if not missing:
                return
            remaining = deadline - self._clock()
            if remaining <= 0:
                self.round_timeouts += 1
                self._warn_once(f"round-timeout-{sorted(missing)}", "round %d: no message from %s within %.1f s; "
                                "going on without", r, ", ".join(sorted(missing)), self.cfg.timeout)
                return
            self._arrived.clear()
            try:
                async with asyncio.timeout(min(remaining, 0.5)):
                    await self._arrived.wait()
            except TimeoutError:
                pass

    def merge_pending(self) -> int:
        """Merge every queued message now, without a local step; returns how many were merged."""
        with self._lock:
            return self._merge_pending_locked()

    def _merge_pending_locked(self, max_round: int | None = None) -> int:
        """Merge queued messages (for round algorithms, only those of rounds <= ``max_round``)."""
        with self._inbox_lock:
            if max_round is None:
                inbox, self._inbox = self._inbox, []
            else:
                # a round's messages in (round, sender) order, not arrival order: the sum they
                # enter is then rounded the same way whatever the timing, so a run is reproducible
                # and equals the lock-step schedule's (which delivers in sender order)
                inbox = sorted((item for item in self._inbox if item[0].round <= max_round),
                               key=lambda item: (item[0].round, item[0].sender))
                self._inbox = [item for item in self._inbox if item[0].round > max_round]
        if inbox:
            messages = [m for m, _ in inbox]
            for m in messages:
                self.staleness.add(self.state.step - m.step)
            self.state.merge(messages, self._merge_weights(messages))
            del messages
        for _, body in inbox:  # merged: nothing references these buffers any more
            self._rx_pool.give(body)
        return len(inbox)

    def _work(self, trains: bool, exchange_now: bool) -> tuple[memoryview | None, list[str]] | None:
        """Merge what arrived and take one local step (worker thread).

        With ``exchange_now`` (a pairwise algorithm's gossip point) returns (None, [peer]), the
        partner of the exchange the gossip loop runs next; otherwise None.
        """
        with self._lock:
            rounds = self.algorithm.requirements.rounds
            self._merge_pending_locked(self.state.step if rounds else None)
            if trains:
                self.loss = self.state.local_step()
            self.state.step += 1
            if not exchange_now:
                return None
            self._set_round(self.state.step)
            targets = draw_targets(self.algorithm.targets, self._neighbours, self._rng)
            return (None, targets[:1]) if targets else None

    def _gossip_message(self) -> tuple[memoryview, list[str]] | None:
        """This gossip point's message and its targets, or None (worker thread, send buffer free).

        Nothing merges between the step and this call (merges happen at step starts), so the
        message carries the model the step left. Encoding copies the parameters into the send
        buffer under the lock: that copy is the snapshot, so the next step may change the model
        while the frame is on its way.
        """
        with self._lock:
            self._set_round(self.state.step)
            targets = draw_targets(self.algorithm.targets, self._neighbours, self._rng)
            if not targets:
                return None
            body = self._encode_locked(self.state.message(len(targets)))
        return body, targets

    def _encode_locked(self, msg: Message, *, kind: str = "gossip") -> memoryview:
        env = wire.Envelope(
            cluster=self.cfg.cluster, sender=self.id, algorithm=self.algorithm.name, kind=kind,
            fingerprint=self.fingerprint, step=msg.step, round=msg.round,
            meta={**msg.meta, "addr": self.address, "deg": self._degree},
            tensors=dict(msg.tensors),
        )
        size = wire.encoded_size(env, secret=self.secret)
        if len(self._tx_buf) < size:
            self._tx_buf = bytearray(size)
        n = wire.encode_into(env, self._tx_buf, secret=self.secret)
        return memoryview(self._tx_buf)[:n]

    def _evaluate_and_record(self) -> None:
        with self._lock:
            loss, acc = self.trainer.evaluate(self.state.model())
        self.accuracy = acc
        if not self.algorithm.requirements.trains:
            self.loss = loss
        self._metrics({
            "node": self.id, "t": round(self._now(), 4), "step": self.state.step,
            "loss": loss, "train_loss": self.loss, "accuracy": acc,
            "bytes_out": self.bytes_out, "bytes_in": self.bytes_in,
            "msgs_out": self.msgs_out, "msgs_in": self.msgs_in, "staleness": self.staleness.since_row(),
        })

    async def model_snapshot(self) -> torch.Tensor:
        """A copy of the model this node would deploy (push-sum: de-biased), for cluster metrics.

        Async because an exchange in flight holds the lock across awaits: blocking the event loop
        on it would deadlock the exchange that is waiting for that loop."""
        if not await self._acquire(float("inf")):
            raise RuntimeError("unreachable: an infinite wait cannot time out")
        try:
            return self.state.model().clone()
        finally:
            self._lock.release()

    # ------------------------------------------------------------------ lock-step schedule

    async def work_round(self, *, gossip: bool = True) -> tuple[memoryview | None, list[str]] | None:
        """One round of a synchronous schedule: merge what arrived, step, encode the message.

        A simulation driver calls this on every node, then `send_round` on every node, so that
        round-r messages are merged in round r+1 everywhere (the schedule the vectorised engine
        reproduces). The node's own training loop must not be running (start with ``hold=True``).
        """
        self._refresh_view()
        pairwise = self.algorithm.requirements.pairwise
        out = await asyncio.to_thread(self._work, self.algorithm.requirements.trains, gossip and pairwise)
        if gossip and not pairwise:
            out = await asyncio.to_thread(self._gossip_message)
        return out

    async def send_round(self, out: tuple[memoryview | None, list[str]] | None) -> None:
        """Deliver this round's message to its targets, one after another (deterministic)."""
        if out is None:
            return
        body, targets = out
        for target in targets:
            if body is None:
                await self._exchange(target)
            else:
                await self._send(target, body)

    async def evaluate_now(self) -> None:
        """Evaluate and write a metrics row (used by drivers of the synchronous schedule)."""
        await asyncio.to_thread(self._evaluate_and_record)

    async def probe_peers(self) -> None:
        """Probe every static peer once and refresh the neighbour view."""
        await self._probe_once()
        self._refresh_view()

    # ------------------------------------------------------------------ gossip

    async def _gossip_loop(self) -> None:
        while True:
            await self._outgoing_ready.wait()
            self._outgoing_ready.clear()
            out, self._outgoing = self._outgoing, None
            try:
                if out is not None:
                    body, targets = out
                    if body is None:
                        await self._exchange(targets[0])
                    else:
                        await asyncio.gather(*(self._send(t, body) for t in targets))
            finally:
                self._send_idle.set()

    async def _acquire(self, within: float) -> bool:
        """Take the state lock from the event loop without blocking it (cancellation-safe)."""
        deadline = self._clock() + within
        while not self._lock.acquire(blocking=False):
            if self._clock() > deadline:
                return False
            await asyncio.sleep(0.0005)
        return True

    async def _exchange(self, peer_id: str) -> None:
        """Pairwise (AD-PSGD): snapshot our model, send it, add the reply's delta.

        The lock is held only to take the snapshot and to apply the reply, not for the round
        trip: meanwhile this node answers other nodes' exchanges (nobody is refused because it is
        exchanging itself, so simultaneous initiators do not all collide). Both sides move by
        deltas against what was sent (`ADPSGD.respond` / `apply_reply`), so the sum of the
        models is conserved however exchanges interleave. The training loop takes no step until
        this returns.
        """
        address = self.membership.address(peer_id)
        if address is None or not await self._acquire(self.cfg.timeout):
            return
        try:
            # a copy: answering an exchange meanwhile reuses the send buffer
            body = bytes(self._encode_locked(self.state.message(1), kind="exchange"))
        finally:
            self._lock.release()
        reply = await self._post(peer_id, address, "/exchange", body)
        env = self._exchange_reply(peer_id, reply)
        if env is None or not await self._acquire(self.cfg.timeout):
            return  # the snapshot is dropped by the next exchange's message()
        try:
            reply_msg = _message(env)
            self.staleness.add(self.state.step - reply_msg.step)
            self.state.apply_reply(reply_msg)
        finally:
            self._lock.release()
        self.bytes_out += len(body)
        self.msgs_out += 1
        assert reply is not None  # a decoded reply came in it
        self.bytes_in += len(reply.body)
        self.msgs_in += 1
        self.membership.seen(peer_id, address)

    def _exchange_reply(self, peer_id: str, reply: Reply | None) -> wire.Envelope | None:
        """The decoded reply to our exchange request, or None (refused, failed, malformed)."""
        if reply is None:
            return None
        if reply.status == 423:
            self.busy_replies += 1
            return None
        if reply.status == 503:  # the peer finished training; not an error
            return None
        if reply.status != 200:
            self._warn_once(f"xrefused-{peer_id}-{reply.status}", "peer %s refused the exchange (%d): %s",
                            peer_id, reply.status, reply.body[:200].decode(errors="replace"))
            return None
        try:
            return self._accept(reply.body)
        except WireError as exc:
            self._warn_once(f"xbad-{peer_id}", "bad exchange reply from %s: %s", peer_id, exc)
            return None

    async def rpc_exchange(self, body: bytes | bytearray) -> tuple[int, bytes]:
        """The responder's side of a pairwise exchange: average atomically, return our part."""
        if not self.algorithm.requirements.pairwise:
            return 409, _json({"error": f"{self.algorithm.name} does not exchange pairwise", "reason": "algorithm"})
        try:
            env = self._accept(body)
        except WireError as exc:
            reason = getattr(exc, "reason", None) or next((r for c, r in _REASONS if isinstance(exc, c)), "malformed")
            self.rejected[reason] += 1
            return exc.http_status, _json({"error": str(exc), "reason": reason})
        if self._closed_for_merges():
            return 503, _json({"error": f"node {self.id} has finished training", "reason": "finished"})
        if not await self._acquire(self.cfg.timeout / 2):  # a step outlasting timeout / 2
            return 423, _json({"error": f"node {self.id} is busy (a local step held its state for "
                                        f"{self.cfg.timeout / 2:g} s)", "reason": "busy"})
        try:
            incoming = _message(env)
            self.staleness.add(self.state.step - incoming.step)
            reply = self.state.respond(incoming)
            out = bytes(self._encode_locked(reply, kind="reply"))
        finally:
            self._lock.release()
        self.bytes_in += len(body)
        self.msgs_in += 1
        self.bytes_out += len(out)  # the reply carries our model too: it counts as a message sent
        self.msgs_out += 1
        addr = env.meta.get("addr")
        if isinstance(addr, str) and _valid_address(addr):
            self.membership.seen(env.sender, addr)
        return 200, out

    async def _post(self, peer_id: str, address: str, path: str,
                    body: bytes | bytearray | memoryview) -> Reply | None:
        """One POST to a peer; a failure counts against its membership and returns None."""
        try:
            return await self._transport.request(address, "POST", path, body, timeout=self.cfg.timeout)
        except PeerError as exc:
            if self.membership.contact_failed(peer_id):
                self._peer_left(peer_id, f"unreachable for {self.cfg.peer_timeout:.0f} s ({exc})")
            return None

    async def _send(self, peer_id: str, body: bytes | bytearray | memoryview) -> None:
        address = self.membership.address(peer_id)
        if address is None:
            return
        reply = await self._post(peer_id, address, "/gossip", body)
        if reply is None:
            return
        if reply.status == 200:
            self.bytes_out += len(body)
            self.msgs_out += 1
            self.membership.seen(peer_id, address)
        elif reply.status == 503:  # the peer finished training: not an error, it just stops merging
            self.log.debug("peer %s has finished; message not delivered", peer_id)
        else:
            self._warn_once(f"refused-{peer_id}-{reply.status}", "peer %s refused our message (%d): %s",
                            peer_id, reply.status, reply.body[:200].decode(errors="replace"))

    async def _membership_loop(self) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            await self._probe_once()
            rounds += 1
            if rounds % PEER_EXCHANGE_EVERY == 0 and self.membership.ids():
                await self._exchange_views(self._view_rng.choice(self.membership.ids()))
            for gone in self.membership.expire():
                self._peer_left(gone, f"no contact for {self.cfg.peer_timeout:.0f} s")

    async def _exchange_views(self, peer_id: str) -> None:
        """Ask one random member for its view: peers we did not know become addresses to probe.

        Membership spreads like gossip, so one --peer is enough: a node joining through A becomes
        known to everyone within a few exchanges, and every node again computes the same graph."""
        address = self.membership.address(peer_id)
        if address is None:
            return
        try:
            reply = await self._transport.request(address, "GET", "/status", timeout=self.cfg.timeout)
            info = reply.json() if reply.status == 200 else None
        except PeerError:
            return  # failures are the business of pings and sends
        if isinstance(info, dict):
            self._learn_peers(info)

    def _learn_peers(self, info: dict[str, Any]) -> None:
        peers = info.get("peers")
        if not isinstance(peers, list):
            return
        known = set(self.membership.ids())
        for p in peers[:1024]:
            if not isinstance(p, dict):
                continue
            pid, addr = p.get("id"), p.get("address")
            if (isinstance(pid, str) and isinstance(addr, str) and pid != self.id and pid not in known
                    and _valid_address(addr)):
                self.membership.add_static(addr)  # verified by a probe before it joins our view

    async def _probe_once(self) -> None:
        due = self.membership.static_due(recent=RECENT_CONTACT)
        quiet = self.membership.quiet(recent=RECENT_CONTACT)
        if due or quiet:
            await asyncio.gather(*(self._probe(a) for a in due), *(self._ping(p, a) for p, a in quiet))

    async def _ping(self, peer_id: str, address: str) -> None:
        """Check a member we have not heard from lately (typically not a neighbour) is still there.

        Without it a crashed member that no one sends to never fails a contact, and stays in
        the view of every non-neighbour, whose graph then disagrees with everyone else's."""
        try:
            reply = await self._transport.request(address, "GET", "/status", timeout=self.cfg.timeout)
            info = reply.json() if reply.status == 200 else None
        except PeerError:
            info = None
        if isinstance(info, dict) and info.get("id") == peer_id:
            self.membership.seen(peer_id, address)
        elif self.membership.contact_failed(peer_id):
            self._peer_left(peer_id, f"unreachable for {self.cfg.peer_timeout:.0f} s")

    async def _probe(self, address: str) -> None:
        """Ask a static peer who it is; a node of another cluster or model is ignored, loudly."""
        try:
            reply = await self._transport.request(address, "GET", "/status", timeout=self.cfg.timeout)
            info = reply.json() if reply.status == 200 else None
        except PeerError as exc:
            self._warn_once(f"probe-{address}", "peer %s unreachable (%s); retrying with back-off", address, exc)
            self._probe_failed(address)
            return
        if not isinstance(info, dict) or not isinstance(info.get("id"), str):
            self._warn_once(f"probe-bad-{address}", "%s is not a gossipfl node; ignoring it", address)
            self._probe_failed(address)
            return
        for key, ours in (("cluster", self.cfg.cluster), ("fingerprint", self.fingerprint),
                          ("algorithm", self.algorithm.name)):
            if info.get(key) != ours:
                self._warn_once(f"probe-{key}-{address}", "ignoring %s at %s: %s %r differs from ours %r",
                                info["id"], address, key, info.get(key), ours)
                self._probe_failed(address)
                return
        self._warned.discard(f"probe-{address}")
        if self.membership.seen(info["id"], address):
            self.log.info("peer %s joined at %s", info["id"], address)
        self._learn_peers(info)

    def _probe_failed(self, address: str) -> None:
        for gone in self.membership.probe_failed(address):
            self._peer_left(gone, f"{address} unreachable for {self.cfg.peer_timeout:.0f} s")

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_path(self) -> Path:
        assert self._state_dir is not None
        return self._state_dir / "checkpoint.gfl"

    def _checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a restarted node needs to carry on: the model, the optimizer's momentum and
        the algorithm's own state (CHOCO's public copies, DIGing's tracker, partition ages, ...)."""
        tensors = {"params": self.state.params.clone()}
        velocity = self.trainer.velocity
        if velocity is not None:
            tensors["velocity"] = velocity.clone()
        for name, t in self.state.state_tensors().items():
            if name != "params":
                tensors[_STATE + name] = t.clone()
        return tensors

    def _save_checkpoint(self) -> None:
        """Write the node's state atomically (temp file + rename); a full disk is logged, not fatal."""
        path = self._checkpoint_path()
        with self._lock:
            env = wire.Envelope(
                cluster=self.cfg.cluster, sender=self.id, algorithm=self.algorithm.name,
                fingerprint=self.fingerprint, kind="checkpoint", step=self.state.step,
                tensors=self._checkpoint_tensors(),
            )
        tmp = path.with_suffix(".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as f:
                f.write(wire.encode(env))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            self.log.error("checkpoint not saved to %s: %s (the previous one is kept)", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _restore_checkpoint(self) -> None:
        if self._state_dir is None or not self._checkpoint_path().exists():
            return
        path = self._checkpoint_path()
        try:
            env = wire.decode(path.read_bytes(), fingerprint=self.fingerprint)
            if env.algorithm != self.algorithm.name:
                raise WireError(f"written by algorithm {env.algorithm!r}, this node runs {self.algorithm.name!r}")
            wire.require_finite(env)
            restore = self._restorable(env.tensors)
        except (OSError, KeyError, GossipflError) as exc:
            self.log.warning("ignoring checkpoint %s: %s", path, exc)
            return
        with torch.no_grad():
            for target, saved in restore:
                target.copy_(saved)
        rng = env.tensors.get(_STATE + "rng")
        if rng is not None:  # a copy, not a view: the generator takes it back
            self.state.load_state({"rng": rng.clone()})
        self.state.step = env.step
        self.log.info("resumed from %s at step %d", path, env.step)

    def _restorable(self, tensors: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(live tensor, saved tensor) pairs, all checked before anything is overwritten: the model
        must fit; the momentum and algorithm state fit too or the checkpoint is refused, and where
        an older checkpoint lacks them they keep their fresh values (a warning says so)."""
        live: dict[str, torch.Tensor] = {"params": self.state.params}
        if self.trainer.velocity is not None:
            live["velocity"] = self.trainer.velocity
        live.update({_STATE + k: t for k, t in self.state.state_tensors().items() if k != "params"})
        pairs, missing = [], []
        for name, t in live.items():
            saved = tensors.get(name)
            if saved is None:
                if name == "params":
                    raise WireError("no params tensor")
                missing.append(name)
                continue
            if saved.shape != t.shape or saved.dtype != t.dtype:
                raise WireError(f"{name} is {saved.dtype} {list(saved.shape)}, "
                                f"this node's is {t.dtype} {list(t.shape)}")
            pairs.append((t, saved))
        if missing:
            self.log.warning("checkpoint lacks %s: starting those afresh", ", ".join(missing))
        return pairs

    # ------------------------------------------------------------------ helpers

    def _warn_once(self, key: str, fmt: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.log.warning(fmt, *args)


async def _read_body(request: web.Request, pool: BufferPool) -> bytes | bytearray:
    """The request body, read straight into one buffer of the announced size when there is one.

    One copy per byte instead of aiohttp's chunk list + join; the frame's tensors then alias a
    writable buffer. A body longer or shorter than its Content-Length is malformed."""
    n = request.content_length
    if n is None or n < 1 << 16:
        return await request.read()
    buf = pool.take(n)
    view = memoryview(buf)
    off = 0
    async for chunk in request.content.iter_any():
        end = off + len(chunk)
        if end > n:
            return b""  # longer than announced: let the codec reject an empty frame
        view[off:end] = chunk
        off = end
    return buf if off == n else b""


def _message(env: wire.Envelope) -> Message:
    return Message(sender=env.sender, tensors=env.tensors, step=env.step, round=env.round, meta=env.meta)


def _error_response(status: int, reason: str, message: str) -> web.Response:
    return web.Response(status=status, body=_json({"error": message, "reason": reason}),
                        content_type="application/json")


def _finite_or_none(x: float) -> float | None:
    return x if x == x and abs(x) != float("inf") else None


def _valid_address(addr: str) -> bool:
    try:
        parse_address(addr)
    except ConfigError:
        return False
    return True


def _advertised_address(host: str, port: int) -> str:
    """The address peers should use: a wildcard bind advertises this host's primary IP."""
    if host in ("0.0.0.0", "", "::"):
        host = _primary_ip()
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def _primary_ip() -> str:
    # The source address the kernel would pick for a LAN destination; no packet is sent.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return str(s.getsockname()[0])
        except OSError:
            # No route (an isolated LAN without a default gateway): the host's first LAN
            # address, not loopback, which peers would take as their own.
            return _default_addresses(None)[0]

