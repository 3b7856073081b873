"""The ``gossipfl`` command: sim, node, sweep, topology, peers, report.

Exit codes: 0 success, 2 bad usage or configuration (one line naming what is wrong), 1 anything
else. A user mistake never ends in a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import tomllib
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gossipfl.cli_help import config_defaults, parse_args, show_defaults
from gossipfl.config import MAX_SEED, UNBOUNDED_STEPS, RunConfig, load_config, parse_address
from gossipfl.errors import ConfigError, GossipflError

__all__ = ["main"]

log = logging.getLogger("gossipfl")


# ---------------------------------------------------------------- arguments

def _learning_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by sim and node; each maps to the TOML key of the same name."""
    p.add_argument("--config", metavar="FILE.toml", help="settings file; flags override it")
    p.add_argument("--topology", help="ring, torus, complete, star, hypercube, exponential, ... or a file")
    p.add_argument("--algorithm", help="dpsgd (default), gossip, gossip_partitioned, averaging, epidemic, "
                   "gradex, pushsum, pushsum_averaging, adpsgd, choco, diging ([algorithm_params] in --config)")
    p.add_argument("--data", help="digits (default), synthetic, regression, or pkg.mod:load_data")
    p.add_argument("--loss", help="cross_entropy (default), mse, or pkg.mod:fn (per-sample losses)")
    p.add_argument("--model", help="mlp (default), logreg, cnn, or pkg.mod:make_model")
    p.add_argument("--hidden", type=int, nargs="+", metavar="N", help="MLP hidden layer sizes")
    p.add_argument("--dtype", help="the models' parameters: float32 (default) or float64 (theory checks); "
                   "every node of a cluster must use the same")
    p.add_argument("--algorithm-param", dest="algorithm_param", action="append", metavar="KEY=VALUE",
                   help="one [algorithm_params] entry, e.g. aggregator=median or tau=0.5 (repeatable)")
    p.add_argument("--aggregator", help="robust merge: mean, median, trimmed_mean, krum, clipped_gossip, balance "
                   "(dpsgd, averaging, epidemic, gossip)")
    p.add_argument("--aggregator-param", dest="aggregator_param", action="append", metavar="KEY=VALUE",
                   help="one [aggregator_params] entry, e.g. tau=0.3, tau=\"auto\", b=1, f=1 (repeatable)")
    p.add_argument("--partition", help="iid, dirichlet:ALPHA or shards:K")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="local steps per node")
    g.add_argument("--duration", type=float, metavar="SECONDS", help="train for this long instead")
    p.add_argument("--seed", type=int, help="seed of the data split, the models and every random draw")
    p.add_argument("--lr", type=float, help="learning rate of the local SGD steps")
    p.add_argument("--momentum", type=float, help="SGD momentum")
    p.add_argument("--batch-size", type=int, help="minibatch size of a local step")
    p.add_argument("--gossip-every", type=int, metavar="K", help="local steps between gossip points")
    p.add_argument("--eval-every", type=int, metavar="K", help="local steps between metric rows")
    p.add_argument("--weights", help="metropolis (default), max_degree, uniform")
    p.add_argument("--same-init", action="store_const", const=True,
                   help="start every node from the same model (default: each its own)")
    p.add_argument("--timeout", type=float, help="seconds for one peer exchange")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log lines (-vv: debug)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gossipfl", description="Asynchronous peer-to-peer gossip learning: simulate it, run it on a LAN, "
        "study how it converges.", epilog="`gossipfl COMMAND --help` describes each command and its defaults.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    sim = sub.add_parser("sim", help="run many nodes on this host and write a run folder")
    _learning_flags(sim)
    sim.add_argument("--engine", help="cluster (real node services, default) or vectorized (one tensor, many nodes)")
    sim.add_argument("--device", help="vectorized engine: cpu (default) or cuda")
    sim.add_argument("--nodes", type=int, help="number of nodes (default 8)")
    sim.add_argument("--transport", help="http (loopback sockets, default) or memory")
    sim.add_argument("--schedule", help="async (default: every node at its own pace, the [emulation] table "
                     "applies) or sync (lock-step rounds)")
    sim.add_argument("--shards", type=int, help="cut the training set into this many shards; node i trains on "
                     "shard i %% K (default: one per node)")
    sim.add_argument("--out", metavar="DIR", help="run folder (default runs/<time>)")
    sim.add_argument("--quiet", action="store_true", help="no progress, no table")
    sim.add_argument("--live", nargs="?", const="127.0.0.1:8750", metavar="HOST:PORT",
                     help="serve a live page of the run (graph, accuracy, consensus) at HOST:PORT "
                          "(default 127.0.0.1:8750, loopback; port 0: any free port); the URL is printed at start")

    node = sub.add_parser("node", help="run one node on this machine, until stopped (Ctrl-C / SIGTERM)",
                          description="Run one gossipfl node: it serves until SIGINT or SIGTERM (then it saves "
                          "its checkpoint, says goodbye over mDNS and exits 0), unless --steps or --duration "
                          "give it a budget.")
    _learning_flags(node)
    node.add_argument("--listen", metavar="HOST:PORT", help="address to serve on (default 127.0.0.1:0)")
    node.add_argument("--peer", dest="peers", action="append", metavar="HOST:PORT",
                      help="a peer's address (repeatable)")
    node.add_argument("--cluster", help="cluster name; nodes of other clusters are ignored")
    node.add_argument("--id", help="node id (default: kept in --state-dir, else host-port)")
    node.add_argument("--state-dir", metavar="DIR", help="checkpoint and metrics live here")
    node.add_argument("--secret-file", metavar="FILE", help="cluster secret: messages are HMAC-signed")
    node.add_argument("--no-mdns", dest="mdns", action="store_const", const=False,
                      help="do not advertise or discover peers over mDNS (use --peer)")
    node.add_argument("--mdns-interface", dest="mdns_interfaces", action="append", metavar="IP",
                      help="run mDNS on this interface address only (repeatable)")
    node.add_argument("--node-index", type=int, help="which data shard this node trains on")
    node.add_argument("--shards", type=int, help="how many shards the training data is cut into")
    node.add_argument("--quiet", action="store_true", help="no start, progress or finish lines (warnings still)")
    node.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                      help="seconds between two progress lines (default 10)")
    node.add_argument("--attack", metavar="KIND", help="red-team runs: this node attacks (sign_flip, scaled, "
                      "gaussian, alie, ipm, label_flip, free_rider; strength and start in the [attack] table)")

    sweep = sub.add_parser("sweep", help="run every combination of a grid of settings, spread over cores")
    sweep.add_argument("--config", metavar="FILE.toml", help="base settings for every run")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="a setting and its values (repeatable; any sim flag or TOML key)")
    sweep.add_argument("--seeds", default="0", metavar="S1,S2,...", help="repeat every combination per seed")
    sweep.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                       help="runs in parallel (default: half the cores; with --ray auto, the local Ray "
                       "instance's CPUs)")
    sweep.add_argument("--ray", metavar="ADDRESS", help="run on a Ray cluster (pip install 'gossipfl[ray]'): "
                       "its address (HOST:6379, ray://HOST:10001), or auto for a local instance; same folder "
                       "and resume")
    sweep.add_argument("--out", metavar="DIR", help="sweep folder (default runs/sweep-<time>)")
    sweep.add_argument("--plot", metavar="FILE.png", help="convergence plot of all runs")
    sweep.add_argument("--x", dest="x_axis", default="steps", choices=["steps", "time", "bytes"],
                       help="the plot's x axis: local steps, time or MB sent")
    sweep.add_argument("--band", default="minmax", choices=["minmax", "sd", "ci95", "none"],
                       help="the plot's band over seeds: min to max, mean ± 1 sd, the mean's 95 %% confidence "
                       "interval (Student's t), or none")
    sweep.add_argument("--pivot", metavar="ROW,COL", help="also a ROW x COL table of honest mean (min) accuracy, "
                       "e.g. aggregator,attack.kind")
    sweep.add_argument("-v", "--verbose", action="count", default=0, help="more log lines (-vv: debug)")

    topo = sub.add_parser("topology", help="describe (and plot) a topology")
    topo.add_argument("spec", metavar="FILE|NAME", help="a built-in topology (ring, torus, exponential, ...) or a "
                      "topology file (topologies/*.toml)")
    topo.add_argument("--nodes", type=int, default=16, help="number of nodes to lay it over")
    topo.add_argument("--weights", default="metropolis", help="mixing weights: metropolis, max_degree or uniform")
    topo.add_argument("--seed", type=int, default=0, help="seed of a random topology")
    topo.add_argument("--plot", metavar="FILE.png", help="also draw the graph into this PNG")

    peers = sub.add_parser("peers", help="list the gossipfl nodes on this network (mDNS)")
    peers.add_argument("--cluster", help="only nodes of this cluster")
    peers.add_argument("--duration", type=float, default=3.0, metavar="SECONDS", help="how long to listen")
    peers.add_argument("--interface", dest="interfaces", action="append", metavar="IP",
                       help="listen on this interface address only (repeatable)")
    peers.add_argument("--json", action="store_true", help="one JSON object per node")
    peers.add_argument("--watch", action="store_true",
                       help="a table (step, accuracy, peers, traffic) refreshed every second until Ctrl-C")
    peers.add_argument("--peer", dest="peer_addresses", action="append", metavar="HOST:PORT",
                       help="also ask this node (repeatable; --watch)")
    peers.add_argument("--no-mdns", dest="browse", action="store_false",
                       help="do not browse mDNS; only the --peer addresses (--watch)")
    peers.add_argument("--count", type=int, metavar="N", help="--watch: stop after N refreshes (default: Ctrl-C)")

    rep = sub.add_parser("report", help="compare run folders: table, and convergence plots")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or a sweep folder (its runs, in grid "
                     "order)")
    rep.add_argument("--plot", metavar="FILE.png", help="accuracy and consensus distance, one curve per "
                     "configuration (seeds averaged, a band over them: --band)")
    rep.add_argument("--x", dest="x_axis", default="steps", choices=["steps", "time", "bytes"],
                     help="the plot's x axis: local steps, time or MB sent")
    rep.add_argument("--band", default="minmax", choices=["minmax", "sd", "ci95", "none"],
                     help="the plot's band over seeds: min to max, mean ± 1 sd, the mean's 95 %% confidence "
                     "interval (Student's t), or none")
    rep.add_argument("--detail", action="store_true", help="also print each run's per-node table")
    rep.add_argument("--pivot", metavar="ROW,COL", help="also a ROW x COL table of honest mean (min) accuracy over "
                     "seeds, e.g. aggregator,attack.kind")
    rep.add_argument("--markdown", action="store_true", help="print the --pivot table as Markdown")
    rep.add_argument("--target", type=float, metavar="ACC",
                     help="also steps, time and MB until the mean accuracy first reached ACC, per configuration")
    rep.add_argument("--md", metavar="FILE", help="write the per-configuration table (seeds aggregated) as Markdown")
    defaults = config_defaults()
    for name, p in sub.choices.items():
        show_defaults(p, defaults, special={"steps": "run until stopped", "duration": "none"} if name == "node"
                      else {"duration": "none"})
    return parser


