"""Gossip learning with age-weighted merge, its update-merge order and a partitioned variant.

Ormándi, Hegedűs, Jelasity, "Gossip learning with linear models on fully distributed data",
Concurrency and Computation 2013; Hegedűs, Danner, Jelasity, "Gossip learning as a decentralized
alternative to federated learning", DAIS 2019. Each node periodically sends (model, age) to ONE
random neighbour; a receiver merges every arriving model into its own, weighting each by its
age (number of updates it has seen):

    x <- (a_i x_i + a_j x_j) / (a_i + a_j),    a <- max(a_i, a_j)

Two orders (Ormándi et al. 2013, "MU" and "UM"; ``order`` hyperparameter):

- ``merge_update`` (default): merge what arrived, then take the local step: ``x <- update(merge(x, x_j))``.
- ``update_merge``: each arrived model is first updated on the receiver's data (one plain SGD
  step with the learner's lr, its age counting that update), then merged into the receiver's
  model, which its own step updates: ``x <- update(merge(x, update(x_j)))``. The engine takes the
  arrival's step (``Channel.local_update``): each costs one extra gradient.

Partitioned (``gossip_partitioned``; Hegedűs, Danner, Jelasity, "Decentralized learning works: an
empirical comparison of gossip learning and federated learning", J. Parallel Distrib. Comput.
2021): the parameters are split into ``partitions`` strided parts (entry c belongs to part
c mod P), each with its own age; a message carries ONE part chosen at random (its entries, zero-
padded to ceil(D / P), its index in the ``partition`` tensor and its age), and the receiver merges
only that part, age-weighted by the part's ages. Messages are P times smaller.

Asynchronous by nature: no rounds, loss-tolerant. A message carries the model and its age; the
receiver merges messages one at a time (``each`` channels). Ages live in ``state["age"]`` ``[N]``
(float64) and count local steps; the partitioned variant keeps per-part ages ``state["ages"]``
``[N, P]``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from gossipfl.algorithms._util import check_choice, check_int
from gossipfl.algorithms.aggregation import RobustRule
from gossipfl.algorithms.base import (
    AlgorithmBase,
    Channel,
    Inbox,
    Learner,
    Requirements,
    Send,
    State,
    Targets,
    TensorSpecs,
)

__all__ = ["GossipLearning", "PartitionedGossip", "age_weighted_merge", "merge_partition", "partition_size"]

ORDERS = ("merge_update", "update_merge")


def age_weighted_merge(
    x: torch.Tensor, age: torch.Tensor | float, y: torch.Tensor, age_y: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Age-weighted average of two models (leading node axes allowed; ages broadcast over D).

    Two fresh models (both age 0) average with equal weight.
    """
    if isinstance(age, torch.Tensor) or isinstance(age_y, torch.Tensor):
        a = torch.as_tensor(age, dtype=x.dtype)
        b = torch.as_tensor(age_y, dtype=x.dtype)
        total = a + b
        wa = torch.where(total > 0, a / total.clamp_min(1e-12), torch.full_like(total, 0.5))
        merged = wa.unsqueeze(-1) * x + (1 - wa).unsqueeze(-1) * y
        return merged, torch.maximum(a, b)
    total_f = float(age) + float(age_y)
    wa_f = 0.5 if total_f <= 0 else float(age) / total_f
    return wa_f * x + (1.0 - wa_f) * y, max(float(age), float(age_y))


def partition_size(numel: int, partitions: int, part: int) -> int:
    """Entries in strided part ``part`` (``part::partitions``) of a ``numel`` vector."""
    return len(range(part, numel, partitions))


