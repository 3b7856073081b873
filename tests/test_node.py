"""The node service over real loopback HTTP: serving, rejecting bad input, peers, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from pathlib import Path

import aiohttp
import pytest
import torch
from helpers import make_node, running

from gossipfl import wire
from gossipfl.config import RunConfig
from gossipfl.node.replay import stamp

BASE = RunConfig(steps=10_000, eval_every=10, listen="127.0.0.1:0", timeout=2.0, peer_timeout=1.5)


def envelope(node, **changes) -> wire.Envelope:
    """A valid message for ``node``, built from its own model, with ``changes`` applied."""
    fields = dict(cluster=node.cfg.cluster, sender="intruder", algorithm=node.algorithm.name,
                  fingerprint=node.fingerprint, tensors={"params": torch.zeros_like(node.state.params)})
    fields.update(changes)
    return wire.Envelope(**fields)


async def post(address: str, body: bytes) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.post(f"http://{address}/gossip", data=body) as r:
        return r.status, json.loads(await r.read())


async def get_status(address: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(f"http://{address}/status") as r:
        assert r.status == 200
        return json.loads(await r.read())


async def wait_for(predicate, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def test_bad_messages_get_clear_http_errors_and_change_nothing() -> None:
    cfg = BASE.replace(max_message_mb=0.05, steps=5)

    async def scenario() -> None:
        node = make_node(cfg, "victim")
        await node.start(hold=True)  # serves, never trains: params change only through merges
        try:
            before = node.state.params.clone()
            p = node.state.params
            cases = [
                (b"\x00garbage", 400, "malformed"),
                (bytes(wire.encode(envelope(node, fingerprint="0" * 16))), 409, "fingerprint"),
                (bytes(wire.encode(envelope(node, cluster="other"))), 409, "cluster"),
                (bytes(wire.encode(envelope(node, algorithm="gossip"))), 409, "algorithm"),
                (bytes(wire.encode(envelope(node, tensors={"params": torch.zeros(p.numel() - 1)}))), 400, "shape"),
                (bytes(wire.encode(envelope(node, tensors={"params": torch.full_like(p, math.nan)}))), 400,
                 "nonfinite"),
                (bytes(wire.encode(envelope(node, sender="victim"))), 400, "sender"),
                (b"x" * 60_000, 413, "too_large"),
            ]
            for body, status, reason in cases:
                got, answer = await post(node.address, body)
                assert (got, answer["reason"]) == (status, reason), answer
                assert answer["error"]
            assert node._inbox == []  # nothing was queued for a merge
            node._work(trains=False, exchange_now=False)  # a merge point
            assert torch.equal(node.state.params, before)
            status = await get_status(node.address)
            assert status["rejected"] == {r: 1 for _, _, r in cases}
            assert status["msgs_in"] == 0
            # ...and a good message is still accepted afterwards, and merged.
            ok, _ = await post(node.address, bytes(wire.encode(envelope(node))))
            assert ok == 200
            assert len(node._inbox) == 1
            node._work(trains=False, exchange_now=False)
            assert not torch.equal(node.state.params, before)
        finally:
            await node.aclose()

    asyncio.run(scenario())


def test_node_keeps_training_while_receiving_garbage() -> None:
    async def scenario() -> None:
        async with running(make_node(BASE, "busy")) as node:
            await wait_for(lambda: node.state.step > 5)
            for _ in range(20):
                assert (await post(node.address, b"GFL\x01" + b"\xff" * 100))[0] == 400
            s1 = (await get_status(node.address))["step"]
            await wait_for(lambda: node.state.step > s1 + 20)
            assert node.rejected["malformed"] == 20

    asyncio.run(scenario())


def test_signed_cluster_rejects_unsigned_and_forged_messages() -> None:
    secret = b"s3cret-s3cret-s3cret"

    async def scenario() -> None:
        async with running(make_node(BASE.replace(steps=3), "guarded", secret=secret)) as node:
            unsigned = bytes(wire.encode(envelope(node)))
            assert (await post(node.address, unsigned))[0] == 401
            forged = bytearray(wire.encode(envelope(node), secret=secret))
            forged[-40] ^= 1
            assert (await post(node.address, bytes(forged)))[0] in (400, 401)
            good = bytes(wire.encode(envelope(node, meta=stamp({}, time.time)), secret=secret))
            assert (await post(node.address, good))[0] == 200

    asyncio.run(scenario())


def test_replayed_stale_and_unstamped_signed_messages_are_refused_and_change_nothing() -> None:
    """A signed cluster: a captured message sent again (replay), one timestamped beyond
    max_clock_skew in either direction (stale), and a signed one without time and nonce are
    refused with 401, counted by reason, and queue nothing; the model stays bit-for-bit as it was
    (the node holds its training loop, so only merges could change it)."""
    secret = b"s3cret-s3cret-s3cret"

    async def scenario() -> None:
        node = make_node(BASE.replace(max_clock_skew=30.0), "guarded", secret=secret)
        await node.start(hold=True)
        try:
            before = node.state.params.clone()

            def signed(meta: dict) -> bytes:
                return bytes(wire.encode(envelope(node, meta=meta), secret=secret))

            fresh = signed(stamp({}, time.time))
            assert (await post(node.address, fresh))[0] == 200
            queued = len(node._worker.inbox)
            cases = {
                "replay": fresh,
                "stale": signed({"ts": time.time() - 31.0, "nonce": 7}),
                "future": signed({"ts": time.time() + 31.0, "nonce": 8}),
                "unstamped": signed({}),
            }
            for name, body in cases.items():
                status, reply = await post(node.address, body)
                assert status == 401, name
                assert reply["reason"] == ("replay" if name == "replay" else "stale"), name
            assert node.rejected["replay"] == 1
            assert node.rejected["stale"] == 3
            assert len(node._worker.inbox) == queued  # nothing more to merge
            assert node.msgs_in == 1
            assert torch.equal(node.state.params, before)
            # a new nonce within the skew is accepted: only the resent capture was refused
            assert (await post(node.address, signed(stamp({}, time.time))))[0] == 200
        finally:
            await node.aclose()

    asyncio.run(scenario())


def test_signed_nodes_gossip_with_stamped_messages() -> None:
    """Two signed nodes learn from each other: every message they send carries a fresh stamp."""
    secret = b"another-shared-secret"

    async def scenario() -> None:
        async with running(make_node(BASE, "a", index=0, shards=2, secret=secret)) as a:
            async with running(make_node(BASE.replace(peers=(a.address,)), "b", index=1, shards=2,
                                         secret=secret)) as b:
                await wait_for(lambda: a.msgs_in > 10 and b.msgs_in > 10)
                assert not a.rejected
                assert not b.rejected

    asyncio.run(scenario())


def test_alone_node_trains_then_gossips_when_a_peer_appears() -> None:
    async def scenario() -> None:
        async with running(make_node(BASE, "a", index=0, shards=2)) as a:
            await wait_for(lambda: a.state.step > 20)
            status = await get_status(a.address)
            assert status["alone"] is True
            assert status["peers"] == []
            assert a.msgs_out == 0
            # b knows a's address; a learns b from b's messages (their envelopes carry b's address)
            cfg_b = BASE.replace(peers=(a.address,))
            async with running(make_node(cfg_b, "b", index=1, shards=2)) as b:
                await wait_for(lambda: a.msgs_out > 5 and b.msgs_out > 5)
                status = await get_status(a.address)
                assert status["alone"] is False
                assert [p["id"] for p in status["peers"]] == ["b"]
                assert status["bytes_in"] > 0
                assert status["bytes_out"] > 0

    asyncio.run(scenario())


def test_peers_of_a_dead_node_drop_it_and_carry_on() -> None:
    async def scenario() -> None:
        a = make_node(BASE, "a", index=0, shards=3)
        async with running(a):
            peers = (a.address,)
            b = make_node(BASE.replace(peers=peers), "b", index=1, shards=3)
            c = make_node(BASE.replace(peers=peers), "c", index=2, shards=3)
            async with running(b):
                async with running(c):
                    await wait_for(lambda: set(a.membership.ids()) == {"b", "c"} and c.msgs_out > 3)
                # c is gone (its server closed): a and b must drop it and keep learning together
                await wait_for(lambda: "c" not in a.membership.ids() and "c" not in b.membership.ids(), 10)
                sa, sb = a.msgs_out, b.msgs_out
                await wait_for(lambda: a.msgs_out > sa + 10 and b.msgs_out > sb + 10)
                assert a.state.step > 0
                assert b.status()["neighbours"] == ["a"]

    asyncio.run(scenario())


def test_lifecycle_start_twice_refused_close_idempotent() -> None:
    async def scenario() -> None:
        node = make_node(BASE, "x")
        await node.start()
        with pytest.raises(RuntimeError, match="already started"):
            await node.start()
        await node.aclose()
        await node.aclose()
        with pytest.raises(RuntimeError):
            await node.start()

    asyncio.run(scenario())


def test_checkpoint_resumes_where_it_stopped(tmp_path: Path) -> None:
    cfg = BASE.replace(steps=60)

    async def scenario() -> None:
        async with running(make_node(cfg, "ck", state_dir=tmp_path)) as node:
            await node.finished.wait()
            saved = node.state.params.clone()
        assert (tmp_path / "checkpoint.gfl").exists()
        again = make_node(cfg, "ck", state_dir=tmp_path)
        assert again.state.step == 0
        async with running(again):
            assert again.state.step >= 60
            await again.finished.wait()
        assert not torch.equal(again.state.params, saved)  # it trained on from there
        # a corrupt checkpoint is ignored with a warning, not a crash
        (tmp_path / "checkpoint.gfl").write_bytes(b"junk")
        async with running(make_node(cfg.replace(steps=1), "ck", state_dir=tmp_path)) as fresh:
            await fresh.finished.wait()
            assert fresh.state.step == 1

    asyncio.run(scenario())


def algorithm_state(node) -> dict[str, torch.Tensor]:
    """The node's algorithm tensors beyond the model (``[1, ...]`` each: a node is a batch of one)."""
    return {k: t for k, t in node.state.state.items() if k != "params"}


