"""``gossipfl peers --watch``: a terminal table of the cluster, refreshed every second.

The nodes come from mDNS (browsed again every `REBROWSE` seconds in the background, so nodes
that join show up) and from ``--peer HOST:PORT`` addresses; each refresh asks every node for its
``/status`` (one timeout each, concurrently). On a terminal the table redraws in place; into a
pipe or file each refresh is printed as a block. Ctrl-C ends it (exit 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from gossipfl.errors import GossipflError

__all__ = ["format_table", "watch"]

REBROWSE = 15.0  # seconds between two mDNS browses
STATUS_TIMEOUT = 1.0


def _num(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: Sequence[dict[str, Any]], rates: dict[str, float | None]) -> list[str]:
    """The table's lines: one per node (``rates``: messages out per second since the last refresh)."""
    head = (f"{'id':<16}{'address':<22}{'step':>8}{'accuracy':>10}{'peers':>7}{'nbrs':>6}{'msgs out':>10}"
            f"{'msgs in':>9}{'out/s':>8}{'MB out':>9}{'MB in':>8}{'rejected':>10}")
    lines = [head]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['id']:<16}{r['address']:<22}  unreachable: {r['error'][:60]}")
            continue
        rate = rates.get(r["id"])
        lines.append(
            f"{r['id']:<16}{r['address']:<22}{_num(r.get('step'), 'd'):>8}{_num(r.get('accuracy'), '.4f'):>10}"
            f"{len(r.get('peers') or []):>7}{len(r.get('neighbours') or []):>6}{r.get('msgs_out', 0):>10}"
            f"{r.get('msgs_in', 0):>9}{_num(rate, '.1f'):>8}{r.get('bytes_out', 0) / 1e6:>9.2f}"
            f"{r.get('bytes_in', 0) / 1e6:>8.2f}{sum((r.get('rejected') or {}).values()):>10}")
    return lines


class _Watch:
    def __init__(self, *, cluster: str | None, addresses: Sequence[str], interfaces: Sequence[str] | None,
                 mdns: bool, duration: float) -> None:
        from gossipfl.node.transport import HttpTransport

        self.cluster, self.interfaces, self.mdns, self.duration = cluster, interfaces, mdns, duration
        self.known: dict[str, str] = {a: a for a in addresses}  # address -> id as last seen
        self.transport = HttpTransport()
        self._last: dict[str, tuple[float, int]] = {}

    async def browse_forever(self) -> None:
        from gossipfl.node.discovery import browse

        while True:
            for info in await browse(duration=self.duration, cluster=self.cluster, interfaces=self.interfaces):
                self.known.setdefault(info.address, info.id)
            await asyncio.sleep(REBROWSE)

    async def _status(self, address: str) -> dict[str, Any]:
        try:
            reply = await self.transport.request(address, "GET", "/status", timeout=STATUS_TIMEOUT)
            status = reply.json() if reply.status == 200 else None
        except (GossipflError, ValueError, OSError) as exc:
            return {"id": self.known[address], "address": address, "error": str(exc) or type(exc).__name__}
        if not isinstance(status, dict):
            return {"id": self.known[address], "address": address, "error": f"HTTP {reply.status}"}
        if self.cluster is not None and status.get("cluster") != self.cluster:
            return {}
        self.known[address] = str(status.get("id", address))
        for peer in status.get("peers") or []:  # the rest of the cluster, as this node knows it
            if isinstance(peer, dict) and isinstance(peer.get("address"), str):
                self.known.setdefault(peer["address"], str(peer.get("id", peer["address"])))
        return {**status, "id": str(status.get("id", address)), "address": address}

    async def refresh(self) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
        rows = [r for r in await asyncio.gather(*(self._status(a) for a in sorted(self.known))) if r]
        rows.sort(key=lambda r: r["id"])
        now, rates = time.monotonic(), {}
        for r in rows:
            if r.get("error"):
                continue
            prev = self._last.get(r["id"])
            rates[r["id"]] = (r["msgs_out"] - prev[1]) / (now - prev[0]) if prev and now > prev[0] else None
            self._last[r["id"]] = (now, int(r.get("msgs_out", 0)))
        return rows, rates


async def watch(*, cluster: str | None, addresses: Sequence[str], interfaces: Sequence[str] | None, mdns: bool,
                duration: float, every: float = 1.0, count: int | None = None, out: TextIO = sys.stdout) -> None:
    """Refresh the table every ``every`` seconds, ``count`` times (None: until cancelled)."""
    w = _Watch(cluster=cluster, addresses=addresses, interfaces=interfaces, mdns=mdns, duration=duration)
    tty = out.isatty()
    browser = asyncio.create_task(w.browse_forever()) if mdns else None
    try:
        k = 0
        while count is None or k < count:
            rows, rates = await w.refresh()
            lines = format_table(rows, rates)
            if not rows:
                lines = ["no gossipfl nodes found yet (listening on mDNS" + (" and polling --peer addresses"
                         if addresses else "") + "; Ctrl-C to stop)"]
            stamp = time.strftime("%H:%M:%S")
            block = [f"gossipfl peers --watch  {stamp}  {len(rows)} node(s)", *lines]
            if tty:
                out.write("\x1b[H\x1b[2J" + "\n".join(block) + "\n")
            else:
                out.write("\n".join(block) + "\n\n")
            out.flush()
            k += 1
            if count is None or k < count:
                await asyncio.sleep(every)
    finally:
        if browser is not None:
            browser.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await browser
        await w.transport.aclose()
