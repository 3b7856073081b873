"""Messages on a simulated clock, held as tensors: the bookkeeping of the vectorised engine.

A message does not carry a copy of its tensors. What the sender sent goes once into a
`SnapshotRing` (the last few messages each node sent, one tensor per channel), and a message in
flight is one row of `Messages`: receiver, sender, ring slot, send sequence number, arrival time,
the mixing weight the receiver gives the sender, and the sender's step count.
Sending to 20 neighbours costs 20 index rows, not 20 copies of D floats; merging is an indexed
read of the ring (one sparse product per channel). If a slow link outlives the ring (the sender has
sent ``depth`` newer models since), the message is reported as expired, like a bounded inbox
dropping its oldest entry.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["Messages", "SnapshotRing", "latest_per_pair", "latest_positions", "merge_waves"]


@dataclass
class Messages:
    """Messages in flight, one row per message (all tensors on one device, same length)."""

    recv: torch.Tensor  # int64
    send: torch.Tensor  # int64
    slot: torch.Tensor  # int64, ring slot of the sender's snapshot
    seq: torch.Tensor  # int64, the sender's send counter when it sent this message
    arrive: torch.Tensor  # float64, simulated arrival time
    weight: torch.Tensor  # float64, mixing weight the receiver gives the sender
    step: torch.Tensor  # int64, the sender's step count when it sent (for staleness)
    nbytes: torch.Tensor  # int64, encoded size

    @classmethod
    def empty(cls, device: torch.device) -> Messages:
        i = torch.empty(0, dtype=torch.int64, device=device)
        f = torch.empty(0, dtype=torch.float64, device=device)
        return cls(i, i, i, i, f, f, i, i)

    def __len__(self) -> int:
        return self.recv.shape[0]

    def select(self, index: torch.Tensor) -> Messages:
        """Rows at ``index`` (a bool mask or int64 positions), in that order."""
        if index.dtype == torch.bool:
            index = index.nonzero().squeeze(1)  # once, not once per field
        return Messages(*(getattr(self, f.name).index_select(0, index) for f in fields(self)))

    def extend(self, other: Messages) -> Messages:
        if not len(other):
            return self
        if not len(self):
            return other
        return Messages(*(torch.cat([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)))


class SnapshotRing:
    """The last ``depth`` messages each of ``n`` nodes sent, one tensor per channel ``[depth, n, ...]``.

    ``specs``: channel -> (shape per node, dtype). A message may leave a channel out
    (``Channel.every``): ``has[channel]`` says per slot whether it carried it.
    """

    def __init__(self, depth: int, n: int, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], *,
                 device: torch.device) -> None:
        self.depth, self.n = depth, n
        self.tensors = {k: torch.zeros(depth, n, *shape, dtype=dt, device=device) for k, (shape, dt) in specs.items()}
        self.has = {k: torch.zeros(depth, n, dtype=torch.bool, device=device) for k in specs}
        self.seq = torch.full((depth, n), -1, dtype=torch.int64, device=device)
        self.sent = torch.zeros(n, dtype=torch.int64, device=device)  # send counter per node

    def flat(self, key: str) -> torch.Tensor:
        """``[depth * n, ...]``: row ``slot * n + node`` of channel ``key``."""
        t = self.tensors[key]
        return t.view(-1, *t.shape[2:])

    def record(self, nodes: torch.Tensor, values: dict[str, torch.Tensor],
               carried: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the messages ``nodes`` send now (``carried``: per channel, which of them carry it);
        returns (slot, seq) per node."""
        seq = self.sent[nodes]
        slot = seq % self.depth
        at = slot * self.n + nodes  # rows of `flat`
        for k, v in values.items():
            self.flat(k).index_copy_(0, at, v)
            has = torch.ones_like(nodes, dtype=torch.bool) if carried is None or k not in carried else carried[k]
            self.has[k].view(-1).index_copy_(0, at, has)
        self.seq.view(-1).index_copy_(0, at, seq)
        self.sent.index_copy_(0, nodes, seq + 1)
        return slot, seq

    def valid(self, m: Messages) -> torch.Tensor:
        """True where the message's snapshot is still in the ring."""
        return self.seq[m.slot, m.send] == m.seq

    def rows(self, m: Messages) -> torch.Tensor:
        """Row of each message in `flat`."""
        return m.slot * self.n + m.send

    def carries(self, m: Messages, key: str) -> torch.Tensor:
        """True where the message carried channel ``key``."""
        return self.has[key].view(-1)[self.rows(m)]


def latest_positions(m: Messages, n: int, among: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the newest message (highest seq) of each (receiver, sender) pair, sorted by pair
    (``among``: only those positions are candidates). The vectorised form of
    `gossipfl.algorithms.inbox.latest_per_sender`, for all receivers at once."""
    idx = torch.arange(len(m), device=m.recv.device) if among is None else among
    if not idx.numel():
        return idx
    order = idx[torch.argsort(m.seq[idx], stable=True)]
    key = m.recv[order] * n + m.send[order]
    order = order[torch.argsort(key, stable=True)]
    key = m.recv[order] * n + m.send[order]
    last = torch.ones_like(key, dtype=torch.bool)
    last[:-1] = key[1:] != key[:-1]
    return order[last]


def latest_per_pair(m: Messages, n: int) -> Messages:
    """Keep only the newest message of each (receiver, sender) pair, sorted by pair."""
    return m.select(latest_positions(m, n)) if len(m) else m


def merge_waves(recv: torch.Tensor, *keys: torch.Tensor) -> list[torch.Tensor]:
    """Split messages into waves for sequential merges: wave k holds each receiver's k-th message.

    Messages are ordered per receiver by ``keys`` (most significant first); within a wave every
    receiver appears at most once, so a wave is one batched merge. Returns positions into the
    original arrays, one tensor per wave.
    """
    if not recv.numel():
        return []
    order = torch.arange(recv.numel(), device=recv.device)
    for key in reversed(keys):
        order = order[torch.argsort(key[order], stable=True)]
    order = order[torch.argsort(recv[order], stable=True)]
    r = recv[order]
    start = torch.ones_like(r, dtype=torch.bool)
    start[1:] = r[1:] != r[:-1]
    pos = torch.arange(r.numel(), device=r.device)
    first = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), 0).values
    rank = pos - first
    waves = int(rank.max()) + 1  # one host sync per merge batch: how many sequential waves
    return [order[rank == k] for k in range(waves)]
