"""The decoder fuzzer (scripts/fuzz_wire.py), in small: a few hundred mutated frames at
`wire.decode` and at live loopback nodes, proof that the fuzzer notices a crash or a 5xx, and the
regression test for what it found (a sender hanging up mid-body logged a traceback)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
from pathlib import Path

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import fuzz_wire  # noqa: E402
from fuzz_frames import OPERATORS, FramePool, make_case, split  # noqa: E402

from gossipfl import wire  # noqa: E402
from gossipfl.node import handlers  # noqa: E402


def _kinds(report: fuzz_wire.Report, prefix: str) -> set[str]:
    return {k[len(prefix):].strip() for k in report.outcomes if k.startswith(prefix)}


def test_mutations_start_from_real_frames_and_break_them() -> None:
    pool = FramePool(cluster="c", algorithm="dpsgd", fingerprint="f", numel=10, dtype=wire.SUPPORTED_DTYPES["float32"],
                     secret=b"k", seed=1)
    for frame in pool.frames:  # the starting points decode as they are (signed ones under the key)
        signed = split(frame)[2]
        assert wire.decode(frame, secret=b"k" if signed else None).cluster == "c"
    rng = random.Random(0)
    cases = [make_case(rng, pool) for _ in range(300)]
    assert sum(frame in pool.frames for _, frame in cases) < 15  # nearly every case is changed
    assert {op.split("+")[0] for op, _ in cases} == set(OPERATORS)  # every operator is drawn


def test_decode_fuzz_raises_only_wire_errors(tmp_path: Path) -> None:
    report = fuzz_wire.fuzz_decode(400, seed=11, out=tmp_path)
    assert report.failures == []
    assert report.cases == 400
    plain, secret = _kinds(report, "plain"), _kinds(report, "secret")
    # The mutations reach every layer: accepted frames, the signature, the header, the table.
    assert "ok" in plain
    assert "ok" in secret
    assert any(k.startswith("BadSignature") for k in secret)
    assert any("header field" in k for k in plain)
    assert any(k.startswith("WireError: tensor") for k in plain)
    assert any("NaN" in k for k in plain)
    assert len(plain) > 40
    assert not list(tmp_path.iterdir())  # nothing was saved


def test_live_nodes_answer_every_mutated_frame_with_their_validators_verdict(tmp_path: Path) -> None:
    """300 frames at an unsigned and a signed node: only 200 or the right 4xx, no hang, no logged
    error, the model unchanged by every batch it accepted nothing from, /status answering."""
    report = asyncio.run(fuzz_wire.fuzz_node(300, seed=5, out=tmp_path))
    assert report.failures == []
    for who in ("plain", "signed"):
        statuses = {k.split()[0] for k in _kinds(report, who)}
        assert {"200", "400"} <= statuses, report.outcomes
    assert any(k.startswith("401") for k in _kinds(report, "signed"))
    assert any("413" in k for k in _kinds(report, "raw"))


def test_the_fuzzer_reports_a_crash_and_saves_the_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = wire.decode

    def buggy(buf, **kw):  # a decoder with an IndexError on frames whose 6th byte is odd
        if len(buf) > 5 and buf[5] & 1:
            raise IndexError("boom")
        return real(buf, **kw)

    monkeypatch.setattr(fuzz_wire.wire, "decode", buggy)
    report = fuzz_wire.fuzz_decode(60, seed=3, out=tmp_path)
    assert report.failures
    assert "IndexError: boom" in report.failures[0]
    saved = sorted(tmp_path.glob("decode-*.bin"))
    assert saved
    assert saved[0].read_bytes()[5] & 1  # the offending frame itself was kept
    assert "IndexError" in saved[0].with_suffix(".txt").read_text()


def test_the_fuzzer_reports_a_server_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = handlers.Handlers.rpc_gossip

    def buggy(self, body, *rest):  # a handler that crashes on short bodies: aiohttp answers 500
        if len(body) < 64:
            raise RuntimeError("handler bug")
        return real(self, body, *rest)

    monkeypatch.setattr(handlers.Handlers, "rpc_gossip", buggy)
    report = asyncio.run(fuzz_wire.fuzz_node(100, seed=2, out=tmp_path))
    assert any("answered 500" in f for f in report.failures)
    assert any("logged error" in f and "handler bug" in f for f in report.failures)


def test_a_sender_hanging_up_mid_body_is_counted_not_logged_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """Regression (found by the fuzzer): a body cut short by the sender (its timeout, a crash)
    raised ConnectionResetError out of the handler, which aiohttp logged as an error with a
    traceback. Now it is counted as rejected ("incomplete") and the node carries on."""
    cfg = fuzz_wire.RunConfig(cluster="fuzz", listen="127.0.0.1:0", max_message_mb=0.5, steps=10, mdns=False)

    async def scenario() -> None:
        async with fuzz_wire.fuzz_nodes(cfg) as nodes:
            node, _, pool = nodes[0]
            head = b"POST /gossip HTTP/1.1\r\nHost: x\r\n"
            for length in (5000, 100_000):  # read whole, and read into a pooled buffer
                request = head + b"Content-Length: %d\r\n\r\n" % length + pool.frames[0][:1000]
                assert await fuzz_wire._raw_http(node.address, request, True, 5.0) == ""
            for _ in range(100):
                if node.rejected["incomplete"] == 2:
                    break
                await asyncio.sleep(0.02)
            async with aiohttp.ClientSession() as s, s.get(f"http://{node.address}/status") as r:
                assert r.status == 200
                assert json.loads(await r.read())["rejected"] == {"incomplete": 2}
            assert not node.failed.is_set()

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
