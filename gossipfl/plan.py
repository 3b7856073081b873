"""A run resolved once: the algorithm, the emulation model, the data and its partition, and the
topology schedule, checked against each other; every engine consumes a `Plan` as it is.

`resolve` interprets a `RunConfig` once, cheap checks first: the algorithm and its parameters, the
``[emulation]`` table, the data set and whether it can be split among the nodes, the partition,
then the topology schedule (graph 0 is built here, once: seconds at 100 000 nodes), and last what
the algorithm requires of them (an undirected graph, lossless delivery, a static topology), and
which nodes attack (``[attack]``, `gossipfl.attacks`). The
CLI's preflight, the local cluster (`gossipfl.sim.cluster.run_cluster`) and the vectorised engine
(`gossipfl.sim.vectorized.VectorizedSim`) take the same `Plan`, so none of them parses a table or
builds a graph again; each also accepts a plain `RunConfig` and resolves it itself.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from gossipfl.algorithms import Algorithm
from gossipfl.attacks import Attack, flip_labels, parse_attack
from gossipfl.build import build_algorithm, build_data, build_trainer, check_requirements, cut_shards
from gossipfl.config import RunConfig
from gossipfl.emulation import Emulation, parse_emulation
from gossipfl.errors import ConfigError, DataError
from gossipfl.learning import Dataset, Trainer
from gossipfl.topology import Schedule, build_schedule

log = logging.getLogger("gossipfl")

__all__ = ["Plan", "resolve"]


@dataclass(frozen=True)
class Plan:
    """Everything a run's engines share, built once from ``cfg`` (see the module docstring).

    ``shards``: the partition of the training set; node i trains on ``shards[i % len(shards)]``
    (one shard per node unless ``cfg.shards`` is given). ``algorithm``: the run's algorithm; a
    local cluster gives each `Node` its own (`new_algorithm`), the vectorised engine uses this one.
    """

    cfg: RunConfig
    algorithm: Algorithm
    emulation: Emulation
    data: Dataset
    shards: tuple[torch.Tensor, ...]
    schedule: Schedule
    attack: Attack | None = None

    @property
    def time_varying(self) -> bool:
        return self.schedule.period != 1

    def new_algorithm(self) -> Algorithm:
        """A fresh instance of the run's algorithm (same name and parameters)."""
        return build_algorithm(self.cfg)

    def shard(self, index: int) -> torch.Tensor:
        """Training-set indices of node ``index``."""
        return self.shards[index % len(self.shards)]

    def trainer(self, index: int) -> Trainer:
        """Node ``index``'s Trainer: its shard, its initial model, its batch order."""
        return build_trainer(self.cfg, self.data, index, len(self.shards), shards=self.shards)


def resolve(cfg: RunConfig | Plan, *, data: Dataset | None = None) -> Plan:
    """The `Plan` of ``cfg`` (a Plan is returned as it is); ConfigError / DataError name what is wrong.

    ``data``: a data set already loaded for ``cfg`` (else loaded here).
    """
    if isinstance(cfg, Plan):
        return cfg
    algorithm = build_algorithm(cfg)
    emulation = parse_emulation(cfg.emulation)
    data = data if data is not None else build_data(cfg)
    if data.shards is None and cfg.shards is None and len(data.y_train) < cfg.nodes:
        raise DataError(f"partition: {len(data.y_train)} training samples cannot be split among {cfg.nodes} "
                        "nodes; give shards = K (--shards K) and node i trains on shard i % K")
    shards = cut_shards(cfg, data, cfg.shards or cfg.nodes)
    used = [len(shards[i % len(shards)]) for i in range(min(cfg.nodes, len(shards)))]
    # (a batch as large as the whole data set asks for full-batch gradients: no warning)
    if used and min(used) < cfg.batch_size < len(data.y_train) and algorithm.requirements.trains:
        k = max(1, len(data.y_train) // cfg.batch_size)
        log.warning("a node's data is smaller than a batch: %d training samples over %d shards leave as few as %d "
                    "per node (batch_size %d); give shards = K (--shards %d, node i trains on shard i %% K) for "
                    "full batches", len(data.y_train), len(shards), min(used), cfg.batch_size, k)
    schedule = build_schedule(cfg.topology, cfg.nodes, seed=cfg.seed)  # the graph, once
    check_requirements(cfg, algorithm, directed=schedule.directed, time_varying=schedule.period != 1,
                       loss=emulation.loss)
    attack = parse_attack(cfg.attack, schedule(0), seed=cfg.seed)  # hubs: by graph 0's degrees
    if attack is not None and attack.kind == "label_flip":
        if data.regression:
            raise ConfigError("attack.kind: label_flip flips class labels, and this data is regression")
        data, shards = _flipped(data, shards, attack, cfg.nodes)
    return Plan(cfg=cfg, algorithm=algorithm, emulation=emulation, data=data, shards=shards, schedule=schedule,
                attack=attack)


def _flipped(data: Dataset, shards: tuple[torch.Tensor, ...], attack: Attack,
             n: int) -> tuple[Dataset, tuple[torch.Tensor, ...]]:
    """Label flipping: each attacker trains on a copy of its shard with labels C - 1 - y, appended
    to the training set (the honest nodes' samples keep their labels); one shard entry per node."""
    if attack.start:
        raise ConfigError("attack.start: label_flip poisons the attackers' data from step 0 (start = 0)")
    own = [shards[i % len(shards)] for i in attack.nodes]
    if not own:
        return data, shards
    idx = torch.cat(own)
    base = data.y_train.shape[0]
    flipped = dataclasses.replace(data, x_train=torch.cat([data.x_train, data.x_train[idx]]),
                                  y_train=torch.cat([data.y_train, flip_labels(data.y_train[idx], data.n_classes)]))
    per_node = [shards[i % len(shards)] for i in range(n)]
    offset = base
    for i, s in zip(attack.nodes, own, strict=True):
        per_node[i] = torch.arange(offset, offset + s.shape[0])
        offset += s.shape[0]
    return flipped, tuple(per_node)
