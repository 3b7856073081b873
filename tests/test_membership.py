"""Membership -> topology: who a node believes is alive, and the graph every node derives from it.

No coordinator decides the graph: each node sorts the member ids it knows (itself included)
and lays the topology over them (``graph_for_members``). These tests pin down that mapping
(same members, same graph, on every node and in any order; the expected neighbour changes on
a join or a leave) and the ``Membership`` bookkeeping that feeds it, on a fake clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random

import networkx as nx
import pytest
from helpers import make_node

from gossipfl.config import RunConfig
from gossipfl.node import MemoryNetwork
from gossipfl.node import peers as peers_module
from gossipfl.node.membership import Membership
from gossipfl.topology import graph_for_members, neighbours

TIMEOUT = 10.0  # peer_timeout of the Membership tests


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def membership(clock: FakeClock, self_id: str = "me") -> Membership:
    return Membership(self_id, peer_timeout=TIMEOUT, clock=clock)


def edges(graph: nx.Graph) -> set[frozenset[str]]:
    return {frozenset(e) for e in graph.edges()}


def ring_neighbours(members: list[str]) -> dict[str, set[str]]:
    """A ring over sorted ids, written out by hand (the independent expectation)."""
    ids = sorted(members)
    n = len(ids)
    return {m: {ids[(i - 1) % n], ids[(i + 1) % n]} - {m} for i, m in enumerate(ids)}


def views(spec: str, members: list[str]) -> dict[str, set[str]]:
    """Each member's neighbours, computed from the graph that member builds itself."""
    return {m: set(neighbours(graph_for_members(spec, members), m)) for m in members}


# -- membership -> graph ------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["ring", "complete", "star", "torus", "watts_strogatz", "erdos_renyi"])
def test_same_membership_in_any_order_gives_the_same_graph(spec: str) -> None:
    members = [f"host{c}-7070" for c in "qwertyuio"]
    reference = graph_for_members(spec, members, seed=3)
    assert set(reference.nodes()) == set(members)
    rng = random.Random(0)
    for _ in range(10):
        shuffled = rng.sample(members, len(members))
        shuffled += rng.sample(members, 3)  # a member heard of twice is one member
        graph = graph_for_members(spec, shuffled, seed=3)
        assert edges(graph) == edges(reference)


def test_every_node_computes_the_same_graph_from_its_own_membership(clock: FakeClock) -> None:
    """Four nodes, each with a Membership filled in its own order (as discovery would), agree."""
    ids = ["host0-7070", "host1-7070", "host2-7070", "host3-7070"]
    graphs = {}
    for me, order in zip(ids, itertools.permutations(ids), strict=False):
        m = membership(clock, me)
        for peer in order:  # includes `me`, which Membership ignores
            m.seen(peer, f"10.0.0.{ids.index(peer) + 1}:7070")
        assert m.ids() == sorted(set(ids) - {me})
        graphs[me] = graph_for_members("ring", [*m.ids(), me])
    reference = edges(graphs[ids[0]])
    assert all(edges(g) == reference for g in graphs.values())
    assert reference == {frozenset(p) for p in [(ids[0], ids[1]), (ids[1], ids[2]), (ids[2], ids[3]),
                                                 (ids[3], ids[0])]}
    # and what each node derives for itself is the graph's adjacency, seen from both ends
    for me, graph in graphs.items():
        for peer in neighbours(graph, me):
            assert me in neighbours(graphs[peer], peer)


def test_ring_join_changes_only_the_newcomers_two_neighbours() -> None:
    before = ["a", "c", "e", "g"]
    after = [*before, "d"]  # sorts between c and e
    old, new = views("ring", before), views("ring", after)
    assert old == ring_neighbours(before) == {"a": {"c", "g"}, "c": {"a", "e"}, "e": {"c", "g"}, "g": {"e", "a"}}
    assert new == ring_neighbours(after)
    assert new["d"] == {"c", "e"}
    assert new["c"] == {"a", "d"}  # c now talks to d instead of e
    assert new["e"] == {"d", "g"}  # e now talks to d instead of c
    assert {m for m in before if old[m] != new[m]} == {"c", "e"}


def test_ring_leave_reconnects_the_leavers_two_neighbours() -> None:
    before = ["a", "b", "c", "d", "e"]
    after = ["a", "b", "d", "e"]  # c leaves
    old, new = views("ring", before), views("ring", after)
    assert new == ring_neighbours(after)
    assert new["b"] == {"a", "d"}
    assert new["d"] == {"b", "e"}
    assert {m for m in after if old[m] != new[m]} == {"b", "d"}


