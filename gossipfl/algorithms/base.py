"""The seam between algorithm math and engines: batched state, declared messages, combined inbox.

Every algorithm is three small pieces of math over tensors with a leading node axis ``[N, ...]``
(N = 1 inside a `gossipfl.node.Node`, N = all nodes of a batch in the vectorised simulator):

- ``local_step(state, learner)``: the node's own computation (default: one SGD step). The engine
  supplies the `Learner` (gradients on each node's next minibatch, the shared optimiser).
- ``message(state, send)``: the tensors a node sends to its targets at a gossip point.
- ``merge(state, inbox)``: fold what arrived into the state. The algorithm never sees single
  messages: it DECLARES per message tensor (a `Channel`) how a receiver combines what arrived,
  and the engine hands it the combined `Inbox`. A node combines by looping over its messages
  (`gossipfl.algorithms.inbox.combine`); the vectorised engine by one sparse product per channel.

How an engine drives an algorithm (one "step" of a node):

    merge(state, inbox of what arrived)          # between steps, never during one
    loss = local_step(state, learner)
    if gossip point:
        targets drawn as ``algorithm.targets`` declares (every out-neighbour, or a random sample)
        tensors = message(state, send)           # one message, sent to every target
    evaluate(model(state))                       # push-sum evaluates x / w, not x

Pairwise algorithms (``requirements.pairwise``, AD-PSGD) exchange instead of pushing: the
initiator sends ``message``; the responder calls ``respond`` (atomically) and returns a reply;
the initiator calls ``apply_reply`` once the reply is in.

Combine rules (``Channel.combine``), for receiver i, messages m_j from senders j, mixing weights
w_ij (what the topology gives the receiver; engines pass 0 where an algorithm declares none):

``mix``       ``(1 - sum_j w_ij) s_i + sum_j w_ij m_j`` with ``s_i = state[channel.key]``
              (a missing neighbour's weight stays with the node: D-PSGD's convex combination)
``weighted``  ``sum_j w_ij m_j``
``sum``       ``sum_j m_j``
``mean``      ``(s_i + sum_j m_j) / (1 + count)``, the plain average with the node's own value
``each``      no combining: ``merge`` is called once per message, in arrival order
``gather``    no combining, all at once: ``values[key]`` is ``[R, K, ...]``, the K messages of each
              receiver in slots 0 .. count - 1 (sender order; the rest zero), and ``weight[key]``
              the ``[R, K]`` mixing weight of each slot (0 where empty): for robust aggregation
              (`gossipfl.algorithms.robust`), which must see every neighbour's value

With ``latest`` only each sender's newest message enters (D-PSGD mixes the freshest model of
each neighbour); otherwise every message counts exactly once (push-sum mass, CHOCO's deltas).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

import torch

__all__ = [
    "COMBINES", "Algorithm", "AlgorithmBase", "Channel", "Draws", "Edges", "Inbox", "Learner", "Message",
    "Requirements", "Send", "State", "Targets", "TensorSpecs",
]

State = dict[str, torch.Tensor]
"""An algorithm's state for N nodes: every entry ``[N, ...]``; ``"params"`` is the ``[N, D]`` model."""

# name -> (shape, dtype) of every tensor one node's message may carry (no node axis)
TensorSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]

Combine = Literal["mix", "weighted", "sum", "mean", "each", "gather"]
COMBINES: tuple[str, ...] = ("mix", "weighted", "sum", "mean", "each", "gather")


@dataclass(frozen=True, kw_only=True)
class Requirements:
    """What an algorithm assumes of the engine; engines refuse a mismatch with a clear error."""

    rounds: bool = False  # needs neighbour-local rounds (merge round r-1 from every in-neighbour)
    weights: str = "symmetric"  # "symmetric" (doubly stochastic), "column" (push-sum) or "none"
    undirected: bool = True  # needs an undirected graph
    lossless: bool = False  # breaks if messages are lost
    trains: bool = True  # runs local SGD steps (pure averaging does not)
    pairwise: bool = False  # exchanges with one peer atomically (AD-PSGD) instead of pushing
    static_topology: bool = False  # needs the same neighbours and weights every round (CHOCO's replicas)
    # pairwise, lock-step: who initiates in a round. "all": every node once, in node order;
    # "random": N clock ticks, each waking one node drawn uniformly at random (Boyd et al. 2006)
    wakes: str = "all"


@dataclass(frozen=True)
class Channel:
    """One tensor of a message and how a receiver's engine combines the copies that arrived.

    ``key`` names the tensor in the (decoded) message and, for ``mix`` and ``mean``, the state
    tensor that holds the receiver's own value. ``every``: the message carries it only at steps
    that are multiples of ``every`` (gradient exchange sends its model every k steps).
    ``local_update``: before combining, the receiver takes one plain SGD step on its own data
    from each arrived model (gossip learning's update-merge order); ``each`` channels only.
    ``replaces``: the algorithm's ``merge`` sets ``state[key]`` to the combined value and reads
    nothing else of its old value (``mix`` channels), so a node may combine into ``state[key]``
    itself: no model-sized result beside the receive buffer (the vectorised engine ignores it).
    """

    key: str
    combine: Combine
    latest: bool = True
    every: int = 1
    local_update: bool = False
    replaces: bool = False

    def __post_init__(self) -> None:
        if self.combine not in COMBINES:
            raise ValueError(f"channel {self.key!r}: combine must be one of {COMBINES}, got {self.combine!r}")