@pytest.mark.parametrize("algorithm", ["choco", "diging", "gossip_partitioned"])
def test_checkpoint_keeps_momentum_and_algorithm_state(tmp_path: Path, algorithm: str) -> None:
    """A restarted node gets back its optimizer momentum, its algorithm's own state (CHOCO's
    public copies, DIGing's tracker, partition ages) and its algorithm generator, not fresh zeros
    and a fresh seed; a checkpoint whose state does not fit is refused whole; an older one without
    that state still gives the model."""
    cfg = BASE.replace(steps=60, algorithm=algorithm, momentum=0.9)

    async def scenario() -> None:
        async with running(make_node(cfg, "ck", state_dir=tmp_path)) as node:
            await node.finished.wait()
        # alone, a round algorithm's state stays at its start: give it values no fresh node has
        gen = torch.Generator().manual_seed(0)
        for t in algorithm_state(node).values():
            t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64) > 0.5 if t.dtype == torch.bool
                    else torch.randn(t.shape, generator=gen, dtype=t.dtype))
        if algorithm == "diging":  # DIGing takes plain gradient steps: its momentum buffer stays 0
            node.trainer.velocity.copy_(torch.randn(node.trainer.velocity.shape, generator=gen))
        torch.rand(7, generator=node.state.generator)  # alone it drew nothing: move its generator on
        node._save_checkpoint()
        saved = {k: t.clone() for k, t in algorithm_state(node).items()}
        assert saved
        rng = node.state.generator.get_state()
        velocity = node.trainer.velocity.clone()
        assert velocity.abs().sum() > 0
        again = make_node(cfg, "ck", state_dir=tmp_path)
        fresh_rng = again.state.generator.get_state()
        assert not torch.equal(fresh_rng, rng)
        again._restore_checkpoint()
        assert again.state.step == node.state.step
        assert torch.equal(again.state.params, node.state.params)
        assert torch.equal(again.trainer.velocity, velocity)
        assert saved.keys() == algorithm_state(again).keys()
        for k, t in saved.items():
            assert torch.equal(algorithm_state(again)[k], t), k
        assert torch.equal(again.state.generator.get_state(), rng)

        # tamper: one state tensor of the wrong shape -> the whole checkpoint is ignored
        path = tmp_path / "checkpoint.gfl"
        env = wire.decode(path.read_bytes(), fingerprint=node.fingerprint)
        name = next(iter(saved))
        bad = dict(env.tensors, **{f"state/{name}": torch.zeros(3)})
        path.write_bytes(wire.encode(dataclasses.replace(env, tensors=bad)))
        fresh = make_node(cfg, "ck", state_dir=tmp_path)
        before = fresh.state.params.clone()
        fresh._restore_checkpoint()
        assert fresh.state.step == 0
        assert torch.equal(fresh.state.params, before)
        assert fresh.trainer.velocity.abs().sum() == 0
        assert torch.equal(fresh.state.generator.get_state(), fresh_rng)

        # an older checkpoint (the model alone): the model comes back, the rest starts afresh
        path.write_bytes(wire.encode(dataclasses.replace(env, tensors={"params": env.tensors["params"]})))
        old = make_node(cfg, "ck", state_dir=tmp_path)
        old._restore_checkpoint()
        assert old.state.step == node.state.step
        assert torch.equal(old.state.params, node.state.params)
        assert old.trainer.velocity.abs().sum() == 0
        assert torch.equal(old.state.generator.get_state(), fresh_rng)

    asyncio.run(scenario())


