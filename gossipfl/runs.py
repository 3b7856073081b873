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
from gossipfl.errors import ConfigError
from gossipfl.plan import Plan

__all__ = ["default_run_folder", "execute", "make_run_folder", "preflight", "write_json"]


def preflight(cfg: RunConfig) -> Plan:
    """Resolve ``cfg`` (`gossipfl.plan.resolve`: algorithm, emulation, data, partition, graph) and
    build one node's model, so that a bad setting is reported (ConfigError / DataError naming it)
    before a run folder is created or a socket bound; the returned plan is what `execute` runs."""
    from gossipfl.build import check_algorithm_fits, check_model_fits
    from gossipfl.plan import resolve

    plan = resolve(cfg)
    trainer = plan.trainer(0)  # the partition and initial model the engines will use
    check_model_fits(cfg, plan.data, trainer)
    check_algorithm_fits(plan.algorithm, trainer.params)
    if cfg.engine == "vectorized":
        from gossipfl.sim.vectorized import check_config

        check_config(plan)  # device, schedule and duration, per-node speeds, what the attack needs
    elif plan.attack is not None and plan.attack.kind == "dissensus" and plan.attack.nodes:
        raise ConfigError("attack.kind: dissensus crafts each receiver's message from that receiver's whole inbox, "
                          "which only the vectorised engine's omniscient adversary sees (--engine vectorized)")
    return plan


def default_run_folder(cfg: RunConfig) -> Path:
    """``runs/STAMP-ALGORITHM-TOPOLOGY-N``; a second run in the same second gets ``-2``, ``-3``..."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{stamp}-{cfg.algorithm}-{cfg.topology.replace('/', '_')}-{cfg.nodes}"
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def make_run_folder(cfg: RunConfig, out: Path) -> None:
    """Create ``out`` with the resolved config.toml; never overwrite an earlier run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        if (out / "metrics.jsonl").exists():
            raise ConfigError(f"out: {out} already holds a run (metrics.jsonl); choose another folder")
        (out / "config.toml").write_text(config_to_toml(cfg), encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"out: cannot write to {out}: {exc.strerror or exc}") from None


def execute(cfg: RunConfig | Plan, out: Path, *, progress: TextIO | None, live: Any = None) -> dict[str, Any]:
    """Run ``cfg`` (a config, or the plan `preflight` returned) with its engine into the prepared
    folder ``out``; writes and returns the summary. ``live``: a `gossipfl.web.live.Live` page."""
    engine = cfg.cfg.engine if isinstance(cfg, Plan) else cfg.engine
    if engine == "vectorized":
        from gossipfl.sim.vectorized import run_vectorized

        summary = run_vectorized(cfg, out, progress=progress, live=live)
    else:
        from gossipfl.sim.cluster import run_cluster

        summary = asyncio.run(run_cluster(cfg, out, progress=progress, live=live))
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
