"""Soak: N `gossipfl node` processes on loopback for a long time, with churn, watched for leaks.

    python scripts/soak.py                                   # 32 nodes, 10 minutes
    python scripts/soak.py --nodes 8 --minutes 2 --churn-every 30 --kill 1
    python scripts/soak.py --nodes 32 -- --gossip-every 2    # after --: passed to every node

Every node is its own process on 127.0.0.1 (no mDNS), told node00's address, trains on its shard
and runs until stopped. After --warmup seconds and then every --churn-every seconds, --kill nodes
(never node00, the one everybody was told about) are killed with SIGKILL -- no checkpoint on the
way out -- and restarted --down seconds later from their --state-dir; each restart is judged as
soon as the node answers again, and the watch goes on past --minutes until every one is.

Every --every seconds the script reads each node's /status and prints one line: nodes up, each
node's resident memory, open file descriptors and asyncio tasks (min / median / max), the longest
event-loop stall, and the cluster's accuracy (mean, min); the per-node table at the start of the
watch and at the end. At the end it says:

* whether anything grew without bound: for each process that lived long enough, the mean of a
  figure over the last half of its life against the first half (medians; its first 2 minutes,
  or 20 %, left out: connections to the peers open as the node meets them); growing means more
  than `GROWTH` allows (memory: 5 % and 16 MiB; open files: 4; tasks: 8);
* whether every restarted node resumed: its step counter carried on from its last checkpoint
  (the first step it reports is at least the checkpoint's, which is > 0), and its first accuracy
  after the restart is at most --tolerance (0.02) below its last one before the kill (higher is
  fine: that first reading comes after some hundred steps of training and merging).

Exit code 0 when nothing grew and every restart resumed, else 1. Samples go to --out as JSONL.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

# figure -> (relative, absolute) growth allowed between the two halves of a process's life
GROWTH: dict[str, tuple[float, float]] = {"rss_bytes": (0.05, 16 * 2**20), "open_fds": (0.0, 4), "tasks": (0.0, 8)}
WARMUP_SHARE = 0.2  # of a process's life, left out of the growth check (at least SETTLE seconds)
SETTLE = 120.0
MIN_SAMPLES = 6  # after the warm-up, for a growth verdict on one process


def status(address: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """A node's /status, or None if it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{address}/status", timeout=timeout) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def checkpoint_step(state_dir: Path) -> int | None:
    """The step saved in a node's checkpoint (what a restart must resume from), or None.

    Read from the frame's msgpack header (`gossipfl.wire` layout) without importing the codec:
    this script then needs no torch, and stays light beside the nodes it watches."""
    try:
        frame = (state_dir / "checkpoint.gfl").read_bytes()
        (header_len,) = struct.unpack_from("<I", frame, 4)
        return int(msgpack.unpackb(frame[8 : 8 + header_len])["step"])
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def grew(points: list[tuple[float, float | None]], figure: str, settle: float = SETTLE) -> float | None:
    """How much ``figure`` grew over one process's life, from its ``(t, value)`` samples, or None
    if it stayed within bounds or too few samples are left to say. A process's first ``settle``
    seconds (or 20 % of its life, if longer) are left out: a node opens a connection to each
    peer as it meets them, so its files and tasks climb for a minute or two, then level off."""
    points = [(t, v) for t, v in points if v is not None]
    if not points:
        return None
    start = points[0][0] + max(settle, WARMUP_SHARE * (points[-1][0] - points[0][0]))
    values = [v for t, v in points if t >= start]
    if len(values) < MIN_SAMPLES:
        return None
    half = len(values) // 2
    # Memory and tasks: medians, so a sample caught mid-burst (requests in flight) does not decide
    # it. Files dip while peers are down (churn: in a 10-minute 32-node run one node's fds moved
    # between 65 and 72 as its peers came and went), so their upper envelope is compared: a leak
    # raises the maximum, a peer that is down only lowers it.
    stat = max if figure == "open_fds" else statistics.median
    first, last = stat(values[:half]), stat(values[half:])
    rel, absolute = GROWTH[figure]
    return last - first if last - first > max(rel * first, absolute) else None


def resumed(before: dict[str, Any], saved_step: int | None, after: dict[str, Any], tolerance: float) -> str | None:
    """Why a restarted node did not resume (None if it did): ``before`` is its last status
    before the kill, ``saved_step`` its checkpoint's step, ``after`` its first status with an
    accuracy after the restart."""
    if not saved_step:
        return "no checkpoint to resume from"
    if after["step"] < saved_step:
        return f"step {after['step']} after the restart, its checkpoint was at {saved_step} (started afresh?)"
    a, b = before.get("accuracy"), after.get("accuracy")
    if a is None or b is None:
        return "no accuracy before or after"
    # One-sided: its first accuracy after the restart comes some hundred steps in (it trains and
    # merges from the moment it is up), and a node that catches up with better neighbours has
    # resumed all the same; one that started afresh is far below.
    if b < a - tolerance:
        return f"accuracy {b:.4f} after the restart, {a:.4f} before (lost more than {tolerance})"
    return None


