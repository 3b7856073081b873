"""Network and compute emulation for the local cluster, from the same `[emulation]` knobs as the
vectorised engine: per-link latency, jitter, loss and bandwidth on every request, and per-node
compute speed (stragglers included) as a minimum wall time per local step.

Like Linux netem, but in-process: a wrapped transport sleeps for the link's delay before the
request and drops it with the loss probability. A lost request surfaces to the sender as a
failed contact after the link delay (a real sender would wait for its timeout; the outcome, no
delivery and a failed contact, is the same, only faster). Churn is not emulated here.
"""

from __future__ import annotations

import asyncio
import random

import torch

from gossipfl.emulation import Emulation
from gossipfl.errors import PeerError
from gossipfl.node.transport import Reply, Transport

__all__ = ["EmulatedTransport"]


class EmulatedTransport:
    """Wraps a transport; delays and drops requests as link ``src -> dst`` would."""

    def __init__(self, inner: Transport, *, src: int, index_of: dict[str, int], emulation: Emulation,
                 seed: int) -> None:
        self._inner = inner
        self._src = src
        self._index_of = index_of  # peer address -> node index (links are keyed by indices)
        self._em = emulation
        self._seed = seed
        self._rng = random.Random(seed * 1_000_003 + src)
        self._latency: dict[int, float] = {}
        self.lost = 0
        self.lost_bytes = 0

    def _link_latency(self, dst: int) -> float:
        if dst not in self._latency:
            lat = self._em.link_latency(torch.tensor([self._src]), torch.tensor([dst]), seed=self._seed)
            self._latency[dst] = float(lat[0])
        return self._latency[dst]

    async def request(self, address: str, method: str, path: str, body: bytes | bytearray | memoryview = b"",
                      *, timeout: float) -> Reply:
        dst = self._index_of.get(address)
        if dst is None:  # not a cluster member: no emulated link
            return await self._inner.request(address, method, path, body, timeout=timeout)
        delay = self._link_latency(dst) + self._em.transfer_seconds(len(body))
        if self._em.jitter:
            delay = max(0.0, delay + self._rng.uniform(-self._em.jitter, self._em.jitter))
        if delay:
            await asyncio.sleep(min(delay, timeout))
        if self._em.loss and self._rng.random() < self._em.loss:
            if path in ("/gossip", "/exchange"):  # a message lost; a status probe is not one
                self.lost += 1
                self.lost_bytes += len(body)
            raise PeerError(f"{address}: {method} {path} lost (emulated loss {self._em.loss:g})")
        return await self._inner.request(address, method, path, body, timeout=timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()
