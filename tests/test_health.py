"""A node's health figures in /status: memory, open files, tasks and event-loop stalls."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import socket
import time

import aiohttp
import pytest
from helpers import make_node

from gossipfl.config import RunConfig
from gossipfl.node.health import LoopMonitor, open_fds, resident_bytes


def test_memory_and_file_counts_follow_the_process() -> None:
    fds = open_fds()
    with socket.socket() as a, socket.socket() as b:
        assert open_fds() == fds + 2
        assert a.fileno() != b.fileno()
    assert open_fds() == fds
    before = resident_bytes()
    block = b"\x01" * (64 * 2**20)  # written, so every page is resident (calloc'd zeros might not be)
    assert resident_bytes() - before > 60 * 2**20
    del block


def test_stall_windows_roll_over() -> None:
    t = [0.0]
    mon = LoopMonitor(window=10.0, now=lambda: t[0])
    mon.record(0.5)
    t[0] = 11.0
    mon.record(0.01)  # a new window: the previous one's 0.5 is still recent
    assert (mon.longest, mon.recent) == (0.5, 0.5)
    t[0] = 21.5
    mon.record(0.02)  # two windows on: 0.5 is no longer recent, the all-time longest keeps it
    assert (mon.longest, mon.recent) == (0.5, 0.02)
    t[0] = 60.0
    mon.record(0.0)  # after a long quiet spell nothing is recent
    assert mon.recent == 0.0


def test_status_reports_a_blocked_event_loop() -> None:
    async def scenario() -> None:
        node = make_node(RunConfig(listen="127.0.0.1:0", steps=5, mdns=False), "watched")
        await node.start(hold=True)
        try:
            await asyncio.sleep(0.3)
            time.sleep(0.5)  # noqa: ASYNC251 -- on purpose: a blocking call on the loop thread stalls the node
            await asyncio.sleep(0.3)
            async with aiohttp.ClientSession() as s, s.get(f"http://{node.address}/status") as r:
                st = json.loads(await r.read())
            assert 0.4 < st["loop_stall_max"] < 1.5
            assert st["loop_stall_recent"] == st["loop_stall_max"]
            assert st["tasks"] >= 4  # the node's loops (membership, gossip, training, health) at least
            assert st["rss_bytes"] > 10 * 2**20
            assert st["open_fds"] > 3
        finally:
            await node.aclose()

    asyncio.run(scenario())


def test_a_long_stall_is_logged_with_where_the_loop_was(caplog: pytest.LogCaptureFixture) -> None:
    """The watcher thread names the blocking call while the loop is still stuck in it."""

    def blocking_call() -> None:
        time.sleep(0.5)  # on purpose: a synchronous call on the loop thread

    async def scenario() -> LoopMonitor:
        mon = LoopMonitor(tick=0.02, report_after=0.2)
        task = asyncio.create_task(mon.loop())
        await asyncio.sleep(0.05)
        blocking_call()
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return mon

    with caplog.at_level(logging.WARNING, logger="gossipfl.node.health"):
        mon = asyncio.run(scenario())
    assert mon.where is not None
    assert "blocking_call" in mon.where
    assert mon.status()["loop_stall_where"] == mon.where
    assert any("blocking_call" in r.getMessage() for r in caplog.records)
    assert mon.longest >= 0.4


def test_a_served_node_takes_its_startup_heap_out_of_the_collector() -> None:
    """`gossipfl node` freezes what it built before serving (modules, data, model: ~265 000
    objects), so a full garbage collection -- which holds the GIL for as long as it walks them,
    0.1 s idle, 5-6 s in the 32-node soak on two cores -- no longer stalls the event loop."""
    from gossipfl.cli import _serve_node

    cfg = RunConfig(listen="127.0.0.1:0", steps=2, mdns=False, eval_every=1000)
    gc.unfreeze()  # an earlier test in this worker may have served a node (tests/test_cli.py) and frozen its heap
    before = gc.get_freeze_count()
    try:
        assert asyncio.run(_serve_node(cfg, quiet=True)) == 0
        frozen = gc.get_freeze_count() - before
        assert frozen > 50_000
        assert len(gc.get_objects()) < frozen / 2  # what a full collection still walks
    finally:
        gc.unfreeze()  # this test process builds and drops many nodes: let them be collected again
