"""A 100-million-parameter float32 model (400 MB) sent from one node process to another on loopback.

Prints, for one gossip message of that model:

* **transfer time**: the POST of the encoded frame until the receiver's 200 (the receiver streams
  the body into a preallocated buffer, verifies and validates it off its event loop, and queues
  it), beside a plain blocking TCP socket sending the same bytes into a preallocated buffer in
  another process, measured in the same run (ratio = socket time / gossipfl time);
* **peak extra memory** of the receiver while it receives and merges the message (the real merge
  of the algorithm, in a worker thread as between two training steps): peak RSS minus the RSS it
  had before the message, over the model's size. The receive buffer itself is one copy; target
  <= 2 copies in all;
* **longest event-loop stall** of each process, sampled by a task that sleeps 5 ms at a time
  (target <= 0.1 s);
* the sender's peak extra memory (its one reusable send buffer: one copy).

With a pairwise algorithm (``--algorithm adpsgd``) the message is an exchange: the responder
averages as it answers and sends its model back, which the sender decodes and checks; the
transfer time then covers both directions, and the sender's memory the reply.

    python scripts/bench_large_model.py [--params 100000000] [--algorithm dpsgd] [--repeat 3]

Exit 1 if a target is missed. Needs about 4 GB of memory for 100M parameters.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transfer import _trainer, bench_socket  # noqa: E402  (a sibling script)

from gossipfl import wire  # noqa: E402
from gossipfl.algorithms import get_algorithm  # noqa: E402
from gossipfl.config import RunConfig  # noqa: E402
from gossipfl.node import Node  # noqa: E402
from gossipfl.node.buffers import new_buffer  # noqa: E402
from gossipfl.node.health import freeze_heap  # noqa: E402
from gossipfl.node.transport import HttpTransport  # noqa: E402

STALL_TARGET = 0.1
MEMORY_TARGET = 2.0
TRANSFER_TARGET = 0.5


def _rss(field: str) -> int:
    """VmRSS or VmHWM (peak) of this process, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


async def _settle() -> None:
    """Collect garbage before a measurement, then let the stall monitor wake: its late wake-up
    from the collection itself would otherwise land after the reset and count as the message's."""
    gc.collect()
    await asyncio.sleep(0.02)


