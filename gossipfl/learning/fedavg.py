"""A FedAvg (local SGD) reference computed outside every engine, to check gossip against it.

With one initial model on every node, lock-step rounds, the complete graph with uniform weights
(Metropolis gives 1/n there) and an exact average every H local steps, D-PSGD in combine-then-adapt
order is local SGD, i.e. FedAvg with every client taking part (McMahan et al., AISTATS 2017;
Stich, ICLR 2019): the reference below trains each node's own copy, with the node's own data and
minibatch order (`gossipfl.plan.Plan.trainer`), H steps, then replaces every copy by the
average. ``tests/test_local_sgd.py`` and ``scripts/check_theory.py`` compare the engines with it.
"""

from __future__ import annotations

import torch

from gossipfl.config import RunConfig
from gossipfl.plan import resolve

__all__ = ["local_sgd"]


def local_sgd(cfg: RunConfig, h: int, cycles: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``cycles`` FedAvg rounds of ``h`` local steps on ``cfg``'s nodes.

    Returns the ``[N, D]`` copies before the last average (what a gossip engine holds after
    ``h * cycles`` lock-step rounds, its last messages not yet merged) and the global model after
    each average. Raises ValueError where the nodes do not start from one model (``same_init``)."""
    plan = resolve(cfg)
    trainers = [plan.trainer(i) for i in range(cfg.nodes)]
    start = trainers[0].params
    if not all(torch.equal(t.params, start) for t in trainers):
        raise ValueError("local_sgd: FedAvg starts every node from one model; set same_init = true")
    averages: list[torch.Tensor] = []
    copies = torch.stack([t.params.clone() for t in trainers])
    for cycle in range(cycles):
        for t in trainers:
            for _ in range(h):
                t.step()
        copies = torch.stack([t.params.clone() for t in trainers])
        averages.append(copies.mean(0))
        if cycle < cycles - 1:
            for t in trainers:
                t.params.copy_(averages[-1])
    return copies, averages
