"""``gossipfl sim --live``: the page for a simulation in progress, served from a thread.

Either engine runs in the main thread and writes metric rows through a writer; `Live.tap` wraps
that writer, so every cluster row (mean accuracy, consensus distance, mean step) also becomes a
point of the page's history, with what only the driver knows beside it: the minimum accuracy,
node-steps per second and wall time against simulated time. The graph is the run's topology
(round 0), a fixed sample of `MAX_DRAWN` nodes beyond that many, each coloured by its accuracy at
the latest metric point; the consensus chart's theory line is rho^2 per round, rho the second
largest singular value of the mixing matrix, where it applies (a fixed symmetric matrix).
`LiveServer` serves the page with aiohttp on its own event loop in a daemon thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from gossipfl.config import parse_address
from gossipfl.errors import ConfigError
from gossipfl.web.graph import MAX_DRAWN, Layout, sample_nodes
from gossipfl.web.history import History
from gossipfl.web.page import PageSource, page_response

__all__ = ["Live", "LiveServer", "theory_rho"]

Probe = Callable[[Sequence[int]], tuple[list[float | None], list[int]]]
"""The accuracy and step of the nodes at the given indices, read by the engine's own thread."""


def theory_rho(plan: Any) -> float | None:
    """rho = |W - J|_2 of the run's fixed symmetric mixing matrix (None: none applies, or too big)."""
    from gossipfl.topology import mixing_matrix, slem

    schedule, cfg = plan.schedule, plan.cfg
    if schedule.period != 1 or schedule.directed or cfg.nodes > 4096:
        return None
    if plan.algorithm.requirements.weights != "symmetric":
        return None
    return float(slem(mixing_matrix(schedule(0), cfg.weights)))


class Live:
    """The page's data for one run (`gossipfl.web.page.PageSource`)."""

    def __init__(self, plan: Any, *, probe: Probe | None = None) -> None:
        cfg = plan.cfg
        self.cfg = cfg
        self.history = History()
        self.probe = probe
        graph = plan.schedule(0)
        self.drawn = [int(v) for v in sample_nodes(sorted(graph.nodes()), MAX_DRAWN, seed=cfg.seed)]
        keep = set(self.drawn)
        self.edges = sorted({(min(int(a), int(b)), max(int(a), int(b))) for a, b in graph.edges()
                             if int(a) in keep and int(b) in keep and a != b})
        self.rho = theory_rho(plan)
        self.attackers = sorted(plan.attack.nodes) if plan.attack is not None and plan.attack.nodes else []
        self._layout = Layout(seed=cfg.seed)
        self._acc: list[float | None] = [None] * len(self.drawn)
        self._step: list[int] = [0] * len(self.drawn)
        self._wall0 = time.monotonic()
        self._last: tuple[float, float] | None = None  # (wall, total node-steps) of the previous point
        self.finished = False
        self.names: list[str] | None = None  # the engine's node ids (else the graph's indices)

    def tap(self, writer: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        """``writer``, also feeding this page (cluster rows become points; node rows pass through)."""
        def write(row: dict[str, Any]) -> None:
            writer(row)
            if row.get("node") is None:
                self.point(row)
        return write

    def point(self, row: dict[str, Any]) -> None:
        wall = time.monotonic() - self._wall0
        steps = float(row.get("mean_step") or 0.0) * self.cfg.nodes
        rate = None
        if self._last is not None and wall > self._last[0]:
            rate = (steps - self._last[1]) / (wall - self._last[0])
        self._last = (wall, steps)
        if self.probe is not None:
            self._acc, self._step = self.probe(self.drawn)
        self.history.add({**row, "wall": round(wall, 3), "node_steps_per_s": rate})

    def info(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"kind": "sim", "nodes": cfg.nodes, "engine": cfg.engine, "schedule": cfg.schedule,
                "algorithm": cfg.algorithm, "topology": cfg.topology, "steps": cfg.steps,
                "duration": cfg.duration, "rho": self.rho, "drawn": len(self.drawn), "finished": self.finished}

    async def cluster(self) -> dict[str, Any]:
        pos = self._layout.positions(self.drawn, self.edges)
        bad = set(self.attackers)
        last = self.history.last() or {}
        names = self.names

        def name(i: int) -> str:
            return names[i] if names is not None else str(i)

        return {
            "nodes": [{"id": name(i), "x": pos[i][0], "y": pos[i][1], "accuracy": a, "step": s,
                       "attacker": i in bad} for i, a, s in zip(self.drawn, self._acc, self._step, strict=True)],
            "edges": [{"a": name(a), "b": name(b)} for a, b in self.edges],
            "sampled": len(self.drawn) < self.cfg.nodes,
            "consensus_distance": last.get("consensus_distance"),
        }


class LiveServer:
    """Serves `gossipfl.web.page` for ``source`` at ``address`` (HOST:PORT; port 0: any free one)
    from a daemon thread; `url` once started. A context manager."""

    def __init__(self, source: PageSource, address: str = "127.0.0.1:8750") -> None:
        self.source = source
        self.host, self.port = parse_address(address, key="live")
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def __enter__(self) -> LiveServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="gossipfl-live", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise ConfigError(f"live: cannot serve on {self.host}:{self.port}: {self._error}") from None

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._start_site())
        except OSError as exc:
            self._error = exc.strerror or exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        loop.run_forever()
        assert self._runner is not None
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    async def _start_site(self) -> None:
        async def entry(request: web.Request) -> web.StreamResponse:
            page = await page_response(self.source, request)
            if page is None:
                raise web.HTTPNotFound(text="not found")
            return page

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", entry)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}/"

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
