"""Turn a `RunConfig` into the learning objects a node needs; shared by every engine and the CLI.

Seeds are derived here, once, so that a node started by ``gossipfl node`` on a LAN, the same node
in a local cluster and the same row of the vectorised simulator start from the same numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from gossipfl.algorithms import Algorithm, get_algorithm
from gossipfl.config import RunConfig
from gossipfl.errors import ConfigError, DataError
from gossipfl.learning import Dataset, Trainer, build_model, load_data, partition
from gossipfl.learning.losses import Loss, get_loss

__all__ = ["build_algorithm", "build_data", "build_loss", "build_trainer", "check_algorithm_fits", "check_model_fits",
           "check_requirements", "cut_shards", "node_seed", "stable_index"]


def build_data(cfg: RunConfig) -> Dataset:
    """The run's data, features in the models' dtype."""
    data = load_data(cfg.data, seed=cfg.seed, test_fraction=cfg.test_fraction)
    dtype = getattr(torch, cfg.dtype)
    if data.x_train.dtype == dtype and (not data.regression or data.y_train.dtype == dtype):
        return data
    targets = {"y_train": data.y_train.to(dtype), "y_test": data.y_test.to(dtype)} if data.regression else {}
    return dataclasses.replace(data, x_train=data.x_train.to(dtype), x_test=data.x_test.to(dtype), **targets)


def build_loss(cfg: RunConfig, data: Dataset) -> Loss:
    """The run's training loss (`gossipfl.learning.losses`), checked against the data's targets."""
    return get_loss(cfg.loss, regression=data.regression)


def node_seed(cfg: RunConfig, index: int) -> int:
    """Seed of node ``index``'s initial model (shared by all nodes when ``same_init``)."""
    return cfg.seed if cfg.same_init else cfg.seed * 100_003 + index + 1


def cut_shards(cfg: RunConfig, data: Dataset, n_shards: int) -> tuple[torch.Tensor, ...]:
    """The training-set indices of each of ``n_shards`` shards (node i trains on shard i % K): the
    data's own ``shards`` where it brings them, else ``cfg.partition`` cut with the run's seed (so
    every process of a cluster, and every engine, cuts the same ones)."""
    if data.shards is not None:  # the data says which node trains on which samples
        if cfg.partition != "iid" or (cfg.shards is not None and cfg.shards != len(data.shards)):
            raise ConfigError(f"partition: data {cfg.data!r} brings its own {len(data.shards)} shards (node i "
                              "trains on shard i % shards); drop partition and shards from the configuration")
        return data.shards
    if data.regression and cfg.partition != "iid":
        raise ConfigError(f"partition: {cfg.partition!r} deals samples by class label, and data {cfg.data!r} "
                          "is regression (real-valued targets); use partition = \"iid\" or data with shards")
    return tuple(partition(data.y_train, n_shards, cfg.partition, seed=cfg.seed))


def build_trainer(cfg: RunConfig, data: Dataset, index: int, n_shards: int,
                  shards: Sequence[torch.Tensor] | None = None) -> Trainer:
    """The Trainer of node ``index`` of ``n_shards``: its data shard, its initial model, its batch order.

    ``shards``: the partition already cut (`gossipfl.plan.Plan.shards`), else cut here (`cut_shards`)."""
    if shards is None:
        shards = cut_shards(cfg, data, n_shards)
    model = build_model(
        cfg.model, input_shape=data.input_shape, n_classes=data.n_classes,
        hidden=cfg.hidden, seed=node_seed(cfg, index), dtype=getattr(torch, cfg.dtype),
    )
    return Trainer(
        model, data, shards[index % len(shards)], lr=cfg.lr, batch_size=cfg.batch_size,
        momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=cfg.seed * 7919 + index,
        loss=build_loss(cfg, data),
    )


