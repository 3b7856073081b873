"""AD-PSGD: asynchronous decentralized SGD by atomic pairwise averaging.

Lian, Zhang, Zhang, Liu, "Asynchronous Decentralized Parallel Stochastic Gradient Descent",
ICML 2018. Each node trains at its own pace; at a gossip point it picks ONE random neighbour j and
the two replace their models by their average in one atomic exchange:

    x_i, x_j <- x_i + mix (x_j - x_i),  x_j + mix (x_i - x_j)          (mix = 1/2: both the average)

Order here: local SGD step, then the exchange (the paper computes the gradient before the
averaging and applies it after; the difference is one step of staleness either way).

The exchange (``POST /exchange``) in three atomic pieces, each under its own node's lock:

1. initiator ``message``: sends ``x_i`` and remembers that snapshot ``x_i^s`` (``state["sent"]``);
2. responder ``respond``: ``x_j <- x_j + mix (x_i^s - x_j)`` and replies with its PRE-exchange
   parameters ``x_j^old`` (what ``/exchange`` returns);
3. initiator ``apply_reply``: ``x_i <- x_i + mix (x_j^old - x_i^s)``.

The two updates are exact negatives of each other, so every completed exchange preserves the sum
of all parameters, whatever else happens to either node in between, and no step needs two locks at
once. Both engines also keep the exchange atomic: an initiator whose exchange is in flight takes
no step and answers nobody -- it refuses a request from a lower id at once (423; the refused
initiator tries a fresh partner) and defers one from a higher id until its own exchange settles --
so ``x_i = x_i^s`` when the reply arrives and both sides end exactly at the average
``(x_i^s + x_j^old) / 2`` (variance shrinks as theory says). No deadlock: a request waits only for
an in-flight initiator with a lower id, so a chain of waits has decreasing ids and never closes
into a cycle (`gossipfl.sim._pairwise` spells out the protocol). An exchange whose reply is lost
after the responder updated moves mass once; nothing else breaks. Pushed messages, which a
pairwise engine does not send, are merged one-sidedly (``x_i <- x_i + mix (x_j - x_i)``).
Rows of ``respond``'s and ``apply_reply``'s arguments pair up: row k of the state is the node
that answers (or receives the reply to) row k of the message.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from gossipfl.algorithms._util import check_real
from gossipfl.algorithms.base import AlgorithmBase, Channel, Inbox, Requirements, Send, Snapshot, State, Targets

__all__ = ["ADPSGD", "PairwiseAveraging", "add_exchange_delta", "exchange_delta"]


def exchange_delta(own: torch.Tensor, other: torch.Tensor, mix: float = 0.5) -> torch.Tensor:
    """What ``own``'s holder adds in a pairwise exchange with ``other``: ``mix (other - own)``.

    The other side adds ``exchange_delta(other, own, mix)``, its exact negative.
    """
    return mix * (other - own)


_CHUNK = 1 << 18  # elements per slice of `add_exchange_delta`'s temporary (1 MB of float32)


def add_exchange_delta(target: torch.Tensor, own: torch.Tensor, other: torch.Tensor, mix: float = 0.5) -> None:
    """``target += exchange_delta(own, other, mix)``, element for element the same floats, with a
    temporary of at most `_CHUNK` elements per row instead of two of the model's size: for a
    100M-parameter model the difference between 1.2 GB and 1 MB of scratch per exchange.
    ``target`` may be ``own`` itself."""
    width = target.shape[-1] if target.dim() else 1
    if width <= _CHUNK:
        target.add_(exchange_delta(own, other, mix))
        return
    scratch = torch.empty((*target.shape[:-1], _CHUNK), dtype=target.dtype, device=target.device)
    for start in range(0, width, _CHUNK):
        end = min(start + _CHUNK, width)
        tmp = scratch[..., : end - start]
        torch.sub(other[..., start:end], own[..., start:end], out=tmp)
        tmp.mul_(mix)
        target[..., start:end].add_(tmp)


class ADPSGD(AlgorithmBase):
    """Pairwise atomic averaging with one random neighbour per gossip point.

    Hyperparameter: ``mix`` in (0, 1], how far each side moves towards the other (1/2: average).
    """

    name: ClassVar[str] = "adpsgd"
    requirements: ClassVar[Requirements] = Requirements(pairwise=True, weights="none", undirected=True)
    channels = (Channel("params", "each"),)
    targets = Targets("one")

    def __init__(self, *, mix: float = 0.5) -> None:
        self.mix = check_real("mix", mix, low=0.0, high=1.0, low_open=True)

    def init_state(self, state: State) -> None:
        state["sent"] = torch.zeros_like(state["params"])  # the snapshot of the exchange in flight

    @torch.no_grad()
    def message(self, state: State, send: Send) -> dict[str, torch.Tensor]:
        # one exchange in flight per initiator (it takes no step until its reply is in)
        state["sent"] = state["params"].clone()
        return {"params": state["sent"]}

    @torch.no_grad()
    def respond(self, state: State, incoming: dict[str, torch.Tensor], *,
                snapshot: Snapshot | None = None) -> dict[str, torch.Tensor]:
        params = state["params"]
        old = snapshot({"params": params})["params"] if snapshot is not None else params.clone()
        add_exchange_delta(params, old, incoming["params"], self.mix)
        return {"params": old}

    @torch.no_grad()
    def apply_reply(self, state: State, reply: dict[str, torch.Tensor]) -> None:
        add_exchange_delta(state["params"], state["sent"], reply["params"], self.mix)

    @torch.no_grad()
    def merge(self, state: State, inbox: Inbox) -> None:
        add_exchange_delta(state["params"], state["params"], inbox["params"], self.mix)


class PairwiseAveraging(ADPSGD):
    """Randomized gossip: no training; at each clock tick one node drawn uniformly at random
    wakes and averages with one uniformly random neighbour (Boyd, Ghosh, Prabhakar, Shah,
    "Randomized Gossip Algorithms", IEEE Trans. Inf. Theory 52(6), 2006).

    The exchange is AD-PSGD's (sum-conserving deltas). In the lock-step schedule a round is N
    ticks (`gossipfl.sim.wakeups`); on the complete graph the second moment then decays exactly as
    E||x_k - mean||^2 = (1 - 1/(n-1))^k ||x_0 - mean||^2 after k ticks (each tick removes half of
    the woken pair's squared difference, on average 2 V / (n - 1); Chatterjee et al.,
    arXiv:1911.02756). In the async schedule each node wakes on its own clock instead.
    """

    name: ClassVar[str] = "pairwise_averaging"
    requirements: ClassVar[Requirements] = Requirements(pairwise=True, weights="none", undirected=True,
                                                        trains=False, wakes="random")
