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
  step with the Trainer's lr), as is the receiver's own model, then they are merged:
  ``x <- merge(update(x), update(x_j))``. Arrivals wait in ``state.extra`` for the next step;
  each costs one extra gradient there.

Partitioned (``gossip_partitioned``; Hegedűs, Danner, Jelasity, "Decentralized learning works: an
empirical comparison of gossip learning and federated learning", J. Parallel Distrib. Comput.
2021): the parameters are split into ``partitions`` strided parts (entry c belongs to part
c mod P), each with its own age; a message carries ONE part chosen at random (its entries, zero-
padded to ceil(D / P), its index in ``meta["partition"]`` and its age), and the receiver merges
only that part, age-weighted by the part's ages. Messages are P times smaller.

Asynchronous by nature: no rounds, loss-tolerant. Engines increment ``state.age`` after each
local step; the partitioned variant keeps its per-part ages in ``state.extra["ages"]``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from gossipfl.algorithms._util import check_choice, check_int, generator, keep_generator
from gossipfl.algorithms.base import AlgorithmBase, LocalState, Message, Requirements, TensorSpecs

if TYPE_CHECKING:
    from gossipfl.learning.trainer import Trainer

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


def merge_partition(
    x: torch.Tensor, ages: torch.Tensor, part: int, values: torch.Tensor, age: float, partitions: int
) -> None:
    """Age-weighted merge of ``values`` into part ``part`` of ``x`` (in place, last axis), ages too."""
    view = x[..., part::partitions]
    merged, new_age = age_weighted_merge(view, ages[..., part], values[..., : view.shape[-1]], age)
    view.copy_(merged)
    ages[..., part] = new_age


class GossipLearning(AlgorithmBase):
    """Send to one random neighbour per gossip point; age-weighted merge on arrival.

    Hyperparameter: ``order``, ``"merge_update"`` (default) or ``"update_merge"``.
    """

    name: ClassVar[str] = "gossip"
    requirements: ClassVar[Requirements] = Requirements(weights="none", undirected=False)

    def __init__(self, *, order: str = "merge_update") -> None:
        self.order = check_choice("order", order, ORDERS)

    def targets(self, neighbours: Sequence[str], rng: random.Random, *, round: int = 0) -> list[str]:
        return [rng.choice(list(neighbours))] if neighbours else []

    def message(self, state: LocalState, *, targets: Sequence[str] = ()) -> Message:
        return Message(tensors={"params": state.params}, step=state.step, round=state.step, age=state.age)

    @torch.no_grad()
    def merge(self, state: LocalState, messages: Sequence[Message], weights: Mapping[str, float]) -> None:
        if not messages:
            return
        if self.order == "update_merge":  # keep copies (the buffers are reused) until the next step
            xs = torch.stack([m.tensors["params"] for m in messages])
            ages = torch.tensor([float(m.age) for m in messages], dtype=torch.float64)
            if "arrived" in state.extra:
                xs = torch.cat([state.extra["arrived"], xs])
                ages = torch.cat([state.extra["arrived_ages"], ages])
            state.extra["arrived"], state.extra["arrived_ages"] = xs, ages
            return
        for m in messages:
            merged, age = age_weighted_merge(state.params, state.age, m.tensors["params"], m.age)
            state.params.copy_(merged)
            state.age = float(age)

    def local_step(self, state: LocalState, trainer: Trainer) -> float:
        loss = trainer.step()
        arrived = state.extra.pop("arrived", None)
        ages = state.extra.pop("arrived_ages", None)
        if arrived is None or ages is None:
            return loss
        # update(x_j) on our data, then merge with update(x) (already taken); ages count the update.
        age: torch.Tensor | float = state.age + 1
        for x_j, a_j in zip(arrived, ages.tolist(), strict=True):
            _, grad = trainer.loss_and_grad(params=x_j)
            with torch.no_grad():
                x_j = x_j - trainer.lr * grad
                merged, age = age_weighted_merge(state.params, age, x_j, a_j + 1)
                state.params.copy_(merged)
        state.age = float(age) - 1  # the engine adds this step's 1
        return loss


class PartitionedGossip(AlgorithmBase):
    """Gossip learning that sends one random part of the parameters, with per-part ages.

    Hyperparameters: ``partitions`` (P >= 1; 1 is plain gossip learning), ``seed`` (part choice;
    mixed with the node's seed).
    """

    name: ClassVar[str] = "gossip_partitioned"
    requirements: ClassVar[Requirements] = Requirements(weights="none", undirected=False)

    def __init__(self, *, partitions: int = 4, seed: int = 0) -> None:
        self.partitions = check_int("partitions", partitions, minimum=1)
        self.seed = check_int("seed", seed)

    def tensor_specs(self, numel: int, dtype: torch.dtype) -> TensorSpecs:
        return {"part": ((math.ceil(numel / self.partitions),), dtype)}

    def init_state(self, state: LocalState) -> None:
        if self.partitions > state.params.numel():
            raise ValueError(f"partitions={self.partitions} exceeds the {state.params.numel()} parameters")
        state.extra["ages"] = torch.zeros(self.partitions, dtype=torch.float64)

    def targets(self, neighbours: Sequence[str], rng: random.Random, *, round: int = 0) -> list[str]:
        return [rng.choice(list(neighbours))] if neighbours else []

    def local_step(self, state: LocalState, trainer: Trainer) -> float:
        loss = trainer.step()
        state.extra["ages"].add_(1)
        return loss

    @torch.no_grad()
    def message(self, state: LocalState, *, targets: Sequence[str] = ()) -> Message:
        g = generator(state, self.seed)
        part = int(torch.randint(self.partitions, (), generator=g))
        keep_generator(state, g)
        numel = state.params.shape[-1]
        out = torch.zeros(math.ceil(numel / self.partitions), dtype=state.params.dtype)
        values = state.params[part :: self.partitions]
        out[: values.shape[-1]] = values
        return Message(tensors={"part": out}, step=state.step, round=state.step,
                       age=float(state.extra["ages"][part]), meta={"partition": part})

    @torch.no_grad()
    def merge(self, state: LocalState, messages: Sequence[Message], weights: Mapping[str, float]) -> None:
        for m in messages:
            part = m.meta.get("partition")
            if isinstance(part, bool) or not isinstance(part, int) or not 0 <= part < self.partitions:
                continue  # malformed: the shape was checked by the engine, the index is ours to check
            merge_partition(state.params, state.extra["ages"], part, m.tensors["part"], m.age, self.partitions)