def test_membership_spreads_from_a_single_peer_address() -> None:
    """b and c were only told about a; they must learn of each other and agree on the graph."""

    async def scenario() -> None:
        a = make_node(BASE, "a", index=0, shards=3)
        async with running(a):
            cfg = BASE.replace(peers=(a.address,), topology="complete")
            async with running(make_node(cfg, "b", index=1, shards=3)) as b, \
                    running(make_node(cfg, "c", index=2, shards=3)) as c:
                await wait_for(lambda: "c" in b.membership.ids() and "b" in c.membership.ids(), 15)
                await wait_for(lambda: b.status()["neighbours"] == ["a", "c"], 5)

    asyncio.run(scenario())


def test_a_flooding_peer_is_throttled_while_the_node_keeps_learning_from_the_others() -> None:
    """A peer firing 1000 valid messages a second at a node that allows 100 per sender: the
    excess is refused (429, counted as ``rate``), at most the allowance gets through, the
    node keeps stepping, and its honest neighbour's messages keep arriving and merging."""
    async def scenario() -> None:
        cfg = BASE.replace(max_peer_rate=100.0)
        async with running(make_node(cfg, "a", index=0, shards=2)) as a:
            async with running(make_node(BASE.replace(peers=(a.address,)), "b", index=1, shards=2)) as b:
                await wait_for(lambda: a.msgs_in > 5 and b.msgs_in > 5)
                body = bytes(wire.encode(envelope(a, sender="flooder")))
                step0, from_b0 = a.state.step, a.traffic["b"][2]
                codes: dict[int, int] = {}
                t0 = time.monotonic()
                async with aiohttp.ClientSession() as s:
                    async def fire() -> None:
                        async with s.post(f"http://{a.address}/gossip", data=body) as r:
                            codes[r.status] = codes.get(r.status, 0) + 1

                    for _ in range(30):  # 3 s at 1000 requests/s, in bursts of 100 every 0.1 s
                        await asyncio.gather(*(fire() for _ in range(100)))
                        await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - t0) % 0.1))
                elapsed = time.monotonic() - t0
                accepted = a.traffic.get("flooder", [0, 0, 0, 0])[2]
                assert codes.get(429, 0) > 1000
                assert accepted <= 100 * elapsed + 100 + 5  # the rate, plus one burst
                assert a.rejected["rate"] >= codes[429]  # b too, beyond 100/s: the limit is per sender
                assert a.state.step > step0 + 50  # training went on
                assert a.traffic["b"][2] > from_b0 + 20  # and so did the honest neighbour's gossip
                assert sum(1 for m, _ in a._worker.inbox if m.sender == "flooder") <= 4

    asyncio.run(scenario())
