"""Parameter sweeps: every combination of a grid of settings, one run folder each, spread over cores.

    gossipfl sweep --grid topology=ring,exponential,complete --grid algorithm=dpsgd,gossip \
                   --seeds 0,1,2 --workers 2 --out runs/topologies

Each combination is checked before any run starts (a typo fails fast, naming the key), then runs
in a worker process with the same code path as ``gossipfl sim``. The sweep folder holds one run
folder per combination, ``sweep.json`` (each run's settings and summary) and a comparison table;
``gossipfl report`` works on it as on any run folders.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import multiprocessing as mp
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from gossipfl.config import RunConfig, from_mapping
from gossipfl.errors import ConfigError

__all__ = ["expand_grid", "parse_grid", "run_sweep", "setting"]


def _scalar(text: str) -> Any:
    """A grid value as TOML would read it (1, 0.5, true, "ring"); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    """``["topology=ring,complete", "lr=0.05,0.1"]`` -> ``{"topology": [...], "lr": [...]}``."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")  # flag spelling; a dotted key names a table entry
        parsed = [_scalar(v.strip()) for v in values.split(",") if v.strip()]
        if not sep or not key or not parsed:
            raise ConfigError(f"grid: {item!r} is not KEY=V1,V2,...")
        if key in grid:
            raise ConfigError(f"grid: {key!r} is given twice")
        grid[key] = parsed
    return grid


def _slug(value: Any) -> str:
    text = str(value).replace("/", "_").replace(":", "")
    return "".join(c for c in text if c.isalnum() or c in "._-")[:40] or "x"


def _nest(changes: dict[str, Any], base: RunConfig) -> dict[str, Any]:
    """Dotted keys (``attack.kind``, ``aggregator_params.tau``) as entries of the base's tables."""
    out: dict[str, Any] = {}
    for key, value in changes.items():
        table, dot, entry = key.partition(".")
        if not dot:
            out[key] = value
            continue
        current = out.get(table, getattr(base, table, None))
        if not isinstance(current, dict):
            raise ConfigError(f"grid: {key!r}: {table!r} is not a table of the configuration")
        out[table] = {**current, entry: value}
    return out


def setting(cfg: RunConfig | dict[str, Any], key: str) -> Any:
    """The value of a (dotted) grid key in a config or a config.toml's dict (None when unset)."""
    d = cfg if isinstance(cfg, dict) else {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    table, dot, entry = key.partition(".")
    v = d.get(table)
    return (v.get(entry) if isinstance(v, dict) else None) if dot else v


def expand_grid(base: RunConfig, grid: dict[str, list[Any]], seeds: Sequence[int]) -> list[tuple[str, RunConfig]]:
    """(name, config) for every combination and seed, each config checked by the dataclass."""
    keys = list(grid)
    runs = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        changes = dict(zip(keys, combo, strict=True))
        combination = from_mapping(_nest(changes, base), base=base, source="grid")  # a bad key or value names it
        for seed in seeds:
            cfg = combination.replace(seed=seed)
            name = "-".join(f"{k}={_slug(v)}" for k, v in changes.items()) or "base"
            runs.append((f"{name}-seed={seed}", cfg))
    return runs


def _run_one(cfg: RunConfig, out: str) -> dict[str, Any]:
    """Worker process: one run, quietly (runs in parallel would interleave their progress)."""
    import torch

    from gossipfl.runs import execute

    torch.set_num_threads(1)  # one core per run: the pool spreads runs over the cores
    return execute(cfg, Path(out), progress=None)


def _prepare(runs: list[tuple[str, RunConfig]], out: Path) -> set[str]:
    """Run folders for a new sweep, or the names already finished when ``out`` holds this same
    sweep (resume: an unfinished run is cleared to be redone). A folder of another grid or other
    settings is refused: a resumed sweep must be the sweep that was started."""
    from gossipfl.config import config_to_toml
    from gossipfl.runs import make_run_folder

    names = {name for name, _ in runs}
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.is_dir() and (p / "config.toml").exists()
                         and p.name not in names)
        if foreign:
            raise ConfigError(f"sweep: {out} holds runs of another grid ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); give another --out, or the grid it was "
                              "started with to resume it")
    done: set[str] = set()
    for name, cfg in runs:
        folder = out / name
        saved = folder / "config.toml"
        if saved.exists():
            if saved.read_text(encoding="utf-8") != config_to_toml(cfg):
                raise ConfigError(f"sweep: {folder} was run with other settings than this sweep gives it; "
                                  "give another --out, or the settings it was started with to resume it")
            if (folder / "summary.json").exists():
                done.add(name)
                continue
            for leftover in ("metrics.jsonl", "summary.json"):  # an interrupted run: redo it from the start
                (folder / leftover).unlink(missing_ok=True)
        make_run_folder(cfg, folder)
    return done