_NOT_CONFIG = {"command", "config", "verbose", "quiet", "live", "watch", "progress_every"}


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags the user actually gave, as config keys."""
    out = {k: v for k, v in vars(args).items() if v is not None and k not in _NOT_CONFIG}
    if "hidden" in out:
        out["hidden"] = tuple(out["hidden"])
    if "attack" in out:  # gossipfl node --attack KIND: the kind of the [attack] table
        out["attack"] = {"kind": out["attack"]}
    for flag, table in (("algorithm_param", "algorithm_params"), ("aggregator_param", "aggregator_params")):
        if flag in out:
            out[table] = dict(_key_value(item, flag) for item in out.pop(flag))
    for key in ("peers", "mdns_interfaces"):
        if key in out:
            out[key] = tuple(out[key])
    return out


def _key_value(item: str, flag: str = "algorithm_param") -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as a TOML value (number, true/false, "string"), else as text."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--{flag.replace('_', '-')}: expected KEY=VALUE, got {item!r}")
    try:
        return key.strip(), tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value.strip()


def _setup_logging(verbose: int, default: int = logging.WARNING) -> None:
    level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else default
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


# ---------------------------------------------------------------- sim

def cmd_sim(args: argparse.Namespace) -> int:
    from gossipfl.runs import default_run_folder, execute, make_run_folder, preflight

    cfg = load_config(args.config, _overrides(args))
    plan = preflight(cfg)  # resolved once: the engine runs this plan, nothing is parsed or built again
    out = Path(cfg.out) if cfg.out else default_run_folder(cfg)
    make_run_folder(cfg, out)
    if not args.quiet:
        how = (f"vectorized engine on {cfg.device} ({cfg.schedule})" if cfg.engine == "vectorized"
               else f"{cfg.transport} transport")
        print(f"gossipfl sim: {cfg.nodes} nodes, {cfg.topology}, {cfg.algorithm}, {cfg.data}/{cfg.model}, "
              f"{how} -> {out}", file=sys.stderr)
    if args.live is None:
        summary = execute(plan, out, progress=None if args.quiet else sys.stderr)
    else:
        from gossipfl.web.live import Live, LiveServer

        live = Live(plan)
        with LiveServer(live, args.live) as server:
            print(f"live page: {server.url}", file=sys.stderr, flush=True)
            summary = execute(plan, out, progress=None if args.quiet else sys.stderr, live=live)
            live.finished = True
    if not args.quiet:
        print(format_summary(summary))
        print(f"run folder: {out}")
    return 0


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run table: per node, then the cluster."""
    def mb(v: Any) -> float | None:
        return v / 1e6 if v is not None else None

    s = summary.get  # a summary from an older or interrupted run may lack figures: shown as "-"
    what = "R^2" if s("score") == "r2" else "accuracy"  # regression data: the coefficient of determination
    lines = [f"{'node':<10}{'steps':>7}{what:>10}{'loss':>9}{'msgs out':>10}{'msgs in':>9}{'MB out':>9}"]
    for nid, row in summary.get("per_node", {}).items():
        lines.append(
            f"{nid:<10}{_fmt(row.get('steps'), ''):>7}{_fmt(row.get('accuracy')):>10}"
            f"{_fmt(row.get('loss'), '.3f'):>9}{_fmt(row.get('msgs_out'), ''):>10}{_fmt(row.get('msgs_in'), ''):>9}"
            f"{_fmt(mb(row.get('bytes_out')), '.2f'):>9}"
        )
    lines += [
        "",
        f"{'mean ' + what:<21}{_fmt(s('mean_accuracy'))}  (min {_fmt(s('min_accuracy'))}, "
        f"max {_fmt(s('max_accuracy'))})",
        f"averaged model       {_fmt(s('avg_model_accuracy'))}",
        f"consensus distance   {_fmt(s('consensus_distance'), '.3e')}  "
        f"(start {_fmt(s('initial_consensus_distance'), '.3e')})",
        f"messages             {_fmt(s('messages'), '')}  ({_fmt(mb(s('bytes')), '.2f')} MB; "
        f"{_fmt(s('messages_per_node_step'), '.2f')} per node-step while training, "
        f"{_fmt(s('linger_messages'), '')} after, {_fmt(s('lost'), '')} lost)",
        f"staleness            {_fmt(s('staleness_mean'), '.2f')} steps mean (receiver's step at merge - sender's "
        f"at send; {_fmt(s('staleness_min'), '')} to {_fmt(s('staleness_max'), '')}): merged models "
        f"{_fmt(s('staleness_behind_mean'), '.2f')} behind, {_fmt(s('staleness_ahead_mean'), '.2f')} ahead",
        f"node steps           {_fmt(s('node_steps'), '')} in {_fmt(s('wall_seconds'), '.1f')} s",
    ]
    if "consensus_rate" in summary or "predicted_rate" in summary:
        lines.append(f"consensus rate       {_fmt(summary.get('consensus_rate'), '.6f')} per round measured, "
                     f"{_fmt(summary.get('predicted_rate'), '.6f')} predicted (SLEM^2)")
        if summary.get("consensus_exact_after") is not None:
            lines.append(f"                     exact after {summary['consensus_exact_after']} round(s)")
        elif "consensus_rounds_to_1e-3" in summary:
            lines.append(f"                     rounds to 1e-3 of the start {_fmt(s('consensus_rounds_to_1e-3'), '')}, "
                         f"to 1e-6 {_fmt(s('consensus_rounds_to_1e-6'), '')}")
    return "\n".join(lines)