def part_index(numel: int, partitions: int, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry indices ``[n, ceil(D / P)]`` of strided part ``part[i]`` of each row, and a mask of
    the real ones (a short part is zero-padded to the common length)."""
    width = math.ceil(numel / partitions)
    idx = part.unsqueeze(1) + partitions * torch.arange(width, device=part.device)
    valid = idx < numel
    return idx.clamp_max(numel - 1), valid


def merge_partition(
    x: torch.Tensor, ages: torch.Tensor, part: torch.Tensor, values: torch.Tensor, age: torch.Tensor,
    partitions: int,
) -> None:
    """Age-weighted merge of ``values [n, ceil(D / P)]`` into part ``part[i]`` of each row of
    ``x [n, D]`` (in place), with the part's ages ``ages [n, P]`` updated to the maximum."""
    numel = x.shape[-1]
    own_age = ages.gather(1, part.unsqueeze(1)).squeeze(1)
    merged_ages = torch.maximum(own_age, age.to(ages.dtype))
    # each entry c of part k sits at position c // P of the part's values
    pos = torch.arange(numel, device=x.device) // partitions
    full = values.gather(1, pos.unsqueeze(0).expand(x.shape[0], -1).clamp_max(values.shape[1] - 1))
    merged, _ = age_weighted_merge(x, own_age, full, age)
    mask = (torch.arange(numel, device=x.device) % partitions) == part.unsqueeze(1)
    x.copy_(torch.where(mask, merged, x))
    ages.scatter_(1, part.unsqueeze(1), merged_ages.unsqueeze(1))


class GossipLearning(AlgorithmBase):
    """Send (model, age) to one random neighbour per gossip point; age-weighted merge on arrival.

    Hyperparameter: ``order``, ``"merge_update"`` (default) or ``"update_merge"``.
    """

    name: ClassVar[str] = "gossip"
    requirements: ClassVar[Requirements] = Requirements(weights="none", undirected=False)
    targets = Targets("one")

    def __init__(self, *, order: str = "merge_update", aggregator: str = "mean", **rule_params: Any) -> None:
        self.order = check_choice("order", order, ORDERS)
        update = self.order == "update_merge"
        self.channels = (Channel("params", "each", local_update=update), Channel("age", "each"))
        # one model per merge: only the rules that act on one neighbour apply
        self.rule = RobustRule(aggregator, rule_params, allowed=("mean", "clipped_gossip", "balance"),
                               algorithm=self.name)
        self.aggregator = aggregator

    def tensor_specs(self, numel: int, dtype: torch.dtype) -> TensorSpecs:
        return {"params": ((numel,), dtype), "age": ((), torch.float64)}

    def init_state(self, state: State) -> None:
        state["age"] = torch.zeros(state["params"].shape[0], dtype=torch.float64, device=state["params"].device)
        self.rule.init_state(state)

    def local_step(self, state: State, learner: Learner) -> torch.Tensor:
        loss = learner.sgd_step(state["params"])
        state["age"] += 1
        return loss

    def message(self, state: State, send: Send) -> dict[str, torch.Tensor]:
        return {"params": state["params"], "age": state["age"]}

    @torch.no_grad()
    def merge(self, state: State, inbox: Inbox) -> None:
        # update-merge: the arrival took one step on our data (the engine's local_update), which its age counts
        age_y = inbox["age"] + 1 if self.order == "update_merge" else inbox["age"]
        if self.rule.plain:
            merged, _ = age_weighted_merge(state["params"], state["age"], inbox["params"], age_y)
        else:  # the arrival's age weight w: x + w (y - x) becomes the rule on the one slot y
            x = state["params"]
            w = age_weighted_merge(torch.zeros_like(x[:, :1]), state["age"], torch.ones_like(x[:, :1]), age_y)[0]
            one = torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)
            merged = self.rule.apply(state, x, inbox["params"].unsqueeze(1), one, w)
        state["params"].copy_(merged)
        state["age"] = torch.maximum(state["age"], age_y.to(torch.float64))


class PartitionedGossip(AlgorithmBase):
    """Gossip learning that sends one random part of the parameters, with per-part ages.

    Hyperparameters: ``partitions`` (P >= 1; 1 is plain gossip learning), ``seed`` (part choice;
    mixed with the node's seed).
    """

    name: ClassVar[str] = "gossip_partitioned"
    requirements: ClassVar[Requirements] = Requirements(weights="none", undirected=False)
    targets = Targets("one")
    channels = (Channel("part", "each"), Channel("partition", "each"), Channel("age", "each"))

    def __init__(self, *, partitions: int = 4, seed: int = 0) -> None:
        self.partitions = check_int("partitions", partitions, minimum=1)
        self.seed = check_int("seed", seed)

    def tensor_specs(self, numel: int, dtype: torch.dtype) -> TensorSpecs:
        return {"part": ((math.ceil(numel / self.partitions),), dtype), "partition": ((), torch.int64),
                "age": ((), torch.float64)}

    def init_state(self, state: State) -> None:
        p = state["params"]
        if self.partitions > p.shape[-1]:
            raise ValueError(f"partitions={self.partitions} exceeds the {p.shape[-1]} parameters")
        state["ages"] = torch.zeros(p.shape[0], self.partitions, dtype=torch.float64, device=p.device)

    def local_step(self, state: State, learner: Learner) -> torch.Tensor:
        loss = learner.sgd_step(state["params"])
        state["ages"] += 1
        return loss

    @torch.no_grad()
    def message(self, state: State, send: Send) -> dict[str, torch.Tensor]:
        p = state["params"]
        part = send.rng.randint(self.partitions, p.shape[0], device=p.device)
        idx, valid = part_index(p.shape[-1], self.partitions, part)
        values = p.gather(1, idx) * valid.to(p.dtype)
        return {"part": values, "partition": part, "age": state["ages"].gather(1, part.unsqueeze(1)).squeeze(1)}

    @torch.no_grad()
    def merge(self, state: State, inbox: Inbox) -> None:
        part = inbox["partition"]
        ok = (part >= 0) & (part < self.partitions)  # the shape was checked by the engine, the index is ours
        if not bool(ok.all()):
            if not bool(ok.any()):
                return
            rows = ok.nonzero().squeeze(1)
            sub_p, sub_a = state["params"][rows], state["ages"][rows]
            merge_partition(sub_p, sub_a, part[rows], inbox["part"][rows], inbox["age"][rows], self.partitions)
            state["params"][rows] = sub_p
            state["ages"][rows] = sub_a
            return
        merge_partition(state["params"], state["ages"], part, inbox["part"], inbox["age"], self.partitions)