@dataclass(frozen=True)
class Targets:
    """Whom a node sends to at a gossip point: every out-neighbour (``all``), one random one
    (``one``), or ``count`` distinct random ones (``sample``; ``count`` 0 is Epidemic Learning's
    ``ceil(log2(d + 1))`` for d neighbours).
    """

    kind: Literal["all", "one", "sample"] = "all"
    count: int = 1

    def number(self, degree: int) -> int:
        """How many targets a node with ``degree`` out-neighbours draws."""
        if self.kind == "all":
            return degree
        if self.kind == "one":
            return min(1, degree)
        k = self.count or max(1, (degree).bit_length())  # ceil(log2(d + 1)) == bit_length(d)
        return min(k, degree)

    def numbers(self, degree: torch.Tensor) -> torch.Tensor:
        """`number` for a tensor of degrees."""
        if self.kind == "all":
            return degree
        if self.kind == "one":
            return degree.clamp_max(1)
        if self.count:
            return degree.clamp_max(self.count)
        k = torch.log2(degree.double() + 1).ceil().long().clamp_min(1)
        return torch.minimum(k, degree)


@dataclass(frozen=True)
class Send:
    """What an engine tells ``message`` about one gossip point of each sending node (``[S]`` each).

    ``targets``: how many targets each sender sends this message to; ``step``: its local step count
    (= the round of the message); ``rng``: the senders' random generators (see `Draws`).
    """

    targets: torch.Tensor
    step: torch.Tensor
    rng: Draws


class Draws:
    """Random draws for a batch of nodes: one generator per node (exact: a node's own draws), or one
    shared generator for all of them (fast, the vectorised engine's default)."""

    def __init__(self, generators: torch.Generator | Sequence[torch.Generator]) -> None:
        self.generators = generators

    @property
    def per_node(self) -> bool:
        return not isinstance(self.generators, torch.Generator)

    def randint(self, high: int, n: int, *, device: torch.device | None = None) -> torch.Tensor:
        """One integer in ``[0, high)`` per node, ``[n]`` int64."""
        if isinstance(self.generators, torch.Generator):
            return torch.randint(high, (n,), generator=self.generators, device=device)
        out = [int(torch.randint(high, (), generator=g)) for g in self.generators]
        return torch.tensor(out, dtype=torch.int64, device=device)

    def each(self, n: int) -> list[torch.Generator]:
        """A generator per node (the shared one n times in fast mode)."""
        if isinstance(self.generators, torch.Generator):
            return [self.generators] * n
        return list(self.generators)


@dataclass
class Edges:
    """A ``gather`` channel's arrivals as an edge list instead of padded slots, for a rule with a
    sparse form (`RobustRule.sparse`; the vectorised engine builds it, a node never does): message
    m goes to receiver ``r[m]`` with weight ``w[m]`` (float64), its value is row ``col[m]`` of
    ``values`` ``[V, ...]``."""

    r: torch.Tensor
    col: torch.Tensor
    w: torch.Tensor
    values: torch.Tensor


@dataclass
class Inbox:
    """What arrived for R receivers, combined as the algorithm's channels declare (``[R, ...]``).

    ``values[key]``: the combined tensor; ``count[key]``: messages that entered it; ``weight[key]``:
    the sum of the mixing weights of the distinct senders that entered it; ``neighbour_weight``:
    the sum of the receiver's mixing weights over ALL its in-neighbours (``1 - W_ii``), present or
    not (CHOCO's consensus step uses the whole row of W). ``each`` channels: one message per
    receiver, ``count`` 1.
    """

    values: dict[str, torch.Tensor | Edges]
    count: dict[str, torch.Tensor]
    weight: dict[str, torch.Tensor]
    neighbour_weight: torch.Tensor

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self.values[key]
        if isinstance(value, Edges):
            raise TypeError(f"channel {key!r} holds an edge list; read it with inbox.values")
        return value

    def __contains__(self, key: str) -> bool:
        return key in self.values