@dataclass
class Proc:
    """One node's current process and every sample of every incarnation."""

    index: int
    address: str
    state: Path
    popen: subprocess.Popen | None = None
    life: int = 0  # incarnation number (restarts so far)
    samples: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # life -> statuses
    last: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        return f"node{self.index:02d}"


class Soak:
    """Starts, samples, kills and restarts the nodes; keeps what the verdict needs."""

    def __init__(self, args: argparse.Namespace, extra: list[str]) -> None:
        self.args, self.extra = args, extra
        self.root = Path(args.state_dir or tempfile.mkdtemp(prefix="gossipfl-soak-"))
        self.procs = [Proc(i, f"127.0.0.1:{args.base_port + i}", self.root / f"node{i:02d}") for i in range(args.nodes)]
        self.restarts: list[dict[str, Any]] = []  # one verdict per restart
        self.pending: list[dict[str, Any]] = []  # killed nodes not yet restarted or not yet back
        self.t0 = time.monotonic()
        self.out = open(args.out, "w") if args.out else None  # closed in close()
        self._pool = ThreadPoolExecutor(max(4, args.nodes))

    def start(self, p: Proc) -> None:
        cmd = [sys.executable, "-m", "gossipfl.cli", "node", "--listen", p.address, "--no-mdns", "--quiet",
               "--id", p.id, "--cluster", "soak", "--shards", str(self.args.nodes), "--node-index", str(p.index),
               "--state-dir", str(p.state), *self.extra]
        if p.index:
            cmd += ["--peer", self.procs[0].address]
        p.state.mkdir(parents=True, exist_ok=True)
        with (self.root / f"{p.id}.log").open("a") as log:
            p.popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def sample(self) -> list[dict[str, Any] | None]:
        """Every node's status now (None where down or not answering), recorded per incarnation."""
        up = [p for p in self.procs if p.popen is not None and p.popen.poll() is None]
        got = dict(zip([p.index for p in up], self._pool.map(lambda p: status(p.address), up), strict=True))
        t = round(self.now(), 1)
        rows: list[dict[str, Any] | None] = []
        for p in self.procs:
            st = got.get(p.index)
            if st is not None:
                st = {"t": t, "life": p.life, **{k: st.get(k) for k in (
                    "id", "step", "accuracy", "rss_bytes", "open_fds", "tasks", "loop_stall_max",
                    "loop_stall_recent", "msgs_in", "msgs_out")}}
                p.samples.setdefault(p.life, []).append(st)
                p.last = st
                if self.out:
                    self.out.write(json.dumps(st) + "\n")
            rows.append(st)
        if self.out:
            self.out.flush()
        return rows

    def wait_up(self, procs: list[Proc], within: float) -> list[Proc]:
        """Wait until each of ``procs`` reports an accuracy; returns those that never did."""
        deadline = time.monotonic() + within
        waiting, dead = list(procs), []
        while waiting and time.monotonic() < deadline:
            time.sleep(0.5)
            dead += [p for p in waiting if p.popen is None or p.popen.poll() is not None]  # e.g. port taken
            waiting = [p for p in waiting if p not in dead]
            answers = list(self._pool.map(lambda p: status(p.address), waiting))
            waiting = [p for p, st in zip(waiting, answers, strict=True) if st is None or st.get("accuracy") is None]
        return dead + waiting

    def kill(self, rng: random.Random) -> None:
        """SIGKILL --kill nodes that are up (never node00); `tick` restarts and judges them."""
        pending = {r["proc"].index for r in self.pending}
        candidates = [p for p in self.procs[1:] if p.index not in pending]
        victims = rng.sample(candidates, min(self.args.kill, len(candidates)))
        for p in victims:
            before = status(p.address) or p.last or {}
            assert p.popen is not None
            p.popen.send_signal(signal.SIGKILL)
            p.popen.wait()
            self.pending.append({"proc": p, "before": before, "restart_at": self.now() + self.args.down})
        if victims:
            print(f"{self.now():7.1f}s  killed {', '.join(p.id for p in victims)} (SIGKILL)", flush=True)

    def tick(self) -> None:
        """Restart killed nodes whose --down time is over; judge those that are back (see `resumed`)."""
        for r in list(self.pending):
            p, now = r["proc"], self.now()
            if "saved" not in r:
                if now >= r["restart_at"]:
                    r["saved"] = checkpoint_step(p.state)  # what the new process must resume from
                    p.life += 1
                    self.start(p)
                    r["deadline"] = now + 300
                continue
            after = status(p.address, timeout=2.0)
            back = after is not None and after.get("accuracy") is not None
            if not back and now < r["deadline"]:
                continue
            self.pending.remove(r)
            before = r["before"]
            why = resumed(before, r["saved"], after, self.args.tolerance) if back else "not back within 300 s"
            record = {"t": round(now, 1), "node": p.id, "step_before": before.get("step"),
                      "checkpoint_step": r["saved"], "step_after": after and after.get("step"),
                      "accuracy_before": before.get("accuracy"), "accuracy_after": after and after.get("accuracy"),
                      "restart_seconds": round(now - r["restart_at"], 1), "resumed": why is None, "why": why}
            self.restarts.append(record)
            print(f"{now:7.1f}s  {p.id} back after {record['restart_seconds']:g} s: step {record['step_before']} "
                  f"-> checkpoint {record['checkpoint_step']} -> {record['step_after']}, accuracy "
                  f"{_f(record['accuracy_before'])} -> {_f(record['accuracy_after'])}: "
                  f"{'resumed' if why is None else 'NOT RESUMED: ' + why}", flush=True)

    def close(self) -> list[int | None]:
        """SIGTERM every node (they checkpoint and exit), SIGKILL what is left after 60 s."""
        for p in self.procs:
            if p.popen is not None and p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for p in self.procs:
            if p.popen is None:
                codes.append(None)
                continue
            try:
                codes.append(p.popen.wait(timeout=60))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                codes.append(p.popen.wait())
        self._pool.shutdown()
        if self.out:
            self.out.close()
        return codes


