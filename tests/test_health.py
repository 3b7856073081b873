"""A node's health figures in /status: memory, open files, tasks and event-loop stalls."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
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