def check_model_fits(cfg: RunConfig, data: Dataset, trainer: Trainer) -> None:
    """One forward pass on two training samples, so that a model that does not fit the data (input
    shape, number of classes) is a DataError naming both before any node starts, not a traceback."""
    x, model = trainer.x[:2], trainer.model
    what = f"{cfg.model!r} does not fit data {cfg.data!r} (inputs {data.input_shape}, {data.n_classes} classes)"
    training = model.training
    model.eval()  # no dropout draws, no batch-norm statistics: the model is left as it was
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # user code: report, never a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(f"model: {what}: {type(exc).__name__}: {first}") from exc
    finally:
        model.train(training)
    expected = (len(x), data.n_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"model: {what}: a batch of {len(x)} gives output {got}, expected {list(expected)}")
    if not trainer.loss.builtin:  # a user loss: per-sample values, finite, on a real batch
        try:
            values = trainer.loss.per_sample(out, trainer.y[:2])
        except Exception as exc:  # user code: report, never a traceback
            raise ConfigError(f"loss: {cfg.loss} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(values, torch.Tensor) or tuple(values.shape) != (len(x),):
            got = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ConfigError(f"loss: {cfg.loss} must return one loss per sample (shape [{len(x)}] for a batch of "
                              f"{len(x)}, reduction='none'), got {got}")


def check_algorithm_fits(algorithm: Algorithm, params: torch.Tensor) -> None:
    """Run the algorithm's ``init_state`` on a copy of one node's flat ``params``, so that a
    hyperparameter that does not fit the model (more gossip partitions than parameters) is a
    ConfigError naming it before any node starts, not a traceback in every node."""
    try:
        algorithm.init_state({"params": params.detach().reshape(1, -1).clone()})
    except ValueError as exc:
        raise ConfigError(f"algorithm_params: {exc}") from None


def _rule_params(table: dict[str, Any], chosen: str) -> dict[str, Any]:
    """``[aggregator_params]``: the chosen rule's keys, plainly or in a sub-table named by the rule
    (``[aggregator_params.clipped_gossip]``), so that one file serves a sweep over rules."""
    from gossipfl.algorithms.robust import AGGREGATORS

    out = {k: v for k, v in table.items() if not isinstance(v, dict)}
    for name, sub in table.items():
        if isinstance(sub, dict):
            if name not in AGGREGATORS:
                raise ConfigError(f"aggregator_params.{name}: not a rule; sub-tables are named by one of "
                                  f"{', '.join(AGGREGATORS)}")
            if name == chosen:
                out.update(sub)
    return out


def build_algorithm(cfg: RunConfig) -> Algorithm:
    """The run's algorithm with its parameters; the top-level ``aggregator`` and
    ``[aggregator_params]`` join them (for the algorithms that take a robust rule)."""
    params = dict(cfg.algorithm_params)
    if cfg.aggregator is not None or cfg.aggregator_params:
        import inspect

        from gossipfl.algorithms import ALGORITHMS

        cls = ALGORITHMS.get(cfg.algorithm)
        if cls is not None and "aggregator" not in inspect.signature(cls).parameters:
            takes = sorted(n for n, c in ALGORITHMS.items() if "aggregator" in inspect.signature(c).parameters)
            raise ConfigError(f"aggregator: {cfg.algorithm} has no robust merge; {', '.join(takes)} take one")
        if cfg.aggregator is not None:
            if params.get("aggregator", cfg.aggregator) != cfg.aggregator:
                raise ConfigError(f"aggregator: {cfg.aggregator!r} and algorithm_params.aggregator = "
                                  f"{params['aggregator']!r} disagree; give one")
            params["aggregator"] = cfg.aggregator
        chosen = params.get("aggregator", "mean")
        for k, v in _rule_params(cfg.aggregator_params, chosen).items():
            if k in params and params[k] != v:
                raise ConfigError(f"aggregator_params.{k}: {v!r} and algorithm_params.{k} = {params[k]!r} disagree")
            params[k] = v
    if params.get("aggregator") == "balance" and "horizon" not in params:
        params["horizon"] = cfg.steps  # BALANCE's T: the run's steps
    return get_algorithm(cfg.algorithm, **params)


def stable_index(node_id: str, modulo: int) -> int:
    """A shard index from a node id that every process computes alike (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(node_id.encode()).digest()[:8], "little") % modulo


def check_requirements(cfg: RunConfig, algorithm: Algorithm, *, directed: bool, time_varying: bool,
                       loss: float | None = None) -> None:
    """Refuse a run whose topology or network breaks what the algorithm assumes, naming both.

    ``loss``: the emulated loss rate (`gossipfl.emulation.Emulation.loss`), else read from ``cfg``."""
    req = algorithm.requirements
    name = algorithm.name
    if req.undirected and directed:
        raise ConfigError(
            f"algorithm: {name} needs an undirected graph (symmetric, doubly stochastic weights), but topology "
            f"{cfg.topology!r} is directed; use pushsum (or gossip) on directed graphs"
        )
    if req.lossless:
        if loss is None:
            from gossipfl.emulation import parse_emulation

            loss = parse_emulation(cfg.emulation).loss
        if loss > 0:
            raise ConfigError(
                f"algorithm: {name} assumes lossless delivery (a lost message corrupts its state), but "
                f"emulation.loss = {loss}; use an algorithm that tolerates loss (gossip, pushsum, dpsgd)"
            )
    if req.static_topology and time_varying:
        raise ConfigError(f"algorithm: {name} keeps a copy of each neighbour's model and needs a static topology, "
                          f"not the time-varying {cfg.topology!r}")