def _f(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def _spread(values: list[float], scale: float = 1.0, fmt: str = ".0f") -> str:
    v = sorted(x / scale for x in values if x is not None)
    return "-" if not v else f"{v[0]:{fmt}}/{statistics.median(v):{fmt}}/{v[-1]:{fmt}}"


def summary_line(t: float, rows: list[dict[str, Any] | None]) -> str:
    up = [r for r in rows if r is not None]
    accs = [r["accuracy"] for r in up if r["accuracy"] is not None]
    stall = max((r["loop_stall_recent"] or 0.0 for r in up), default=0.0)
    return (f"{t:7.1f}s  up {len(up):2d}/{len(rows)}  rss MB {_spread([r['rss_bytes'] for r in up], 2**20)}  "
            f"fds {_spread([r['open_fds'] for r in up])}  tasks {_spread([r['tasks'] for r in up])}  "
            f"stall(10-20s) {stall:.3f}s  accuracy {_f(statistics.fmean(accs) if accs else None)} "
            f"(min {_f(min(accs, default=None))})")


def node_table(rows: list[dict[str, Any] | None], procs: list[Proc]) -> str:
    lines = [f"{'node':<8}{'life':>5}{'step':>8}{'accuracy':>10}{'rss MB':>8}{'fds':>5}{'tasks':>6}{'stall max':>11}"]
    for p, r in zip(procs, rows, strict=True):
        if r is None:
            lines.append(f"{p.id:<8}  (not answering)")
            continue
        lines.append(f"{p.id:<8}{r['life']:>5}{r['step']:>8}{_f(r['accuracy']):>10}"
                     f"{_f(r['rss_bytes'] and r['rss_bytes'] / 2**20, '.0f'):>8}{r['open_fds']:>5}{r['tasks']:>6}"
                     f"{_f(r['loop_stall_max'], '.3f'):>11}")
    return "\n".join(lines)


def verdict(soak: Soak) -> dict[str, Any]:
    """What grew (per node and figure), the restarts, and the first and last figures."""
    growth = {}
    for p in soak.procs:
        for life, samples in p.samples.items():
            for figure in GROWTH:
                g = grew([(s["t"], s[figure]) for s in samples], figure)
                if g is not None:
                    growth[f"{p.id}#{life} {figure}"] = g
    firsts = [s[0] for p in soak.procs for s in [p.samples.get(0, [])] if s]
    lasts = [p.last for p in soak.procs if p.last is not None]
    return {"growth": growth, "restarts": soak.restarts,
            "stall_max": max((s["loop_stall_max"] or 0.0 for p in soak.procs for ss in p.samples.values()
                              for s in ss), default=0.0),
            "first": firsts, "last": lasts}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=32, help="node processes (default 32)")
    ap.add_argument("--minutes", type=float, default=10.0, help="how long to watch them (default 10)")
    ap.add_argument("--churn-every", type=float, default=60.0, metavar="SECONDS", help="seconds between kills")
    ap.add_argument("--warmup", type=float, default=90.0, metavar="SECONDS", help="seconds before the first kill")
    ap.add_argument("--kill", type=int, default=2, help="nodes killed (SIGKILL) at each churn point")
    ap.add_argument("--down", type=float, default=5.0, metavar="SECONDS", help="seconds a killed node stays down")
    ap.add_argument("--every", type=float, default=30.0, metavar="SECONDS", help="seconds between samples")
    ap.add_argument("--tolerance", type=float, default=0.02, help="accuracy a restarted node may lose")
    ap.add_argument("--base-port", type=int, default=7400)
    ap.add_argument("--state-dir", help="parent folder of the nodes' state dirs and logs (default: a temp folder)")
    ap.add_argument("--out", help="write every sample here as JSONL")
    ap.add_argument("--json", help="write the verdict here as JSON")
    args = ap.parse_args(argv)
    if args.nodes < 2 or args.minutes <= 0 or args.every <= 0 or args.churn_every <= 0 or args.kill < 0:
        ap.error("need --nodes >= 2, and --minutes, --every, --churn-every > 0, --kill >= 0")
    soak = Soak(args, extra)
    print(f"{args.nodes} nodes on {soak.procs[0].address}..{soak.procs[-1].address}, {args.minutes:g} min, "
          f"{args.kill} killed every {args.churn_every:g} s after {args.warmup:g} s; logs and state in {soak.root}",
          flush=True)
    stop = threading.Event()  # Ctrl-C or SIGTERM: end the watch early, still stop the nodes and judge
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    rng = random.Random(0)
    codes: list[int | None] = []
    try:
        for p in soak.procs:
            soak.start(p)
        missing = soak.wait_up(soak.procs, within=300)
        if missing:
            print(f"not up after 300 s or exited: {', '.join(p.id for p in missing)} (logs in {soak.root})",
                  file=sys.stderr)
            return 1
        rows = soak.sample()
        print(f"{soak.now():7.1f}s  all up\n" + node_table(rows, soak.procs), flush=True)
        end = soak.now() + args.minutes * 60
        next_sample, next_churn = soak.now() + args.every, soak.now() + args.warmup
        while not stop.is_set() and (soak.now() < end or soak.pending):  # every restart gets judged
            stop.wait(min(1.0, max(0.05, min(next_sample, next_churn, end) - soak.now())))
            soak.tick()
            if args.kill and next_churn <= soak.now() < end - args.down:
                soak.kill(rng)
                next_churn += args.churn_every
            if soak.now() >= next_sample:
                print(summary_line(soak.now(), soak.sample()), flush=True)
                next_sample += args.every
                if next_sample < soak.now():  # a slow sample: skip the slots it missed
                    next_sample = soak.now() + args.every
        rows = soak.sample()
        print(f"{soak.now():7.1f}s  end of the watch\n" + node_table(rows, soak.procs), flush=True)
    finally:
        codes = soak.close()
    result = verdict(soak)
    result["exit_codes"] = codes
    bad_exits = [p.id for p, c in zip(soak.procs, codes, strict=True) if c not in (0, None)]
    _print_verdict(result, bad_exits)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    ok = not result["growth"] and all(r["resumed"] for r in result["restarts"]) and not bad_exits
    return 0 if ok else 1


