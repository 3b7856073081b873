"""One graph's links as tensors, for the vectorised engine: who sends to whom, with which weight.

`Links` holds a graph's out-neighbour lists (CSR by sender), in-degrees, the mixing weight each
receiver gives each link's sender (the node's: Metropolis-Hastings etc. for ``symmetric``
algorithms, uniform ``1 / (1 + in-degree)`` otherwise), the sum of those weights per receiver
(``1 - W_ii``), and lazily the fused mixing matrix ``M`` with ``M @ x = mix`` of every node's
neighbours (diagonal ``1 - sum_j W_ij``). `LinkCache` keeps the links of a time-varying
topology's recent rounds: a periodic schedule has few graphs, and async senders sit at nearby rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch

from gossipfl.algorithms._util import csr
from gossipfl.emulation import Emulation
from gossipfl.topology import Schedule, mixing_matrix_sparse

__all__ = ["Fanout", "LinkCache", "Links", "csr", "csr_from"]


def csr_from(row: np.ndarray, col: np.ndarray, val: np.ndarray, n: int, dev: torch.device) -> torch.Tensor:
    """The ``n x n`` CSR matrix with ``val`` at (``row``, ``col``) (no duplicates), 32-bit indices
    where they fit: the sparse product is faster with them."""
    order = np.lexsort((col, row))
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=n), out=ptr[1:])
    index = torch.int32 if len(row) < 2**31 else torch.int64
    return csr(torch.from_numpy(ptr).to(dev, index), torch.from_numpy(col[order]).to(dev, index),
               torch.from_numpy(val[order]).to(dev), (n, n))


@dataclass(frozen=True)
class Fanout:
    """Every node sending to all its out-neighbours (a lock-step gossip round): the same messages
    each round of one graph, so they are computed once (`Links.fanout`). Per message, by sender:
    the sender's position ``which`` (= its index), sender, receiver and the receiver's
    float64 weight for the sender; per node the number of messages sent and received; ``covers``:
    every node receives at least one."""

    which: torch.Tensor
    send: torch.Tensor
    recv: torch.Tensor
    weight: torch.Tensor
    n_targets: torch.Tensor
    in_count: torch.Tensor
    every_sender: bool
    covers: bool


class Links:
    """The links of one graph on ``device``; ``weights``: the mixing-weight kind, or None for uniform
    ``1 / (1 + in-degree)`` (algorithms without symmetric weights)."""

    def __init__(self, graph: nx.Graph, n: int, *, weights: str | None, device: torch.device,
                 host_lists: bool = False) -> None:
        self.graph = graph
        pairs = np.array(list(graph.edges()), dtype=np.int64).reshape(-1, 2)
        src, dst = pairs[:, 0], pairs[:, 1]
        if not graph.is_directed():
            src, dst = np.concatenate([src, dst]), np.concatenate([dst, src])
        order = np.lexsort((dst, src))
        src, dst = src[order], dst[order]
        deg = np.bincount(src, minlength=n)
        ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(deg, out=ptr[1:])
        self.n, self.device = n, device
        self.send_ptr = torch.from_numpy(ptr).to(device)
        self.send_col = torch.from_numpy(dst).to(device)
        self.send_src = torch.from_numpy(src).to(device)
        self.send_deg = torch.from_numpy(deg).to(device)
        in_deg = np.bincount(dst, minlength=n)
        self.recv_deg = torch.from_numpy(in_deg).to(device)
        # out-neighbour lists on the host, for exact sampling (each node's own random.Random)
        self.lists = [dst[ptr[i]:ptr[i + 1]].tolist() for i in range(n)] if host_lists else []
        if weights is None:
            val64 = 1.0 / (1.0 + in_deg[dst].astype(np.float64))
            w_row, w_col = dst, src
            link_w = val64
        else:
            w = mixing_matrix_sparse(graph, weights, dtype=torch.float64)
            crow, col, val = w.crow_indices().numpy(), w.col_indices().numpy(), w.values().numpy()
            row = np.repeat(np.arange(n), np.diff(crow))
            off = row != col
            w_row, w_col, val64 = row[off], col[off], val[off]  # W[receiver, sender]; rows sorted, then cols
            at = np.searchsorted(w_row * n + w_col, dst * n + src)
            link_w = val64[at]
        self._w_rows, self._w_cols, self._w_vals = w_row, w_col, val64
        self.send_weight = torch.from_numpy(link_w.astype(np.float32)).to(device)  # per (sender -> receiver) link
        self.send_weight64 = torch.from_numpy(np.ascontiguousarray(link_w)).to(device)
        wsum = np.zeros(n, dtype=np.float64)
        np.add.at(wsum, w_row, val64)
        self.neighbour_weight = torch.from_numpy(wsum).to(device)  # sum_j W_ij over in-neighbours
        self._mixing: torch.Tensor | None = None
        self._fanout: Fanout | None = None
        self._latency: tuple[object, int, torch.Tensor] | None = None

    def latency(self, emulation: Emulation, seed: int) -> torch.Tensor:
        """Base one-way latency of every link (float64; a pure function of its ends: computed once)."""
        if self._latency is None or self._latency[0] is not emulation or self._latency[1] != seed:
            self._latency = (emulation, seed, emulation.link_latency(self.send_src, self.send_col, seed=seed))
        return self._latency[2]

    def fanout(self) -> Fanout:
        """Every node's messages when all send to all their out-neighbours (cached; see `Fanout`)."""
        if self._fanout is None:
            which, link = self.out_links(torch.arange(self.n, device=self.device))
            self._fanout = Fanout(which=which, send=which, recv=self.send_col[link],
                                  weight=self.send_weight64[link], n_targets=self.send_deg,
                                  in_count=self.recv_deg, every_sender=bool((self.send_deg > 0).all()),
                                  covers=bool((self.recv_deg > 0).all()))
        return self._fanout

    def mixing(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``M`` (CSR, in the models' ``dtype``) with ``M @ x`` = every node's mix of all its
        in-neighbours (cached per dtype)."""
        if self._mixing is None or self._mixing.dtype != dtype:
            n, np_dtype = self.n, np.float64 if dtype == torch.float64 else np.float32
            wsum = torch.zeros(n, dtype=dtype).index_add_(
                0, torch.from_numpy(self._w_rows), torch.from_numpy(self._w_vals.astype(np_dtype)))
            diag = np.arange(n)
            self._mixing = csr_from(np.concatenate([self._w_rows, diag]), np.concatenate([self._w_cols, diag]),
                                    np.concatenate([self._w_vals.astype(np_dtype), (1.0 - wsum).numpy()]), n,
                                    self.device)
        return self._mixing

    def out_links(self, senders: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(position in ``senders``, link index) of every out-link of every sender, by sender."""
        dev = senders.device
        deg = self.send_deg[senders]
        which = torch.repeat_interleave(torch.arange(senders.shape[0], device=dev), deg)
        first = torch.cumsum(deg, 0) - deg
        link = self.send_ptr[senders][which] + torch.arange(which.shape[0], device=dev) - first[which]
        return which, link


class LinkCache:
    """`Links` per round of a schedule (one entry for a static topology; a few recent rounds else)."""

    def __init__(self, schedule: Schedule, n: int, *, weights: str | None, device: torch.device,
                 host_lists: bool = False, size: int = 32) -> None:
        self.schedule, self.n, self.weights, self.device = schedule, n, weights, device
        self.host_lists, self.size = host_lists, size
        self.static = schedule.period == 1
        self._cache: dict[int, Links] = {}

    def at(self, r: int) -> Links:
        """The links of round ``r``'s graph."""
        key = 0 if self.static else (r % self.schedule.period if self.schedule.period else r)
        links = self._cache.get(key)
        if links is None:
            links = Links(self.schedule(key), self.n, weights=self.weights, device=self.device,
                          host_lists=self.host_lists)
            if len(self._cache) >= self.size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = links
        return links
