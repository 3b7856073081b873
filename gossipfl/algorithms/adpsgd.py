"""AD-PSGD: asynchronous decentralized SGD by atomic pairwise averaging.

Lian, Zhang, Zhang, Liu, "Asynchronous Decentralized Parallel Stochastic Gradient Descent",
ICML 2018. Each node trains at its own pace; at a gossip point it picks ONE random neighbour j and
the two replace their models by their average in one atomic exchange:

    x_i, x_j <- x_i + mix (x_j - x_i),  x_j + mix (x_i - x_j)          (mix = 1/2: both the average)

Order here: local SGD step, then the exchange (the paper computes the gradient before the
averaging and applies it after; the difference is one step of staleness either way).

The exchange (``POST /exchange``) in three atomic pieces, each under its own node's lock:

1. initiator ``message``: sends ``x_i`` and remembers that snapshot ``x_i^s``;
2. responder ``respond``: ``x_j <- x_j + mix (x_i^s - x_j)`` and replies with its PRE-exchange
   parameters ``x_j^old`` (what ``/exchange`` returns);
3. initiator ``apply_reply``: ``x_i <- x_i + mix (x_j^old - x_i^s)``.

The two updates are exact negatives of each other, so every completed exchange preserves the sum
of all parameters, whatever else happens to either node in between: a local step taken or an
exchange answered by the initiator while its request is in flight is kept, not overwritten (no
lost update), and no step needs two locks at once (no deadlock). An exchange whose reply is lost
after the responder updated moves mass once; nothing else breaks. Pushed messages, which a
pairwise engine does not send, are merged one-sidedly (``x_i <- x_i + mix (x_j - x_i)``).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from gossipfl.algorithms._util import check_real
from gossipfl.algorithms.base import AlgorithmBase, LocalState, Message, Requirements

__all__ = ["ADPSGD", "exchange_delta"]


def exchange_delta(own: torch.Tensor, other: torch.Tensor, mix: float = 0.5) -> torch.Tensor:
    """What ``own``'s holder adds in a pairwise exchange with ``other``: ``mix (other - own)``.

    The other side adds ``exchange_delta(other, own, mix)``, its exact negative.
    """
    return mix * (other - own)


class ADPSGD(AlgorithmBase):
    """Pairwise atomic averaging with one random neighbour per gossip point.

    Hyperparameter: ``mix`` in (0, 1], how far each side moves towards the other (1/2: average).
    """

    name: ClassVar[str] = "adpsgd"
    requirements: ClassVar[Requirements] = Requirements(pairwise=True, weights="none", undirected=True)

    def __init__(self, *, mix: float = 0.5) -> None:
        self.mix = check_real("mix", mix, low=0.0, high=1.0, low_open=True)

    def targets(self, neighbours: Sequence[str], rng: random.Random, *, round: int = 0) -> list[str]:
        return [rng.choice(list(neighbours))] if neighbours else []

    @torch.no_grad()
    def message(self, state: LocalState, *, targets: Sequence[str] = ()) -> Message:
        # One exchange in flight per initiator (the node takes no step until its reply is in):
        # older snapshots belong to exchanges that failed.
        for key in [k for k in state.extra if k.startswith("sent:")]:
            del state.extra[key]
        snapshot = state.params.clone()
        for t in targets or ("",):
            state.extra[f"sent:{t}"] = snapshot
        return Message(tensors={"params": snapshot}, step=state.step, round=state.step, age=state.age)

    @torch.no_grad()
    def respond(self, state: LocalState, incoming: Message) -> Message:
        old = state.params.clone()
        state.params.add_(exchange_delta(old, incoming.tensors["params"], self.mix))
        return Message(tensors={"params": old}, step=state.step, round=state.step, age=state.age)

    @torch.no_grad()
    def apply_reply(self, state: LocalState, reply: Message) -> None:
        sent = state.extra.pop(f"sent:{reply.sender}", None)
        if sent is None:
            sent = state.extra.pop("sent:", None)
        for key in [k for k in state.extra if k.startswith("sent:")]:
            del state.extra[key]
        base = state.params if sent is None else sent
        state.params.add_(exchange_delta(base, reply.tensors["params"], self.mix))

    @torch.no_grad()
    def merge(self, state: LocalState, messages: Sequence[Message], weights: Mapping[str, float]) -> None:
        for m in messages:
            state.params.add_(exchange_delta(state.params, m.tensors["params"], self.mix))
