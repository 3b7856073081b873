"""Launch N real `gossipfl node` processes on this host, one per port, and watch them learn.

Each node is its own OS process listening on 127.0.0.1 (no mDNS: loopback only); every node is
told the first node's address, and learns the others from the messages it receives, exactly as
on a LAN with one --peer. Node i trains on shard i of N. Every few seconds the script prints each
node's /status; Ctrl-C (or the end of --duration) stops all nodes with SIGTERM, so they save
their checkpoints under --state-dir.

    python scripts/launch_nodes.py --nodes 4 --duration 60 --topology ring
    python scripts/launch_nodes.py --nodes 4 --duration 60 -- --algorithm gossip --lr 0.05

Arguments after `--` are passed to every `gossipfl node`.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def status(address: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://{address}/status", timeout=2) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def main() -> int:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--base-port", type=int, default=7070)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds each node trains")
    ap.add_argument("--topology", default="ring")
    ap.add_argument("--cluster", default="local")
    ap.add_argument("--state-dir", help="parent folder of the nodes' state dirs (default: a temp folder)")
    ap.add_argument("--every", type=float, default=3.0, help="seconds between status tables")
    args = ap.parse_args(argv)
    if args.nodes < 1:
        ap.error("--nodes must be >= 1")
    state = Path(args.state_dir or tempfile.mkdtemp(prefix="gossipfl-nodes-"))
    addresses = [f"127.0.0.1:{args.base_port + i}" for i in range(args.nodes)]
    procs = []
    for i, address in enumerate(addresses):
        cmd = [sys.executable, "-m", "gossipfl.cli", "node", "--listen", address, "--no-mdns",
               "--id", f"node{i:02d}", "--cluster", args.cluster, "--topology", args.topology,
               "--shards", str(args.nodes), "--node-index", str(i), "--duration", str(args.duration),
               "--state-dir", str(state / f"node{i:02d}"), *extra]
        if i:
            cmd += ["--peer", addresses[0]]
        log = (state / f"node{i:02d}.log").open("w")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    print(f"{args.nodes} nodes on {addresses[0]}..{addresses[-1]}; logs and state in {state}")
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping and any(p.poll() is None for p in procs):
            time.sleep(args.every)
            if all(p.poll() is not None for p in procs):
                break
            print(f"{'node':<8}{'step':>7}{'accuracy':>10}{'peers':>7}{'msgs in':>9}{'msgs out':>9}")
            for address in addresses:
                s = status(address)
                if s is None:
                    print(f"{address:<8} (not answering)")
                    continue
                acc = "-" if s["accuracy"] is None else f"{s['accuracy']:.4f}"
                print(f"{s['id']:<8}{s['step']:>7}{acc:>10}{len(s['peers']):>7}{s['msgs_in']:>9}{s['msgs_out']:>9}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=30) for p in procs]
    print(f"exit codes: {codes}; logs and checkpoints in {state}")
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
