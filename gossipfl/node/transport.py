"""How requests travel between nodes: real HTTP (aiohttp) or an in-memory network.

Both carry the same bytes to the same handler (`Node.handle`), so everything a node does with a
message -- size limits, decoding, validation, merge -- is exercised with or without sockets.
Names mirror the server side: ``call_gossip`` here, ``rpc_gossip`` in the node.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from gossipfl.errors import PeerError, PeerTimeout
from gossipfl.node.buffers import new_buffer, read_into
from gossipfl.node.clock import Clock, WallClock

__all__ = ["READ_BUFSIZE", "SLICE", "Handler", "HttpTransport", "MemoryNetwork", "MemoryTransport", "Reply",
           "Transport", "slices"]


@dataclass(frozen=True)
class Reply:
    """A peer's answer: HTTP status and its JSON body (or raw bytes for binary replies)."""

    status: int
    body: bytes | memoryview

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            raise PeerError(f"peer answered {self.status} with a body that is not JSON") from None


# (method, path, body) -> (status, body); the node's single entry point for requests.
Handler = Callable[[str, str, bytes | bytearray], Awaitable[tuple[int, bytes | memoryview]]]


class Transport(Protocol):
    """Sends one request to a peer address (``host:port``) and returns its reply."""

    async def request(self, address: str, method: str, path: str, body: bytes | bytearray | memoryview = b"",
                      *, timeout: float) -> Reply:
        ...

    async def aclose(self) -> None:
        ...


class HttpTransport:
    """aiohttp client with one pooled session; every call bounded by ``timeout`` on ``clock``.

    Sockets wait in real time: give it the wall clock (the default), not a virtual one."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._clock = clock or WallClock()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Loopback and LAN peers: keep connections alive, do not touch proxies from the env.
            connector = aiohttp.TCPConnector(limit=64, ttl_dns_cache=60)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False, read_bufsize=READ_BUFSIZE)
        return self._session

    async def request(self, address: str, method: str, path: str, body: bytes | bytearray | memoryview = b"",
                      *, timeout: float) -> Reply:
        session = self._get_session()
        url = f"http://{address}{path}"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(body))} if body else None
        # Large bodies go out in slices: one big write makes Python 3.11's asyncio transport buffer
        # the remainder and shift it after every send, which is quadratic in the body size; and
        # aiohttp joins the headers with the first piece it is given (bytes.join: a copy), so the
        # first slice is small.
        data: Any = slices(body) if len(body) > _FIRST_SLICE else (body or None)
        try:
            async with self._clock.timeout(timeout):
                async with session.request(method, url, data=data, headers=headers) as resp:
                    return Reply(resp.status, await _read_reply(resp))
        except TimeoutError:
            raise PeerTimeout(f"{address}: no answer to {method} {path} within {timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise PeerError(f"{address}: {method} {path} failed: {exc or type(exc).__name__}") from None

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


SLICE = 1 << 20
_FIRST_SLICE = 1 << 14  # what aiohttp copies to put the headers in front of it (Python < 3.12.9)

READ_BUFSIZE = 1 << 18
"""aiohttp's body buffer limit, client and server. A body arrives in socket reads of up to 256 KB
(asyncio's read size); under aiohttp's default of 64 KB every read trips the reader's high-water
mark (twice the limit) and pauses and resumes the socket, two epoll calls and a loop turn per
read: a 10 MB body took ~0.7 ms longer (of ~5). Each connection buffers at most ~twice this."""


async def _read_reply(resp: aiohttp.ClientResponse) -> bytes | memoryview:
    """A reply's body; a large one (an exchange's model) read straight into one new buffer of the
    announced size, as a node reads a request (`gossipfl.node.handlers.read_body`): aiohttp's own
    read keeps every chunk and joins them, twice the model's size and one long copy on the loop."""
    n = resp.content_length
    if n is None or n < 1 << 16 or resp.content_type != "application/octet-stream":  # JSON stays bytes
        return await resp.read()
    view = memoryview(new_buffer(n))
    got = await read_into(resp.content.iter_any(), view)
    if got != n:
        raise aiohttp.ClientPayloadError(f"reply of {'more' if got is None else got} bytes, "
                                         f"its Content-Length says {n}")
    return view


async def slices(body: bytes | bytearray | memoryview) -> AsyncIterator[memoryview]:
    """The body in `SLICE` pieces after a `_FIRST_SLICE` one, yielding to the event loop before
    each one after the first.

    aiohttp awaits nothing while the socket takes every write whole (a fast loopback peer), so
    without the yield a 400 MB body went out in one ~0.1 s stretch of the loop."""
    view = memoryview(body)
    yield view[:_FIRST_SLICE]
    for off in range(_FIRST_SLICE, len(view), SLICE):
        await asyncio.sleep(0)
        yield view[off : off + SLICE]


class MemoryNetwork:
    """A switchboard of in-process nodes keyed by address; no sockets, same handler code."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._next_port = 1

    def register(self, handler: Handler, host: str = "mem") -> str:
        """Attach a node's handler and return its made-up address."""
        address = f"{host}:{self._next_port}"
        self._next_port += 1
        self._handlers[address] = handler
        return address

    def unregister(self, address: str) -> None:
        self._handlers.pop(address, None)

    def transport(self, *, clock: Clock | None = None) -> MemoryTransport:
        """A sender on this network; its timeouts run on ``clock`` (default: the wall clock)."""
        return MemoryTransport(self, clock=clock)


class MemoryTransport:
    """Delivers requests by calling the peer's handler directly (bytes are still copied)."""

    def __init__(self, network: MemoryNetwork, *, clock: Clock | None = None) -> None:
        self._network = network
        self._clock = clock or WallClock()

    async def request(self, address: str, method: str, path: str, body: bytes | bytearray | memoryview = b"",
                      *, timeout: float) -> Reply:
        handler = self._network._handlers.get(address)
        if handler is None:
            raise PeerError(f"{address}: connection refused (no node at this address)")
        try:
            async with self._clock.timeout(timeout):
                status, out = await handler(method, path, bytes(body))
        except TimeoutError:
            raise PeerTimeout(f"{address}: no answer to {method} {path} within {timeout:g} s") from None
        return Reply(status, out)

    async def aclose(self) -> None:
        return None
