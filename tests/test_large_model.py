"""Large models: receive buffers that cost no page touches up front, and large bodies verified and
decoded off the event loop, with every check still applied."""

from __future__ import annotations

import asyncio
import mmap
import time

import torch
from torch import nn

from gossipfl import wire
from gossipfl.algorithms import get_algorithm
from gossipfl.config import RunConfig
from gossipfl.learning import Dataset, Trainer
from gossipfl.node import Node
from gossipfl.node.buffers import MAPPED_FROM, BufferPool, new_buffer
from gossipfl.node.handlers import OFF_LOOP_BYTES
from gossipfl.node.transport import MemoryNetwork

SIDE = 1100  # 1.21M float32 parameters: a 4.8 MB frame, over OFF_LOOP_BYTES


def _node(network: MemoryNetwork) -> Node:
    torch.manual_seed(0)
    model = nn.Linear(SIDE, SIDE, bias=False)
    data = Dataset(name="big", x_train=torch.zeros(4, SIDE), y_train=torch.zeros(4, dtype=torch.long),
                   x_test=torch.zeros(2, SIDE), y_test=torch.zeros(2, dtype=torch.long),
                   n_classes=SIDE, input_shape=(SIDE,))
    cfg = RunConfig(listen="mem:0", steps=1, max_peer_rate=0)
    return Node(cfg, node_id="rx", trainer=Trainer(model, data, torch.arange(4)),
                algorithm=get_algorithm("dpsgd"), network=network, secret=None)


def test_large_buffers_are_maps_and_recycled() -> None:
    big = new_buffer(MAPPED_FROM)
    assert isinstance(big, mmap.mmap)
    assert len(big) == MAPPED_FROM
    assert big[:8] == bytes(8)
    assert isinstance(new_buffer(MAPPED_FROM - 1), bytearray)
    pool = BufferPool(keep=1)
    pool.give(big)
    assert pool.take(MAPPED_FROM) is big  # the same map again: its pages stay faulted in
    assert pool.take(MAPPED_FROM) is not big


def test_large_body_is_decoded_off_the_event_loop_and_still_checked() -> None:
    async def main() -> None:
        node = _node(MemoryNetwork())
        await node.start(hold=True)
        try:
            validator = node._validator
            real = validator.decode
            during: list[int] = []  # loop ticks seen while the decode ran

            def slow_decode(body: object) -> object:
                out = real(body)  # type: ignore[arg-type]
                before = ticks
                time.sleep(0.3)  # blocks whichever thread runs it
                during.append(ticks - before)
                return out

            validator.decode = slow_decode  # type: ignore[method-assign]
            ticks = 0  # read by slow_decode (a closure over this frame)

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            def frame(params: torch.Tensor) -> bytes:
                env = wire.Envelope(cluster=node.cfg.cluster, sender="tx", algorithm=node.algorithm.name,
                                    fingerprint=node.fingerprint, tensors={"params": params})
                return bytes(wire.encode(env))

            good = frame(torch.ones(SIDE * SIDE))
            assert len(good) >= OFF_LOOP_BYTES
            task = asyncio.create_task(ticker())
            status, _ = await node.handle("POST", "/gossip", good)
            task.cancel()
            assert status == 200
            assert len(node._worker.inbox) == 1
            assert during[0] >= 2  # the loop kept running while the 0.3 s decode ran (0 on the loop)

            bad = torch.ones(SIDE * SIDE)
            bad[-1] = float("nan")
            status, _ = await node.handle("POST", "/gossip", frame(bad))
            assert status == 400
            assert node.rejected["nonfinite"] == 1
            assert len(node._worker.inbox) == 1
            status, _ = await node.handle("POST", "/gossip", frame(torch.ones(SIDE * SIDE + 1)))
            assert status == 400
            assert node.rejected["shape"] == 1
        finally:
            await node.aclose()

    asyncio.run(main())


