"""Who this node believes is alive, and where they are.

Membership is fed by three sources -- static peer addresses probed over ``GET /status``, peers
that message us (their envelope carries their address), and discovery -- and loses a peer only
after it has failed every contact for ``peer_timeout`` seconds. Every node maps the same member
set onto the same topology, so agreeing on membership is agreeing on the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Membership", "PeerState"]


@dataclass
class PeerState:
    """What we know of one peer."""

    id: str
    address: str
    last_ok: float  # last successful contact (either direction)
    failing_since: float | None = None


class Membership:
    """Alive peers by id; static addresses retried with exponential back-off."""

    def __init__(self, self_id: str, *, peer_timeout: float, clock: Callable[[], float]) -> None:
        self.self_id = self_id
        self.peer_timeout = peer_timeout
        self._clock = clock
        self._peers: dict[str, PeerState] = {}
        self.version = 0  # bumps on every join or leave, so callers recompute neighbours lazily
        # static address -> (next probe time, current back-off)
        self._static: dict[str, tuple[float, float]] = {}

    def add_static(self, address: str) -> None:
        self._static.setdefault(address, (0.0, 1.0))

    def static_due(self, *, recent: float) -> list[str]:
        """Static addresses to probe now: due by back-off and not contacted within ``recent`` s."""
        now = self._clock()
        fresh = {p.address for p in self._peers.values() if now - p.last_ok < recent and p.failing_since is None}
        return [a for a, (due, _) in self._static.items() if due <= now and a not in fresh]

    def quiet(self, *, recent: float) -> list[tuple[str, str]]:
        """``(id, address)`` of members not heard from within ``recent`` s, static ones excepted.

        A member we neither send to (not our neighbour) nor hear from would otherwise never be
        contacted, so it could never fail a contact and never leave the view after a crash:
        the node checks these members itself (static addresses have ``static_due``).
        """
        now = self._clock()
        return [
            (p.id, p.address) for p in sorted(self._peers.values(), key=lambda p: p.id)
            if p.address not in self._static and now - p.last_ok >= recent
        ]

    def probe_failed(self, address: str) -> list[str]:
        """Back off this static address; returns ids of peers at it that are now dropped."""
        _, backoff = self._static.get(address, (0.0, 1.0))
        self._static[address] = (self._clock() + backoff, min(backoff * 2, 30.0))
        return [p.id for p in list(self._peers.values()) if p.address == address and self.contact_failed(p.id)]

    def seen(self, peer_id: str, address: str) -> bool:
        """Record a successful contact; returns True if the peer is new (joined)."""
        if peer_id == self.self_id:
            return False
        now = self._clock()
        if address in self._static:
            self._static[address] = (now, 1.0)
        p = self._peers.get(peer_id)
        if p is None:
            self._peers[peer_id] = PeerState(peer_id, address, now)
            self.version += 1
            return True
        p.last_ok, p.failing_since, p.address = now, None, address
        return False

    def contact_failed(self, peer_id: str) -> bool:
        """Record a failed contact; returns True if the peer has now been dropped (left)."""
        p = self._peers.get(peer_id)
        if p is None:
            return False
        now = self._clock()
        if p.failing_since is None:
            p.failing_since = now
        if now - p.failing_since >= self.peer_timeout:
            self.remove(peer_id)
            return True
        return False

    def remove(self, peer_id: str) -> None:
        if self._peers.pop(peer_id, None) is not None:
            self.version += 1

    def expire(self) -> list[str]:
        """Drop peers that have been failing for longer than the timeout; return their ids."""
        now = self._clock()
        gone = [
            p.id for p in self._peers.values()
            if p.failing_since is not None and now - p.failing_since >= self.peer_timeout
        ]
        for pid in gone:
            self.remove(pid)
        return gone

    def address(self, peer_id: str) -> str | None:
        p = self._peers.get(peer_id)
        return p.address if p else None

    def ids(self) -> list[str]:
        return sorted(self._peers)

    def snapshot(self) -> list[dict[str, str]]:
        return [{"id": p.id, "address": p.address} for p in sorted(self._peers.values(), key=lambda p: p.id)]
