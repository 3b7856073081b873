"""Sweeps: grid parsing, checks before anything runs, one run folder per combination."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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


FAST = ["--grid", "engine=vectorized", "--grid", "schedule=sync", "--grid", "nodes=4", "--grid", "steps=5"]


def test_running_the_same_sweep_again_resumes_it(tmp_path: Path, capsys) -> None:
    """Finished runs are kept (not run again), an unfinished one is redone, and a sweep folder of
    another grid or other settings is refused with a message."""
    out = tmp_path / "sw"
    argv = ["sweep", "--grid", "topology=ring,complete", *FAST, "--workers", "1", "--out", str(out)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "[2/2 done, 0 failed" in first
    assert "ETA" in first
    kept = out / "topology=complete-engine=vectorized-schedule=sync-nodes=4-steps=5-seed=0"
    redo = out / "topology=ring-engine=vectorized-schedule=sync-nodes=4-steps=5-seed=0"
    stamp = (kept / "summary.json").stat().st_mtime_ns
    (redo / "summary.json").unlink()  # as an interrupted run leaves it
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "resuming: 1 finished, 1 to run" in again
    assert (kept / "summary.json").stat().st_mtime_ns == stamp  # not run again
    assert (redo / "summary.json").exists()
    assert len(json.loads((out / "sweep.json").read_text())) == 2
    assert main(["sweep", "--grid", "topology=ring,star", *FAST, "--out", str(out)]) == 2
    assert "another grid" in capsys.readouterr().err
    assert main(["sweep", "--grid", "topology=ring,complete", *FAST, "--grid", "lr=0.05", "--out", str(out)]) == 2
    assert "another grid" in capsys.readouterr().err  # the names change with the grid
    base = tmp_path / "base.toml"
    base.write_text("lr = 0.05\n")
    assert main(["sweep", "--config", str(base), *argv[1:]]) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_and_its_workers_and_keeps_finished_runs(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "gossipfl.cli", "sweep", "--grid", "engine=vectorized", "--grid", "schedule=sync",
           "--grid", "nodes=4", "--grid", "steps=3,200000", "--workers", "2", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        quick = out / "engine=vectorized-schedule=sync-nodes=4-steps=3-seed=0" / "summary.json"
        deadline = time.monotonic() + 60
        while not quick.exists():
            assert time.monotonic() < deadline, "the short run never finished"
            assert proc.poll() is None, "the sweep exited early"
            time.sleep(0.1)
        time.sleep(1.0)  # the long run is under way
        kids = [int(x) for x in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                               text=True).stdout.split()]
        assert kids  # the workers
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
        t0 = time.monotonic()
        text, _ = proc.communicate(timeout=20)
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1
    assert "interrupted; 1 of 2 runs finished and kept" in text
    assert quick.exists()
    records = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in records] == ["engine=vectorized-schedule=sync-nodes=4-steps=3-seed=0"]
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{k}").exists() for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [k for k in kids if Path(f"/proc/{k}").exists()], "worker processes left running"


def test_report_skips_an_unfinished_run_with_one_warning(tmp_path: Path, capsys) -> None:
    done, broken = tmp_path / "done", tmp_path / "broken"
    assert main(["sim", "--quiet", "--engine", "vectorized", "--nodes", "4", "--steps", "3", "--out", str(done)]) == 0
    broken.mkdir()
    (broken / "metrics.jsonl").write_text("")
    capsys.readouterr()
    assert main(["report", str(done), str(broken)]) == 0
    io = capsys.readouterr()
    assert f"skipping {broken}" in io.err
    assert "dpsgd/ring/4n (done)" in io.out
    assert main(["report", str(broken)]) == 2


def test_report_aggregates_seeds_and_measures_what_it_took_to_reach_a_target(tmp_path: Path, capsys) -> None:
    """Two topologies x two seeds: one line per topology (the label names only what varies), mean
    ± sd over the seeds, and steps / time / MB until the mean accuracy first reached the target,
    read off the runs' own metric rows."""
    from gossipfl.report import load_run, to_target

    out = tmp_path / "sw"
    assert main(["sweep", "--grid", "topology=ring,complete", "--grid", "engine=vectorized", "--grid", "schedule=sync",
                 "--grid", "nodes=8", "--grid", "steps=60", "--grid", "eval_every=5", "--seeds", "0,1",
                 "--workers", "1", "--out", str(out)]) == 0
    md = tmp_path / "table.md"
    capsys.readouterr()
    assert main(["report", str(out), "--target", "0.5", "--md", str(md)]) == 0
    lines = md.read_text().splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| topology=ring | 2 | ")
    assert lines[3].startswith("| topology=complete | 2 | ")
    run = load_run(out / "topology=ring-engine=vectorized-schedule=sync-nodes=8-steps=60-eval_every=5-seed=0")
    hit = to_target(run, 0.5)
    assert hit is not None
    rows = [r for r in run.rows if r["node"] is None]
    first = next(r for r in rows if r["mean_accuracy"] is not None and r["mean_accuracy"] >= 0.5)
    assert hit == (first["mean_step"], first["t"], float(first["bytes"]))
    assert first["bytes"] > 0
    assert "± " in lines[2]
    from gossipfl.topology import build_graph, graph_spectral_gap

    gap = lines[0].split(" | ").index("gap")  # the mixing matrix's spectral gap, as `gossipfl topology` gives it
    assert lines[2].split(" | ")[gap] == format(graph_spectral_gap(build_graph("ring", 8), "metropolis"), ".3g")
    assert float(lines[3].split(" | ")[gap]) == pytest.approx(1.0)  # complete graph: W = J, mixed in one round
    assert main(["report", str(out), "--target", "1.5"]) == 2


