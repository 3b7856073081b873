"""Screenshots of the live page, for the README: a node's page (4 `gossipfl node` processes on
loopback, ring) and a simulation's (`gossipfl sim --engine vectorized --nodes 256 --live`).

Needs Playwright's Python package and Debian's chromium (the test extra and `.ci/run` install
both). Writes ``scripts/figures/live-node.png`` and ``scripts/figures/live-sim.png``.

    python scripts/screenshot_live.py            # about 40 s
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

OUT = Path(__file__).resolve().parent / "figures"


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shoot(url: str, path: Path, nodes: int, settle: float) -> None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        page.wait_for_function(f"document.querySelectorAll('#graph circle.node').length == {nodes}", timeout=60_000)
        page.wait_for_timeout(settle * 1000)
        page.screenshot(path=str(path), full_page=True)
        browser.close()
    print(f"wrote {path}")


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=20)


def main() -> int:
    OUT.mkdir(exist_ok=True)
    addrs = [f"127.0.0.1:{port()}" for _ in range(4)]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "gossipfl.cli", "node", "--listen", a, "--id", f"n{i}", "--shards", "4",
         "--node-index", str(i), "--duration", "60", "--cluster", "demo", "--no-mdns", "--topology", "ring",
         "--lr", "0.01", *[x for b in addrs if b != a for x in ("--peer", b)]],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i, a in enumerate(addrs)]
    try:
        deadline = time.monotonic() + 60
        while True:  # until node 0 answers
            try:
                urllib.request.urlopen(f"http://{addrs[0]}/status", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("node 0 did not start") from None
                time.sleep(0.3)
        shoot(f"http://{addrs[0]}/", OUT / "live-node.png", 4, settle=12)
    finally:
        stop(procs)
    sim = subprocess.Popen([sys.executable, "-m", "gossipfl.cli", "sim", "--engine", "vectorized", "--nodes", "256",
                            "--topology", "torus", "--steps", "100000", "--lr", "0.02", "--live", "127.0.0.1:0",
                            "--out", str(Path("runs") / "live-demo"), "--quiet"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert sim.stderr is not None
        url = None
        while url is None:
            line = sim.stderr.readline()
            if not line:
                raise SystemExit("gossipfl sim exited before printing its URL")
            found = re.search(r"live page: (\S+)", line)
            url = found.group(1) if found else None
        shoot(url, OUT / "live-sim.png", 256, settle=12)
    finally:
        stop([sim])
        sim.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
