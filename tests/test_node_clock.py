"""The node's protocol on a virtual clock: round timeouts, step pacing and peer expiry, timed exactly.

Nodes talk over the in-memory network and read time from a `VirtualClock`, which jumps to the
next deadline whenever every task waits on it: a 30 s round timeout takes 30 virtual seconds
and almost no real time, and a run is deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from helpers import data_for, make_node

from gossipfl.config import RunConfig
from gossipfl.node import MemoryNetwork, Node
from gossipfl.node.clock import Clock, VirtualClock, WallClock, as_clock

pytestmark = pytest.mark.timeout(20)

REAL_LIMIT = 2.0  # real seconds any virtual-time scenario here may take (the data set loaded beforehand)


@pytest.fixture(autouse=True, scope="module")
def _data_loaded() -> None:
    data_for(RunConfig())  # once, outside the timed scenarios


def run_virtual(scenario: Callable[[VirtualClock], Any]) -> tuple[Any, float]:
    """Run ``scenario(clock)`` with a driven virtual clock; returns its result and the real seconds taken."""
    clock = VirtualClock()
    began = time.perf_counter()
    result = asyncio.run(clock.run(scenario(clock)))
    return result, time.perf_counter() - began


def pair(cfg: RunConfig, clock: VirtualClock, ids: tuple[str, str] = ("a", "b"),
         **per_node: dict[str, Any]) -> tuple[Node, Node]:
    """Two nodes on one in-memory network and ``clock``, each on half the data (``per_node``:
    extra arguments by id)."""
    net = MemoryNetwork()
    first, second = (make_node(cfg, nid, index=i, shards=2, network=net, clock=clock, **per_node.get(nid, {}))
                     for i, nid in enumerate(ids))
    return first, second


@contextlib.asynccontextmanager
async def started(*nodes: Node, hold: bool = True) -> AsyncIterator[None]:
    """Start ``nodes`` (held: training waits for ``go``), close them all on the way out."""
    async with contextlib.AsyncExitStack() as stack:
        for n in nodes:
            await n.start(hold=hold)
            stack.push_async_callback(n.aclose)
        yield


# -- the clock itself ---------------------------------------------------------------------------


def test_virtual_sleepers_wake_in_deadline_order_at_their_exact_times() -> None:
    async def scenario(clock: VirtualClock) -> list[tuple[str, float]]:
        woke: list[tuple[str, float]] = []

        async def sleeper(name: str, seconds: float) -> None:
            await clock.sleep(seconds)
            woke.append((name, clock.now()))

        async with asyncio.TaskGroup() as tg:
            for name, seconds in (("c", 30.0), ("a", 0.5), ("b", 7.25), ("a2", 0.5)):
                tg.create_task(sleeper(name, seconds))
        return woke

    woke, real = run_virtual(scenario)
    assert woke == [("a", 0.5), ("a2", 0.5), ("b", 7.25), ("c", 30.0)]  # ties: in the order they slept
    assert real < REAL_LIMIT


def test_virtual_timeout_expires_at_its_deadline_and_time_stands_still_while_tasks_run() -> None:
    async def scenario(clock: VirtualClock) -> dict[str, Any]:
        out: dict[str, Any] = {}
        never = asyncio.Event()
        with pytest.raises(TimeoutError):
            async with clock.timeout(12.5):
                await never.wait()
        out["expired_at"] = clock.now()
        async with clock.timeout(1.0):  # a body that finishes in time is left alone
            await clock.sleep(0.75)
        out["in_time_at"] = clock.now()
        # a busy task (runnable all along) holds virtual time still, however long it runs
        t = clock.now()
        for _ in range(1000):
            await asyncio.sleep(0)
        out["busy_elapsed"] = clock.now() - t
        # to_thread runs the work inline, in zero virtual time
        out["work"] = await clock.to_thread(sum, [1, 2, 3])
        # a cancelled sleeper ends at once, and its deadline no longer counts
        sleeper = asyncio.create_task(clock.sleep(1000.0))
        await clock.sleep(1.0)
        sleeper.cancel()
        await asyncio.wait([sleeper])
        out["sleeper_cancelled"] = sleeper.cancelled()
        out["after_cancel"] = clock.now()
        return out

    out, real = run_virtual(scenario)
    assert out["expired_at"] == 12.5
    assert out["in_time_at"] == 13.25
    assert out["busy_elapsed"] == 0.0
    assert out["work"] == 6
    assert out["sleeper_cancelled"]
    assert out["after_cancel"] == 14.25
    assert real < REAL_LIMIT


def test_advance_by_hand_fires_due_timers_and_plain_callables_still_make_a_clock() -> None:
    clock = VirtualClock(start=5.0)
    fired: list[float] = []
    clock.call_at(6.0, lambda: fired.append(clock.now()))
    clock.call_at(9.0, lambda: fired.append(clock.now())).cancel()
    clock.advance(10.0)
    assert fired == [6.0]
    assert clock.now() == 15.0
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-1.0)

    ticks = iter([100.0, 101.5])
    wrapped = as_clock(lambda: next(ticks))  # the old `clock=callable` form
    assert isinstance(wrapped, WallClock)
    assert (wrapped.now(), wrapped.now()) == (100.0, 101.5)
    assert as_clock(clock) is clock
    assert isinstance(as_clock(None), Clock)
    with pytest.raises(TypeError, match="clock"):
        as_clock(42)  # type: ignore[arg-type]


# -- the node's protocol on it ------------------------------------------------------------------


ROUNDS = RunConfig(algorithm="diging", topology="ring", eval_every=1000, timeout=30.0, peer_timeout=1000.0)


def test_round_wait_for_a_silent_neighbour_gives_up_after_exactly_timeout() -> None:
    """b is a member (it answers /status and takes messages) but never sends: a's round-1 wait
    for it runs out after ``timeout`` = 30 virtual seconds, counted once, and a goes on."""

    async def scenario(clock: VirtualClock) -> dict[str, Any]:
        a, b = pair(ROUNDS.replace(steps=2), clock)
        async with started(b, a):
            a.membership.add_static(b.address)
            a.go.set()  # b is never let go: it serves, but takes no step and sends nothing
            await a.finished.wait()
            return {"t": clock.now(), "timeouts": a.round_timeouts, "step": a.state.step,
                    "members": a.membership.ids(), "b_got": b.msgs_in}

    out, real = run_virtual(scenario)
    assert out["timeouts"] == 1
    assert out["t"] == pytest.approx(30.0, abs=1e-9)  # round 0 waits for nobody; round 1 for 30 s
    assert out["step"] == 2
    assert out["members"] == ["b"]  # still a member all along: it was waited for, not dropped
    assert out["b_got"] == 2  # a's round messages did reach b
    assert real < REAL_LIMIT


def test_round_neighbours_that_do_send_are_not_waited_for() -> None:
    """The contrast: two live round nodes run 20 rounds without one timeout, in no virtual time
    to speak of (the clock does not jump while a peer still has work to do)."""

    async def scenario(clock: VirtualClock) -> dict[str, Any]:
        a, b = pair(ROUNDS.replace(steps=20), clock)
        async with started(a, b):
            a.membership.add_static(b.address)
            b.membership.add_static(a.address)
            a.go.set()
            b.go.set()
            await asyncio.gather(a.finished.wait(), b.finished.wait())
            return {"t": clock.now(), "timeouts": a.round_timeouts + b.round_timeouts,
                    "msgs": (a.msgs_in, b.msgs_in)}

    out, real = run_virtual(scenario)
    assert out["timeouts"] == 0
    assert out["t"] < 0.5  # not one 0.5 s poll of a round wait ran out
    assert out["msgs"] == (20, 20)
    assert real < REAL_LIMIT


def test_min_step_pacing_takes_n_steps_times_min_step_virtual_seconds() -> None:
    """A fast (0.25 s/step) and a slow (1 s/step) node gossiping: each keeps its own pace, and
    the metrics' ``t`` is virtual time. The same scenario twice gives the same rows (deterministic)."""
    steps = 8

    async def scenario(clock: VirtualClock) -> dict[str, Any]:
        cfg = RunConfig(steps=steps, eval_every=4, timeout=5.0, peer_timeout=100.0)
        rows: list[dict[str, Any]] = []
        fast, slow = pair(cfg, clock, ("fast", "slow"), fast={"min_step_seconds": 0.25, "metrics": rows.append},
                          slow={"min_step_seconds": 1.0, "metrics": rows.append})
        finished_at: dict[str, float] = {}

        async def finish(n: Node) -> None:
            await n.finished.wait()
            finished_at[n.id] = clock.now()

        async with started(fast, slow):
            fast.membership.add_static(slow.address)
            slow.membership.add_static(fast.address)
            fast.go.set()
            slow.go.set()
            await asyncio.gather(finish(fast), finish(slow))
            return {"at": finished_at, "rows": rows, "overruns": fast.step_overruns + slow.step_overruns,
                    "msgs": (fast.msgs_out, slow.msgs_out)}

    out, real = run_virtual(scenario)
    assert out["at"] == {"fast": pytest.approx(steps * 0.25), "slow": pytest.approx(steps * 1.0)}
    assert out["overruns"] == 0  # compute takes no virtual time: the emulated speed is always kept
    assert out["msgs"][0] == steps  # one per step, every one taken: slow was still training
    assert 1 <= out["msgs"][1] <= 2  # slow's steps end at 1 s and 2 s before fast is done (then: 503)
    times = {(r["node"], r["step"]): r["t"] for r in out["rows"]}
    assert times[("fast", 4)] == pytest.approx(1.0)
    assert times[("slow", 4)] == pytest.approx(4.0)
    again, _ = run_virtual(scenario)
    assert json.dumps(again["rows"]) == json.dumps(out["rows"])  # (as text: NaN losses compare equal)
    assert real < REAL_LIMIT