# ---------------------------------------------------------------- node

def _read_secret(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"secret_file: cannot read {path}: {exc.strerror or exc}") from None
    if len(secret) < 16:
        raise ConfigError(f"secret_file: {path} holds {len(secret)} bytes; use at least 16 random bytes")
    return secret


def _node_id(cfg: RunConfig) -> str:
    """Given id, else the one kept in the state dir (stable across restarts), else host-port."""
    if cfg.id:
        return cfg.id
    _, port = parse_address(cfg.listen, key="listen")
    fresh = f"{socket.gethostname()}-{port if port else uuid.uuid4().hex[:6]}"
    if cfg.state_dir is None:
        return fresh
    path = Path(cfg.state_dir) / "node_id"
    try:
        if path.exists():
            return path.read_text(encoding="utf-8").strip() or fresh
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(fresh + "\n", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"state_dir: cannot use {cfg.state_dir}: {exc.strerror or exc}") from None
    return fresh


def _progress(node: Any) -> str:
    st = node.status()
    loss, acc = st["loss"], st["accuracy"]
    return (f"node {st['id']}: step {st['step']}, loss {_fmt(loss, '.4f')}, accuracy {_fmt(acc, '.4f')}, "
            f"peers {len(st['peers'])} ({len(st['neighbours'])} neighbours), msgs out {st['msgs_out']} "
            f"in {st['msgs_in']}, rejected {sum(st['rejected'].values())}")


