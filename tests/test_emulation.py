"""The asynchrony model: one [emulation] table, validated once, drawn alike by every engine."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from gossipfl.config import RunConfig
from gossipfl.emulation import Emulation, parse_emulation
from gossipfl.errors import ConfigError
from gossipfl.sim.vectorized import VectorizedSim


@pytest.mark.parametrize(("table", "key"), [
    ({"latancy": 0.1}, "emulation: unknown key 'latancy'"),
    ({"latency": -0.1}, "emulation.latency"),
    ({"latency": "uniform:0.2:0.1"}, "emulation.latency"),
    ({"latency": "lognormal:1"}, "emulation.latency"),
    ({"speed": "weird:1"}, "emulation.speed"),
    ({"speed": 0}, "emulation.speed"),
    ({"speed": "uniform:a:b"}, "emulation.speed"),
    ({"speeds": []}, "emulation.speeds"),
    ({"speeds": [1.0, -2.0]}, r"emulation.speeds\[1\]"),
    ({"loss": 1.0}, "emulation.loss"),
    ({"stragglers": "many"}, "emulation.stragglers"),
    ({"straggler_slowdown": 0.5}, "emulation.straggler_slowdown"),
    ({"jitter": float("nan")}, "emulation.jitter"),
    ({"churn": True}, "emulation.churn"),
    ({"time_slice": 0}, "emulation.time_slice"),
    ({"bandwidth": -1}, "emulation.bandwidth"),
    ({"seed": 1.5}, "emulation.seed"),
])
def test_bad_values_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        parse_emulation(table)


def test_empty_table_is_identical_nodes_on_a_perfect_network() -> None:
    emu = parse_emulation({})
    assert emu == Emulation()
    assert emu.ideal
    assert torch.equal(emu.node_speeds(5, seed=0), torch.ones(5, dtype=torch.float64))
    assert not parse_emulation({"latency": 0.01}).ideal
    assert not parse_emulation({"speed": "uniform:0.5:2"}).ideal


def test_node_speeds_are_a_pure_function_of_seed_and_index() -> None:
    emu = parse_emulation({"speed": "uniform:0.5:2.0"})
    a, b = emu.node_speeds(1000, seed=4), emu.node_speeds(1000, seed=4)
    assert torch.equal(a, b)
    assert torch.equal(emu.node_speeds(10, seed=4), a[:10])  # a node need not know the others
    assert ((a >= 0.5) & (a <= 2.0)).all()
    assert a.mean() == pytest.approx(1.25, abs=0.05)
    assert not torch.equal(a, emu.node_speeds(1000, seed=5))
    assert torch.equal(parse_emulation({"speed": "uniform:0.5:2.0", "seed": 5}).node_speeds(8, seed=0),
                       emu.node_speeds(8, seed=5))
    lognormal = parse_emulation({"speed": "lognormal:0.5"}).node_speeds(4000, seed=1)
    assert lognormal.median() == pytest.approx(1.0, abs=0.05)
    assert lognormal.log().std() == pytest.approx(0.5, abs=0.03)


def test_stragglers_and_explicit_speeds() -> None:
    emu = parse_emulation({"stragglers": 0.1, "straggler_slowdown": 8.0})
    s = emu.node_speeds(50, seed=0)
    assert (s == 1 / 8).sum() == 5
    assert (s == 1).sum() == 45
    assert torch.equal(emu.step_seconds(50, seed=0), 0.01 / s)
    explicit = parse_emulation({"speeds": [1, 2, 4], "step_time": 0.3})
    assert explicit.step_seconds(3, seed=0).tolist() == pytest.approx([0.3, 0.15, 0.075])
    assert explicit.slice_width(explicit.step_seconds(3, seed=0)) == pytest.approx(0.075)
    assert parse_emulation({"time_slice": 0.5}).slice_width(torch.ones(3)) == 0.5
    with pytest.raises(ConfigError, match="emulation.speeds: has 3 entries for 4 nodes"):
        explicit.node_speeds(4, seed=0)


def test_link_latency_is_per_directed_link_and_order_free() -> None:
    emu = parse_emulation({"latency": "uniform:0.01:0.05"})
    src = torch.randint(0, 100, (500,))
    dst = torch.randint(0, 100, (500,))
    lat = emu.link_latency(src, dst, seed=3)
    assert ((lat >= 0.01) & (lat <= 0.05)).all()
    one_by_one = torch.cat([emu.link_latency(src[k:k + 1], dst[k:k + 1], seed=3) for k in range(500)])
    assert torch.equal(lat, one_by_one)
    assert not torch.equal(lat, emu.link_latency(dst, src, seed=3))  # each direction its own link
    assert emu.max_latency == 0.05
    constant = parse_emulation({"latency": 0.02})
    assert torch.equal(constant.link_latency(src, dst, seed=0), torch.full((500,), 0.02, dtype=torch.float64))


def test_bandwidth_and_churn_figures() -> None:
    emu = parse_emulation({"bandwidth": 8.0, "churn": 0.25, "churn_period": 2.0})
    assert emu.transfer_seconds(1_000_000) == pytest.approx(1.0)  # 8 Mbit at 8 Mbit/s
    assert Emulation().transfer_seconds(10**9) == 0.0
    assert emu.churn_means() == pytest.approx((1.5, 0.5))


def test_latency_holds_messages_back_in_the_vectorised_engine() -> None:
    cfg = RunConfig(nodes=8, topology="ring", duration=0.2, eval_every=5)
    late = VectorizedSim(cfg.replace(emulation={"latency": 10.0}))
    late.run(None)
    assert int(late.msgs_in.sum()) == 0  # nothing arrives before the run ends
    prompt = VectorizedSim(cfg.replace(emulation={"latency": 0.05, "bandwidth": 100.0}))
    prompt.run(None)
    received = int(prompt.msgs_in.sum())
    # One send at a time, as the node: a step's message waits until the previous one reached both
    # neighbours (latency + transfer = L), and the next step starts once it went out. Step 1 runs
    # 0-10 ms and sends at once; from then on a message leaves every L, so step k >= 2 starts at
    # 10 ms + (k - 2) L, and message k (out at 10 ms + (k - 1) L) arrives exactly when step k + 2
    # starts: the last two messages find no step left to merge them.
    link = 0.05 + prompt.emulation.transfer_seconds(prompt.msg_bytes)
    steps = 1 + math.ceil((0.2 - 0.01) / link)
    assert steps == 5  # more than the 0.2 / (10 ms + L) = 3.3 a step-then-send node would take
    assert prompt.step.tolist() == [steps] * 8
    assert received == 2 * 8 * (steps - 2)


def test_a_wider_time_slice_keeps_the_step_count() -> None:
    cfg = RunConfig(nodes=8, topology="ring", duration=0.3, eval_every=10,
                    emulation={"speed": "uniform:0.5:1.5", "time_slice": 0.05})
    narrow = VectorizedSim(cfg.replace(emulation={"speed": "uniform:0.5:1.5"}))
    wide = VectorizedSim(cfg)
    narrow.run(None)
    wide.run(None)
    assert torch.equal(narrow.step, wide.step)


@pytest.mark.parametrize("algorithm", ["dpsgd", "gossip"])
def test_no_message_outlives_its_snapshot(algorithm: str) -> None:
    """Fast senders, slow receivers, late links: every message still finds the model it carries."""
    cfg = RunConfig(nodes=16, topology="exponential", algorithm=algorithm, duration=0.4, eval_every=40,
                    emulation={"speed": "uniform:0.3:3", "latency": "uniform:0:0.03", "jitter": 0.01,
                               "time_slice": 0.02})
    summary = VectorizedSim(cfg).run(None)
    assert summary["expired"] == 0
    assert summary["messages"] > 0
