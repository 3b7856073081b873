"""Sweeps: grid parsing, checks before anything runs, one run folder per combination."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gossipfl.cli import main
from gossipfl.errors import ConfigError
from gossipfl.sweep import parse_grid


def test_grid_values_are_read_as_toml_scalars() -> None:
    grid = parse_grid(["topology=ring,complete", "lr=0.05,0.1", "nodes=4,8", "same-init=true,false"])
    assert grid == {"topology": ["ring", "complete"], "lr": [0.05, 0.1], "nodes": [4, 8],
                    "same_init": [True, False]}


@pytest.mark.parametrize("bad", ["topology", "=ring", "lr=", "lr=1,2 lr=3"])
def test_bad_grid_items(bad: str) -> None:
    with pytest.raises(ConfigError, match="grid"):
        parse_grid(bad.split(" ") if " " in bad else [bad])


@pytest.mark.slow
def test_sweep_runs_every_combination_and_seed(tmp_path: Path, capsys) -> None:
    base = tmp_path / "base.toml"
    base.write_text('nodes = 3\nsteps = 30\ntransport = "memory"\neval_every = 10\n')
    out = tmp_path / "sweep"
    rc = main(["sweep", "--config", str(base), "--grid", "algorithm=dpsgd,gossip", "--seeds", "0,1",
               "--workers", "2", "--out", str(out)])
    assert rc == 0
    records = json.loads((out / "sweep.json").read_text())
    assert len(records) == 4
    assert {(r["settings"]["algorithm"], r["settings"]["seed"]) for r in records} == {
        ("dpsgd", 0), ("dpsgd", 1), ("gossip", 0), ("gossip", 1)}
    for r in records:
        assert r["summary"]["node_steps"] == 90
        assert (out / r["name"] / "metrics.jsonl").stat().st_size > 0
    # different seeds are different runs
    by = {(r["settings"]["algorithm"], r["settings"]["seed"]): r["summary"] for r in records}
    assert by[("dpsgd", 0)]["initial_consensus_distance"] != by[("dpsgd", 1)]["initial_consensus_distance"]
    assert capsys.readouterr().out.count("cluster") >= 4


def test_a_bad_combination_fails_before_any_run_starts(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    rc = main(["sweep", "--grid", "topology=ring,hypercube", "--grid", "nodes=6", "--out", str(out)])
    assert rc == 2
    assert "hypercube" in capsys.readouterr().err
    assert not out.exists()