async def _report_progress(node: Any, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        print(_progress(node), file=sys.stderr, flush=True)


async def _serve_node(cfg: RunConfig, *, quiet: bool = False, progress_every: float = 10.0,
                      forever: bool = False) -> int:
    from gossipfl.build import (
        build_algorithm,
        build_data,
        build_trainer,
        check_algorithm_fits,
        check_model_fits,
        stable_index,
    )
    from gossipfl.metrics import MetricsWriter
    from gossipfl.node import Node
    from gossipfl.node.health import freeze_heap
    from gossipfl.topology import check_spec

    check_spec(cfg.topology, seed=cfg.seed)
    node_id = _node_id(cfg)
    secret = _read_secret(cfg.secret_file)
    data = build_data(cfg)
    shards = cfg.shards or 1
    index = cfg.node_index if cfg.node_index is not None else stable_index(node_id, shards)
    if cfg.shards is None:
        log.info("no --shards given: this node trains on the whole training set")
    attack = None
    if cfg.attack:  # this node is the attacker (the table's placement keys do not apply to one node)
        import dataclasses

        import networkx as nx

        from gossipfl.attacks import flip_labels, parse_attack

        table = {k: v for k, v in cfg.attack.items() if k not in ("fraction", "placement", "nodes", "seed")}
        attack = parse_attack({**table, "nodes": [0]}, nx.empty_graph(1), seed=cfg.seed)
        if attack.kind == "dissensus":
            raise ConfigError("attack.kind: dissensus crafts each receiver's message from that receiver's whole "
                              "inbox, which a node service cannot see; run it in the vectorised engine")
        if attack.kind == "label_flip":  # data poisoning: this node learns from flipped labels
            if data.regression:
                raise ConfigError("attack.kind: label_flip flips class labels, and this data is regression")
            data = dataclasses.replace(data, y_train=flip_labels(data.y_train, data.n_classes))
        log.warning("node %s is an attacker: %s", node_id, attack.kind)
    trainer = build_trainer(cfg, data, index, shards)
    check_model_fits(cfg, data, trainer)
    check_algorithm_fits(build_algorithm(cfg), trainer.params)
    metrics = MetricsWriter(Path(cfg.state_dir) / "metrics.jsonl" if cfg.state_dir else None)
    stop = asyncio.Event()
    code = 0
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    freeze_heap()  # before serving: a full GC pass over the startup heap would stall the loop (node/health.py)
    try:
        async with Node(cfg, node_id=node_id, trainer=trainer, algorithm=build_algorithm(cfg),
                        metrics=metrics, secret=secret, state_dir=cfg.state_dir,
                        seed=stable_index(node_id, 2**31), mdns=cfg.mdns,
                        mdns_interfaces=cfg.mdns_interfaces, attack=attack) as node:
            if not quiet:
                budget = "until stopped (Ctrl-C)" if forever else (
                    f"for {cfg.duration:g} s" if cfg.duration is not None else f"for {cfg.steps} steps")
                print(f"gossipfl node {node_id} on {node.address} (cluster {cfg.cluster}, shard {index}/{shards}), "
                      f"running {budget}; page: http://{node.address}/", file=sys.stderr, flush=True)
            finished = asyncio.create_task(node.finished.wait())
            stopped = asyncio.create_task(stop.wait())
            failed = asyncio.create_task(node.failed.wait())
            ticker = None if quiet else asyncio.create_task(_report_progress(node, progress_every))
            await asyncio.wait({finished, stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
            for t in (finished, stopped, failed, ticker):
                if t is not None:
                    t.cancel()
            if node.failed.is_set():
                print(f"gossipfl node {node_id}: error: {node.error}; stopping (checkpoint kept)", file=sys.stderr,
                      flush=True)
                code = 1
            elif not quiet:
                why = "stopped" if stop.is_set() else "finished"
                print(f"{_progress(node)} ({why})", file=sys.stderr, flush=True)
    finally:
        metrics.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return code


def _no_budget(args: argparse.Namespace) -> bool:
    """Neither the flags nor the config file give the node ``steps`` or ``duration``."""
    given = set(_overrides(args))
    if args.config:
        with contextlib.suppress(OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            given |= set(tomllib.loads(Path(args.config).read_text(encoding="utf-8")))
    return not {"steps", "duration"} & given


def cmd_node(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _overrides(args))
    if not args.progress_every > 0:
        raise ConfigError(f"progress-every: must be a positive number of seconds, got {args.progress_every}")
    forever = _no_budget(args)
    if forever:  # a service: it runs until it is stopped
        cfg = cfg.replace(steps=UNBOUNDED_STEPS)
    _setup_logging(args.verbose, default=logging.WARNING if args.quiet else logging.INFO)
    return asyncio.run(_serve_node(cfg, quiet=args.quiet, progress_every=args.progress_every, forever=forever))


# ---------------------------------------------------------------- topology, report

def cmd_sweep(args: argparse.Namespace) -> int:
    import datetime as dt

    from gossipfl.report import check_plot_path, comparison_table, load_run, parse_pivot, pivot_table, plot_runs
    from gossipfl.sweep import parse_grid, run_sweep

    if args.plot:
        check_plot_path(args.plot)
    pivot = parse_pivot(args.pivot) if args.pivot else None
    base = load_config(args.config)
    grid = parse_grid(args.grid)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"seeds: {args.seeds!r} is not a comma-separated list of integers") from None
    if any(not 0 <= s <= MAX_SEED for s in seeds):
        raise ConfigError(f"seeds: every seed must be in [0, {MAX_SEED}], got {args.seeds!r}")
    if args.workers < 1:
        raise ConfigError(f"workers: must be >= 1, got {args.workers}")
    if "out" in grid:
        raise ConfigError("grid: 'out' cannot be swept (each run gets its own folder under --out)")
    if "seed" in grid:
        raise ConfigError("grid: sweep seeds with --seeds, not --grid seed=...")
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{dt.datetime.now():%Y%m%d-%H%M%S}"
    records = run_sweep(base.replace(out=None), grid, seeds=seeds or [0], out=out, workers=args.workers,
                        ray=args.ray)
    done = [load_run(out / r["name"]) for r in records if "summary" in r]
    if done:
        print(comparison_table(done))
        if pivot:
            print("\n" + pivot_table(done, *pivot))
    if args.plot and done:
        try:
            plot_runs(done, args.plot, x=args.x_axis, band=args.band)
        except OSError as exc:
            raise ConfigError(f"plot: cannot write {args.plot}: {exc.strerror or exc}") from None
        print(f"plot written to {args.plot}")
    failed = [r for r in records if "error" in r]
    return 1 if failed else 0


def cmd_topology(args: argparse.Namespace) -> int:
    from gossipfl.topology import build_schedule, describe, plot_graph

    if args.nodes < 1:
        raise ConfigError(f"nodes: must be a positive integer, got {args.nodes}")
    schedule = build_schedule(args.spec, args.nodes, seed=args.seed)
    graph = schedule(0)
    if schedule.period != 1:
        print(f"time-varying: a new graph every round (period {schedule.period or 'none, random'}); "
              "round 0 shown")
    info = describe(graph, args.weights)
    for key, value in info.items():
        print(f"{key:<22}{_fmt(value, '.6g') if isinstance(value, float) else value}")
    if args.plot:
        try:
            plot_graph(graph, args.plot, title=f"{args.spec} ({args.nodes} nodes)")
        except OSError as exc:
            raise ConfigError(f"plot: cannot write {args.plot}: {exc.strerror or exc}") from None
        print(f"plot written to {args.plot}")
    return 0


def _run_folders(paths: list[str]) -> list[Path]:
    """The run folders among ``paths``: a sweep folder (sweep.json, no summary.json) stands for its
    runs, in the sweep's order; a plain file (``runs/*`` matches sweep.json) is skipped."""
    out: list[Path] = []
    for text in paths:
        p = Path(text)
        if p.is_file():
            log.info("report: skipping %s (a file, not a run folder)", p)
            continue
        if (p / "sweep.json").is_file() and not (p / "summary.json").exists():
            try:
                records = json.loads((p / "sweep.json").read_text(encoding="utf-8"))
                out += [p / r["name"] for r in records if "summary" in r]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"report: cannot read {p / 'sweep.json'}: {exc}") from None
            continue
        out.append(p)
    if not out:
        raise ConfigError("report: no run folders among the paths given")
    return out


def cmd_report(args: argparse.Namespace) -> int:
    from gossipfl.report import comparison_table, load_run, parse_pivot, pivot_table, plot_runs, seed_table

    pivot = parse_pivot(args.pivot) if args.pivot else None
    runs = []
    for folder in _run_folders(args.runs):
        if not folder.is_dir():
            raise ConfigError(f"report: {folder} is not a folder (give run folders, or a sweep folder)")
        if not (folder / "summary.json").exists():  # interrupted, failed, or not a run folder at all
            print(f"gossipfl report: skipping {folder} (no summary.json: an unfinished run, or not a run folder)",
                  file=sys.stderr)
            continue
        runs.append(load_run(folder))
    if not runs:
        raise ConfigError("report: none of the folders given holds a finished run (summary.json)")
    print(comparison_table(runs))
    if args.target is not None and not 0 < args.target <= 1:
        raise ConfigError(f"target: an accuracy in (0, 1], got {args.target}")
    if args.target is not None or args.md or len(runs) > 1:
        print("\nper configuration (seeds aggregated: mean ± sd)")
        print(seed_table(runs, target=args.target))
    if args.md:
        try:
            Path(args.md).write_text(seed_table(runs, target=args.target, markdown=True) + "\n", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"md: cannot write {args.md}: {exc.strerror or exc}") from None
        print(f"markdown table written to {args.md}")
    if pivot:
        print("\n" + pivot_table(runs, *pivot, markdown=args.markdown))
    if args.detail:
        for run in runs:
            print(f"\n== {run.path}")
            print(format_summary(run.summary))
    if args.plot:
        try:
            plot_runs(runs, args.plot, x=args.x_axis, band=args.band)
        except OSError as exc:
            raise ConfigError(f"plot: cannot write {args.plot}: {exc.strerror or exc}") from None
        print(f"plot written to {args.plot}")
    return 0


async def _peers(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Browse mDNS, then ask each node found for its /status (step, accuracy)."""
    from gossipfl.node.discovery import browse
    from gossipfl.node.transport import HttpTransport

    found = await browse(duration=args.duration, cluster=args.cluster, interfaces=args.interfaces)
    transport = HttpTransport()

    async def row(info: Any) -> dict[str, Any]:
        out = {"id": info.id, "address": info.address, "cluster": info.cluster, "step": None, "accuracy": None}
        try:
            reply = await transport.request(info.address, "GET", "/status", timeout=3.0)
            status = reply.json() if reply.status == 200 else {}
            out.update(step=status.get("step"), accuracy=status.get("accuracy"))
        except GossipflError as exc:
            out["error"] = str(exc)
        return out

    try:
        return list(await asyncio.gather(*(row(i) for i in found)))
    finally:
        await transport.aclose()


def cmd_peers(args: argparse.Namespace) -> int:
    if not args.duration > 0:
        raise ConfigError(f"duration: must be a positive number of seconds, got {args.duration}")
    if args.watch:
        from gossipfl.watch import watch

        if args.count is not None and args.count < 1:
            raise ConfigError(f"count: must be at least 1, got {args.count}")
        if not args.browse and not args.peer_addresses:
            raise ConfigError("--no-mdns leaves nothing to watch: give --peer HOST:PORT")
        for a in args.peer_addresses or ():
            parse_address(a, key="peer")
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(watch(cluster=args.cluster, addresses=args.peer_addresses or (), interfaces=args.interfaces,
                              mdns=args.browse, duration=args.duration, count=args.count))
        return 0
    rows = asyncio.run(_peers(args))
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    if not rows:
        print("no gossipfl nodes found (is UDP 5353 open, and are you on the same network segment?)")
        return 0
    print(f"{'id':<24}{'address':<24}{'cluster':<14}{'step':>8}{'accuracy':>10}")
    for r in rows:
        print(f"{r['id']:<24}{r['address']:<24}{r['cluster']:<14}{r['step'] if r['step'] is not None else '-':>8}"
              f"{_fmt(r['accuracy']):>10}")
    return 0


COMMANDS = {"sim": cmd_sim, "node": cmd_node, "sweep": cmd_sweep, "topology": cmd_topology, "peers": cmd_peers,
            "report": cmd_report}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)  # exits with 2 on bad usage: the subcommand's usage, a suggestion
    if args.command != "node":
        _setup_logging(getattr(args, "verbose", 0))
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"gossipfl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except GossipflError as exc:
        print(f"gossipfl {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gossipfl {args.command}: interrupted", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
