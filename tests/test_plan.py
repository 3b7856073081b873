"""A run is resolved once: one emulation parse, one data load, one graph, whatever the engine."""

from __future__ import annotations

import inspect
import sys
from collections import Counter
from typing import Any

import pytest

from gossipfl.config import RunConfig
from gossipfl.errors import ConfigError, DataError
from gossipfl.plan import Plan, resolve
from gossipfl.runs import execute, preflight
from gossipfl.topology.generators import GENERATORS


def _count_calls(monkeypatch: pytest.MonkeyPatch, calls: Counter[str], name: str) -> None:
    """Count calls of function ``name`` under every gossipfl module that holds it (imported by name)."""
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("gossipfl") or not hasattr(mod, name):
            continue
        original = getattr(mod, name)

        def counted(*a: Any, _f: Any = original, **k: Any) -> Any:
            calls[name] += 1
            return _f(*a, **k)

        monkeypatch.setattr(mod, name, counted)


@pytest.mark.parametrize("engine", ["cluster", "vectorized"])
def test_a_run_parses_its_emulation_loads_its_data_and_builds_its_graph_once(
        engine: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import gossipfl.sim.cluster  # noqa: F401  (every engine module loaded, so its names get counted)
    import gossipfl.sim.vectorized  # noqa: F401

    calls: Counter[str] = Counter()
    for name in ("parse_emulation", "build_data", "load_data", "partition"):
        _count_calls(monkeypatch, calls, name)
    ring = GENERATORS["ring"]

    def counted_ring(*a: Any, **k: Any) -> Any:
        # a Node maps its own membership view onto the topology (as on a LAN): not the run's graph
        if not any(f.frame.f_globals.get("__name__", "").startswith("gossipfl.node") for f in inspect.stack()):
            calls["graph"] += 1
        return ring(*a, **k)

    monkeypatch.setitem(GENERATORS, "ring", counted_ring)
    cfg = RunConfig(nodes=4, topology="ring", algorithm="dpsgd", steps=2, eval_every=2, engine=engine,
                    transport="memory", schedule="sync", hidden=(8,))
    plan = preflight(cfg)
    summary = execute(plan, tmp_path, progress=None)
    assert summary["node_steps"] == 8
    assert calls == Counter(parse_emulation=1, build_data=1, load_data=1, partition=1, graph=1)


def test_resolve_checks_the_algorithm_against_the_graph_and_the_network() -> None:
    with pytest.raises(ConfigError, match="undirected"):
        resolve(RunConfig(nodes=8, topology="exponential_directed", algorithm="dpsgd"))
    with pytest.raises(ConfigError, match="lossless"):
        resolve(RunConfig(nodes=4, topology="ring", algorithm="choco", emulation={"loss": 0.1}))
    with pytest.raises(ConfigError, match="emulation: unknown key 'latncy'"):
        resolve(RunConfig(nodes=4, emulation={"latncy": 0.1}))
    with pytest.raises(DataError, match="cannot be split among 5000 nodes"):
        resolve(RunConfig(nodes=5000))


def test_a_plan_gives_the_shards_and_trainers_the_engines_share() -> None:
    plan = resolve(RunConfig(nodes=6, shards=3, partition="dirichlet:0.5", hidden=(8,)))
    assert isinstance(resolve(plan), Plan)
    assert resolve(plan) is plan
    assert len(plan.shards) == 3
    assert plan.shard(4) is plan.shards[1]  # node i trains on shard i % shards
    assert sorted(int(i) for s in plan.shards for i in s) == list(range(len(plan.data.y_train)))
    trainer = plan.trainer(4)
    assert trainer.x.shape[0] == plan.shards[1].shape[0]
    assert plan.new_algorithm() is not plan.algorithm
    assert plan.new_algorithm().name == plan.algorithm.name
