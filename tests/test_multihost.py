"""Four machines on one LAN, each running ``gossipfl node`` with mDNS and no peer addresses.

The machines are network namespaces on a bridge (``netns.py``), each with its own host name
(a UTS namespace, when ``unshare`` is there) and, like an isolated lab LAN, no default
route; every node runs the README's one-line command with nothing typed about the others
(half of them bind 0.0.0.0, half their LAN address). A fifth namespace is an observer on the same
segment: it polls every node's ``GET /status`` and runs ``gossipfl peers``. mDNS and all
gossip stay inside the namespaces this test creates.

Checked, in order: every node discovers the other three at their LAN addresses and computes
the same ring; gossip crosses the wire (each namespace's eth0 carries the bytes its node
counts in); mean accuracy on digits reaches 0.90; a node killed with SIGKILL (no mDNS
goodbye) leaves the other three views within a bound and they re-form a ring of three and
keep training; restarted from its state dir, it resumes its checkpoint and rejoins every
view; SIGTERM stops everyone cleanly. Discovery, drop and rejoin times are printed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from netns import NetnsNetwork, netns_available

REPO = Path(__file__).resolve().parents[1]
HOSTS = 4  # node machines; namespace HOSTS is the observer
PORT = 7070
PEER_TIMEOUT = 3.0  # seconds of failed contact before a peer leaves a view (default 10)
PROBE_EVERY = 0.2  # seconds between two polls of every node's /status
ACCURACY = 0.90

# Bounds on each phase, in seconds (generous: CI machines are slow and shared).
START_WITHIN = 60.0  # from launch to a full view: includes 4 processes importing torch at once
DISCOVER_WITHIN = 10.0  # from the last node answering /status to a full view: mDNS itself
DROP_WITHIN = PEER_TIMEOUT + 12.0  # quiet check (3 s) + peer_timeout + probe and poll periods
REJOIN_WITHIN = 60.0  # from relaunch: includes the restarted process importing torch

# Runs on the observer host: one line on stdin -> one JSON line with every node's /status.
POLLER = r"""
import json, sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
for _ in sys.stdin:
    out = {}
    for address in sys.argv[1:]:
        try:
            with opener.open(f"http://{address}/status", timeout=2.0) as reply:
                out[address] = json.load(reply)
        except Exception as exc:
            out[address] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out), flush=True)
