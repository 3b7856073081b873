"""Fuzz the wire decoder and a live node's ``POST /gossip`` with random and mutated frames.

    python scripts/fuzz_wire.py --cases 10000          # 10 000 frames at decode, 10 000 at a node,
                                                       # then 2000 at a node with a ~200 KB model
    python scripts/fuzz_wire.py --cases 2000 --only node --seed 7

Frames come from `fuzz_frames` (real frames, signed and unsigned, broken in one or two ways).

decode: every frame is decoded three ways (no secret; with the secret; with the expected
cluster, fingerprint and a 64 KiB limit), from ``bytes`` or a ``bytearray``. Only a
``WireError`` may come out. A frame that decodes must have readable tensors and survive
``encode`` -> ``decode`` unchanged (what the decoder accepts, the encoder can say).

node: two nodes in this process on 127.0.0.1 (one unsigned, one signed), started on hold so they
never train; their model changes only by merging what they accepted. Each frame is POSTed (some
with chunked transfer encoding) and the answer must be what the node's own `Validator` says of
the same bytes: 200 for a message it accepts, else the 4xx of the refusal; never a 5xx, a hang
(no answer within --hang seconds) or a logged error. After every batch the node merges its
inbox: if it accepted nothing, its state must be bit-for-bit what it was, and ``/status`` must
answer with counters that add up. A few raw HTTP cases follow (lying Content-Length, broken
chunking, wrong method). A second round (--large-cases) does the same with a ~200 KB model, whose
bodies an unsigned node reads into a pooled buffer and scans for NaN/Inf as they arrive.

Prints the case count, outcome counts by kind and cases/s; exits 1 on any failure, saving each
offending frame under --out (``<target>-<case>.bin`` and a ``.txt`` saying what went wrong).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import random
import re
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgpack
import torch
from aiohttp.http_exceptions import HttpProcessingError

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzz_frames import FramePool, make_case  # noqa: E402

from gossipfl import wire  # noqa: E402
from gossipfl.build import build_algorithm, build_data, build_trainer  # noqa: E402
from gossipfl.config import RunConfig  # noqa: E402
from gossipfl.errors import WireError  # noqa: E402
from gossipfl.node import Node  # noqa: E402
from gossipfl.node.handlers import Validator  # noqa: E402

SECRET = b"fuzz-cluster-secret"
BATCH = 25  # node cases between two merge-and-check points


@dataclass
class Report:
    """What one fuzz run saw: outcomes by kind, and every failure (with where its frame went)."""

    target: str
    cases: int = 0
    seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def fail(self, out: Path | None, case: int, frame: bytes, what: str) -> None:
        """Record a failure and save its frame, so it can be replayed and turned into a test."""
        where = ""
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"{self.target}-{case}.bin"
            path.write_bytes(frame)
            path.with_suffix(".txt").write_text(what + "\n")
            where = f" (frame saved to {path})"
        self.failures.append(f"case {case}: {what.splitlines()[0]}{where}")

    def print(self, top: int = 30) -> None:
        rate = self.cases / self.seconds if self.seconds else float("inf")
        print(f"{self.target}: {self.cases} cases in {self.seconds:.1f} s ({rate:.0f} cases/s), "
              f"{len(self.failures)} failures")
        for kind, n in self.outcomes.most_common(top):
            print(f"  {n:7d}  {kind}")
        if len(self.outcomes) > top:
            rest = sum(n for _, n in self.outcomes.most_common()[top:])
            print(f"  {rest:7d}  ({len(self.outcomes) - top} rarer kinds)")
        for line in self.failures[:20]:
            print(f"  FAIL {line}")


def kind_of(exc: BaseException) -> str:
    """An error's class and message with the specifics (names, numbers) taken out, for counting."""
    msg = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", str(exc))
    msg = re.sub(r"0x[0-9a-fA-F]+|\d+", "N", msg)
    return f"{type(exc).__name__}: {msg[:70]}"