def test_a_large_body_goes_out_with_the_loop_running_between_slices() -> None:
    """A socket that takes every write whole makes aiohttp await nothing: the slices themselves
    must yield, or a 400 MB body holds the sender's loop ~0.1 s (bench_large_model)."""
    from gossipfl.node.transport import _FIRST_SLICE, SLICE, slices

    async def main() -> list[int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        body = bytearray(range(256)) * (8 * SLICE // 256)
        pieces: list[bytes] = []
        seen: list[int] = []
        async for piece in slices(body):
            seen.append(ticks)
            pieces.append(bytes(piece))
        task.cancel()
        assert b"".join(pieces) == body  # every byte once, in order
        assert len(pieces[0]) == _FIRST_SLICE  # what aiohttp copies to join the headers to it
        assert max(map(len, pieces)) == SLICE
        return seen

    seen = asyncio.run(main())
    assert len(seen) == 9  # the small first slice, then 8 of SLICE (the last one shorter)
    assert all(b > a for a, b in zip(seen, seen[1:], strict=False))  # the loop ran before every slice


def test_a_large_exchange_is_answered_off_the_loop_and_its_reply_buffer_recycled() -> None:
    """AD-PSGD over real HTTP with a 4.8 MB model: the responder averages exactly
    (``own + 0.5 (other - own)``, its reply the model from before), answers in a worker thread,
    streams the reply and then keeps its buffer for the next reply; the initiator reads the reply
    into one buffer of its size (a memoryview, not aiohttp's joined bytes)."""
    from gossipfl.node.transport import HttpTransport

    torch.manual_seed(0)
    model = nn.Linear(SIDE, SIDE, bias=False)
    data = Dataset(name="big", x_train=torch.zeros(4, SIDE), y_train=torch.zeros(4, dtype=torch.long),
                   x_test=torch.zeros(2, SIDE), y_test=torch.zeros(2, dtype=torch.long),
                   n_classes=SIDE, input_shape=(SIDE,))
    cfg = RunConfig(listen="127.0.0.1:0", steps=1, max_peer_rate=0, algorithm="adpsgd", max_message_mb=64)

    async def main() -> None:
        node = Node(cfg, node_id="rx", trainer=Trainer(model, data, torch.arange(4)),
                    algorithm=get_algorithm("adpsgd"), secret=None)
        await node.start(hold=True)
        transport = HttpTransport()
        threads: list[str] = []
        worker = node._worker
        real = worker.encode_locked

        def spy(msg: object, **kw: object) -> memoryview:
            import threading
            threads.append(threading.current_thread().name)
            return real(msg, **kw)  # type: ignore[arg-type]

        worker.encode_locked = spy  # type: ignore[method-assign]
        try:
            buffers = []
            for k in range(2):
                own = node.state.params.detach().reshape(-1).clone()
                other = torch.randn(SIDE * SIDE, generator=torch.Generator().manual_seed(k))
                env = wire.Envelope(cluster=node.cfg.cluster, sender="tx", algorithm="adpsgd", kind="exchange",
                                    fingerprint=node.fingerprint, tensors={"params": other},
                                    meta={"addr": "127.0.0.1:1", "deg": 1})
                reply = await transport.request(node.address, "POST", "/exchange", wire.encode(env), timeout=60)
                assert reply.status == 200
                assert isinstance(reply.body, memoryview)  # read into one buffer of the announced size
                back = wire.decode(reply.body, fingerprint=node.fingerprint).tensors["params"]
                assert torch.equal(back, own)  # the reply is the model from before the average
                assert torch.equal(node.state.params.detach().reshape(-1), own + 0.5 * (other - own))
                assert len(worker.reply_pool._spare) == 1  # the reply's buffer came back after sending
                buffers.append(worker.reply_pool._spare[0])
            assert buffers[0] is buffers[1]  # and the second reply reused it: no new 4.8 MB buffer
            assert threads
            assert all(name != "MainThread" for name in threads)  # answered off the event loop
        finally:
            await transport.aclose()
            await node.aclose()

    asyncio.run(main())


def test_read_into_copies_every_chunk_and_refuses_a_body_longer_than_its_buffer() -> None:
    from gossipfl.node.buffers import read_into

    async def chunks(*parts: bytes):  # type: ignore[no-untyped-def]
        for p in parts:
            yield p

    async def main() -> None:
        view = memoryview(bytearray(7))
        ends: list[int] = []
        assert await read_into(chunks(b"abc", b"defg"), view, ends.append) == 7
        assert bytes(view) == b"abcdefg"
        assert ends == [3, 7]  # told after each chunk
        assert await read_into(chunks(b"ab"), memoryview(bytearray(7))) == 2  # short: the caller refuses it
        assert await read_into(chunks(b"abcd", b"efgh"), memoryview(bytearray(7))) is None

    asyncio.run(main())