def test_ring_of_four_losing_one_member_becomes_a_triangle() -> None:
    """What the multi-host test sees: 4 hosts on a ring, one crashes, the 3 left all talk."""
    ids = ["host0-7070", "host1-7070", "host2-7070", "host3-7070"]
    assert views("ring", ids) == {
        "host0-7070": {"host1-7070", "host3-7070"},
        "host1-7070": {"host0-7070", "host2-7070"},
        "host2-7070": {"host1-7070", "host3-7070"},
        "host3-7070": {"host2-7070", "host0-7070"},
    }
    left = [i for i in ids if i != "host1-7070"]
    assert views("ring", left) == {m: set(left) - {m} for m in left}
    assert views("ring", ids) == views("ring", [*left, "host1-7070"])  # rejoining restores the ring


def test_small_memberships_on_a_ring() -> None:
    assert views("ring", ["solo"]) == {"solo": set()}
    assert views("ring", ["a", "b"]) == {"a": {"b"}, "b": {"a"}}
    assert views("ring", ["a", "b", "c"]) == {"a": {"b", "c"}, "b": {"a", "c"}, "c": {"a", "b"}}


def test_topology_that_needs_more_members_is_complete_until_they_join() -> None:
    # A torus needs 9 nodes; a cluster that is still growing must work meanwhile.
    members = ["a", "b", "c", "d"]
    assert views("torus", members) == {m: set(members) - {m} for m in members}


# -- Membership ---------------------------------------------------------------------------------


def test_seen_adds_once_updates_the_address_and_ignores_ourselves(clock: FakeClock) -> None:
    m = membership(clock)
    assert m.seen("b", "10.0.0.2:7070") is True
    v = m.version
    assert m.seen("b", "10.0.0.2:7070") is False
    assert m.version == v  # no change of membership, no recomputation
    assert m.seen("b", "10.0.0.9:7070") is False  # moved: same member, new address
    assert m.address("b") == "10.0.0.9:7070"
    assert m.seen("me", "10.0.0.1:7070") is False
    assert m.ids() == ["b"]
    assert m.address("me") is None


def test_join_and_leave_bump_the_version(clock: FakeClock) -> None:
    m = membership(clock)
    versions = [m.version]
    for peer in ("c", "a", "b"):
        m.seen(peer, f"{peer}:1")
        versions.append(m.version)
    m.remove("a")
    versions.append(m.version)
    m.remove("a")  # already gone: no change
    versions.append(m.version)
    assert versions == [0, 1, 2, 3, 4, 4]
    assert m.ids() == ["b", "c"]
    assert m.snapshot() == [{"id": "b", "address": "b:1"}, {"id": "c", "address": "c:1"}]


def test_contact_failures_drop_a_peer_only_after_the_timeout(clock: FakeClock) -> None:
    m = membership(clock)
    m.seen("b", "b:1")
    assert m.contact_failed("b") is False  # first failure starts the clock
    clock.advance(TIMEOUT - 0.1)
    assert m.contact_failed("b") is False
    assert m.ids() == ["b"]
    clock.advance(0.1)
    v = m.version
    assert m.contact_failed("b") is True
    assert m.ids() == []
    assert m.version == v + 1
    assert m.contact_failed("b") is False  # unknown peer: nothing to drop


def test_one_success_resets_the_failure_clock(clock: FakeClock) -> None:
    m = membership(clock)
    m.seen("b", "b:1")
    m.contact_failed("b")
    clock.advance(TIMEOUT - 1)
    m.seen("b", "b:1")  # it answered once: failures start over
    clock.advance(2)
    assert m.contact_failed("b") is False
    clock.advance(TIMEOUT - 1)
    assert m.contact_failed("b") is False
    assert m.ids() == ["b"]


def test_expire_drops_failing_peers_but_not_merely_silent_ones(clock: FakeClock) -> None:
    m = membership(clock)
    m.seen("failing", "f:1")
    m.seen("silent", "s:1")
    m.contact_failed("failing")
    clock.advance(TIMEOUT * 5)
    assert m.expire() == ["failing"]
    assert m.expire() == []
    # A silent peer has failed nothing: only a contact attempt can drop it, hence quiet().
    assert m.ids() == ["silent"]