class Learner(Protocol):
    """What an engine supplies to ``local_step`` for a batch of nodes: gradients on each node's own
    next minibatch and the shared optimiser (`gossipfl.algorithms.optim.sgd_update`), whose momentum
    buffer the learner keeps. ``params`` arguments are ``[n, D]`` rows of the batch's nodes."""

    lr: float
    momentum: float
    weight_decay: float

    def grad(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Minibatch loss ``[n]`` and gradient ``[n, D]`` at ``params`` (no weight decay added)."""
        ...

    def sgd_step(self, params: torch.Tensor) -> torch.Tensor:
        """One SGD step (momentum, weight decay) in place on ``params``; returns the loss ``[n]``."""
        ...

    def apply(self, params: torch.Tensor, grad: torch.Tensor, where: torch.Tensor | None = None) -> None:
        """The optimiser's update with a given gradient, in place on ``params`` (``where``: only
        those rows move, and only their momentum)."""
        ...


@dataclass(frozen=True, kw_only=True)
class Message:
    """One node's message as it travels: the wire envelope adds identity, checks and signature.

    ``tensors`` are one node's (no node axis), in the algorithm's wire form (see ``decode``).
    """

    sender: str = ""
    tensors: Mapping[str, torch.Tensor]
    step: int = 0
    round: int = 0
    meta: Mapping[str, int | float | str | bool | None] = field(default_factory=dict)


class Algorithm(Protocol):
    """The interface engines call; implementations are small classes around pure functions."""

    name: ClassVar[str]
    requirements: ClassVar[Requirements]
    channels: tuple[Channel, ...]
    targets: Targets
    seed: int

    def tensor_specs(self, numel: int, dtype: torch.dtype) -> TensorSpecs:
        """Every tensor one node's message may carry (wire form, no node axis), so a node can reject
        wrong shapes before merging. A message may omit some (``Channel.every``), never add others."""
        ...

    def init_state(self, state: State) -> None:
        """Add the algorithm's tensors to ``state`` (``"params"`` ``[N, D]`` is there)."""
        ...

    def local_step(self, state: State, learner: Learner) -> torch.Tensor:
        """One local computation of every node of ``state``; returns the minibatch losses ``[N]``."""
        ...

    def message(self, state: State, send: Send) -> dict[str, torch.Tensor]:
        """What each node sends (``[N, ...]`` per tensor, wire form). Tensors may alias the state;
        engines copy them before the next step. May update the state (push-sum keeps its share)."""
        ...

    def decode(self, tensors: dict[str, torch.Tensor], numel: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The channel values ``[n, ...]`` of messages in wire form (CHOCO decompresses)."""
        ...

    def merge(self, state: State, inbox: Inbox) -> None:
        """Fold the combined inbox into ``state`` (every row received something)."""
        ...

    def model(self, state: State) -> torch.Tensor:
        """The models ``[N, D]`` the nodes would deploy (evaluated, averaged for consensus metrics)."""
        ...

    def expected_senders(self, in_neighbours: Sequence[str], *, round: int) -> list[str]:
        """Round algorithms: whose round-``round`` message a node waits for before its next step."""
        ...

    def respond(self, state: State, incoming: dict[str, torch.Tensor], *,
                snapshot: Snapshot | None = None) -> dict[str, torch.Tensor]:
        """Pairwise algorithms: the responders' side of one atomic exchange each (rows pair up).

        The reply is the responders' tensors from before the exchange. ``snapshot``, if given,
        copies them somewhere of the caller's (a node: into the reply's frame) and returns the
        copies, which the reply then is: no copy of the algorithm's own on top."""
        ...

    def apply_reply(self, state: State, reply: dict[str, torch.Tensor]) -> None:
        """Pairwise algorithms: the initiators' side once their replies arrived."""
        ...


Snapshot = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
"""Copies a pairwise reply's tensors (``[N, ...]``) out of the state and returns the copies."""


class AlgorithmBase:
    """Defaults for the optional parts of `Algorithm`: D-PSGD-shaped (send the model to every
    out-neighbour, mix the freshest ones); subclasses override what they need."""

    name: ClassVar[str] = ""
    requirements: ClassVar[Requirements] = Requirements()
    channels: tuple[Channel, ...] = (Channel("params", "mix"),)
    targets: Targets = Targets("all")
    seed: int = 0

    def tensor_specs(self, numel: int, dtype: torch.dtype) -> TensorSpecs:
        return {"params": ((numel,), dtype)}

    def init_state(self, state: State) -> None:
        return None

    def local_step(self, state: State, learner: Learner) -> torch.Tensor:
        return learner.sgd_step(state["params"])

    def message(self, state: State, send: Send) -> dict[str, torch.Tensor]:
        return {"params": state["params"]}

    def decode(self, tensors: dict[str, torch.Tensor], numel: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return tensors

    def merge(self, state: State, inbox: Inbox) -> None:
        raise NotImplementedError

    def model(self, state: State) -> torch.Tensor:
        return state["params"]

    def expected_senders(self, in_neighbours: Sequence[str], *, round: int) -> list[str]:
        return list(in_neighbours) if self.requirements.rounds else []

    def respond(self, state: State, incoming: dict[str, torch.Tensor], *,
                snapshot: Snapshot | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{self.name} is not a pairwise algorithm")

    def apply_reply(self, state: State, reply: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError(f"{self.name} is not a pairwise algorithm")


def draw_targets(targets: Targets, neighbours: Sequence[str], rng: random.Random) -> list[str]:
    """One node's targets at a gossip point (``neighbours`` sorted), drawn with its own ``rng``."""
    peers = list(neighbours)
    if targets.kind == "all":
        return peers
    if targets.kind == "one":
        return [rng.choice(peers)] if peers else []
    return sorted(rng.sample(peers, targets.number(len(peers))))
