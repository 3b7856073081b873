"""`Node`: one learner as an async service -- its lifecycle and public API.

A node owns, inside one task group: an HTTP server (aiohttp, or a slot on an in-memory network),
a training loop (local steps run in a worker thread so the event loop keeps serving), a gossip
loop (sends the newest snapshot to the algorithm's targets), and a membership loop (probes
static peers, expires dead ones). Received messages are validated by the wire codec and queued;
they are merged between two local steps, never during one, so a step sees a consistent model.

This module wires the parts together and runs their lifecycle; each part lives in its own
module: `handlers` (requests and validation), `worker` (lock, inbox, steps and merges), `view`
(the neighbour view), `protocol` (train, gossip and round loops, sends, exchanges), `peers`
(the membership protocol), `checkpoint` (save and restore).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from aiohttp import web

from gossipfl import wire
from gossipfl.algorithms import Algorithm, Message
from gossipfl.attacks import Attack
from gossipfl.config import RunConfig, parse_address
from gossipfl.errors import ConfigError
from gossipfl.learning.trainer import Trainer
from gossipfl.metrics import StalenessTally, robust_counts
from gossipfl.node.checkpoint import Checkpoints
from gossipfl.node.clock import Clock, WallClock, as_clock
from gossipfl.node.discovery import Discovery, _default_addresses
from gossipfl.node.handlers import Handlers, Validator
from gossipfl.node.health import LoopMonitor
from gossipfl.node.learner import NodeLearning
from gossipfl.node.membership import Membership
from gossipfl.node.peers import Peers
from gossipfl.node.protocol import Protocol
from gossipfl.node.transport import READ_BUFSIZE, HttpTransport, MemoryNetwork, Reply, Transport
from gossipfl.node.util import WarnOnce
from gossipfl.node.view import NeighbourView
from gossipfl.node.worker import Outgoing, Worker
from gossipfl.web.history import History
from gossipfl.web.node_view import NodeSource

__all__ = ["Node"]


class Node:
    """One gossip-learning node: ``async with Node(cfg, ...) as node: await node.finished.wait()``.

    ``clock``: what the node reads time from and waits on (`gossipfl.node.clock`): the wall clock
    by default; a plain ``now`` callable (waits stay real); or a `VirtualClock`, with which the
    node's protocol -- steps, round waits, timeouts, pacing, peer expiry -- runs in virtual time
    over an in-memory ``network``. Discovery (mDNS) always keeps real time.
    """

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
        clock: Clock | Callable[[], float] | None = None,
        state_dir: str | Path | None = None,
        seed: int = 0,
        mdns: bool = False,
        mdns_interfaces: Sequence[str] | None = None,
        transport: Transport | None = None,
        min_step_seconds: float = 0.0,
        linger: bool = False,
        attack: Attack | None = None,
    ) -> None:
        self.cfg = cfg
        self.id = node_id
        self.trainer = trainer
        self.algorithm = algorithm
        # learning state, the algorithm calls on it; ``attack``: this node sends poisoned models (red-team runs)
        self.state = NodeLearning(algorithm, trainer, seed=seed, attack=attack)
        self.fingerprint = trainer.layout.fingerprint
        self.secret = secret
        self.log = logging.getLogger(f"gossipfl.node.{node_id}")
        self._network = network
        self._clock = clock = as_clock(clock)
        if transport is None:
            transport = network.transport(clock=clock) if network else HttpTransport(clock=clock)
        self._transport = transport
        self.step_overruns = 0  # emulated steps whose real compute took longer than the emulated time
        # After its last step a lingering node keeps merging and gossiping (no more training) until
        # it is closed, so slower peers are not left to drift alone at the end of a simulation.
        linger = linger and not algorithm.requirements.rounds
        self._metrics = metrics or (lambda row: None)
        self._t0 = t0
        self._mdns = mdns
        self._mdns_interfaces = list(mdns_interfaces) if mdns_interfaces else None
        self.membership = Membership(node_id, peer_timeout=cfg.peer_timeout, clock=clock.now)
        for addr in cfg.peers:
            self.membership.add_static(addr)
        self.address = ""
        self.busy_replies = 0  # pairwise: exchanges a peer refused because it was busy
        self.round_timeouts = 0  # rounds: waits for neighbours that ran out
        # counters reported by /status and metrics
        self.bytes_in = self.bytes_out = self.msgs_in = self.msgs_out = 0
        self.linger_msgs = self.linger_bytes = 0  # gossip sent after training ended (lost ones too)
        self.dropped = 0
        self.rejected: Counter[str] = Counter()
        # per peer: [messages out, bytes out, messages in, bytes in] (the page's traffic per edge)
        self.traffic: dict[str, list[int]] = {}
        self.history = History()  # the evaluation points the page's charts read (GET /metrics)
        self.spread: tuple[float | None, int] = (None, 0)  # consensus estimate at the last evaluation
        self.staleness = StalenessTally()  # of every merged message, in local steps
        self.accuracy = float("nan")
        self.finished = asyncio.Event()
        self.failed = asyncio.Event()  # one of the node's loops crashed (``error`` says which and why)
        self.error: str | None = None
        self.health = LoopMonitor()  # event-loop stalls, for /status (gossipfl.node.health)
        # the training loop waits for this, so a cluster can wire every node's peers first
        self.go = asyncio.Event()
        self._stack: contextlib.AsyncExitStack | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

        # the parts (each in its own module), wired together
        self._warn = WarnOnce(self.log)
        self._view = NeighbourView(node_id, cfg, algorithm, self.membership, log=self.log, warn=self._warn)
        self._worker = Worker(node_id=node_id, cluster=cfg.cluster, fingerprint=self.fingerprint, secret=secret,
                              state=self.state, view=self._view, staleness=self.staleness,
                              rng=random.Random(seed),  # the algorithm's draws only (targets): engines replay them
                              clock=clock)
        self._validator = Validator(node_id=node_id, cfg=cfg, algorithm=algorithm, fingerprint=self.fingerprint,
                                    secret=secret, numel=trainer.layout.numel, dtype=trainer.params.dtype,
                                    wall=self._worker.wall)
        self._checkpoints = None if state_dir is None else Checkpoints(
            Path(state_dir), node_id=node_id, cluster=cfg.cluster, fingerprint=self.fingerprint,
            state=self.state, lock=self._worker.lock, log=self.log)
        self._peers = Peers(node_id=node_id, cfg=cfg, fingerprint=self.fingerprint, algorithm=algorithm.name,
                            membership=self.membership, transport=transport, clock=clock, seed=seed,
                            log=self.log, warn=self._warn)
        self._protocol = Protocol(self, worker=self._worker, view=self._view, peers=self._peers,
                                  validator=self._validator, transport=transport, checkpoints=self._checkpoints,
                                  clock=clock, warn=self._warn, min_step=min_step_seconds, linger=linger)
        self.page = NodeSource(self, self.history)  # GET /: the live page's data (gossipfl.web)
        self._handlers = Handlers(self, validator=self._validator, worker=self._worker, warn=self._warn,
                                  linger=linger)

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
            self._t0 = self._clock.now()
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
                tg.create_task(self._guard("membership", self._peers.loop), name=f"{self.id}-membership"),
                tg.create_task(self._guard("gossip", self._protocol.gossip_loop), name=f"{self.id}-gossip"),
                tg.create_task(self._guard("training", self._protocol.train_loop), name=f"{self.id}-train"),
            ]
            if isinstance(self._clock, WallClock):  # stalls are real time; a virtual clock has none
                self._tasks.append(tg.create_task(self._guard("health", self.health.loop), name=f"{self.id}-health"))
        except BaseException:
            self._stack = None
            await stack.aclose()
            raise
        if not hold:
            self.go.set()
        self.log.info("node %s listening on %s (model %s, %d parameters)",
                      self.id, self.address, self.fingerprint, self.trainer.layout.numel)

    async def _guard(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one of the node's loops; if it crashes, say so (``error``, ``failed``) rather than
        leave a node that serves but no longer learns: `gossipfl node` then stops with exit 1."""
        try:  # the coroutine is made here: a task cancelled before it ran leaves none un-awaited
            await loop()
        except Exception as exc:  # a bug or an environment failure; never silent
            self.error = f"the {name} loop crashed: {type(exc).__name__}: {exc}"
            self.log.error("node %s: %s", self.id, self.error, exc_info=exc)
            self.failed.set()

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
        if self._checkpoints is not None:
            await self._clock.to_thread(self._checkpoints.save)

    async def _start_server(self, stack: contextlib.AsyncExitStack) -> None:
        if self._network is not None:
            host, _ = parse_address(self.cfg.listen, key="listen")
            self.address = self._network.register(self.handle, host=host)
            stack.callback(self._network.unregister, self.address)
        else:
            host, port = parse_address(self.cfg.listen, key="listen")
            app = web.Application(client_max_size=self.cfg.max_message_bytes + 2**20)
            app.router.add_route("*", "/{tail:.*}", self._handlers.http_entry)
            runner = web.AppRunner(app, access_log=None, handle_signals=False, read_bufsize=READ_BUFSIZE)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, host, port, reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                raise ConfigError(f"listen: cannot bind {host}:{port}: {exc.strerror or exc}") from None
            bound = runner.addresses[0]
            self.address = _advertised_address(host, bound[1])
        self._worker.address = self.address  # outgoing envelopes carry it: peers learn us from them

    async def _start_discovery(self, stack: contextlib.AsyncExitStack) -> None:
        """Advertise over mDNS and feed what we hear into membership (closed before the server)."""
        # The bind address decides, not the advertised one: a wildcard bind runs mDNS on every
        # interface and advertises every LAN address (its advertised address is only a guess).
        host, _ = parse_address(self.cfg.listen, key="listen")
        _, port = parse_address(self.address, key="listen")
        specific = host not in ("0.0.0.0", "", "::")
        interfaces = self._mdns_interfaces or ([host] if specific else None)
        discovery = Discovery(
            node_id=self.id, cluster=self.cfg.cluster, port=port, fingerprint=self.fingerprint,
            protocol_version=wire.PROTOCOL_VERSION, addresses=[host] if specific else None,
            interfaces=interfaces, on_change=self._peers.on_discovery, logger=self.log,
        )
        self._peers.discovery = discovery
        await discovery.start()
        stack.push_async_callback(discovery.aclose)

    # ------------------------------------------------------------------ serving

    async def handle(self, method: str, path: str, body: bytes | bytearray) -> tuple[int, bytes | memoryview]:
        """The node's one entry point for requests, shared by HTTP and the in-memory network."""
        return await self._handlers.handle(method, path, body)

    def rpc_gossip(self, body: bytes | bytearray) -> tuple[int, bytes]:
        """Validate one message and queue it for the next merge; the model is untouched on error."""
        return self._handlers.rpc_gossip(body)

    async def rpc_exchange(self, body: bytes | bytearray) -> tuple[int, bytes | memoryview]:
        """The responder's side of a pairwise exchange: average atomically, return our part."""
        return await self._handlers.rpc_exchange(body)

    @property
    def loss(self) -> float:
        """Training loss of the last local step (pure averaging: test loss of the last evaluation)."""
        return self._worker.loss

    @loss.setter
    def loss(self, value: float) -> None:
        self._worker.loss = value

    def count_out(self, peer: str, nbytes: int) -> None:
        """One message of ``nbytes`` delivered to ``peer``."""
        self.bytes_out += nbytes
        self.msgs_out += 1
        self._count(peer, 0, nbytes)

    def count_in(self, peer: str, nbytes: int) -> None:
        """One message of ``nbytes`` accepted from ``peer``."""
        self.bytes_in += nbytes
        self.msgs_in += 1
        self._count(peer, 2, nbytes)

    def _count(self, peer: str, at: int, nbytes: int) -> None:
        t = self.traffic.setdefault(peer, [0, 0, 0, 0])  # msgs out, bytes out, msgs in, bytes in
        t[at] += 1
        t[at + 1] += nbytes

    def seen_spread(self) -> tuple[float | None, int]:
        """The consensus estimate among the models this node has seen, at its last evaluation."""
        return self.spread

    async def request_peer(self, address: str, path: str, *, timeout: float) -> Reply:  # noqa: ASYNC109
        """A GET to a peer through this node's transport (the page's view of the cluster)."""
        return await self._transport.request(address, "GET", path, timeout=timeout)

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
            "neighbours": list(self._view.neighbours),
            "alone": not self._view.neighbours,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "msgs_in": self.msgs_in,
            "msgs_out": self.msgs_out,
            "dropped": self.dropped,
            "rejected": dict(self.rejected),
            # signed step lag of merged models (ours at merge - the sender's at send), and its sides
            "staleness": self.staleness.mean,
            "staleness_behind": self.staleness.behind_mean,
            "staleness_ahead": self.staleness.ahead_mean,
            "traffic": {p: {"msgs_out": t[0], "bytes_out": t[1], "msgs_in": t[2], "bytes_in": t[3]}
                        for p, t in sorted(self.traffic.items())},
            **robust_counts(self.state.state),  # clipped / discarded, with a robust aggregator
            "finished": self.finished.is_set(),
            **self.health.status(),  # rss_bytes, open_fds, tasks, loop_stall_max / _recent (seconds)
        }

    # ------------------------------------------------------------------ learning

    def _now(self) -> float:
        assert self._t0 is not None
        return self._clock.now() - self._t0

    def merge_pending(self) -> int:
        """Merge every queued message now, without a local step; returns how many were merged."""
        return self._worker.merge_pending()

    def _evaluate_and_record(self) -> None:
        loss, acc, self.spread = self._worker.evaluate()
        self.accuracy = acc
        if not self.algorithm.requirements.trains:
            self.loss = loss
        row = {
            "node": self.id, "t": round(self._now(), 4), "step": self.state.step,
            "loss": loss, "train_loss": self.loss, "accuracy": acc,
            "bytes_out": self.bytes_out, "bytes_in": self.bytes_in,
            "msgs_out": self.msgs_out, "msgs_in": self.msgs_in, "staleness": self.staleness.since_row(),
            **robust_counts(self.state.state),
        }
        self._metrics(row)
        self.history.add({**row, "rejected": sum(self.rejected.values()), "dropped": self.dropped,
                          "peers": len(self.membership.snapshot()), "neighbours": len(self._view.neighbours),
                          "consensus_estimate": self.spread[0], "models_seen": self.spread[1]})

    async def model_snapshot(self) -> torch.Tensor:
        """A copy of the model this node would deploy (push-sum: de-biased), for cluster metrics.

        Async because an exchange in flight holds the lock across awaits: blocking the event loop
        on it would deadlock the exchange that is waiting for that loop."""
        if not await self._worker.acquire(float("inf")):
            raise RuntimeError("unreachable: an infinite wait cannot time out")
        try:
            return self.state.model().clone()
        finally:
            self._worker.lock.release()

    # ------------------------------------------------------------------ lock-step schedule

    async def work_round(self, *, gossip: bool = True) -> Outgoing | None:
        """One round of a synchronous schedule: merge what arrived, step, encode the message.

        A simulation driver calls this on every node, then `send_round` on every node, so that
        round-r messages are merged in round r+1 everywhere (the schedule the vectorised engine
        reproduces). The node's own training loop must not be running (start with ``hold=True``).
        """
        self._view.refresh(self.state.step)
        pairwise = self.algorithm.requirements.pairwise
        out = await self._clock.to_thread(self._worker.work, self.algorithm.requirements.trains, gossip and pairwise)
        if gossip and not pairwise:
            out = await self._clock.to_thread(self._worker.gossip_message)
        return out

    async def wake_exchange(self) -> None:
        """One clock tick of randomized gossip (``requirements.wakes == "random"``): exchange with
        one random neighbour now, between rounds (the lock-step driver picks who wakes)."""
        await self.send_round(await self._clock.to_thread(self._worker.partner))

    async def send_round(self, out: Outgoing | None) -> None:
        """Deliver this round's message to its targets, one after another (deterministic)."""
        if out is None:
            return
        body, targets = out
        for target in targets:
            if body is None:
                await self._protocol.exchange(target)
            else:
                await self._protocol.send(target, body)

    async def evaluate_now(self) -> None:
        """Evaluate and write a metrics row (used by drivers of the synchronous schedule)."""
        await self._clock.to_thread(self._evaluate_and_record)

    async def probe_peers(self) -> None:
        """Probe every static peer once and refresh the neighbour view."""
        await self._peers.probe_once()
        self._view.refresh(self.state.step)

    # ------------------------------------------------------------------ internals tests reach for

    @property
    def _inbox(self) -> list[tuple[Message, bytes | bytearray]]:
        """Messages waiting for the next merge."""
        return self._worker.inbox

    def _work(self, trains: bool, exchange_now: bool) -> Outgoing | None:
        """A merge point and one local step, as the training loop takes it (see `Worker.work`)."""
        return self._worker.work(trains, exchange_now)

    def _save_checkpoint(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.save()

    def _restore_checkpoint(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.restore()


def _finite_or_none(x: float) -> float | None:
    return x if x == x and abs(x) != float("inf") else None


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