def test_quiet_lists_members_not_heard_from_recently(clock: FakeClock) -> None:
    m = membership(clock)
    m.add_static("10.0.0.5:7070")
    m.seen("b", "10.0.0.2:7070")
    m.seen("a", "10.0.0.3:7070")
    m.seen("static", "10.0.0.5:7070")
    assert m.quiet(recent=3.0) == []
    clock.advance(2.0)
    m.seen("b", "10.0.0.2:7070")  # b messaged us
    clock.advance(1.5)
    # a is quiet, b was heard 1.5 s ago, the static peer is probed by static_due() instead
    assert m.quiet(recent=3.0) == [("a", "10.0.0.3:7070")]
    clock.advance(2.0)
    assert m.quiet(recent=3.0) == [("a", "10.0.0.3:7070"), ("b", "10.0.0.2:7070")]
    # a quiet member that keeps failing its checks leaves after peer_timeout
    m.contact_failed("a")
    clock.advance(TIMEOUT)
    assert m.contact_failed("a") is True
    assert [pid for pid, _ in m.quiet(recent=3.0)] == ["b"]


def test_static_addresses_back_off_and_reset_on_contact(clock: FakeClock) -> None:
    m = membership(clock)
    addr = "10.0.0.2:7070"
    m.add_static(addr)
    assert m.static_due(recent=3.0) == [addr]
    delays = []
    for _ in range(7):
        m.probe_failed(addr)
        start = clock.now
        while m.static_due(recent=3.0) != [addr]:
            clock.advance(0.5)
        delays.append(clock.now - start)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]  # doubling, capped at 30 s
    m.seen("b", addr)  # it answered: back-off resets, and a fresh contact needs no probe
    assert m.static_due(recent=3.0) == []
    clock.advance(3.0)
    assert m.static_due(recent=3.0) == [addr]
    m.probe_failed(addr)
    clock.advance(1.0)
    assert m.static_due(recent=3.0) == [addr]  # back to a 1 s back-off


def test_failed_probes_of_a_static_address_drop_the_peer_behind_it(clock: FakeClock) -> None:
    m = membership(clock)
    addr = "10.0.0.2:7070"
    m.add_static(addr)
    m.seen("b", addr)
    assert m.probe_failed(addr) == []
    clock.advance(TIMEOUT)
    assert m.probe_failed(addr) == ["b"]
    assert m.ids() == []
    clock.advance(60)
    assert m.static_due(recent=3.0) == [addr]  # still retried (backed off): it may come back


# -- in a running node ----------------------------------------------------------------------------


def test_a_crashed_member_leaves_even_the_views_of_nodes_that_never_send_to_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ring of 4: ``a`` never sends to ``c`` (they are opposite), yet drops it when it dies.

    Members are fed in as discovery does (``membership.seen``), with no static address; only
    the quiet-member check can notice that ``c`` stopped answering, on the non-neighbour.
    """
    monkeypatch.setattr(peers_module, "RECENT_CONTACT", 0.3)
    monkeypatch.setattr(peers_module, "PROBE_INTERVAL", 0.1)
    cfg = RunConfig(steps=1_000_000, eval_every=50, timeout=1.0, peer_timeout=0.5)
    ids = ["a", "b", "c", "d"]

    async def scenario() -> None:
        net = MemoryNetwork()
        nodes = {nid: make_node(cfg, nid, index=i, shards=4, network=net) for i, nid in enumerate(ids)}
        async with contextlib.AsyncExitStack() as stack:
            for n in nodes.values():
                await n.start(hold=True)
                stack.push_async_callback(n.aclose)
            for n in nodes.values():
                for other in nodes.values():
                    n.membership.seen(other.id, other.address)
                n.go.set()

            async def until(predicate, what: str, within: float = 10.0) -> None:
                deadline = asyncio.get_running_loop().time() + within
                while not predicate():
                    assert asyncio.get_running_loop().time() < deadline, \
                        f"timed out: {what}; {[n.status() for n in nodes.values()]}"
                    await asyncio.sleep(0.02)

            await until(lambda: all(n.msgs_in > 5 for n in nodes.values()), "gossip starts")
            assert nodes["a"].status()["neighbours"] == ["b", "d"]
            await nodes["c"].aclose()  # gone without a word (no discovery here to say so)
            left = [nodes[x] for x in ("a", "b", "d")]
            await until(lambda: all(n.membership.ids() == sorted({"a", "b", "d"} - {n.id}) for n in left),
                        "every survivor drops c")
            steps = {n.id: n.state.step for n in left}
            await until(lambda: all(n.state.step > steps[n.id] + 5 for n in left), "survivors keep training")
            for n in left:
                assert n.status()["neighbours"] == sorted({"a", "b", "d"} - {n.id})

    asyncio.run(scenario())
