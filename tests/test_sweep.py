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


def test_dotted_grid_keys_set_table_entries() -> None:
    from gossipfl.config import RunConfig
    from gossipfl.sweep import expand_grid, setting

    base = RunConfig(attack={"kind": "sign_flip", "fraction": 0.2})
    runs = expand_grid(base, parse_grid(["attack.kind=none,alie", "aggregator_params.tau=0.3"]), [0])
    assert [c.attack for _, c in runs] == [{"kind": "none", "fraction": 0.2, }, {"kind": "alie", "fraction": 0.2}]
    assert all(c.aggregator_params == {"tau": 0.3} for _, c in runs)
    assert [setting(c, "attack.kind") for _, c in runs] == ["none", "alie"]
    assert runs[1][0] == "attack.kind=alie-aggregator_params.tau=0.3-seed=0"
    with pytest.raises(ConfigError, match="not a table"):
        expand_grid(base, parse_grid(["nodes.x=1"]), [0])


def test_per_rule_parameter_tables_survive_the_run_folder(tmp_path: Path) -> None:
    """[aggregator_params.krum] sub-tables: the chosen rule's apply, the others are ignored, and
    config.toml writes them back so that the run folder reads as it ran."""
    import tomllib

    from gossipfl.build import build_algorithm
    from gossipfl.config import RunConfig, config_to_toml

    cfg = RunConfig(aggregator="krum", aggregator_params={"krum": {"f": 2}, "clipped_gossip": {"tau": 0.3}})
    assert build_algorithm(cfg).rule.params == {"f": 2, "m": 1}
    assert build_algorithm(cfg.replace(aggregator="clipped_gossip")).rule.params == {"tau": 0.3}
    saved = tomllib.loads(config_to_toml(cfg))
    assert saved["aggregator_params"] == {"krum": {"f": 2}, "clipped_gossip": {"tau": 0.3}}
    with pytest.raises(ConfigError, match="not a rule"):
        build_algorithm(cfg.replace(aggregator_params={"krumm": {"f": 1}}))


def _fake_run(root: Path, name: str, config: str, honest: float, low: float) -> Path:
    d = root / name
    d.mkdir()
    (d / "config.toml").write_text(config)
    (d / "summary.json").write_text(json.dumps({"engine": "vectorized", "mean_accuracy": honest, "attackers": 1,
                                                "honest_mean_accuracy": honest, "honest_min_accuracy": low}))
    (d / "metrics.jsonl").write_text("")
    return d


def test_pivot_table_averages_seeds_per_cell(tmp_path: Path, capsys) -> None:
    runs = [_fake_run(tmp_path, "a0", 'aggregator = "mean"\n[attack]\nkind = "alie"\n', 0.2, 0.1),
            _fake_run(tmp_path, "a1", 'aggregator = "mean"\n[attack]\nkind = "alie"\n', 0.4, 0.3),
            _fake_run(tmp_path, "b0", 'aggregator = "krum"\n', 0.9, 0.8)]
    assert main(["report", *map(str, runs), "--pivot", "aggregator,attack.kind"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("honest_mean_accuracy"):].splitlines()
    assert "mean of up to 2 runs per cell" in table[0]
    assert table[1].split() == ["aggregator", "alie", "none"]
    assert table[3].split() == ["mean", "0.300", "(0.200)", "-"]
    assert table[4].split() == ["krum", "-", "0.900", "(0.800)"]
    assert "honest" in out.splitlines()[0]  # the comparison table has honest columns too
    assert main(["report", str(runs[0]), "--pivot", "aggregator"]) == 2


def test_report_takes_a_sweep_folder_and_skips_files(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    _fake_run(sweep, "r1", 'aggregator = "krum"\n', 0.9, 0.8)
    _fake_run(sweep, "r0", 'aggregator = "mean"\n', 0.3, 0.2)
    (sweep / "sweep.json").write_text(json.dumps([{"name": "r1", "summary": {}}, {"name": "r0", "summary": {}},
                                                  {"name": "failed", "error": "x"}]))
    assert main(["report", str(sweep), "--pivot", "aggregator,attack.kind"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [r.split()[0] for r in rows[-2:]] == ["krum", "mean"]  # the sweep's order
    assert main(["report", *map(str, sorted(sweep.iterdir()))]) == 0  # runs/* includes sweep.json
    assert main(["report", str(sweep / "sweep.json")]) == 2
