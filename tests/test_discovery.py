"""Discovery: advert building/parsing and filtering offline; real mDNS between namespaces.

The offline tests feed the peer table the same zeroconf ``ServiceInfo`` objects a resolution
produces. The ``netns`` test runs one process per network namespace (see ``netns.py``), so
multicast never leaves the namespaces the test creates.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from netns import NetnsNetwork, netns_available
from zeroconf import ServiceInfo, ServiceStateChange, service_type_name

from gossipfl.errors import ConfigError, WireError
from gossipfl.node import discovery
from gossipfl.node.discovery import (
    SERVICE_TYPE,
    Discovery,
    PeerInfo,
    browse,
    build_txt,
    incompatibility,
    instance_label,
    on_link_first,
    parse_advert,
)

REPO = Path(__file__).resolve().parents[1]
DISCOVERY_PY = REPO / "gossipfl" / "node" / "discovery.py"
FP = "fp-1"
RECHECK = 1.0  # seconds before a node asks again for a peer it forgot (30 s by default)


# -- offline: names, TXT, parsing ------------------------------------------------------------


def make_info(
    node_id: str = "b",
    *,
    cluster: str = "lab",
    proto: int | str = 1,
    fp: str = FP,
    port: int | None = 8001,
    addresses: tuple[str, ...] = ("10.0.0.2",),
    properties: dict[str, str] | bytes | None = None,
) -> tuple[str, ServiceInfo]:
    """An advert as a resolution would return it."""
    label = instance_label(node_id, cluster)
    name = f"{label}.{SERVICE_TYPE}"
    if properties is None:
        properties = {"id": node_id, "cluster": cluster, "proto": str(proto), "fp": fp}
    info = ServiceInfo(
        SERVICE_TYPE,
        name,
        port=port,
        properties=properties,
        server=f"{label}.local.",
        parsed_addresses=list(addresses),
    )
    return name, info


@pytest.mark.parametrize(
    "node_id",
    ["a", "node-1", "ü/ x.y", "...", "-", "x" * 300, "a.b._tcp.local.", "\x00\x7f", "名前"],
)
def test_instance_label_is_a_valid_dns_sd_instance(node_id: str) -> None:
    label = instance_label(node_id, "lab")
    assert len(label.encode()) <= 63
    assert service_type_name(f"{label}.{SERVICE_TYPE}") == SERVICE_TYPE
    assert label == instance_label(node_id, "lab")  # stable across restarts


def test_instance_label_is_unique_per_cluster_and_id() -> None:
    labels = {
        instance_label(node_id, cluster)
        for node_id in ("a", "A", "a/", "a?", "x" * 100, "x" * 101)
        for cluster in ("lab", "other")
    }
    assert len(labels) == 12


def test_txt_round_trip_through_zeroconf_wire_format() -> None:
    txt = build_txt(node_id="ü b", cluster="lab", protocol_version=3, fingerprint=FP, boot="ab")
    assert txt == {"id": "ü b", "cluster": "lab", "proto": "3", "fp": FP, "boot": "ab"}
    _, sent = make_info(properties=txt)
    _, received = make_info(properties=sent.text)  # as read back from the TXT record bytes
    peer = parse_advert(
        received.properties,
        host=received.server,
        port=received.port,
        addresses=received.parsed_addresses(),
    )
    assert peer == PeerInfo(
        id="ü b",
        cluster="lab",
        version=3,
        fingerprint=FP,
        host=received.server,
        port=8001,
        addresses=("10.0.0.2",),
    )
    assert peer.address == "10.0.0.2:8001"


@pytest.mark.parametrize(
    ("properties", "port", "addresses", "fault"),
    [
        ({b"cluster": b"lab", b"proto": b"1", b"fp": b"f"}, 1, ["10.0.0.1"], "'id' missing"),
        ({b"id": b"a", b"proto": b"1", b"fp": b"f"}, 1, ["10.0.0.1"], "'cluster' missing"),
        ({b"id": b"a", b"cluster": b"c", b"fp": b"f"}, 1, ["10.0.0.1"], "'proto' missing"),
        ({b"id": b"a", b"cluster": b"c", b"proto": b"1"}, 1, ["10.0.0.1"], "'fp' missing"),
        ({b"id": None, b"cluster": b"c", b"proto": b"1", b"fp": b"f"}, 1, ["10.0.0.1"], "'id'"),
        ({b"id": b"", b"cluster": b"c", b"proto": b"1", b"fp": b"f"}, 1, ["10.0.0.1"], "empty"),
        ({b"id": b"\xff", b"cluster": b"c", b"proto": b"1", b"fp": b"f"}, 1, ["10.0.0.1"], "UTF-8"),
        ({b"id": b"a", b"cluster": b"c", b"proto": b"x", b"fp": b"f"}, 1, ["10.0.0.1"], "proto"),
        ({b"id": b"a", b"cluster": b"c", b"proto": b"-1", b"fp": b"f"}, 1, ["10.0.0.1"], "proto"),
        ({b"id": b"a", b"cluster": b"c", b"proto": b"1.0", b"fp": b"f"}, 1, ["10.0.0.1"], "proto"),
        ({b"id": b"a", b"cluster": b"c", b"proto": b" 1", b"fp": b"f"}, 1, ["10.0.0.1"], "proto"),
        ({b"id": b"a", b"cluster": b"c", b"proto": b"1", b"fp": b"f"}, None, ["10.0.0.1"], "port"),
        ({b"id": b"a", b"cluster": b"c", b"proto": b"1", b"fp": b"f"}, 0, ["10.0.0.1"], "port"),
        ({b"id": b"a", b"cluster": b"c", b"proto": b"1", b"fp": b"f"}, 70000, ["10.0.0.1"], "port"),
        ({b"id": b"a", b"cluster": b"c", b"proto": b"1", b"fp": b"f"}, 1, [], "no address"),
        ({b"id": b"a", b"cluster": b"c", b"proto": b"1", b"fp": b"f"}, 1, ["nope"], "no address"),
    ],
)
def test_parse_advert_rejects_malformed(
    properties: dict[bytes, bytes | None], port: int | None, addresses: list[str], fault: str
) -> None:
    with pytest.raises(WireError, match=fault):
        parse_advert(properties, host="h.local.", port=port, addresses=addresses)


def test_address_prefers_a_routable_ipv4() -> None:
    def peer(*addresses: str) -> PeerInfo:
        return PeerInfo(
            id="a", cluster="c", version=1, fingerprint="f", host="h.local.", port=9,
            addresses=addresses,
        )

    assert peer("fe80::1", "127.0.0.1", "192.168.1.5").address == "192.168.1.5:9"
    assert peer("fe80::1", "169.254.3.4").address == "169.254.3.4:9"
    assert peer("0.0.0.0", "fd00::5").address == "[fd00::5]:9"
    assert peer().address == "h.local:9"


def test_addresses_on_our_subnet_come_first() -> None:
    peer = PeerInfo(
        id="a", cluster="c", version=1, fingerprint="f", host="h.local.", port=9,
        addresses=("172.17.0.1", "fe80::1", "192.168.1.5", "10.8.0.2"),
    )  # fmt: skip
    lan = [ipaddress.IPv4Network("192.168.1.0/24")]
    assert on_link_first(peer, lan).address == "192.168.1.5:9"
    assert on_link_first(peer, lan).addresses == ("192.168.1.5", "172.17.0.1", "fe80::1", "10.8.0.2")
    assert on_link_first(peer, []) is peer


def test_incompatibility_names_the_mismatch() -> None:
    peer = PeerInfo(
        id="b", cluster="lab", version=1, fingerprint=FP, host="h.", port=1, addresses=("1.2.3.4",)
    )
    same = {"cluster": "lab", "protocol_version": 1, "fingerprint": FP}
    assert incompatibility(peer, **same) is None
    assert "cluster 'lab', not 'other'" in str(incompatibility(peer, **{**same, "cluster": "other"}))
    assert "protocol version 1, not 2" in str(
        incompatibility(peer, **{**same, "protocol_version": 2})
    )
    assert "fingerprint" in str(incompatibility(peer, **{**same, "fingerprint": "fp-2"}))


# -- offline: the view kept by Discovery -----------------------------------------------------


class Views:
    """Records every view on_change publishes."""

    def __init__(self) -> None:
        self.calls: list[dict[str, PeerInfo]] = []

    def __call__(self, view: dict[str, PeerInfo]) -> None:
        self.calls.append(view)

    @property
    def ids(self) -> list[set[str]]:
        return [set(view) for view in self.calls]


@pytest.fixture
def disco() -> Iterator[tuple[Discovery, Views]]:
    """An unstarted Discovery for node "a" of cluster "lab": its table is fed by hand."""
    views = Views()
    d = Discovery(node_id="a", cluster="lab", port=8000, fingerprint=FP, on_change=views)
    yield d, views
    asyncio.run(d.aclose())


def feed(d: Discovery, name: str, info: ServiceInfo) -> None:
    d._table.update_from_info(name, info)  # what a finished resolution does


def removed(d: Discovery, name: str) -> None:
    d._table.on_service_state_change(
        zeroconf=None,  # type: ignore[arg-type]  # not used on removal
        service_type=SERVICE_TYPE,
        name=name,
        state_change=ServiceStateChange.Removed,
    )


def test_view_tracks_join_update_and_leave(disco: tuple[Discovery, Views]) -> None:
    d, views = disco
    name, info = make_info("b")
    feed(d, name, info)
    feed(d, name, info)  # a refresh with nothing new publishes nothing
    assert views.ids == [{"b"}]
    assert d.peers()["b"].address == "10.0.0.2:8001"
    feed(d, *make_info("b", port=8101))  # updated
    assert d.peers()["b"].port == 8101
    assert len(views.calls) == 2
    removed(d, name)
    assert d.peers() == {}
    assert views.ids[-1] == set()
    feed(d, *make_info("b"))  # a restart with the same id rejoins
    assert set(d.peers()) == {"b"}


@pytest.mark.parametrize(
    ("kwargs", "level", "words"),
    [
        ({"cluster": "other"}, logging.INFO, "is in cluster 'other', not 'lab'"),
        ({"proto": 2}, logging.WARNING, "speaks protocol version 2, not 1"),
        ({"fp": "fp-2"}, logging.WARNING, "has model fingerprint 'fp-2', not 'fp-1'"),
        ({"node_id": "a"}, logging.WARNING, "has our own node id"),
        ({"properties": {"id": "b", "cluster": "lab", "fp": FP}}, logging.WARNING, "malformed"),
        ({"proto": "v1"}, logging.WARNING, "malformed"),
        ({"port": 0}, logging.WARNING, "malformed"),
    ],
)
def test_incompatible_or_malformed_peer_is_ignored_with_one_log_line(
    disco: tuple[Discovery, Views],
    caplog: pytest.LogCaptureFixture,
    kwargs: dict[str, Any],
    level: int,
    words: str,
) -> None:
    d, views = disco
    kwargs = {"node_id": "b", **kwargs}
    node_id = kwargs.pop("node_id")
    # A foreign instance name, so that our own name is not what excludes it.
    name, info = make_info(node_id, **kwargs)
    name = "x" + name
    caplog.set_level(logging.DEBUG, logger="gossipfl")
    for _ in range(3):  # refreshes
        feed(d, name, info)
    lines = [r for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].levelno == level
    assert words in lines[0].getMessage()
    assert d.peers() == {}
    assert views.calls == []


def test_peer_that_turns_incompatible_leaves_the_view(disco: tuple[Discovery, Views]) -> None:
    d, views = disco
    name, info = make_info("b")
    feed(d, name, info)
    _, changed = make_info("b", fp="fp-2")
    feed(d, name, changed)
    assert d.peers() == {}
    assert views.ids == [{"b"}, set()]
    feed(d, name, info)  # and back
    assert set(d.peers()) == {"b"}


def test_own_advert_is_not_a_peer(disco: tuple[Discovery, Views]) -> None:
    d, views = disco
    d._table.on_service_state_change(
        zeroconf=None,  # type: ignore[arg-type]  # returns before using it
        service_type=SERVICE_TYPE,
        name=d.service_name,
        state_change=ServiceStateChange.Added,
    )
    assert d.peers() == {}
    assert views.calls == []


def test_forget_drops_until_reported_again(disco: tuple[Discovery, Views]) -> None:
    d, views = disco
    feed(d, *make_info("b"))
    feed(d, *make_info("c", addresses=("10.0.0.3",)))
    d.forget("b")
    d.forget("nobody")
    assert set(d.peers()) == {"c"}
    assert views.ids == [{"b"}, {"b", "c"}, {"c"}]
    feed(d, *make_info("b"))  # zeroconf reports it again
    assert set(d.peers()) == {"b", "c"}


def test_on_change_failure_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken(view: dict[str, PeerInfo]) -> None:
        raise RuntimeError("boom")

    d = Discovery(node_id="a", cluster="lab", port=8000, fingerprint=FP, on_change=broken)
    feed(d, *make_info("b"))
    assert set(d.peers()) == {"b"}
    assert any("on_change" in r.getMessage() for r in caplog.records)
    asyncio.run(d.aclose())


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"node_id": ""}, "node_id"),
        ({"node_id": "x" * 201}, "node_id"),
        ({"cluster": 3}, "cluster"),
        ({"fingerprint": ""}, "fingerprint"),
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"port": True}, "port"),
        ({"protocol_version": -1}, "protocol_version"),
        ({"addresses": ["10.0.0.300"]}, "addresses"),
        ({"addresses": "10.0.0.1"}, "addresses"),
        ({"addresses": []}, "addresses"),
        ({"interfaces": ["eth0"]}, "interfaces"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict[str, Any], key: str) -> None:
    settings: dict[str, Any] = {"node_id": "a", "cluster": "lab", "port": 1, "fingerprint": FP}
    with pytest.raises(ConfigError, match=key):
        Discovery(**{**settings, **kwargs})


def test_close_is_idempotent_and_final() -> None:
    async def scenario() -> None:
        d = Discovery(node_id="a", cluster="lab", port=8000, fingerprint=FP)
        await d.aclose()
        await d.aclose()
        with pytest.raises(RuntimeError, match="only once"):
            await d.start()  # refused before any socket is opened

    asyncio.run(scenario())


def test_unknown_interface_is_refused_before_any_socket_opens() -> None:
    async def scenario() -> None:
        # 192.0.2.0/24 is TEST-NET-1: no host has it, so start() refuses before zeroconf runs.
        d = Discovery(node_id="a", cluster="lab", port=8000, fingerprint=FP, interfaces=["192.0.2.77"])
        with pytest.raises(ConfigError, match="192.0.2.77"):
            await d.start()
        with pytest.raises(ConfigError, match="192.0.2.77"):
            await browse(duration=0, interfaces=["192.0.2.77"])

    asyncio.run(scenario())


def test_browse_rejects_negative_duration() -> None:
    with pytest.raises(ConfigError, match="duration"):
        asyncio.run(browse(duration=-1))


# -- netns: real mDNS between hosts ----------------------------------------------------------

# One node per namespace. Loads discovery.py by path, after the adverts.py it imports (under
# its package name, so that gossipfl/node/__init__.py does not run): they need neither the
# rest of gossipfl.node nor torch, so a node starts in a fraction of a second. Prints JSON
# lines: {"t": monotonic, "view": {id: "ip:port"}} or {"t": ..., "event": ...}. Reads
# commands ("forget ID") on stdin; closes gracefully on SIGTERM.
LOAD = r"""
import importlib.util, pathlib, sys

