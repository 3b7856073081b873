"""The command line: run folders, exit codes, clear errors, real `gossipfl node` processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gossipfl.cli import main


def test_sim_writes_the_run_folder_and_can_be_repeated(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["sim", "--nodes", "3", "--steps", "40", "--transport", "memory", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mean accuracy" in printed
    assert "n02" in printed
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["nodes"] == 3
    assert cfg["steps"] == 40
    assert cfg["topology"] == "ring"
    summary = json.loads((out / "summary.json").read_text())
    for key in ("mean_accuracy", "min_accuracy", "max_accuracy", "avg_model_accuracy", "consensus_distance",
                "messages", "bytes", "wall_seconds", "node_steps", "per_node"):
        assert key in summary
    assert summary["node_steps"] == 120
    assert (out / "metrics.jsonl").stat().st_size > 0
    # the saved config reproduces the run's settings
    again = tmp_path / "again"
    assert main(["sim", "--quiet", "--config", str(out / "config.toml"), "--out", str(again)]) == 0
    assert tomllib.loads((again / "config.toml").read_text()) == {**cfg, "out": str(again)}
    png = tmp_path / "cmp.png"
    assert main(["report", str(out), str(again), "--plot", str(png), "--detail"]) == 0
    printed = capsys.readouterr().out
    assert "consensus distance" in printed
    assert printed.count("dpsgd/ring/3n") == 2
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["sim", "--nodes", "0"], "nodes"),
        (["sim", "--topology", "moebius"], "moebius"),
        (["sim", "--algorithm", "magic"], "algorithm"),
        (["sim", "--partition", "dirichlet:-2"], "partition"),
        (["sim", "--data", "imagenet"], "imagenet"),
        (["sim", "--model", "nosuchmod_q:f"], "model"),
        (["sim", "--config", "/nonexistent/x.toml"], "config"),
        (["sim", "--lr", "-1"], "lr"),
        (["sim", "--transport", "carrier-pigeon"], "transport"),
        (["topology", "hypercube", "--nodes", "12"], "power of two"),
        (["report", "/nonexistent-run"], "report"),
        (["node", "--listen", "localhost"], "listen"),
        (["node", "--peer", "x:y"], "peer"),
        (["node", "--secret-file", "/nonexistent/secret"], "secret_file"),
        (["sim", "--partition", "dirichlet:inf"], "Dirichlet alpha"),
        (["sim", "--partition", "shards:inf"], "shards per node"),
        (["sim", "--partition", "shards:nan"], "shards per node"),
        (["sim", "--seed", "-1"], "seed"),
        (["sim", "--schedule", "lockstep"], "schedule"),
        (["sim", "--shards", "0"], "shards"),
        (["sim", "--seed", "99999999999999999999"], "seed"),
        (["node", "--shards", "2", "--node-index", "5"], "node_index"),
        (["node", "--topology", "moebius", "--no-mdns"], "unknown topology 'moebius'"),
        (["node", "--topology", "/nonexistent/t.edges", "--no-mdns"], "/nonexistent/t.edges"),
    ],
)
def test_user_mistakes_exit_2_with_one_clear_line(tmp_path: Path, capsys, argv: list[str], needle: str) -> None:
    if argv[0] == "sim":
        argv = [*argv, "--out", str(tmp_path / "r"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("engine", ["cluster", "vectorized"])
def test_hyperparameter_that_does_not_fit_the_model_exits_2(tmp_path: Path, capsys, engine: str) -> None:
    """More gossip partitions than parameters: caught before any node starts, in both engines."""
    cfg = tmp_path / "run.toml"
    cfg.write_text('algorithm = "gossip_partitioned"\nnodes = 3\nsteps = 2\n[algorithm_params]\npartitions = 1000000\n')
    assert main(["sim", "--config", str(cfg), "--engine", engine, "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "algorithm_params: partitions=1000000 exceeds the 2410 parameters" in err
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_bad_config_file_names_the_key(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    for text, needle in [("nodes = 'eight'\n", "nodes"), ("nodez = 8\n", "nodez"), ("steps = [\n", "TOML"),
                         ("hidden = [32, true]\n", "hidden"), ("lr = true\n", "lr")]:
        bad.write_text(text)
        assert main(["sim", "--config", str(bad), "--out", str(tmp_path / "r"), "--quiet"]) == 2
        assert needle in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (b"\xff\xfe nodes = 3\n", ["bad.toml", "UTF-8"]),
        (b"nodes = 'eight'\n", ["bad.toml", "nodes"]),
        (b"steps = 5.5\n", ["bad.toml", "steps"]),
    ],
)
def test_bad_config_file_names_the_file_and_key(tmp_path: Path, capsys, content: bytes, needles: list[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(content)
    assert main(["sim", "--config", str(bad), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert all(n in err for n in needles), err
    assert "Traceback" not in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("fn", "needle"),
    [("wrong_inputs", "mat1 and mat2"), ("wrong_classes", "expected [2, 10]")],
)
@pytest.mark.parametrize("command", ["sim", "node"])
def test_model_that_does_not_fit_the_data_exits_2(
    tmp_path: Path, capsys, monkeypatch, command: str, fn: str, needle: str
) -> None:
    (tmp_path / "cli_user_models.py").write_text(
        "import torch\n"
        "def wrong_inputs(input_shape, n_classes):\n    return torch.nn.Linear(5, n_classes)\n"
        "def wrong_classes(input_shape, n_classes):\n    return torch.nn.Linear(64, 3)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = [command, "--model", f"cli_user_models:{fn}", "--steps", "2"]
    argv += (["--nodes", "2", "--transport", "memory", "--quiet", "--out", str(tmp_path / "r")] if command == "sim"
             else ["--no-mdns"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"model: 'cli_user_models:{fn}' does not fit data 'digits'" in err
    assert needle in err
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("summary", "needle"),
    [("[1, 2]", "not a run summary"), ('{"mean_accuracy": "high"}', "mean_accuracy"),
     ('{"per_node": {"n00": {"steps": "x"}}}', "per_node.n00.steps")],
)
def test_report_on_a_corrupt_summary_exits_2(tmp_path: Path, capsys, summary: str, needle: str) -> None:
    (tmp_path / "summary.json").write_text(summary)
    assert main(["report", str(tmp_path), "--detail"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "summary.json") in err
    assert needle in err
    assert "Traceback" not in err
    assert err.count("\n") == 1


def test_report_shows_a_partial_summary_and_skips_junk_metric_rows(tmp_path: Path, capsys) -> None:
    (tmp_path / "summary.json").write_text('{"mean_accuracy": 0.5}')
    (tmp_path / "metrics.jsonl").write_text('[1, 2]\n"text"\n{"node": null, "t": "x", "mean_accuracy": 1}\n'
                                            '{"node": null, "t": 1.0, "mean_accuracy": 0.5}\n')
    assert main(["report", str(tmp_path), "--detail", "--plot", str(tmp_path / "p.png")]) == 0
    assert "mean accuracy        0.5000  (min -, max -)" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["report", "sweep", "topology"])
@pytest.mark.parametrize("plot", ["curves.xyz", "curves"])
def test_plot_to_an_unknown_format_exits_2_before_any_work(tmp_path: Path, capsys, command: str, plot: str) -> None:
    run = tmp_path / "run"
    if command == "report":
        run.mkdir()
        (run / "summary.json").write_text('{"mean_accuracy": 0.5}')
    argv = {"report": ["report", str(run)],
            "sweep": ["sweep", "--grid", "nodes=2", "--out", str(run)],
            "topology": ["topology", "ring", "--nodes", "4"]}[command]
    assert main([*argv, "--plot", str(tmp_path / plot)]) == 2
    err = capsys.readouterr().err
    assert f"cannot plot to {plot}: use one of" in err
    assert "Traceback" not in err
    assert command == "report" or not run.exists()
    assert not list(tmp_path.glob("curves*"))


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--grid", "nodez=2,4"], "grid: unknown key 'nodez'"),
        (["--grid", "nodes=two"], "grid: nodes"),
        (["--grid", "lr=,,"], "grid: 'lr=,,' is not KEY=V1,V2,..."),
        (["--grid", "nodes=2", "--seeds", "-1"], "seeds"),
    ],
)
def test_bad_sweep_grid_exits_2_naming_it(tmp_path: Path, capsys, extra: list[str], needle: str) -> None:
    out = tmp_path / "sweep"
    assert main(["sweep", *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err
    assert err.count("\n") == 1
    assert not out.exists()


def test_run_folder_is_never_overwritten(tmp_path: Path, capsys) -> None:
    out = tmp_path / "r"
    args = ["sim", "--nodes", "2", "--steps", "2", "--transport", "memory", "--quiet", "--out", str(out)]
    assert main(args) == 0
    before = (out / "metrics.jsonl").read_bytes()
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_bytes() == before


def test_topology_command_reports_spectral_gap_and_plots(tmp_path: Path, capsys) -> None:
    png = tmp_path / "ring.png"
    assert main(["topology", "topologies/ring.toml", "--nodes", "16", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    gap = float(re.search(r"spectral_gap\s+(\S+)", out).group(1))
    assert gap == pytest.approx(0.050747, abs=1e-5)  # 1 - (1/3 + 2/3 cos(2 pi / 16))
    assert re.search(r"edges\s+16", out)
    assert re.search(r"degree_max\s+2", out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _start_node(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "gossipfl.cli", "node", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env)
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"gossipfl node \S+ on (\S+)", line)
        if m:
            return proc, m.group(1)
    raise AssertionError(f"node did not start (exit {proc.wait()})")


@pytest.mark.slow
def test_two_node_processes_find_each_other_and_stop_on_sigterm(tmp_path: Path) -> None:
    """No --steps or --duration: a node is a service. Both keep going past what used to be the
    default budget (300 steps), print progress lines, and exit 0 on SIGTERM with a checkpoint."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    common = ["--listen", "127.0.0.1:0", "--shards", "2", "--cluster", "t", "--no-mdns", "--progress-every", "0.5"]
    a, addr_a = _start_node([*common, "--id", "a", "--node-index", "0", "--state-dir", str(tmp_path / "a")], env)
    b = None
    try:
        b, _ = _start_node([*common, "--id", "b", "--node-index", "1", "--peer", addr_a], env)
        import urllib.request

        status = {}
        for _ in range(100):
            with urllib.request.urlopen(f"http://{addr_a}/status", timeout=5) as r:
                status = json.loads(r.read())
            if status["msgs_in"] > 5 and status["msgs_out"] > 5:
                break
            subprocess.run(["sleep", "0.1"], check=True)
        assert [p["id"] for p in status["peers"]] == ["b"]
        assert not status["alone"]
        for _ in range(300):  # well past the old 300-step default, and still serving
            with urllib.request.urlopen(f"http://{addr_a}/status", timeout=5) as r:
                status = json.loads(r.read())
            if status["step"] > 900:
                break
            subprocess.run(["sleep", "0.1"], check=True)
        assert status["step"] > 900
        assert not status["finished"]
        assert a.poll() is None
        assert b.poll() is None
        for proc in (a, b):
            proc.send_signal(signal.SIGTERM)
        for proc in (a, b):
            assert proc.wait(timeout=20) == 0
        assert a.stderr is not None
        tail = a.stderr.read()
        progress = [line for line in tail.splitlines() if re.match(r"node a: step \d+, loss", line)]
        assert len(progress) >= 2
        assert progress[-1].endswith("(stopped)")
        assert (tmp_path / "a" / "checkpoint.gfl").exists()
        assert (tmp_path / "a" / "metrics.jsonl").stat().st_size > 0
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc is not None and proc.stderr is not None:
                proc.stderr.close()


