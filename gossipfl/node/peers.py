"""A node's membership protocol: finding peers, checking they are alive, forgetting dead ones.

Every ``PROBE_INTERVAL`` seconds the node probes its static addresses that are due (``GET
/status``: who is there, same cluster, model and algorithm?), pings members it has not heard
from lately (a crashed non-neighbour fails no send, so only a ping notices it), asks one random
member for its view every ``PEER_EXCHANGE_EVERY`` passes (membership spreads like gossip: one
``--peer`` is enough), and expires members that failed every contact for ``peer_timeout``
seconds. Discovery (mDNS), when on, feeds joins and leaves in through `on_discovery`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from typing import Any

from gossipfl.config import RunConfig
from gossipfl.errors import PeerError
from gossipfl.node.clock import Clock
from gossipfl.node.discovery import Discovery, PeerInfo
from gossipfl.node.membership import Membership
from gossipfl.node.transport import Transport
from gossipfl.node.util import WarnOnce, valid_address

__all__ = ["PEER_EXCHANGE_EVERY", "PROBE_INTERVAL", "RECENT_CONTACT", "Peers"]

PROBE_INTERVAL = 1.0  # seconds between membership passes
PEER_EXCHANGE_EVERY = 3  # membership passes between two view exchanges with a random member
RECENT_CONTACT = 3.0  # a peer heard from this recently is not probed


class Peers:
    """Keeps ``membership`` current by probing, pinging and exchanging views over ``transport``."""

    def __init__(self, *, node_id: str, cfg: RunConfig, fingerprint: str, algorithm: str,
                 membership: Membership, transport: Transport, clock: Clock, seed: int,
                 log: logging.Logger, warn: WarnOnce) -> None:
        self.id, self.cfg, self.fingerprint, self.algorithm = node_id, cfg, fingerprint, algorithm
        self.membership = membership
        self._transport = transport
        self._clock = clock
        self._view_rng = random.Random(f"{seed}-views")  # whom to ask for its view of the members
        self.log = log
        self._warn = warn
        self.discovery: Discovery | None = None
        self._discovered: set[str] = set()

    async def loop(self) -> None:
        """The membership loop: one pass every ``PROBE_INTERVAL`` seconds, until cancelled."""
        passes = 0
        while True:
            await self._clock.sleep(PROBE_INTERVAL)
            await self.probe_once()
            passes += 1
            if passes % PEER_EXCHANGE_EVERY == 0 and self.membership.ids():
                await self._exchange_views(self._view_rng.choice(self.membership.ids()))
            for gone in self.membership.expire():
                self.left(gone, f"no contact for {self.cfg.peer_timeout:.0f} s")

    async def probe_once(self) -> None:
        """Probe the static addresses that are due and ping the members that went quiet."""
        due = self.membership.static_due(recent=RECENT_CONTACT)
        quiet = self.membership.quiet(recent=RECENT_CONTACT)
        if due or quiet:
            await asyncio.gather(*(self._probe(a) for a in due), *(self._ping(p, a) for p, a in quiet))

    def contact_failed(self, peer_id: str, exc: PeerError) -> None:
        """A request to ``peer_id`` failed: it leaves once it has failed for ``peer_timeout``."""
        if self.membership.contact_failed(peer_id):
            self.left(peer_id, f"unreachable for {self.cfg.peer_timeout:.0f} s ({exc})")

    def left(self, peer_id: str, why: str) -> None:
        self.log.warning("peer %s left: %s", peer_id, why)
        if self.discovery is not None:
            self.discovery.forget(peer_id)  # mDNS will report it again if it comes back
        self._discovered.discard(peer_id)

    def on_discovery(self, view: Mapping[str, PeerInfo]) -> None:
        """Discovery's view changed: peers it sees join, peers it no longer sees leave."""
        for peer_id, info in view.items():
            if self.membership.seen(peer_id, info.address):
                self.log.info("peer %s discovered at %s", peer_id, info.address)
            self._discovered.add(peer_id)
        for gone in self._discovered - set(view):
            self._discovered.discard(gone)
            if gone in self.membership.ids():
                self.membership.remove(gone)
                self.log.info("peer %s left (its mDNS service was withdrawn)", gone)

    async def _status_of(self, address: str) -> Any:
        """``GET /status`` of ``address``: its JSON, or None for a non-200 answer (PeerError on failure)."""
        reply = await self._transport.request(address, "GET", "/status", timeout=self.cfg.timeout)
        return reply.json() if reply.status == 200 else None

    async def _exchange_views(self, peer_id: str) -> None:
        """Ask one random member for its view: peers we did not know become addresses to probe.

        Membership spreads like gossip, so one --peer is enough: a node joining through A becomes
        known to everyone within a few exchanges, and every node again computes the same graph."""
        address = self.membership.address(peer_id)
        if address is None:
            return
        try:
            info = await self._status_of(address)
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
                    and valid_address(addr)):
                self.membership.add_static(addr)  # verified by a probe before it joins our view

    async def _ping(self, peer_id: str, address: str) -> None:
        """Check a member we have not heard from lately (typically not a neighbour) is still there.

        Without it a crashed member that no one sends to never fails a contact, and stays in
        the view of every non-neighbour, whose graph then disagrees with everyone else's."""
        try:
            info = await self._status_of(address)
        except PeerError:
            info = None
        if isinstance(info, dict) and info.get("id") == peer_id:
            self.membership.seen(peer_id, address)
        elif self.membership.contact_failed(peer_id):
            self.left(peer_id, f"unreachable for {self.cfg.peer_timeout:.0f} s")

    async def _probe(self, address: str) -> None:
        """Ask a static peer who it is; a node of another cluster or model is ignored, loudly."""
        try:
            info = await self._status_of(address)
        except PeerError as exc:
            self._warn(f"probe-{address}", "peer %s unreachable (%s); retrying with back-off", address, exc)
            self._probe_failed(address)
            return
        if not isinstance(info, dict) or not isinstance(info.get("id"), str):
            self._warn(f"probe-bad-{address}", "%s is not a gossipfl node; ignoring it", address)
            self._probe_failed(address)
            return
        for key, ours in (("cluster", self.cfg.cluster), ("fingerprint", self.fingerprint),
                          ("algorithm", self.algorithm)):
            if info.get(key) != ours:
                self._warn(f"probe-{key}-{address}", "ignoring %s at %s: %s %r differs from ours %r",
                           info["id"], address, key, info.get(key), ours)
                self._probe_failed(address)
                return
        self._warn.forget(f"probe-{address}")
        if self.membership.seen(info["id"], address):
            self.log.info("peer %s joined at %s", info["id"], address)
        self._learn_peers(info)

    def _probe_failed(self, address: str) -> None:
        for gone in self.membership.probe_failed(address):
            self.left(gone, f"{address} unreachable for {self.cfg.peer_timeout:.0f} s")