def exec_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

def load(path):
    exec_file("gossipfl.node.adverts", pathlib.Path(path).with_name("adverts.py"))
    return exec_file("gossipfl_discovery_under_test", path)
"""

NODE = LOAD + r"""
import asyncio, json, logging, signal, time

def emit(**fields):
    print(json.dumps({"t": time.monotonic(), **fields}), flush=True)

async def main(path, node_id, cluster, address, port, recheck):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    disco = load(path)
    disco.FORGET_RECHECK = float(recheck)  # seconds: short, for the test
    from gossipfl.errors import ConfigError
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reader = asyncio.StreamReader()
    pipe, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    node = disco.Discovery(
        node_id=node_id, cluster=cluster, port=int(port), fingerprint="fp-1",
        addresses=[address], interfaces=[address],
        on_change=lambda view: emit(view={i: p.address for i, p in view.items()}))

    async def commands():
        while line := await reader.readline():
            verb, _, arg = line.decode().strip().partition(" ")
            if verb == "forget":
                node.forget(arg)

    try:
        async with node:
            try:
                await node.start()
            except RuntimeError:
                emit(event="started")
            task = asyncio.create_task(commands())
            await stop.wait()
            task.cancel()
            await asyncio.wait([task])
    except ConfigError as exc:
        emit(event="config-error", message=str(exc))
        return 3
    finally:
        pipe.close()
        emit(event="closed")
    return 0

