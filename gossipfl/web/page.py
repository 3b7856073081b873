"""The page's HTTP side, shared by a node and by ``gossipfl sim --live``.

``GET /``            the page (static HTML; the browser script reads the three endpoints below)
``GET /static/NAME`` its script, style sheet and the vendored chart library (uPlot, MIT)
``GET /info``        what is being watched: ``{"kind": "node" | "sim", ...}``
``GET /metrics?since=T`` the history's points after time T (`gossipfl.web.history`), bounded
``GET /cluster``     the graph: nodes (accuracy, step, ...), edges (traffic where known),
                     positions laid out on the server, and a consensus estimate

Everything is read-only: no endpoint changes a node or a run, and the page loads nothing from
outside (no CDN), so it works on a LAN without internet.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from typing import Any, Protocol

from aiohttp import web

from gossipfl.web.history import History

__all__ = ["PAGE_PATHS", "PageSource", "page_response", "serves", "static_files"]

PAGE_PATHS = ("/", "/index.html", "/info", "/metrics", "/cluster")
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".txt": "text/plain"}


class PageSource(Protocol):
    """What a page watches: a node (`gossipfl.web.node_view`) or a simulation (`gossipfl.web.live`)."""

    history: History

    def info(self) -> dict[str, Any]: ...

    async def cluster(self) -> dict[str, Any]: ...


def static_files() -> dict[str, bytes]:
    """The page's files by their URL name (``index.html``, ``app.js``, ``vendor/uPlot.iife.min.js``...)."""
    root = resources.files("gossipfl.web") / "static"
    out: dict[str, bytes] = {}
    for entry in root.iterdir():
        if entry.is_file():
            out[entry.name] = entry.read_bytes()
        elif entry.is_dir():
            for sub in entry.iterdir():
                if sub.is_file():
                    out[f"{entry.name}/{sub.name}"] = sub.read_bytes()
    return out


_FILES: dict[str, bytes] | None = None


def _file(name: str) -> bytes | None:
    global _FILES
    if _FILES is None:
        _FILES = static_files()
    return _FILES.get(name)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data, allow_nan=False, default=_default),
                        content_type="application/json", headers={"Cache-Control": "no-store"})


def _default(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    raise TypeError(f"not JSON: {type(v).__name__}")


def _since(request: web.Request) -> float | None:
    raw = request.query.get("since")
    if raw is None or raw == "":
        return None
    try:
        t = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"since: expected a number, got {raw!r}",
                                                  "reason": "malformed"}), content_type="application/json") from None
    return t if math.isfinite(t) else None


def serves(path: str) -> bool:
    """Whether ``path`` is one of the page's (the node routes the rest to its gossip handler)."""
    return path in PAGE_PATHS or path.startswith("/static/")


async def page_response(source: PageSource, request: web.Request) -> web.Response | None:
    """The response for a page path, or None when ``request.path`` is not one of the page's."""
    path = request.path
    if not serves(path):
        return None
    if request.method not in ("GET", "HEAD"):
        return _json({"error": f"the page is read-only: use GET for {path}", "reason": "method"}, 405)
    if path in ("/", "/index.html"):
        return web.Response(body=_file("index.html"), content_type="text/html", charset="utf-8")
    if path.startswith("/static/"):
        name = path[len("/static/"):]
        body = _file(name)
        if body is None:
            return _json({"error": f"no such file: {name}", "reason": "not_found"}, 404)
        suffix = name[name.rfind("."):]
        return web.Response(body=body, content_type=_TYPES.get(suffix, "application/octet-stream"),
                            headers={"Cache-Control": "max-age=3600"})
    if path == "/info":
        return _json(source.info())
    if path == "/metrics":
        points = source.history.since(_since(request))
        return _json({"points": points, "kept": len(source.history), "added": source.history.added})
    return _json(await source.cluster())