@pytest.mark.parametrize("x", ["steps", "time", "bytes"])
def test_the_plot_takes_steps_time_or_bytes_on_its_x_axis(tmp_path: Path, x: str) -> None:
    from gossipfl.plots import _band
    from gossipfl.report import load_run

    runs = []
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        assert main(["sim", "--quiet", "--engine", "vectorized", "--schedule", "sync", "--nodes", "4", "--steps", "20",
                     "--eval-every", "5", "--seed", str(seed), "--out", str(out)]) == 0
        runs.append(load_run(out))
    png = tmp_path / "p.png"
    band = {"steps": "ci95", "time": "sd", "bytes": "minmax"}[x]
    assert main(["report", str(tmp_path / "s0"), str(tmp_path / "s1"), "--plot", str(png), "--x", x,
                 "--band", band]) == 0
    assert png.stat().st_size > 10_000
    xs, mean, lo, hi = _band(runs, {"steps": "mean_step", "time": "t", "bytes": "bytes"}[x], "mean_accuracy", 1.0)
    assert len(xs) == 4  # steps 5..20 (round 0 has no accuracy yet)
    assert (lo <= mean).all()
    assert (mean <= hi).all()


def test_the_band_over_seeds_is_min_max_sd_or_the_mean_s_95_percent_interval() -> None:
    """Three seeds: ci95 is mean ± t(0.975, 2) s / sqrt(3) with t = 4.3027 (Student), sd mean ± s."""
    from types import SimpleNamespace

    from gossipfl.plots import _band

    ys = [[0.2, 0.5], [0.4, 0.6], [0.9, 0.7]]
    runs = [SimpleNamespace(rows=[{"node": None, "mean_step": k, "mean_accuracy": y[k]} for k in (0, 1)]) for y in ys]
    first = np.array([0.2, 0.4, 0.9])
    m, s = first.mean(), first.std(ddof=1)
    _, mean, lo, hi = _band(runs, "mean_step", "mean_accuracy", 1.0, "minmax")
    assert (lo[0], mean[0], hi[0]) == pytest.approx((0.2, m, 0.9))
    _, _, lo, hi = _band(runs, "mean_step", "mean_accuracy", 1.0, "sd")
    assert (lo[0], hi[0]) == pytest.approx((m - s, m + s))
    _, _, lo, hi = _band(runs, "mean_step", "mean_accuracy", 1.0, "ci95")
    assert (lo[0], hi[0]) == pytest.approx((m - 4.302653 * s / np.sqrt(3), m + 4.302653 * s / np.sqrt(3)), rel=1e-6)
    assert hi[1] - lo[1] == pytest.approx(2 * 4.302653 * 0.1 / np.sqrt(3), rel=1e-6)  # s = 0.1 at x = 1


def _needs_ray() -> None:
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # found, not imported: the sweep imports it itself
        pytest.skip("Ray is not installed (pip install 'gossipfl[ray]')")


@pytest.mark.slow
def test_a_ray_sweep_gives_the_pool_s_summaries_and_resumes(tmp_path: Path, capsys) -> None:
    """--ray auto: the same four runs on a local Ray instance leave the same folders and the same
    summaries (same seeds) as the process pool, and a second invocation runs nothing again."""
    _needs_ray()
    grid = ["--grid", "topology=ring,complete", *FAST, "--seeds", "0,1", "--workers", "2"]
    pool, on_ray = tmp_path / "pool", tmp_path / "ray"
    assert main(["sweep", *grid, "--out", str(pool)]) == 0
    assert main(["sweep", *grid, "--ray", "auto", "--out", str(on_ray)]) == 0
    text = capsys.readouterr().out
    assert "on a Ray cluster of 2 CPU(s)" in text
    assert "[4/4 done, 0 failed" in text

    def runs(folder: Path) -> dict[str, dict]:
        return {r["name"]: r for r in json.loads((folder / "sweep.json").read_text())}

    a, b = runs(pool), runs(on_ray)
    assert len(a) == 4
    assert a.keys() == b.keys()
    timing = {"wall_seconds", "node_steps_per_second"}
    for name in a:
        assert a[name]["settings"] == b[name]["settings"]
        assert {k: v for k, v in a[name]["summary"].items() if k not in timing} == \
               {k: v for k, v in b[name]["summary"].items() if k not in timing}
        files = sorted(p.name for p in (on_ray / name).iterdir())
        assert files == sorted(p.name for p in (pool / name).iterdir()) == ["config.toml", "metrics.jsonl",
                                                                             "summary.json"]
        assert (on_ray / name / "metrics.jsonl").read_text().count("\n") == \
               (pool / name / "metrics.jsonl").read_text().count("\n")
    redo = sorted(b)[0]
    stamp = {n: (on_ray / n / "summary.json").stat().st_mtime_ns for n in b if n != redo}
    (on_ray / redo / "summary.json").unlink()  # as an interrupted run leaves it
    assert main(["sweep", *grid, "--ray", "auto", "--out", str(on_ray)]) == 0
    assert "resuming: 3 finished, 1 to run" in capsys.readouterr().out
    assert {n: (on_ray / n / "summary.json").stat().st_mtime_ns for n in b if n != redo} == stamp
    assert runs(on_ray)[redo]["summary"]["mean_accuracy"] == a[redo]["summary"]["mean_accuracy"]


def test_a_ray_address_that_answers_nothing_is_a_clear_error(tmp_path: Path, capsys) -> None:
    _needs_ray()
    rc = main(["sweep", *FAST, "--ray", "127.0.0.1:1", "--out", str(tmp_path / "sw")])
    assert rc == 2
    assert "ray: cannot connect to '127.0.0.1:1'" in capsys.readouterr().err