sys.exit(asyncio.run(main(*sys.argv[1:])))
"""

BROWSE = LOAD + r"""
import asyncio, json
browse = load(sys.argv[1]).browse
peers = asyncio.run(browse(duration=float(sys.argv[4]), cluster=sys.argv[3],
                           interfaces=[sys.argv[2]]))
print(json.dumps([[p.id, p.cluster, p.address] for p in peers]))
"""


class Child:
    """One node process in a namespace, its output parsed as it comes."""

    def __init__(
        self, net: NetnsNetwork, i: int, node_id: str, cluster: str, port: int
    ) -> None:
        self.node_id = node_id
        argv = [sys.executable, "-W", "error", "-c", NODE,
                str(DISCOVERY_PY),
                node_id, cluster, net.address(i), str(port), str(RECHECK)]  # fmt: skip
        self.proc = net.run(
            i,
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    event = {"t": time.monotonic(), "raw": line}
                with self._cond:
                    self.events.append(event)
                    self._cond.notify_all()
        except (OSError, ValueError):  # pipe closed under us at teardown
            pass

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        try:
            for line in self.proc.stderr:
                self.stderr.append(line.rstrip())
        except (OSError, ValueError):
            pass

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], deadline: float, what: str
    ) -> dict[str, Any]:
        """First event (already seen or to come) that satisfies predicate."""
        with self._cond:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{self.node_id}: timed out waiting for {what}; events {self.events}, "
                        f"stderr {self.stderr}"
                    )
                self._cond.wait(remaining)

    def wait_view(self, expected: dict[str, str], deadline: float, *, after: float = 0.0) -> float:
        """Monotonic time at which the view first equalled ``expected`` (after ``after``)."""
        event = self.wait_for(
            lambda e: e["t"] >= after and e.get("view") == expected, deadline, f"view {expected}"
        )
        return float(event["t"])

    def view(self) -> dict[str, str] | None:
        with self._cond:
            views = [e["view"] for e in self.events if "view" in e]
        return views[-1] if views else None

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def terminate(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self.join()
        return code

    def wait(self, timeout: float = 10.0) -> int:
        code = self.proc.wait(timeout=timeout)
        self.join()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.join()

    def join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def net() -> Iterator[NetnsNetwork]:
    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)
    with NetnsNetwork(5) as network:
        yield network


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.timeout(60)
def test_nodes_in_namespaces_find_each_other(
    net: NetnsNetwork, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = [f"n{i}" for i in range(4)]
    port = {node_id: 9000 + i for i, node_id in enumerate(lab)}
    where = {node_id: f"{net.address(i)}:{port[node_id]}" for i, node_id in enumerate(lab)}

    def expected(me: str, *, without: tuple[str, ...] = ()) -> dict[str, str]:
        return {p: a for p, a in where.items() if p != me and p not in without}

    children: list[Child] = []

    def start(i: int, node_id: str, cluster: str = "lab") -> Child:
        child = Child(net, i, node_id, cluster, port.get(node_id, 9100))
        children.append(child)
        return child

    try:
        # 1. Four nodes of cluster "lab" and one of cluster "other", on one segment.
        t0 = time.monotonic()
        nodes = {node_id: start(i, node_id) for i, node_id in enumerate(lab)}
        stranger = start(4, "x0", cluster="other")
        deadline = t0 + 15
        full = [child.wait_view(expected(node_id), deadline) for node_id, child in nodes.items()]
        started = [
            child.wait_for(lambda e: e.get("event") == "started", deadline, "start")["t"]
            for child in nodes.values()
        ]  # each also checked that a second start() is refused
        elapsed, after_start = max(full) - t0, max(full) - max(started)
        with capsys.disabled():
            print(
                f"\n[discovery] 4 nodes: full view everywhere {elapsed:.2f} s after launching "
                f"the processes ({after_start:+.2f} s relative to the last start() returning)"
            )
        assert elapsed < 10

        # 2. The node of the other cluster is ignored, and says why once per process.
        time.sleep(1.5)  # let refreshes and re-announcements happen
        assert stranger.view() in (None, {})
        for node_id, child in nodes.items():
            assert child.view() == expected(node_id)
            why = [line for line in child.stderr if "is in cluster 'other'" in line]
            assert len(why) == 1, why

        # 3. browse() from another host lists the cluster, and only it.
        listing = net.run(
            4, [sys.executable, "-W", "error", "-c", BROWSE, str(DISCOVERY_PY), net.address(4), "lab", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        out, err = listing.communicate(timeout=20)
        assert listing.returncode == 0, err
        assert json.loads(out) == [[p, "lab", where[p]] for p in lab]

        # 5. Graceful leave: SIGTERM n3; the others drop it.
        t_leave = time.monotonic()
        assert nodes["n3"].terminate() == 0
        left = [
            nodes[p].wait_view(expected(p, without=("n3",)), t_leave + 10, after=t_leave)
            for p in lab[:3]
        ]
        # 6. Another process claiming n0's id is refused with a ConfigError.
        #    (In n3's namespace, empty now: a second mDNS stack on one host may miss the
        #    unicast answer to the probe, which the kernel gives to one socket only.)
        twin = Child(net, 3, "n0", "lab", 9200)
        children.append(twin)
        twin.wait_for(lambda e: e.get("event") == "config-error", time.monotonic() + 10, "twin")
        assert twin.wait() == 3

        # 7. n3 restarts with the same id and rejoins everywhere.
        t_back = time.monotonic()
        nodes["n3"] = start(3, "n3")
        back = [nodes[p].wait_view(expected(p), t_back + 10, after=t_back) for p in lab]
        with capsys.disabled():
            print(
                f"[discovery] leave seen after {max(left) - t_leave:.2f} s, "
                f"rejoin after {max(back) - t_back:.2f} s"
            )

        # 8. forget(): n0 drops n1, which is alive: n0 asks for it again and it is back.
        t_forget = time.monotonic()
        nodes["n0"].send("forget n1")
        forgot = nodes["n0"].wait_view(expected("n0", without=("n1",)), t_forget + 5, after=t_forget)
        again = nodes["n0"].wait_view(expected("n0"), forgot + RECHECK + 5, after=forgot)
        assert again - forgot >= RECHECK * 0.9

        # 9. n0 forgets n2, n2 crashes (no goodbye) and restarts on another port: zeroconf
        #    reports it updated and it is back in every view, n0's included.
        t_forget = time.monotonic()
        nodes["n0"].send("forget n2")
        nodes["n0"].wait_view(expected("n0", without=("n2",)), t_forget + 5, after=t_forget)
        nodes["n2"].kill()
        port["n2"] = 9102
        where["n2"] = f"{net.address(2)}:9102"
        t_crash = time.monotonic()
        nodes["n2"] = start(2, "n2")
        for p in lab:
            nodes[p].wait_view(expected(p), t_crash + 10, after=t_crash)

        # 10. Everyone closes cleanly, with no warning or traceback on the way.
        for child in nodes.values():
            assert child.terminate() == 0
            assert child.wait_for(lambda e: e.get("event") == "closed", time.monotonic() + 1, "")
        assert stranger.terminate() == 0
        assert stranger.view() in (None, {})
        # Once per peer: n3 left and came back (logged again), n2 only changed.
        why = [line for line in stranger.stderr if "ignoring" in line]
        counts = {p: sum(f"peer '{p}'" in line for line in why) for p in lab}
        assert counts == {"n0": 1, "n1": 1, "n2": 1, "n3": 2}, why
        for child in children:
            noise = [line for line in child.stderr if "Traceback" in line or "Warning" in line]
            assert not noise, (child.node_id, child.stderr)
    finally:
        for child in children:
            if child.proc.poll() is None:
                child.kill()
            else:
                child.join()


def test_discovery_module_exports() -> None:
    assert set(discovery.__all__) >= {"SERVICE_TYPE", "Discovery", "PeerInfo", "browse"}