def _quiet_worker() -> None:
    """Workers leave Ctrl-C to the sweep, which stops them itself (a terminal signals them all)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _PoolSweep:
    """The runs on this host's cores: a process pool, one run per worker process."""

    def __init__(self, workers: int) -> None:
        ctx = mp.get_context("spawn")  # no fork of a process that may hold threads or sockets
        self._pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_quiet_worker)
        self._futures: dict[cf.Future[dict[str, Any]], tuple[str, RunConfig]] = {}

    def submit(self, name: str, cfg: RunConfig, folder: Path) -> None:
        self._futures[self._pool.submit(_run_one, cfg, str(folder))] = (name, cfg)

    def results(self) -> Iterator[tuple[str, RunConfig, dict[str, Any] | BaseException]]:
        for fut in cf.as_completed(self._futures):
            name, cfg = self._futures[fut]
            try:
                yield name, cfg, fut.result()
            except Exception as exc:
                yield name, cfg, exc

    def stop(self) -> None:
        for proc in list(getattr(self._pool, "_processes", {}).values()):  # stop the runs in progress now
            proc.terminate()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _runner(ray: str | None, workers: int) -> Any:
    if ray:
        from gossipfl.sweep_ray import RaySweep

        return RaySweep(ray, workers=workers)
    return _PoolSweep(workers)


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def run_sweep(
    base: RunConfig,
    grid: dict[str, list[Any]],
    *,
    seeds: Sequence[int],
    out: Path,
    workers: int,
    ray: str | None = None,
    echo: Any = print,
) -> list[dict[str, Any]]:
    """Run every combination; returns one record (name, settings, summary or error) per run.

    Re-running the same sweep into the same folder resumes it: finished runs are kept, the rest
    run. Ctrl-C stops the workers at once and keeps what finished (KeyboardInterrupt is raised
    after ``sweep.json`` is written). ``ray``: a Ray cluster's address, or ``"auto"`` for a local
    instance (`gossipfl.sweep_ray`); the folder it leaves is the same."""
    import json
    import time

    from gossipfl.runs import preflight, write_json

    runs = expand_grid(base, grid, seeds)
    if not runs:
        raise ConfigError("grid: no combinations to run")
    for name, cfg in runs:  # all checked before anything starts
        try:
            preflight(cfg)
        except ConfigError as exc:
            raise ConfigError(f"sweep run {name}: {exc}") from None
    done = _prepare(runs, out)
    records: dict[str, dict[str, Any]] = {}
    for name, cfg in runs:
        if name in done:
            summary = json.loads((out / name / "summary.json").read_text(encoding="utf-8"))
            records[name] = {"name": name, "settings": {k: setting(cfg, k) for k in grid} | {"seed": cfg.seed},
                             "summary": {k: v for k, v in summary.items() if k != "per_node"}}
    todo = [(name, cfg) for name, cfg in runs if name not in done]
    runner = _runner(ray if todo else None, workers)  # nothing to run: no cluster to reach
    where = f"a Ray cluster of {runner.cpus()} CPU(s)" if ray and todo else f"{workers} worker(s)"
    echo(f"gossipfl sweep: {len(runs)} runs on {where} -> {out}"
         + (f" (resuming: {len(done)} finished, {len(todo)} to run)" if done else ""))
    failed, t0 = 0, time.monotonic()
    try:
        for name, cfg in todo:
            runner.submit(name, cfg, out / name)
        for k, (name, cfg, result) in enumerate(runner.results(), 1):
            settings = {key: setting(cfg, key) for key in grid} | {"seed": cfg.seed}
            elapsed = time.monotonic() - t0
            progress = (f"[{k}/{len(todo)} done, {failed} failed, {_eta(elapsed)} elapsed, "
                        f"ETA {_eta(elapsed / k * (len(todo) - k))}]")
            if isinstance(result, BaseException):  # one failed run must not lose the others
                failed += 1
                records[name] = {"name": name, "settings": settings,
                                 "error": f"{type(result).__name__}: {result}"}
                echo(f"  {progress} {name}: FAILED ({result})")
                continue
            records[name] = {"name": name, "settings": settings,
                             "summary": {key: v for key, v in result.items() if key != "per_node"}}
            echo(f"  {progress} {name}: mean accuracy {result['mean_accuracy']:.4f}, "
                 f"consensus {result['consensus_distance']:.2e}")
    except KeyboardInterrupt:
        runner.stop()
        write_json(out / "sweep.json", [records[name] for name, _ in runs if name in records])
        echo(f"gossipfl sweep: interrupted; {len(records)} of {len(runs)} runs finished and kept. "
             "Run the same command again to resume.")
        raise
    runner.close()
    ordered = [records[name] for name, _ in runs]
    write_json(out / "sweep.json", ordered)
    return ordered