def test_algorithm_params_from_flags_add_to_the_files_table(tmp_path: Path, capsys) -> None:
    """--algorithm-param KEY=VALUE (a TOML value) adds to / overrides [algorithm_params] of --config."""
    conf = tmp_path / "run.toml"
    conf.write_text('algorithm = "dpsgd"\nsame_init = true\n[algorithm_params]\naggregator = "trimmed_mean"\nb = 2\n')
    out = tmp_path / "run"
    assert main(["sim", "--quiet", "--config", str(conf), "--algorithm-param", "b=1", "--engine", "vectorized",
                 "--schedule", "sync", "--nodes", "6", "--steps", "5", "--out", str(out)]) == 0
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["algorithm_params"] == {"aggregator": "trimmed_mean", "b": 1}
    assert main(["sim", "--algorithm-param", "aggregator=median", "--algorithm-param", "tau=0.5",
                 "--nodes", "2"]) == 2
    assert "tau is not a parameter of aggregator 'median'" in capsys.readouterr().err
    assert main(["sim", "--algorithm-param", "tau", "--nodes", "2"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_a_crashed_loop_stops_the_node_with_exit_1_and_a_message(tmp_path: Path, monkeypatch, capsys) -> None:
    """No loop dies silently: a gossip loop that raises stops `gossipfl node` (exit 1), its stderr
    names the loop and the error, and the checkpoint is still written."""
    from gossipfl.node.protocol import Protocol

    async def broken(self) -> None:
        await asyncio.sleep(0.3)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Protocol, "gossip_loop", broken)
    code = main(["node", "--listen", "127.0.0.1:0", "--no-mdns", "--quiet", "--state-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert "the gossip loop crashed: RuntimeError: disk on fire" in err
    assert (tmp_path / "checkpoint.gfl").exists()


def test_an_unknown_flag_gets_the_commands_usage_and_the_nearest_flag(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["sim", "--nodez", "4"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: gossipfl sim")
    assert "did you mean --nodes?" in err
    with pytest.raises(SystemExit):
        main(["topology", "ring", "--wieghts", "uniform"])
    assert "did you mean --weights?" in capsys.readouterr().err


def test_help_describes_every_flag_with_its_default(capsys) -> None:
    from gossipfl.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    assert set(sub.choices) == {"sim", "node", "sweep", "topology", "peers", "report"}
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert all(helps[c] for c in sub.choices)  # a line per command at the top level
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"gossipfl {name}: {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit):
        main(["sim", "--help"])
    out = capsys.readouterr().out
    assert "local steps per node (default: 300)" in " ".join(out.split())
    assert "(default: 0.1)" in out
    with pytest.raises(SystemExit):
        main(["node", "--help"])
    assert "(default: run until stopped)" in " ".join(capsys.readouterr().out.split())


def test_two_runs_in_the_same_second_get_their_own_default_folders(tmp_path, monkeypatch) -> None:
    from gossipfl.config import RunConfig
    from gossipfl.runs import default_run_folder

    monkeypatch.chdir(tmp_path)
    first = default_run_folder(RunConfig())
    first.mkdir(parents=True)
    second = default_run_folder(RunConfig())
    assert second != first
    assert second.name.startswith(first.name)
