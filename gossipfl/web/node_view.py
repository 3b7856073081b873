"""The page's data on a node: its own history and the cluster as this node sees it.

``GET /cluster`` asks every peer this node knows for its ``/status`` (concurrently, one timeout
each, at most once a second however often pages poll), then draws the graph of the nodes that
answered: edges from each node's neighbour list, weighted by the messages either side counted on
it, and nodes coloured by accuracy. The consensus estimate is this node's own: the spread of the
newest models it has merged from its neighbours and its own (`NodeLearning.seen_spread`).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from gossipfl.errors import GossipflError
from gossipfl.web.graph import Layout
from gossipfl.web.history import History

if TYPE_CHECKING:
    from gossipfl.node.node import Node

__all__ = ["NodeSource"]

STATUS_TIMEOUT = 1.0  # seconds per peer's /status
REFRESH = 1.0  # seconds between two rounds of peer queries


class NodeSource:
    """`gossipfl.web.page.PageSource` of one node."""

    def __init__(self, node: Node, history: History) -> None:
        self.node = node
        self.history = history
        self._layout = Layout()
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()

    def info(self) -> dict[str, Any]:
        node = self.node
        return {"kind": "node", "id": node.id, "cluster": node.cfg.cluster, "algorithm": node.algorithm.name,
                "address": node.address, "topology": node.cfg.topology, "status": node.status()}

    async def _status_of(self, peer: dict[str, str]) -> dict[str, Any] | None:
        try:
            reply = await self.node.request_peer(peer["address"], "/status", timeout=STATUS_TIMEOUT)
        except (GossipflError, OSError):
            return None
        if reply.status != 200:
            return None
        try:
            status = reply.json()
        except ValueError:
            return None
        return status if isinstance(status, dict) and status.get("id") == peer["id"] else None

    async def cluster(self) -> dict[str, Any]:
        async with self._lock:  # pages polling at once share one round of queries
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < REFRESH:
                return self._cached[1]
            out = await self._gather()
            self._cached = (time.monotonic(), out)
            return out

    async def _gather(self) -> dict[str, Any]:
        node = self.node
        peers = node.membership.snapshot()
        answers = await asyncio.gather(*(self._status_of(p) for p in peers))
        statuses = {node.id: node.status()}
        unreachable = []
        for peer, status in zip(peers, answers, strict=True):
            if status is None:
                unreachable.append(peer["id"])
            else:
                statuses[peer["id"]] = status
        edges: dict[tuple[str, str], dict[str, int]] = {}
        for sid, st in statuses.items():
            for nb in st.get("neighbours") or []:
                if isinstance(nb, str) and nb in statuses:
                    edges.setdefault(tuple(sorted((sid, nb))), {"msgs": 0, "bytes": 0})
            for peer, t in (st.get("traffic") or {}).items():  # what this side sent on the link
                key = tuple(sorted((sid, peer)))
                if key in edges and isinstance(t, dict):
                    edges[key]["msgs"] += int(t.get("msgs_out", 0))
                    edges[key]["bytes"] += int(t.get("bytes_out", 0))
        ids = sorted(statuses)
        pos = self._layout.positions(ids, list(edges))
        spread, seen = node.seen_spread()
        return {
            "self": node.id,
            "nodes": [{"id": i, "x": pos[i][0], "y": pos[i][1], "accuracy": statuses[i].get("accuracy"),
                       "step": statuses[i].get("step"), "address": statuses[i].get("address"),
                       "rejected": sum((statuses[i].get("rejected") or {}).values()),
                       "finished": bool(statuses[i].get("finished"))} for i in ids],
            "edges": [{"a": a, "b": b, **t} for (a, b), t in sorted(edges.items())],
            "unreachable": unreachable,
            "consensus_estimate": spread,
            "models_seen": seen,
        }
