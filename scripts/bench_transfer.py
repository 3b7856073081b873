"""End-to-end model transfer between two node processes over loopback HTTP.

Times one node sending a model of 10 MB and 100 MB to another: encode, HTTP POST, the receiver
reading, decoding and validating the frame (fingerprint, shape, NaN check) and queueing it, and
the 200 reply. The baseline, measured in the same run, is a plain blocking TCP socket sending
the same number of bytes into a preallocated buffer in another process (and a 1-byte ack).

    python scripts/bench_transfer.py [--sizes 10 100] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import time
from typing import Any

import torch
from torch import nn

from gossipfl import wire
from gossipfl.config import RunConfig
from gossipfl.learning import Dataset, Trainer
from gossipfl.node import Node
from gossipfl.node.transport import HttpTransport


def _model(mb: int) -> nn.Module:
    # One Linear layer whose weight holds ~mb megabytes of float32.
    side = int((mb * 1e6 / 4) ** 0.5)
    torch.manual_seed(0)
    return nn.Linear(side, side, bias=False)


def _trainer(mb: int) -> Trainer:
    model = _model(mb)
    n_in = model.in_features
    data = Dataset(name="bench", x_train=torch.zeros(4, n_in), y_train=torch.zeros(4, dtype=torch.long),
                   x_test=torch.zeros(2, n_in), y_test=torch.zeros(2, dtype=torch.long),
                   n_classes=model.out_features, input_shape=(n_in,))
    return Trainer(model, data, torch.arange(4))


def _receiver_node(mb: int, conn: Any) -> None:
    """Child process: a node that never trains, only receives; reports its address, then waits."""

    async def main() -> None:
        cfg = RunConfig(listen="127.0.0.1:0", max_message_mb=4 * mb + 16, steps=1)
        trainer = _trainer(mb)
        from gossipfl.algorithms import get_algorithm

        node = Node(cfg, node_id="receiver", trainer=trainer, algorithm=get_algorithm("dpsgd"))
        await node.start(hold=True)  # serve only: never train, never merge
        try:
            conn.send((node.address, node.fingerprint))

            async def merge_like_a_training_node() -> None:
                # A training node merges queued messages between steps and then recycles their
                # receive buffers. Merge arithmetic is not transfer, so it is left out here: the
                # queue is emptied and the buffers recycled exactly as after a merge.
                while True:
                    await asyncio.sleep(0.002)
                    worker = node._worker
                    with worker.inbox_lock:
                        inbox, worker.inbox = worker.inbox, []
                    for _, buf in inbox:
                        worker.rx_pool.give(buf)
                    del inbox

            merger = asyncio.create_task(merge_like_a_training_node())
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
            merger.cancel()
        finally:
            await node.aclose()

    asyncio.run(main())


def _receiver_socket(nbytes: int, port_conn: Any, repeat: int) -> None:
    """Child process: plain TCP receiver into one preallocated buffer, acks each message."""
    srv = socket.create_server(("127.0.0.1", 0))
    port_conn.send(srv.getsockname()[1])
    buf = bytearray(nbytes)
    view = memoryview(buf)
    conn, _ = srv.accept()
    with conn, srv:
        for _ in range(repeat):
            got = 0
            while got < nbytes:
                n = conn.recv_into(view[got:], nbytes - got)
                if n == 0:
                    return
                got += n
            conn.sendall(b"k")


def bench_socket(nbytes: int, repeat: int) -> float:
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=_receiver_socket, args=(nbytes, child, repeat))
    proc.start()
    port = parent.recv()
    payload = bytearray(nbytes)
    best = float("inf")
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(repeat):
            t = time.perf_counter()
            s.sendall(payload)
            assert s.recv(1) == b"k"
            best = min(best, time.perf_counter() - t)
    proc.join(10)
    return best


async def _send_models(address: str, fingerprint: str, mb: int, repeat: int) -> tuple[float, int]:
    params = torch.randn(_model(mb).weight.numel())
    transport = HttpTransport()
    best, size = float("inf"), 0
    tx = bytearray()  # the node reuses one send buffer the same way
    try:
        for _ in range(repeat + 1):  # first round warms the connection and the buffers
            t = time.perf_counter()
            env = wire.Envelope(cluster="default", sender="sender", algorithm="dpsgd",
                                fingerprint=fingerprint, tensors={"params": params},
                                meta={"addr": "127.0.0.1:1", "deg": 1})
            n = wire.encoded_size(env)
            if len(tx) < n:
                tx = bytearray(n)
            body = memoryview(tx)[: wire.encode_into(env, tx)]
            reply = await transport.request(address, "POST", "/gossip", body, timeout=120)
            assert reply.status == 200, reply.body
            best, size = min(best, time.perf_counter() - t), len(body)
    finally:
        await transport.aclose()
    return best, size


def bench_http(mb: int, repeat: int) -> tuple[float, int]:
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=_receiver_node, args=(mb, child))
    proc.start()
    address, fingerprint = parent.recv()
    try:
        return asyncio.run(_send_models(address, fingerprint, mb, repeat))
    finally:
        parent.send("stop")
        proc.join(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100], metavar="MB")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"{'model':>8} {'frame MB':>9} {'gossipfl s':>11} {'MB/s':>8} {'raw TCP s':>10} {'MB/s':>8} {'ratio':>6}")
    for mb in args.sizes:
        t_http, size = bench_http(mb, args.repeat)
        t_sock = bench_socket(size, args.repeat)
        print(f"{mb:>6}MB {size / 1e6:>9.1f} {t_http:>11.4f} {size / 1e6 / t_http:>8.0f} "
              f"{t_sock:>10.4f} {size / 1e6 / t_sock:>8.0f} {t_sock / t_http:>6.2f}x")
    print("ratio = raw socket time / gossipfl time (1.0 = as fast as a plain blocking socket; target >= 0.5)")


if __name__ == "__main__":
    main()
