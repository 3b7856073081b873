"""Run one simulation into a run folder: checks first, then the engine, then the summary.

Shared by `gossipfl sim` and `gossipfl sweep` (which calls it in worker processes), so a run is
the same whichever command started it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
from pathlib import Path
from typing import Any, TextIO

from gossipfl.config import RunConfig, config_to_toml
from gossipfl.errors import ConfigError, DataError

__all__ = ["default_run_folder", "execute", "make_run_folder", "preflight", "write_json"]


def preflight(cfg: RunConfig) -> None:
    """Build topology, algorithm, data and one node's model once, so that a bad setting is
    reported (ConfigError naming it) before a run folder is created or a socket bound."""
    from gossipfl.build import (
        build_algorithm,
        build_data,
        build_trainer,
        check_algorithm_fits,
        check_model_fits,
        check_requirements,
    )
    from gossipfl.topology import build_schedule

    algorithm = build_algorithm(cfg)
    data = build_data(cfg)  # data before the graph: a graph of 100 000 nodes takes seconds to build
    if cfg.shards is None and len(data.y_train) < cfg.nodes:
        raise DataError(f"partition: {len(data.y_train)} training samples cannot be split among {cfg.nodes} "
                        "nodes; give shards = K (--shards K) and node i trains on shard i % K")
    trainer = build_trainer(cfg, data, 0, cfg.shards or cfg.nodes)  # the partition the engines will cut
    check_model_fits(cfg, data, trainer)
    check_algorithm_fits(algorithm, trainer.params)
    if cfg.engine == "vectorized":
        from gossipfl.sim.vectorized import check_config

        check_config(cfg)  # emulation table, device, algorithm, and the graph (built once here)
        return
    schedule = build_schedule(cfg.topology, cfg.nodes, seed=cfg.seed)
    check_requirements(cfg, algorithm, directed=schedule.directed, time_varying=schedule.period != 1)


def default_run_folder(cfg: RunConfig) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.algorithm}-{cfg.topology.replace('/', '_')}-{cfg.nodes}"


def make_run_folder(cfg: RunConfig, out: Path) -> None:
    """Create ``out`` with the resolved config.toml; never overwrite an earlier run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        if (out / "metrics.jsonl").exists():
            raise ConfigError(f"out: {out} already holds a run (metrics.jsonl); choose another folder")
        (out / "config.toml").write_text(config_to_toml(cfg), encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"out: cannot write to {out}: {exc.strerror or exc}") from None


def execute(cfg: RunConfig, out: Path, *, progress: TextIO | None) -> dict[str, Any]:
    """Run ``cfg`` with its engine into the prepared folder ``out``; writes and returns the summary."""
    if cfg.engine == "vectorized":
        from gossipfl.sim.vectorized import run_vectorized

        summary = run_vectorized(cfg, out, progress=progress)
    else:
        from gossipfl.sim.cluster import run_cluster

        summary = asyncio.run(run_cluster(cfg, out, progress=progress))
    write_json(out / "summary.json", summary)
    return summary


def write_json(path: Path, obj: Any) -> None:
    """JSON without NaN/Inf (null instead), so every tool can read it; a write error is reported."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    try:
        path.write_text(json.dumps(clean(obj), indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"out: could not write {path}: {exc.strerror or exc}") from None
