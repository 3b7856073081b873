"""A sweep's runs on a Ray cluster (``gossipfl sweep --ray ADDRESS``), for sweeps that outgrow one host.

Ray does the scheduling (one task per run, one CPU each); nothing here queues or places work.
A task runs in a scratch folder on whichever host Ray picks and sends the run folder's files
back to the driver, which writes them under ``--out`` exactly as the local process pool does,
so the folder layout, resume and ``gossipfl report`` are the same, and no shared filesystem is
needed. Every host needs the same gossipfl installed (checked: a task reports its version).

``--ray auto`` starts a local Ray instance with ``--workers`` CPUs for the sweep and stops it
afterwards; any other value is handed to ``ray.init(address=...)`` (``HOST:6379``, ``ray://HOST:10001``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gossipfl.config import RunConfig
from gossipfl.errors import ConfigError

__all__ = ["RaySweep", "ray_task"]

log = logging.getLogger(__name__)


def ray_task(cfg: RunConfig) -> dict[str, Any]:
    """One run, in a scratch folder on the worker's host: summary, the folder's files, version."""
    import shutil
    import tempfile

    from gossipfl.runs import make_run_folder
    from gossipfl.sweep import _run_one

    scratch = Path(tempfile.mkdtemp(prefix="gossipfl-ray-"))
    try:
        folder = scratch / "run"
        make_run_folder(cfg, folder)
        summary = _run_one(cfg, str(folder))  # as a pool worker runs it: one thread, quietly
        files = {str(p.relative_to(folder)): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "config.toml"}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"summary": summary, "files": files, "version": _version()}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gossipfl")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "unknown"


def _import_ray(*, loopback: bool) -> Any:
    """Ray, imported; ``loopback``: a single-host instance that listens on 127.0.0.1 only (Ray's
    own switch for single-host use; it is read when Ray is imported, hence both settings)."""
    import os
    import sys

    if loopback:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        consts = sys.modules.get("ray._private.ray_constants")
        if consts is not None and hasattr(consts, "ENABLE_RAY_CLUSTER"):  # imported before us
            consts.ENABLE_RAY_CLUSTER = False
    try:
        import ray
    except ImportError:
        raise ConfigError("ray: Ray is not installed; pip install 'gossipfl[ray]' (or run without --ray)") from None
    return ray


def _reachable(address: str) -> None:
    """Fail at once, naming the address, where Ray itself would retry for a minute or more."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"ray: {address!r} is not HOST:PORT or ray://HOST:PORT (or auto for a local instance)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3.0).close()
    except OSError as exc:
        raise ConfigError(f"ray: cannot connect to {address!r}: {exc.strerror or exc}; is the Ray head "
                          "running there (ray start --head)?") from None


class RaySweep:
    """Submits runs as Ray tasks and yields them as they finish; ``stop`` cancels the rest."""

    def __init__(self, address: str, *, workers: int) -> None:
        self._started = address == "auto"
        ray = self._ray = _import_ray(loopback=self._started)
        self._refs: dict[Any, tuple[str, RunConfig, Path]] = {}
        try:
            if self._started:  # a fresh local instance of --workers CPUs, ours to stop
                ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING, configure_logging=False)
            else:
                _reachable(address)
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING,
                         configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"ray: cannot connect to {address!r}: {exc}") from None
        self._remote = ray.remote(num_cpus=1, max_retries=0)(ray_task)

    def cpus(self) -> int:
        """CPUs the cluster offers (what the sweep's progress line reports as workers)."""
        return int(self._ray.cluster_resources().get("CPU", 0))

    def submit(self, name: str, cfg: RunConfig, folder: Path) -> None:
        self._refs[self._remote.remote(cfg)] = (name, cfg, folder)

    def results(self) -> Iterator[tuple[str, RunConfig, dict[str, Any] | BaseException]]:
        """(name, config, summary or the exception) per run, in the order they finish; a finished
        run's files are written into its folder before it is yielded."""
        ray = self._ray
        while self._refs:
            # a short wait, so that Ctrl-C (handled between waits, not inside Ray's) is not held up
            ready, _ = ray.wait(list(self._refs), num_returns=1, timeout=0.25)
            if not ready:
                continue
            ref = ready[0]
            name, cfg, folder = self._refs.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the run's own error, as the pool reports it
                cause = getattr(exc, "cause", None)
                yield name, cfg, cause if isinstance(cause, BaseException) else exc
                continue
            except Exception as exc:  # a lost worker or host
                yield name, cfg, exc
                continue
            if result["version"] != _version():
                log.warning("ray: run %s ran gossipfl %s, this host has %s", name, result["version"], _version())
            try:  # summary.json last: it is what marks the run finished when a sweep resumes
                for rel, data in sorted(result["files"].items(), key=lambda kv: kv[0] == "summary.json"):
                    path = folder / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
            except OSError as exc:  # a full disk fails this run, not the sweep
                yield name, cfg, ConfigError(f"out: could not write {folder}: {exc.strerror or exc}")
                continue
            yield name, cfg, result["summary"]

    def stop(self) -> None:
        """Cancel what has not finished (Ctrl-C), and stop the local instance if the sweep started it."""
        for ref in list(self._refs):
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # already finished or gone
                pass
        self._refs.clear()
        self.close()

    def close(self) -> None:
        """Disconnect; a local instance the sweep started stops with it, a cluster keeps running."""
        self._ray.shutdown()
