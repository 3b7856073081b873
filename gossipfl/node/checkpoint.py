"""A node's checkpoint: everything a restarted node needs to carry on where it stopped.

One file, ``<state dir>/checkpoint.gfl``, in the wire format (an envelope of kind
``checkpoint``): the model, the optimizer's momentum, the algorithm's own state tensors under
``state/<key>`` (CHOCO's public copies, DIGing's tracker, partition ages, the generator) and the
step. Written atomically (temp file, fsync, rename); a checkpoint that does not fit this node is
refused whole, with a warning, and the node starts afresh.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from gossipfl import wire
from gossipfl.errors import GossipflError, WireError
from gossipfl.node.learner import NodeLearning

__all__ = ["CHECKPOINT_EVERY", "Checkpoints"]

CHECKPOINT_EVERY = 50  # local steps between checkpoints when a state dir is set
_STATE = "state/"  # checkpoint tensor names of the algorithm state (NodeLearning.state_tensors)


class Checkpoints:
    """Saves and restores one node's state in ``state_dir`` (``lock``: the node's learning lock)."""

    def __init__(self, state_dir: Path, *, node_id: str, cluster: str, fingerprint: str,
                 state: NodeLearning, lock: threading.Lock, log: logging.Logger) -> None:
        self.path = state_dir / "checkpoint.gfl"
        self.id, self.cluster, self.fingerprint = node_id, cluster, fingerprint
        self.state = state
        self.trainer = state.trainer
        self._lock = lock
        self.log = log

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The model, the optimizer's momentum and the algorithm's own state, copied."""
        tensors = {"params": self.state.params.clone()}
        velocity = self.trainer.velocity
        if velocity is not None:
            tensors["velocity"] = velocity.clone()
        for name, t in self.state.state_tensors().items():
            if name != "params":
                tensors[_STATE + name] = t.clone()
        return tensors

    def save(self) -> None:
        """Write the node's state atomically (temp file + rename); a full disk is logged, not fatal."""
        path = self.path
        with self._lock:
            env = wire.Envelope(
                cluster=self.cluster, sender=self.id, algorithm=self.state.algorithm.name,
                fingerprint=self.fingerprint, kind="checkpoint", step=self.state.step,
                tensors=self._tensors(),
            )
        tmp = path.with_suffix(".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as f:
                f.write(wire.encode(env))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            self.log.error("checkpoint not saved to %s: %s (the previous one is kept)", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def restore(self) -> None:
        """Load the checkpoint if there is one that fits; otherwise keep the fresh state."""
        path = self.path
        if not path.exists():
            return
        algorithm = self.state.algorithm.name
        try:
            env = wire.decode(path.read_bytes(), fingerprint=self.fingerprint)
            if env.algorithm != algorithm:
                raise WireError(f"written by algorithm {env.algorithm!r}, this node runs {algorithm!r}")
            wire.require_finite(env)
            restore = self._restorable(env.tensors)
        except (OSError, KeyError, GossipflError) as exc:
            self.log.warning("ignoring checkpoint %s: %s", path, exc)
            return
        with torch.no_grad():
            for target, saved in restore:
                target.copy_(saved)
        rng = env.tensors.get(_STATE + "rng")
        if rng is not None:  # a copy, not a view: the generator takes it back
            self.state.load_state({"rng": rng.clone()})
        self.state.step = env.step
        self.log.info("resumed from %s at step %d", path, env.step)

    def _restorable(self, tensors: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(live tensor, saved tensor) pairs, all checked before anything is overwritten: the model
        must fit; the momentum and algorithm state fit too or the checkpoint is refused, and where
        an older checkpoint lacks them they keep their fresh values (a warning says so)."""
        live: dict[str, torch.Tensor] = {"params": self.state.params}
        if self.trainer.velocity is not None:
            live["velocity"] = self.trainer.velocity
        live.update({_STATE + k: t for k, t in self.state.state_tensors().items() if k != "params"})
        pairs, missing = [], []
        for name, t in live.items():
            saved = tensors.get(name)
            if saved is None:
                if name == "params":
                    raise WireError("no params tensor")
                missing.append(name)
                continue
            if saved.shape != t.shape or saved.dtype != t.dtype:
                raise WireError(f"{name} is {saved.dtype} {list(saved.shape)}, "
                                f"this node's is {t.dtype} {list(t.shape)}")
            pairs.append((t, saved))
        if missing:
            self.log.warning("checkpoint lacks %s: starting those afresh", ", ".join(missing))
        return pairs