def test_a_peer_that_stops_answering_leaves_the_view_after_peer_timeout() -> None:
    """a gossips to b every 0.5 virtual seconds; b goes away at t = 10 without a word. a drops
    it once its contacts have failed for ``peer_timeout`` = 5 s (not before), and trains on alone."""
    peer_timeout, gone_at = 5.0, 10.0

    async def scenario(clock: VirtualClock) -> dict[str, Any]:
        cfg = RunConfig(steps=10_000, eval_every=1000, timeout=1.0, peer_timeout=peer_timeout)
        a, b = pair(cfg, clock, a={"min_step_seconds": 0.5})
        async with started(a, b):
            a.membership.add_static(b.address)
            a.go.set()  # b only serves
            await clock.sleep(gone_at)
            out: dict[str, Any] = {"sent_before": a.msgs_out, "members_before": a.membership.ids()}
            await b.aclose()
            while "b" in a.membership.ids():
                await clock.sleep(0.125)
            out["dropped_after"] = clock.now() - gone_at
            step = a.state.step
            await clock.sleep(5.0)
            out["steps_after"] = a.state.step - step
            out["neighbours"] = a.status()["neighbours"]
            return out

    out, real = run_virtual(scenario)
    assert out["members_before"] == ["b"]
    assert out["sent_before"] >= 18  # one message per 0.5 s step
    # dropped peer_timeout after its first failed contact, which is a's first send after b went
    # (within one 0.5 s step); measured by polling every 0.125 s
    assert peer_timeout <= out["dropped_after"] <= peer_timeout + 0.5 + 0.125
    assert out["steps_after"] == 10  # 5 s at 0.5 s a step: training never stalled
    assert out["neighbours"] == []
    assert real < REAL_LIMIT