class Hang(Exception):
    """One case ran past its time (raised from a SIGALRM handler in the main thread)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise `Hang` in the main thread if the block runs longer than ``seconds``."""
    def on_alarm(*_: object) -> None:
        raise Hang(f"no result within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    pending, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    t0 = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if pending:  # someone else's alarm (pytest-timeout's): give it back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(pending - (time.monotonic() - t0), 1e-3))


# --------------------------------------------------------------------------- decode


def _same(a: wire.Envelope, b: wire.Envelope) -> bool:
    fields = ("cluster", "sender", "algorithm", "fingerprint", "kind", "step", "round", "version")
    if any(getattr(a, k) != getattr(b, k) for k in fields):
        return False
    if (a.age, a.weight) != (b.age, b.weight) or msgpack.packb(a.meta) != msgpack.packb(b.meta):
        return False
    if list(a.tensors) != list(b.tensors):
        return False
    return all(
        x.dtype == y.dtype and x.shape == y.shape
        and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
        for x, y in zip(a.tensors.values(), b.tensors.values(), strict=True))


def decode_one(frame: bytes, pool: FramePool, mode: str) -> str:
    """Decode ``frame`` in one ``mode``; the outcome's kind, or raise what is not a `WireError`."""
    kwargs: dict = {"secret": SECRET} if mode == "secret" else {}
    if mode == "expect":
        kwargs = {"cluster": pool.cluster, "fingerprint": pool.fingerprint, "max_bytes": 1 << 16}
    try:
        env = wire.decode(frame, **kwargs)
    except WireError as exc:
        return kind_of(exc)
    for t in env.tensors.values():  # every view must lie inside the buffer: read it all
        t.clone()
    again = wire.decode(wire.encode(env, secret=SECRET if mode == "secret" else None), **kwargs)
    if not _same(env, again):
        raise AssertionError(f"decode(encode(decode(frame))) differs from decode(frame): {env!r} vs {again!r}")
    try:
        wire.require_finite(env)
    except WireError as exc:
        return "ok, " + kind_of(exc)
    return "ok"


def fuzz_decode(cases: int, *, seed: int = 0, out: Path | None = None, hang: float = 5.0) -> Report:
    """Throw ``cases`` frames at `wire.decode` (each in three modes); see the module docstring."""
    rng = random.Random(seed)
    pool = FramePool(cluster="fuzz", algorithm="dpsgd", fingerprint="ab" * 8, numel=300,
                     dtype=torch.float32, secret=SECRET, seed=seed)
    report = Report("decode")
    t0 = time.perf_counter()
    for case in range(cases):
        op, frame = make_case(rng, pool)
        buf: bytes | bytearray = bytearray(frame) if case % 2 else frame
        for mode in ("plain", "secret", "expect"):
            try:
                with deadline(hang):
                    kind = decode_one(buf, pool, mode)
            except Exception as exc:  # a crash, a hang or a broken round trip: the fuzzer's finding
                report.fail(out, case, frame, f"{mode} decode after {op}: {type(exc).__name__}: {exc}\n"
                            + traceback.format_exc())
                kind = f"FAILED {type(exc).__name__}"
            report.outcomes[f"{mode:6s} {kind}"] += 1
        report.cases += 1
    report.seconds = time.perf_counter() - t0
    return report


# --------------------------------------------------------------------------- node


class _Errors(logging.Handler):
    """Collects ERROR records (aiohttp's "Error handling request", a crashed node loop)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []
        self.parser = 0  # aiohttp's own 400s for malformed HTTP, which it logs at ERROR (not ours)

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            self.parser += 1
            return
        self.records.append(f"{record.name}: {record.getMessage()}: {type(exc).__name__}: {exc}")


def _state(node: Node) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in node.state.state.items()}


def _unchanged(before: dict[str, torch.Tensor], node: Node) -> bool:
    now = node.state.state
    return before.keys() == now.keys() and all(
        torch.equal(before[k].reshape(-1).view(torch.uint8), now[k].detach().reshape(-1).view(torch.uint8))
        for k in before)


@contextlib.asynccontextmanager
async def fuzz_nodes(cfg: RunConfig) -> AsyncIterator[list[tuple[Node, Validator, FramePool]]]:
    """An unsigned and a signed node on loopback, on hold, each with its oracle and frames."""
    data = build_data(cfg)
    nodes = []
    async with contextlib.AsyncExitStack() as stack:
        for i, secret in enumerate((None, SECRET)):
            node = Node(cfg, node_id=f"target{i}", trainer=build_trainer(cfg, data, 0, 1),
                        algorithm=build_algorithm(cfg), secret=secret)
            await node.start(hold=True)  # serves, never trains: only merges could change its model
            stack.push_async_callback(node.aclose)
            numel, dtype = node.trainer.layout.numel, node.state.params.dtype
            oracle = Validator(node_id=node.id, cfg=cfg, algorithm=node.algorithm, fingerprint=node.fingerprint,
                               secret=secret, numel=numel, dtype=dtype)
            pool = FramePool(cluster=cfg.cluster, algorithm=node.algorithm.name, fingerprint=node.fingerprint,
                             numel=numel, dtype=dtype, secret=secret, seed=i)
            nodes.append((node, oracle, pool))
        yield nodes


def expected_status(oracle: Validator, frame: bytes) -> int:
    """What the node should answer for ``frame``: its own validator's verdict on the same bytes."""
    try:
        oracle.accept(frame)
    except WireError as exc:
        return exc.http_status
    return 200


async def _chunks(frame: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(frame), 4096):
        yield frame[i : i + 4096]


async def _post(session: aiohttp.ClientSession, address: str, frame: bytes, chunked: bool,
                hang: float) -> tuple[int, str]:
    body = _chunks(frame) if chunked else frame
    async with asyncio.timeout(hang), session.post(f"http://{address}/gossip", data=body) as r:
        raw = await r.read()
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    reason = answer.get("reason") if isinstance(answer, dict) else None
    return r.status, reason if isinstance(reason, str) and reason else "(no JSON reason)"


async def _raw_http(address: str, request: bytes, hangup: bool, hang: float) -> str:
    """Send ``request`` on a fresh connection and read the status line ('' if closed unanswered).

    ``hangup``: close the connection right after sending, as a sender that gives up mid-body does
    (aiohttp takes a half-close for a full one, so there is no answer to wait for)."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        if hangup:
            return ""
        async with asyncio.timeout(hang):
            line = await reader.readline()
        return line.decode("latin-1").strip()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def raw_requests(frame: bytes) -> list[tuple[str, bytes, bool]]:
    """HTTP-level abuse around a valid frame: (what, request, hang up after sending)."""
    head = b"POST /gossip HTTP/1.1\r\nHost: x\r\n"
    return [
        ("huge content-length", head + b"Content-Length: 1099511627776\r\n\r\n" + frame[:100], False),
        ("negative length", head + b"Content-Length: -1\r\n\r\n" + frame, False),
        ("bad chunk size", head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + frame + b"\r\n0\r\n\r\n", False),
        ("GET /gossip", b"GET /gossip HTTP/1.1\r\nHost: x\r\n\r\n", False),
        ("POST /status", b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", False),
        ("cut body, small", head + b"Content-Length: 5000\r\n\r\n" + frame[:100], True),
        ("cut body, pooled", head + b"Content-Length: 100000\r\n\r\n" + frame, True),
        ("cut chunked body", head + b"Transfer-Encoding: chunked\r\n\r\nFFFF\r\n" + frame, True),
    ]


async def fuzz_node(cases: int, *, seed: int = 0, out: Path | None = None, hang: float = 10.0,
                    concurrency: int = 4, hidden: int = 32) -> Report:
    """Throw ``cases`` frames at live nodes' ``POST /gossip``; see the module docstring.
    ``hidden``: the nodes' MLP width (32: ~10 KB frames; 640: ~200 KB, which a node without a
    secret scans for NaN/Inf chunk by chunk as they arrive)."""
    frame_mb = (64 * hidden + hidden + 10 * hidden + 10) * 4 / 1e6
    cfg = RunConfig(cluster="fuzz", listen="127.0.0.1:0", max_peer_rate=0, max_message_mb=max(0.1, 4 * frame_mb),
                    steps=10, mdns=False, seed=seed, hidden=(hidden,))
    rng = random.Random(seed)
    report = Report("node" if hidden == 32 else f"node, {frame_mb * 1000:.0f} KB frames")
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    accepted_total = [0, 0]
    try:
        async with fuzz_nodes(cfg) as nodes, aiohttp.ClientSession() as session:
            snapshots = [_state(node) for node, _, _ in nodes]
            sem = asyncio.Semaphore(concurrency)
            t0 = time.perf_counter()

            async def one(case: int, which: int) -> bool:
                node, oracle, pool = nodes[which]
                op, frame = make_case(rng, pool)
                want = expected_status(oracle, frame)
                async with sem:
                    try:
                        got, reason = await _post(session, node.address, frame, case % 10 == 9, hang)
                    except TimeoutError:
                        report.fail(out, case, frame, f"{op}: no answer within {hang} s (a hang)")
                        return False
                report.outcomes[f"{'signed' if which else 'plain':6s} {got} {reason if got != 200 else 'ok'}"] += 1
                if got != want or got >= 500 or (got != 200 and reason.startswith("(")):
                    report.fail(out, case, frame, f"{op}: node answered {got} {reason}, its validator says {want}")
                return got == 200

            for start in range(0, cases, BATCH):
                batch = range(start, min(cases, start + BATCH))
                results = await asyncio.gather(*(one(c, c % 2) for c in batch))
                report.cases += len(batch)
                for which, (node, _, _) in enumerate(nodes):
                    accepted = sum(ok for c, ok in zip(batch, results, strict=True) if c % 2 == which)
                    accepted_total[which] += accepted
                    node.merge_pending()
                    if not accepted and not _unchanged(snapshots[which], node):
                        report.fail(out, start, b"", f"node {node.id}: model changed though it accepted nothing")
                    if not all(bool(torch.isfinite(t).all()) for t in node.state.state.values()
                               if t.is_floating_point()):
                        report.fail(out, start, b"", f"node {node.id}: merging finite messages made NaN or Inf")
                    snapshots[which] = _state(node)
                    await _check_status(session, node, accepted_total[which], report, out, start)
            report.seconds = time.perf_counter() - t0
            for which, (node, _, pool) in enumerate(nodes):
                for what, request, hangup in raw_requests(pool.frames[0]):
                    try:
                        line = await _raw_http(node.address, request, hangup, hang)
                    except TimeoutError:
                        report.fail(out, -1, request, f"raw HTTP {what!r} on {node.id}: no answer within {hang} s")
                        continue
                    except OSError as exc:  # the server may drop a connection it cannot parse
                        line = f"(connection {type(exc).__name__})"
                    report.outcomes[f"raw    {what}: {line or '(closed)'}"] += 1
                    parts = line.split()
                    if line.startswith("HTTP/") and (len(parts) < 2 or not parts[1].startswith("4")):
                        report.fail(out, -1, request, f"raw HTTP {what!r} on {node.id}: {line}")
                if not _unchanged(snapshots[which], node):
                    report.fail(out, -1, b"", f"node {node.id}: model changed by raw HTTP requests")
                await _check_status(session, node, None, report, out, -1)
                if node.failed.is_set():
                    report.fail(out, -1, b"", f"node {node.id} failed: {node.error}")
    finally:
        logging.getLogger().removeHandler(errors)
    if errors.parser:
        report.outcomes["aiohttp logged a malformed-HTTP 400 at ERROR"] += errors.parser
    for record in errors.records:
        report.fail(out, -1, b"", f"logged error: {record}")
    return report


async def _check_status(session: aiohttp.ClientSession, node: Node, accepted: int | None, report: Report,
                        out: Path | None, case: int) -> None:
    """``/status`` answers, and (between batches) its message count is what the node accepted."""
    try:
        async with asyncio.timeout(10), session.get(f"http://{node.address}/status") as r:
            status = await r.json()
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        report.fail(out, case, b"", f"node {node.id}: /status did not answer ({type(exc).__name__}: {exc})")
        return
    if accepted is not None and status["msgs_in"] != accepted:
        report.fail(out, case, b"", f"node {node.id}: /status says {status['msgs_in']} messages in, "
                    f"{accepted} were accepted")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=10_000, help="frames per target (default 10000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("decode", "node"), help="fuzz one target only")
    ap.add_argument("--out", default="fuzz-failures", help="folder for offending frames")
    ap.add_argument("--hang", type=float, default=10.0, help="seconds before a case counts as a hang")
    ap.add_argument("--large-cases", type=int, default=2000,
                    help="frames at nodes with a ~200 KB model, whose bodies are scanned as they arrive "
                         "(default 2000; 0: none)")
    args = ap.parse_args()
    if args.cases < 1 or not math.isfinite(args.hang) or args.hang <= 0:
        ap.error("--cases must be >= 1 and --hang > 0")
    torch.set_num_threads(1)
    logging.getLogger().setLevel(logging.ERROR)  # warnings about rejected frames: noise here
    reports = []
    if args.only in (None, "decode"):
        reports.append(fuzz_decode(args.cases, seed=args.seed, out=Path(args.out), hang=args.hang))
        reports[-1].print()
    if args.only in (None, "node"):
        reports.append(asyncio.run(fuzz_node(args.cases, seed=args.seed, out=Path(args.out), hang=args.hang)))
        reports[-1].print()
        if args.large_cases > 0:
            reports.append(asyncio.run(fuzz_node(args.large_cases, seed=args.seed + 1, out=Path(args.out),
                                                 hang=args.hang, hidden=640)))
            reports[-1].print()
    failed = sum(len(r.failures) for r in reports)
    print(f"total: {sum(r.cases for r in reports)} cases, {failed} failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