def _print_verdict(result: dict[str, Any], bad_exits: list[str]) -> None:
    first, last = result["first"], result["last"]
    print(f"memory per node, start -> end: {_spread([r['rss_bytes'] for r in first], 2**20)} -> "
          f"{_spread([r['rss_bytes'] for r in last], 2**20)} MB (min/median/max); open fds "
          f"{_spread([r['open_fds'] for r in first])} -> {_spread([r['open_fds'] for r in last])}; tasks "
          f"{_spread([r['tasks'] for r in first])} -> {_spread([r['tasks'] for r in last])}")
    print(f"longest event-loop stall: {result['stall_max']:.3f} s")
    accs = [r["accuracy"] for r in last if r["accuracy"] is not None]
    print(f"accuracy at the end: mean {_f(statistics.fmean(accs) if accs else None)}, "
          f"min {_f(min(accs, default=None))}")
    if result["growth"]:
        for what, g in sorted(result["growth"].items()):
            print(f"GREW: {what} by {g / 2**20:.1f} MB" if "rss" in what else f"GREW: {what} by {g:.1f}")
    else:
        print("nothing grew without bound (memory, open fds, tasks)")
    done = result["restarts"]
    ok = sum(r["resumed"] for r in done)
    print(f"restarts resumed: {ok}/{len(done)}" + "".join(f"\n  NOT RESUMED {r['node']} at {r['t']} s: {r['why']}"
                                                         for r in done if not r["resumed"]))
    if bad_exits:
        print(f"nodes that did not exit cleanly on SIGTERM: {', '.join(bad_exits)}")


if __name__ == "__main__":
    sys.exit(main())
