"""Building a vectorised run: what it refuses, the learning objects, initial models, message sizes.

Everything here happens once, before the first step; `gossipfl.sim.vectorized.VectorizedSim`
holds the results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gossipfl import wire
from gossipfl.algorithms import Algorithm
from gossipfl.build import build_loss, node_seed
from gossipfl.config import RunConfig
from gossipfl.errors import ConfigError
from gossipfl.learning import Dataset, ParamLayout, build_model, param_layout
from gossipfl.learning.models import BUILTIN_MODELS
from gossipfl.plan import Plan
from gossipfl.sim._batched_models import BatchedModel, batched_model
from gossipfl.sim._learner import Batches

__all__ = ["Built", "checked", "device_of", "learning", "message_sizes", "node_ids"]


def node_ids(n: int) -> list[str]:
    """Same ids as the local cluster: n00, n01, ... (zero-padded, so sorted order is index order)."""
    width = max(2, len(str(n - 1)))
    return [f"n{i:0{width}d}" for i in range(n)]


def device_of(spec: str) -> torch.device:
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: {spec!r} is not a torch device (use cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA GPU is available; use cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: {spec!r} is not supported; use cpu or cuda")
    return dev


def checked(plan: Plan) -> None:
    """What the vectorised engine refuses beyond `gossipfl.plan.resolve`'s checks, as ConfigErrors naming the key."""
    cfg, algorithm, emulation = plan.cfg, plan.algorithm, plan.emulation
    device_of(cfg.device)
    if cfg.schedule == "sync" and cfg.duration is not None:
        raise ConfigError("duration: the sync schedule counts rounds; give steps instead")
    if algorithm.requirements.rounds and cfg.schedule == "async":
        if cfg.duration is not None:
            raise ConfigError(f"duration: {algorithm.name} runs in neighbour-local rounds, which the vectorised "
                              "engine advances round by round; give steps instead")
        if emulation.churn:
            raise ConfigError(f"emulation.churn: {algorithm.name} waits for every neighbour each round; the "
                              "vectorised engine does not model an offline neighbour's timeout (use "
                              "engine = \"cluster\")")
    emulation.node_speeds(cfg.nodes, seed=cfg.seed)  # per-node factors must match the node count


@dataclass
class Built:
    """The learning objects of a run: initial models, data on the device, minibatches, kernel, blocks."""

    layout: ParamLayout
    params: torch.Tensor
    model: BatchedModel
    batches: Batches
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    block: int
    eval_block: int


def learning(plan: Plan, dev: torch.device, kernel: str, block: int | None, gen: torch.Generator, *,
             exact: bool) -> Built:
    """Initial models (node i's of the local cluster), minibatches of the plan's shards, batched
    kernel and block sizes."""
    cfg, data, n = plan.cfg, plan.data, plan.cfg.nodes
    model = build_model(cfg.model, input_shape=data.input_shape, n_classes=data.n_classes,
                        hidden=cfg.hidden, seed=node_seed(cfg, 0))
    # drawn in float32, then cast: the numbers `build_trainer` gives a node (float64 draws differ)
    params = _initial_params(cfg, data, model, param_layout(model), n)
    model = model.to(getattr(torch, cfg.dtype))
    layout = param_layout(model)
    params = params.to(dev, layout.dtype)
    seeds = [cfg.seed * 7919 + i for i in range(n)] if exact else None
    batches = Batches([plan.shard(i) for i in range(n)], cfg.batch_size, device=dev,
                      generator=gen, seeds=seeds)
    width = max(math.prod(data.input_shape), 1) + sum(cfg.hidden) + data.n_classes
    # floats of activations per block: about what the CPU caches hold, per thread
    budget = 2**20 * torch.get_num_threads() if dev.type == "cpu" else 2**27
    tsize = max(1, data.x_test.shape[0])
    return Built(
        layout=layout, params=params, model=batched_model(model.to(dev), layout, kernel, build_loss(cfg, data)),
        batches=batches,
        x_train=data.x_train.to(dev), y_train=data.y_train.to(dev), x_test=data.x_test.to(dev),
        y_test=data.y_test.to(dev), block=block or max(16, min(n, budget // (batches.bmax * width))),
        eval_block=max(1, min(n, (2**22 if dev.type == "cpu" else 2**28) // (tsize * width))),
    )


def message_sizes(cfg: RunConfig, algorithm: Algorithm, layout: ParamLayout, sender: str,
                  degree: int) -> tuple[int, int]:
    """Size of one encoded gossip message as the wire codec frames it: with every tensor, and without
    the channels sent only every k-th step (`gossipfl.algorithms.base.Channel.every`)."""
    specs = algorithm.tensor_specs(layout.numel, layout.dtype)
    sometimes = {c.key for c in algorithm.channels if c.every > 1}

    def size(keys: list[str]) -> int:
        env = wire.Envelope(
            cluster=cfg.cluster, sender=sender, algorithm=algorithm.name, fingerprint=layout.fingerprint,
            step=cfg.steps, round=cfg.steps, meta={"addr": "127.0.0.1:65535", "deg": degree},
            tensors={k: torch.zeros(specs[k][0], dtype=specs[k][1]) for k in keys},
        )
        return wire.encoded_size(env)

    return size(list(specs)), size([k for k in specs if k not in sometimes])


def _initial_params(cfg: RunConfig, data: Dataset, model: torch.nn.Module, layout: Any, n: int) -> torch.Tensor:
    """Row i = node i's initial model, the same numbers `build_trainer` gives node i in the cluster.

    Built-in models draw their weights only in their layers' ``reset_parameters`` (in module
    order), so re-seeding and resetting one module reproduces ``build_model(seed=...)`` without
    building N modules; user models are built once per node.
    """
    if cfg.same_init:
        return layout.flatten(dict(model.named_parameters())).unsqueeze(0).repeat(n, 1)
    out = torch.empty(n, layout.numel, dtype=layout.dtype)
    if cfg.model in BUILTIN_MODELS:
        resettable = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]  # in build order
        params = dict(model.named_parameters())
        with torch.no_grad():
            for i in range(n):
                # the CPU generator alone: what build_model's torch.manual_seed sets for a CPU model,
                # without torch.manual_seed's queued CUDA/XPU/MTIA seeding (a stack trace kept per
                # call: ~0.6 ms each, a minute and growing memory at 100 000 nodes)
                torch.default_generator.manual_seed(node_seed(cfg, i))
                for layer in resettable:
                    layer.reset_parameters()
                out[i] = layout.flatten(params)
        return out
    for i in range(n):
        m = build_model(cfg.model, input_shape=data.input_shape, n_classes=data.n_classes,
                        hidden=cfg.hidden, seed=node_seed(cfg, i))
        out[i] = layout.flatten(dict(m.named_parameters()))
    return out


