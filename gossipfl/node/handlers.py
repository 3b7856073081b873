"""A node's server side: the request entry point, message validation and error responses.

One handler (`Handlers.handle`) serves both transports: the aiohttp adapter (`http_entry`, which
enforces the size limit before reading a body) and the in-memory network call it with the same
bytes. ``POST /gossip`` (`rpc_gossip`) validates a message and queues it for the next merge;
``POST /exchange`` (`rpc_exchange`) is the responder's side of a pairwise exchange; ``GET
/status`` returns the node's status document. Whatever is refused gets a JSON body naming the
reason (``{"error": ..., "reason": ...}``), is counted by reason, and changes nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from aiohttp import web

from gossipfl import wire
from gossipfl.algorithms import Algorithm, Message
from gossipfl.config import RunConfig
from gossipfl.errors import BadSignature, FingerprintMismatch, MessageTooLarge, WireError
from gossipfl.node.buffers import Buffer, BufferPool, read_into
from gossipfl.node.replay import RateLimit, ReplayGuard
from gossipfl.node.transport import SLICE, slices
from gossipfl.node.util import WarnOnce, json_body, message_of, valid_address
from gossipfl.node.worker import Worker
from gossipfl.web.page import page_response, serves
from gossipfl.wire_scan import FiniteScan

if TYPE_CHECKING:
    from gossipfl.node.node import Node

__all__ = ["OFF_LOOP_BYTES", "Decoded", "Handlers", "Rejected", "Validator", "read_body"]

Decoded = tuple[wire.Envelope, str | None]
"""A frame `Validator.decode` read: the envelope, and its NaN/Inf finding (None: all finite)."""

OFF_LOOP_BYTES = 4 * 2**20
"""Bodies of at least this size are decoded in a worker thread: the HMAC and the NaN/Inf scan read
every byte (~0.1-0.3 s for 400 MB) and release the GIL, so the event loop keeps serving meanwhile."""

_REASONS: list[tuple[type[WireError], str]] = [
    (MessageTooLarge, "too_large"),
    (FingerprintMismatch, "fingerprint"),
    (BadSignature, "signature"),
]


class Rejected(WireError):
    """A well-formed message this node still refuses (other cluster or algorithm, bad shape)."""

    def __init__(self, reason: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.reason = reason
        self.http_status = status


def _reason(exc: WireError) -> str:
    return getattr(exc, "reason", None) or next((r for cls, r in _REASONS if isinstance(exc, cls)), "malformed")


_OK = json_body({"ok": True})  # every accepted message's reply


def _refusal(status: int, reason: str, message: str) -> tuple[int, bytes]:
    return status, json_body({"error": message, "reason": reason})


class Validator:
    """Decodes a frame and checks it is for this node: cluster, algorithm, sender, tensors."""

    def __init__(self, *, node_id: str, cfg: RunConfig, algorithm: Algorithm, fingerprint: str,
                 secret: bytes | None, numel: int, dtype: torch.dtype,
                 wall: Callable[[], float] = time.time) -> None:
        self.id, self.cfg, self.algorithm = node_id, cfg, algorithm
        self.fingerprint, self.secret = fingerprint, secret
        self.replay = ReplayGuard(max_skew=cfg.max_clock_skew, wall=wall) if secret is not None else None
        rate = cfg.max_peer_rate
        self.limit = RateLimit(rate=rate, burst=rate, now=time.monotonic) if rate > 0 else None
        self.templates = {
            name: (torch.Size(shape), dt) for name, (shape, dt) in algorithm.tensor_specs(numel, dtype).items()
        }

    def decode(self, body: bytes | Buffer, scan: FiniteScan | None = None) -> Decoded:
        """The passes over every byte of a frame -- HMAC, decoding, the NaN/Inf scan -- touching no
        node state, so that a large frame's can run off the event loop (`Handlers.handle`).
        Returns the envelope and what the scan found, refused by `accept` after the other checks.
        ``scan``: a completed scan of ``body`` made on arrival, which replaces the NaN/Inf pass."""
        env = wire.decode(body, secret=self.secret, max_bytes=self.cfg.max_message_bytes,
                          fingerprint=self.fingerprint)
        if scan is not None and scan.complete:
            return env, scan.finding(env)
        try:
            wire.require_finite(env)
        except WireError as exc:
            return env, str(exc)
        return env, None

    def accept(self, body: bytes | Buffer, decoded: Decoded | None = None) -> wire.Envelope:
        """The decoded envelope, or `WireError` (a `Rejected` for a well-formed refusal);
        ``decoded``: what `decode` returned for ``body``, if it already ran."""
        env, nonfinite = self.decode(body) if decoded is None else decoded
        if env.cluster != self.cfg.cluster:
            raise Rejected("cluster", f"message for cluster {env.cluster!r}, this node is in "
                           f"{self.cfg.cluster!r}", 409)
        if env.algorithm != self.algorithm.name:
            raise Rejected("algorithm", f"message from algorithm {env.algorithm!r}, this node runs "
                           f"{self.algorithm.name!r}", 409)
        if env.sender == self.id or not env.sender:
            raise Rejected("sender", f"bad sender id {env.sender!r}")
        if self.limit is not None and not self.limit.allow(env.sender):  # a flooding peer: throttled
            raise Rejected("rate", f"{env.sender!r} sends more than {self.cfg.max_peer_rate:g} messages/s", 429)
        if self.replay is not None:  # signed: fresh, and not seen before
            refused = self.replay.check(env.sender, env.meta)
            if refused is not None:
                raise Rejected(refused[0], refused[1], 401)
        unknown = set(env.tensors) - set(self.templates)
        if unknown or not env.tensors:
            raise Rejected("shape", f"expected tensors among {sorted(self.templates)}, got {sorted(env.tensors)}")
        for name, t in env.tensors.items():
            shape, dtype = self.templates[name]
            if t.shape != shape or t.dtype != dtype:
                raise Rejected("shape", f"tensor {name!r} is {t.dtype}{list(t.shape)}, "
                               f"expected {dtype}{list(shape)}")
        if nonfinite is not None:
            raise Rejected("nonfinite", nonfinite)
        return env


class Handlers:
    """The requests ``node`` serves; counts what it accepts and refuses on the node."""

    def __init__(self, node: Node, *, validator: Validator, worker: Worker, warn: WarnOnce,
                 linger: bool) -> None:
        self._node = node
        self._validator = validator
        self._worker = worker
        self._warn = warn
        self._linger = linger

    def closed_for_merges(self) -> bool:
        """A node that finished training (and does not linger) merges nothing more."""
        return self._node.finished.is_set() and not self._linger

    async def http_entry(self, request: web.Request) -> web.Response:
        """HTTP adapter around `handle`: enforce the size limit before reading the body."""
        node = self._node
        if serves(request.path):  # the live page (read-only)
            page = await page_response(node.page, request)
            assert page is not None
            return page
        limit = node.cfg.max_message_bytes
        if request.content_length is not None and request.content_length > limit:
            node.rejected["too_large"] += 1
            return _error_response(413, "too_large", f"body of {request.content_length} bytes exceeds {limit}")
        try:
            # No secret: the floats are scanned as they arrive (a signed frame's bytes must
            # verify before they are parsed, so a signed node scans after decoding).
            body, scan = await read_body(request, self._worker.rx_pool, scan=self._validator.secret is None)
        except web.HTTPRequestEntityTooLarge:
            node.rejected["too_large"] += 1
            return _error_response(413, "too_large", f"body exceeds {limit} bytes")
        except ConnectionError:  # the sender hung up mid-body (its timeout, a crash): counted, not a traceback
            node.rejected["incomplete"] += 1
            return _error_response(400, "incomplete", "the connection closed before the body was complete")
        status, out = await self.handle(request.method, request.path, body, scan)
        binary = request.path == "/exchange" and status == 200
        if binary and len(out) > SLICE:
            # A large reply (a model) in slices, each drained before the next: one write of it all
            # makes Python 3.11's transport shift the unsent rest after every send (quadratic).
            response = web.StreamResponse(status=status)
            response.content_type = "application/octet-stream"
            response.content_length = len(out)
            await response.prepare(request)
            async for piece in slices(out):
                await response.write(piece)  # sent, or copied into the transport's buffer
            await response.write_eof()
            if isinstance(out, memoryview):
                self._worker.reply_pool.give(out.obj)  # its bytes are out: the next reply may reuse it
            return response
        return web.Response(status=status, body=out,
                            content_type="application/octet-stream" if binary else "application/json")

    async def handle(self, method: str, path: str, body: bytes | Buffer,
                     scan: FiniteScan | None = None) -> tuple[int, bytes | memoryview]:
        """The node's one entry point for requests, shared by HTTP and the in-memory network.
        ``scan``: the NaN/Inf scan `read_body` ran over ``body`` as it arrived, if any."""
        if path == "/status" and method == "GET":
            return 200, json_body(self._node.status())
        if path in ("/gossip", "/exchange"):
            if method != "POST":
                return _refusal(405, "method", f"use POST for {path}")
            decoded = await self._decode_off_loop(body, scan)
            return self.rpc_gossip(body, decoded) if path == "/gossip" else await self.rpc_exchange(body, decoded)
        return _refusal(404, "not_found", f"no such endpoint: {method} {path}")

    async def _decode_off_loop(self, body: bytes | Buffer,
                               scan: FiniteScan | None = None) -> Decoded | WireError | None:
        """`Validator.decode` of a large body in a worker thread (None for a small one: decoded in
        place, cheaper than a thread hop); a refusal comes back as the error, raised by `accept`.
        A body whose floats were scanned on arrival is decoded here on the loop: nothing is left
        that reads every byte (decoding makes views), so a thread hop would only add latency."""
        scanned = scan is not None and scan.complete and sys.byteorder == "little"  # big-endian: swaps a copy
        if not scanned and len(body) < OFF_LOOP_BYTES:
            return None
        try:
            if scanned:
                return self._validator.decode(body, scan)
            return await self._node._clock.to_thread(self._validator.decode, body)
        except WireError as exc:
            return exc

    def _accept(self, body: bytes | Buffer, decoded: Decoded | WireError | None) -> wire.Envelope:
        if isinstance(decoded, WireError):
            raise decoded
        return self._validator.accept(body, decoded)

    def rpc_gossip(self, body: bytes | Buffer, decoded: Decoded | WireError | None = None) -> tuple[int, bytes]:
        """Validate one message and queue it for the next merge; the model is untouched on error.
        ``decoded``: the body already decoded off the loop (`_decode_off_loop`)."""
        node, worker = self._node, self._worker
        try:
            env = self._accept(body, decoded)
        except WireError as exc:
            worker.rx_pool.give(body)
            reason = _reason(exc)
            node.rejected[reason] += 1
            self._warn(f"reject-{reason}", "rejected a message (%s): %s", reason, exc)
            return _refusal(exc.http_status, reason, str(exc))
        if self.closed_for_merges():
            del env
            worker.rx_pool.give(body)
            return _refusal(503, "finished", f"node {node.id} has finished training")
        node.count_in(env.sender, len(body))
        addr = env.meta.get("addr")
        if isinstance(addr, str) and valid_address(addr):
            if node.membership.seen(env.sender, addr):
                node.log.info("peer %s joined at %s (it messaged us)", env.sender, addr)
        msg = message_of(env)
        del env
        if worker.queue(msg, body):
            node.dropped += 1
        return 200, _OK

    async def rpc_exchange(self, body: bytes | Buffer,
                           decoded: Decoded | WireError | None = None) -> tuple[int, bytes | memoryview]:
        """The responder's side of a pairwise exchange: average atomically, return our part."""
        node, worker = self._node, self._worker
        if not node.algorithm.requirements.pairwise:
            return _refusal(409, "algorithm", f"{node.algorithm.name} does not exchange pairwise")
        try:
            env = self._accept(body, decoded)
        except WireError as exc:
            reason = _reason(exc)
            node.rejected[reason] += 1
            return _refusal(exc.http_status, reason, str(exc))
        if self.closed_for_merges():
            return _refusal(503, "finished", f"node {node.id} has finished training")
        wait = node.cfg.timeout / 2
        why = await worker.acquire_to_answer(env.sender, wait)  # our own exchange in flight, or a long step
        if why is not None:
            return _refusal(423, why, f"node {node.id} is {why} (refused, or not free within {wait:g} s)")
        def answer() -> memoryview:  # under the lock: the average and our reply, one atomic step
            incoming = message_of(env)
            worker.staleness.add(worker.state.step - incoming.step)
            frames: list[memoryview] = []

            def into_frame(reply: Message) -> dict[str, torch.Tensor]:
                # The reply's frame is the snapshot: encoded from the state before the average,
                # its tensors (views of it) are what the average reads; no clone of the model.
                frames.append(worker.encode_locked(reply, kind="reply"))
                return wire.decode(frames[-1], max_bytes=len(frames[-1])).tensors  # ours: no HMAC to verify

            worker.state.respond(incoming, snapshot=into_frame)
            return frames[-1]

        try:
            # A large model's average and encoding read and write every parameter (~0.1 s and more
            # at 100M): in a worker thread, so the loop keeps serving; a small one's stay here.
            large = len(body) >= OFF_LOOP_BYTES
            out = await node._clock.to_thread(answer) if large else answer()
        finally:
            worker.lock.release()
        node.count_in(env.sender, len(body))
        node.count_out(env.sender, len(out))  # the reply carries our model too: it counts as a message sent
        addr = env.meta.get("addr")
        if isinstance(addr, str) and valid_address(addr):
            node.membership.seen(env.sender, addr)
        return 200, out


async def read_body(request: web.Request, pool: BufferPool, *, scan: bool = False
                    ) -> tuple[bytes | Buffer, FiniteScan | None]:
    """The request body, read straight into one buffer of the announced size when there is one,
    and (with ``scan``) the NaN/Inf scan of its floats made chunk by chunk as they arrived.

    One copy per byte instead of aiohttp's chunk list + join; the frame's tensors then alias a
    writable buffer. A body longer or shorter than its Content-Length is malformed."""
    n = request.content_length
    if n is None or n < 1 << 16:
        return await request.read(), None
    buf = pool.take(n)
    view = memoryview(buf)
    scanner = FiniteScan(view) if scan else None
    got = await read_into(request.content.iter_any(), view, scanner.feed if scanner is not None else None)
    # longer or shorter than announced: let the codec reject an empty frame
    return (buf, scanner) if got == n else (b"", None)


def _error_response(status: int, reason: str, message: str) -> web.Response:
    return web.Response(status=status, body=json_body({"error": message, "reason": reason}),
                        content_type="application/json")