"""

Status = dict[str, Any]


class Lan:
    """The node processes, their logs and the observer, on one NetnsNetwork."""

    def __init__(self, net: NetnsNetwork, tmp: Path) -> None:
        self.net = net
        self.tmp = tmp
        self.cluster = f"mh-{secrets.token_hex(4)}"
        self.config = tmp / "lan.toml"
        self.config.write_text(f"peer_timeout = {PEER_TIMEOUT}\ntimeout = 2.0\n", encoding="utf-8")
        self.addresses = [f"{net.address(i)}:{PORT}" for i in range(HOSTS)]
        self.ids = [f"host{i}-{PORT}" for i in range(HOSTS)]  # default id: host name + port
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.procs: dict[int, subprocess.Popen[Any]] = {}
        self.killed: set[int] = set()  # hosts whose node the test killed on purpose
        self.last: dict[str, Status] = {}
        self.poller = net.run(
            HOSTS, [sys.executable, "-c", POLLER, *self.addresses],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env,
        )  # fmt: skip

    def log(self, i: int) -> Path:
        return self.tmp / f"host{i}.log"

    def start(self, i: int) -> None:
        """``gossipfl node`` on host i: mDNS on, no --peer, state kept in its own folder.

        Even hosts bind the wildcard (the README's command), odd ones their LAN address.
        """
        listen = f"0.0.0.0:{PORT}" if i % 2 == 0 else self.addresses[i]
        cli = [
            sys.executable, "-m", "gossipfl.cli", "node", "--config", str(self.config),
            "--listen", listen, "--cluster", self.cluster, "--topology", "ring",
            "--shards", str(HOSTS), "--node-index", str(i), "--duration", "300",
            "--state-dir", str(self.tmp / f"state{i}"), "-v",
        ]  # fmt: skip
        if shutil.which("unshare"):
            # A host name of its own, as a real machine has; the default id derives from it.
            argv = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', f"host{i}", *cli]
        else:
            argv = [*cli, "--id", self.ids[i]]
        with self.log(i).open("a", encoding="utf-8") as log:
            self.procs[i] = self.net.run(i, argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=self.env)
        self.killed.discard(i)

    def kill(self, i: int) -> None:
        """SIGKILL: no goodbye, no checkpoint, sockets simply vanish."""
        proc = self.procs[i]
        self.killed.add(i)
        proc.kill()
        proc.wait(timeout=10)

    def poll(self) -> dict[str, Status]:
        """Every node's /status by id (unreachable nodes are left out)."""
        assert self.poller.stdin is not None
        assert self.poller.stdout is not None
        self.poller.stdin.write("\n")
        self.poller.stdin.flush()
        line = self.poller.stdout.readline()
        if not line:
            raise AssertionError(f"the /status poller died: {self.poller.stderr.read() if self.poller.stderr else ''}")
        by_address = json.loads(line)
        self.last = {s["id"]: s for s in by_address.values() if "id" in s}
        return self.last

    def wait(self, what: str, predicate: Callable[[dict[str, Status]], bool], within: float) -> float:
        """Poll until ``predicate(statuses)``; return when it first held. Fails with the logs."""
        deadline = time.monotonic() + within
        while True:
            statuses = self.poll()
            now = time.monotonic()
            if predicate(statuses):
                return now
            exited = {i: p.returncode for i, p in self.procs.items() if i not in self.killed and p.poll() is not None}
            if exited:
                raise AssertionError(f"node processes exited (host: code) {exited} while waiting: {what}\n"
                                     f"{self.report()}")
            if now > deadline:
                raise AssertionError(f"not within {within:.0f} s: {what}\n{self.report()}")
            time.sleep(PROBE_EVERY)

    def report(self) -> str:
        """The last statuses seen and the tail of every node's log."""
        lines = ["last /status per node:"]
        for nid, s in sorted(self.last.items()):
            lines.append(f"  {nid}: step {s.get('step')} acc {s.get('accuracy')} peers {s.get('peers')} "
                         f"neighbours {s.get('neighbours')} msgs_in {s.get('msgs_in')}")
        for i in range(HOSTS):
            text = self.log(i).read_text(encoding="utf-8", errors="replace") if self.log(i).exists() else ""
            tail = "\n    ".join(text.splitlines()[-25:])
            lines.append(f"--- host{i} log (last lines):\n    {tail}")
        return "\n".join(lines)

    def link_bytes(self, i: int) -> dict[str, int]:
        """Bytes received per interface of host i, from the kernel's counters."""
        done = subprocess.run(["ip", "-j", "-s", "-n", self.net.names[i], "link", "show"],
                              capture_output=True, text=True, timeout=10, check=True)
        return {link["ifname"]: link["stats64"]["rx"]["bytes"] for link in json.loads(done.stdout)}

    def close_poller(self) -> None:
        if self.poller.stdin is not None:
            self.poller.stdin.close()
        self.poller.wait(timeout=10)
        for stream in (self.poller.stdout, self.poller.stderr):
            if stream is not None:
                stream.close()


def ring(members: list[str]) -> dict[str, list[str]]:
    """Neighbours on a ring over sorted ids, written out independently of gossipfl.topology."""
    ids = sorted(members)
    n = len(ids)
    return {m: sorted({ids[(k - 1) % n], ids[(k + 1) % n]} - {m}) for k, m in enumerate(ids)}


def sees(lan: Lan, nid: str, hosts: list[int], statuses: dict[str, Status]) -> bool:
    """Node ``nid`` knows exactly the other ``hosts``, at their LAN addresses, and the ring over them."""
    s = statuses.get(nid)
    if s is None:
        return False
    where = {lan.ids[i]: lan.addresses[i] for i in hosts}
    peers = {p["id"]: p["address"] for p in s["peers"]}
    return peers == {m: a for m, a in where.items() if m != nid} and s["neighbours"] == ring(list(where))[nid]


def full_view(lan: Lan, hosts: list[int]) -> Callable[[dict[str, Status]], bool]:
    """Every one of ``hosts`` sees the others (and so all compute the same ring)."""
    return lambda statuses: all(sees(lan, lan.ids[i], hosts, statuses) for i in hosts)


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_four_hosts_discover_learn_drop_and_rejoin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if (reason := netns_available()) is not None:
        pytest.skip(reason)
    t_test = time.monotonic()
    with NetnsNetwork(HOSTS + 1) as net:
        names = list(net.names) + [net.switch]
        lan = Lan(net, tmp_path)
        try:
            # 1. Launch all four; every node discovers the three others and computes the ring.
            t_launch = time.monotonic()
            for i in range(HOSTS):
                lan.start(i)
            up: dict[str, float] = {}

            def everyone_sees_everyone(statuses: dict[str, Status]) -> bool:
                for nid in statuses:
                    up.setdefault(nid, time.monotonic())
                return full_view(lan, list(range(HOSTS)))(statuses)

            t_full = lan.wait("every node sees the 3 others at their 10.x addresses, ring neighbours",
                              everyone_sees_everyone, START_WITHIN)
            statuses = lan.last
            for i, nid in enumerate(lan.ids):
                s = statuses[nid]
                assert s["address"] == lan.addresses[i]  # its LAN address, even behind 0.0.0.0
                assert s["cluster"] == lan.cluster
                assert all(not p["address"].startswith("127.") for p in s["peers"])
            first_up, last_up = min(up.values()), max(up.values())
            assert t_full - last_up <= DISCOVER_WITHIN, lan.report()

            # `gossipfl peers` from the observer lists the cluster (started now, read later).
            peers_cmd = net.run(
                HOSTS, [sys.executable, "-m", "gossipfl.cli", "peers", "--cluster", lan.cluster, "--json",
                        "--interface", net.address(HOSTS), "--duration", "2"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=lan.env,
            )  # fmt: skip

            # 2. Gossip crosses the wire: msgs/bytes in grow, and each host's eth0 carried them.
            before_links = [lan.link_bytes(i) for i in range(HOSTS)]
            before = lan.poll()
            lan.wait("every node receives 20 more messages",
                     lambda st: all(st[n]["msgs_in"] >= before[n]["msgs_in"] + 20 for n in lan.ids), 30)
            after = lan.last
            after_links = [lan.link_bytes(i) for i in range(HOSTS)]
            for i, nid in enumerate(lan.ids):
                got = after[nid]["bytes_in"] - before[nid]["bytes_in"]
                on_eth0 = after_links[i]["eth0"] - before_links[i]["eth0"]
                on_lo = after_links[i]["lo"] - before_links[i]["lo"]
                assert got > 0, (nid, before[nid], after[nid])
                # The wire carried at least what the node counted (frames and headers on top);
                # 10% slack for a message half-received when the first counters were read.
                assert on_eth0 >= 0.9 * got, (nid, got, on_eth0)
                assert on_lo < 0.05 * got, (nid, got, on_lo)  # nothing goes through loopback

            # 3. Learning: mean accuracy over the four nodes reaches 0.90 on digits.
            def accurate(st: dict[str, Status]) -> bool:
                accs = [st[n]["accuracy"] for n in lan.ids if n in st]
                return len(accs) == HOSTS and None not in accs and sum(accs) / HOSTS >= ACCURACY

            lan.wait(f"mean accuracy >= {ACCURACY}", accurate, 60)
            mean_acc = sum(lan.last[n]["accuracy"] for n in lan.ids) / HOSTS

            out, err = peers_cmd.communicate(timeout=60)
            assert peers_cmd.returncode == 0, err
            listed = {row["id"]: row["address"] for row in map(json.loads, out.splitlines())}
            assert listed == dict(zip(lan.ids, lan.addresses, strict=True)), out

            # 4. Kill host1 (SIGKILL: no mDNS goodbye). host0 and host2 send to it and see their
            #    sends fail; host3 never sends to it (opposite on the ring) and finds out by its
            #    own check of quiet members. All three drop it and form a ring of three.
            victim = 1
            survivors = [i for i in range(HOSTS) if i != victim]
            lan.kill(victim)
            t_kill = time.monotonic()
            dropped: dict[str, float] = {}

            def dropped_everywhere(st: dict[str, Status]) -> bool:
                for i in survivors:
                    if lan.ids[i] not in dropped and sees(lan, lan.ids[i], survivors, st):
                        dropped[lan.ids[i]] = time.monotonic()
                return full_view(lan, survivors)(st)

            t_dropped = lan.wait(f"the 3 survivors drop {lan.ids[victim]} and re-form a ring of 3",
                                 dropped_everywhere, DROP_WITHIN)
            steps = {lan.ids[i]: lan.last[lan.ids[i]]["step"] for i in survivors}
            msgs = {lan.ids[i]: lan.last[lan.ids[i]]["msgs_in"] for i in survivors}
            lan.wait("the survivors keep training and gossiping",
                     lambda st: all(st[n]["step"] >= steps[n] + 50 and st[n]["msgs_in"] >= msgs[n] + 10
                                    for n in steps), 30)
            survivors_acc = sum(lan.last[n]["accuracy"] for n in steps) / len(steps)
            assert survivors_acc >= ACCURACY, lan.report()

            # 5. Restart host1 with the same state dir: same id, resumes its checkpoint, rejoins.
            lan.start(victim)
            t_restart = time.monotonic()
            back_up: list[float] = []  # when the restarted node first answered /status

            def rejoined(st: dict[str, Status]) -> bool:
                if not back_up and lan.ids[victim] in st:
                    back_up.append(time.monotonic())
                return full_view(lan, list(range(HOSTS)))(st)

            t_back = lan.wait(f"{lan.ids[victim]} is back in every view, ring of 4 again", rejoined, REJOIN_WITHIN)
            assert t_back - back_up[0] <= DISCOVER_WITHIN, lan.report()
            log = lan.log(victim).read_text(encoding="utf-8")
            assert "resumed from" in log, lan.report()
            resumed_at = int(log.split("resumed from", 1)[1].split("at step", 1)[1].split()[0])
            assert resumed_at > 0
            assert lan.last[lan.ids[victim]]["step"] >= resumed_at

            # 6. SIGTERM: every node stops cleanly (checkpoint, mDNS goodbye), no traceback.
            lan.close_poller()
            for proc in lan.procs.values():
                proc.send_signal(signal.SIGTERM)
            for proc in lan.procs.values():
                assert proc.wait(timeout=30) == 0, lan.report()
            for i in range(HOSTS):
                text = lan.log(i).read_text(encoding="utf-8", errors="replace")
                assert "Traceback" not in text, text
                assert "Warning:" not in text, text  # a Python warning (our log says WARNING)
        except BaseException:
            with capsys.disabled():
                print(f"\n[multihost] failure; state at the time:\n{lan.report()}")
            raise
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not any(name in leftover for name in names), leftover

    with capsys.disabled():
        print(
            f"\n[multihost] 4 hosts, mDNS only: full view everywhere {t_full - t_launch:.2f} s after launch, "
            f"{t_full - first_up:.2f} s after the first node answered /status, "
            f"{t_full - last_up:.2f} s after the last (poll period {PROBE_EVERY} s)\n"
            f"[multihost] mean accuracy {mean_acc:.4f}; after the kill: {survivors_acc:.4f} over 3 nodes\n"
            f"[multihost] SIGKILLed node dropped by all 3 in {t_dropped - t_kill:.2f} s "
            f"(each: {', '.join(f'{n} {t - t_kill:.2f} s' for n, t in sorted(dropped.items()))}; "
            f"peer_timeout {PEER_TIMEOUT} s)\n"
            f"[multihost] restarted node in every view {t_back - t_restart:.2f} s after relaunch, "
            f"{t_back - back_up[0]:.2f} s after it first answered /status (resumed at step {resumed_at})\n"
            f"[multihost] test took {time.monotonic() - t_test:.1f} s"
        )