class StallMonitor:
    """Longest lateness of a 5 ms sleep on this event loop: how long the loop was blocked."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            self.longest = max(self.longest, time.perf_counter() - t - 0.005)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _receiver(nbytes: int, algorithm: str, conn: Any) -> None:
    """Child: a node that only receives; merges each message in a worker thread, then reports."""

    async def main() -> None:
        cfg = RunConfig(listen="127.0.0.1:0", max_message_mb=2 * nbytes / 2**20 + 16, steps=1,
                        max_peer_rate=0, algorithm=algorithm)
        node = Node(cfg, node_id="receiver", trainer=_trainer(nbytes), algorithm=get_algorithm(algorithm))
        freeze_heap()  # as `gossipfl node` does before serving: no full GC pass over the startup heap
        await node.start(hold=True)  # serve only; merges happen below, as at a training step's start
        monitor = StallMonitor()
        monitor.start()
        loop = asyncio.get_running_loop()
        try:
            conn.send((node.address, node.fingerprint))
            while True:
                command = await loop.run_in_executor(None, conn.recv)
                if command == "stop":
                    return
                await _settle()
                base = _rss("VmRSS")
                _reset_peak()
                monitor.longest = 0.0
                conn.send("ready")
                worker = node._worker
                if node.algorithm.requirements.pairwise:  # the exchange merges as it answers
                    answered = node.msgs_in
                    while node.msgs_in == answered:  # noqa: ASYNC110  (a counter: the node has no event)
                        await asyncio.sleep(0.001)
                    merged = 1
                else:
                    worker.arrived.clear()
                    while not worker.inbox:  # the message arrives
                        await worker.arrived.wait()
                    merged = await asyncio.to_thread(worker.merge_pending)
                conn.send({"merged": merged, "extra": _rss("VmHWM") - base, "stall": monitor.longest})
        finally:
            monitor.stop()
            await node.aclose()

    asyncio.run(main())


def _check_reply(body: bytes, fingerprint: str) -> None:
    """What a node does with an exchange reply before applying it: decode and check for NaN/Inf."""
    wire.require_finite(wire.decode(body, fingerprint=fingerprint, max_bytes=2**31))


async def _send(address: str, fingerprint: str, numel: int, conn: Any, repeat: int,
                algorithm: str) -> list[dict[str, float]]:
    params = torch.randn(numel)
    freeze_heap()
    transport = HttpTransport()
    monitor = StallMonitor()
    monitor.start()
    rows = []
    tx = new_buffer(0)
    try:
        for _ in range(repeat):
            conn.send("go")
            assert await asyncio.to_thread(conn.recv) == "ready"
            await _settle()
            base = _rss("VmRSS")
            _reset_peak()
            monitor.longest = 0.0
            pairwise = get_algorithm(algorithm).requirements.pairwise
            env = wire.Envelope(cluster="default", sender="sender", algorithm=algorithm, fingerprint=fingerprint,
                                kind="exchange" if pairwise else "gossip",
                                tensors={"params": params}, meta={"addr": "127.0.0.1:1", "deg": 1})
            t0 = time.perf_counter()
            n = wire.encoded_size(env)
            if len(tx) < n:
                tx = new_buffer(n)
            body = memoryview(tx)[: await asyncio.to_thread(wire.encode_into, env, tx)]  # as a node: off the loop
            t1 = time.perf_counter()
            # a pairwise algorithm's exchange: the reply is the responder's model, decoded as a node does
            reply = await transport.request(address, "POST", "/exchange" if pairwise else "/gossip", body,
                                            timeout=300)
            if pairwise and reply.status == 200:
                await asyncio.to_thread(_check_reply, reply.body, fingerprint)
            t2 = time.perf_counter()
            assert reply.status == 200, reply.body[:200]
            report = await asyncio.to_thread(conn.recv)
            rows.append({"encode": t1 - t0, "transfer": t2 - t1, "size": len(body),
                         "rx_extra": report["extra"], "rx_stall": report["stall"], "merged": report["merged"],
                         "tx_extra": _rss("VmHWM") - base, "tx_stall": monitor.longest})
            del body
    finally:
        monitor.stop()
        await transport.aclose()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=int, default=100_000_000)
    ap.add_argument("--algorithm", default="dpsgd",
                    help="the nodes' algorithm; a pairwise one (adpsgd) makes the message an exchange, "
                         "timed until the responder's model is back and decoded")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    nbytes = args.params * 4
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=_receiver, args=(nbytes, args.algorithm, child))
    proc.start()
    address, fingerprint = parent.recv()
    numel = int((nbytes / 4) ** 0.5) ** 2  # the receiver's model (bench_transfer._model): one square Linear
    try:
        rows = asyncio.run(_send(address, fingerprint, numel, parent, args.repeat, args.algorithm))
    finally:
        parent.send("stop")
        proc.join(60)
    model = numel * 4
    t_sock = min(bench_socket(rows[0]["size"], args.repeat))  # best of, as the rows above
    pairwise = get_algorithm(args.algorithm).requirements.pairwise
    if pairwise:
        t_sock *= 2  # an exchange carries the model both ways: the socket's baseline does too
    best = min(r["transfer"] for r in rows)
    rx_extra = max(r["rx_extra"] for r in rows) / model
    tx_extra = max(r["tx_extra"] for r in rows) / model
    stall = max(max(r["rx_stall"], r["tx_stall"]) for r in rows)
    print(f"model: {numel:,} float32 parameters, {model / 1e6:.0f} MB; frame {rows[0]['size'] / 1e6:.0f} MB; "
          f"algorithm {args.algorithm}; best of {args.repeat}")
    print(f"encode (sender, worker thread)     {min(r['encode'] for r in rows):8.3f} s")
    print(f"transfer (POST -> 200)             {best:8.3f} s   {model / 1e6 / best:6.0f} MB/s")
    label = "raw TCP socket, same bytes x2" if pairwise else "raw TCP socket, same bytes"
    print(f"{label:<34} {t_sock:8.3f} s   ratio {t_sock / best:.2f}x  "
          f"(target >= {TRANSFER_TARGET}x)")
    print(f"receiver peak extra RSS (receive + merge) {rx_extra:5.2f}x the model  (target <= {MEMORY_TARGET}x)")
    print(f"sender peak extra RSS (encode + send)     {tx_extra:5.2f}x the model")
    print(f"longest event-loop stall (either process) {stall * 1000:6.1f} ms  (target <= {STALL_TARGET * 1000:.0f} ms)")
    ok = t_sock / best >= TRANSFER_TARGET and rx_extra <= MEMORY_TARGET and stall <= STALL_TARGET
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
