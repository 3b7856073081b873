"""CHOCO-SGD: decentralized SGD with compressed communication.

Koloskova, Stich, Jaggi, "Decentralized Stochastic Optimization and Gossip Algorithms with
Compressed Communication", ICML 2019 (Algorithm 2; the memory-efficient form of their appendix).
Every node i keeps its model ``x_i``, a public copy ``x̂_i`` that all its neighbours also hold
exactly, and ``s_i = sum_{j != i} w_ij x̂_j``, the weighted sum of its neighbours' public copies.
One round, with Q a compression operator (:mod:`gossipfl.algorithms.compression`):

    x_i <- x_i - lr g_i(x_i)                                   local_step (the Trainer's SGD step)
    q_i  = Q(x_i - x̂_i);  x̂_i <- x̂_i + q_i;  send q_i         message
    s_i <- s_i + sum_j w_ij q_j                                 merge, next round
    x_i <- x_i + gamma (s_i - (sum_j w_ij) x̂_i)                 = x_i + gamma sum_j w_ij (x̂_j - x̂_i)

Only the compressed difference ``q_i`` travels; ``gamma`` is the consensus step size (1 with no
compression gives D-PSGD exactly; smaller for stronger compression). Unbiased operators are
divided by their second-moment factor ``tau`` (``rescale``), which makes them contractions as the
convergence proof requires: random-k then is plain (unscaled) random-k, QSGD sends its scale
divided by the exact ``tau`` of the vector it quantised (see
:mod:`~gossipfl.algorithms.compression`).

Needs: neighbour-local rounds, lossless delivery (a lost ``q_j`` desynchronises ``x̂_j`` for
good) and a static topology with symmetric doubly stochastic weights (``s_i`` sums fixed
neighbours with fixed weights). ``x̂`` and ``s`` start at zero, so the first messages carry the
(compressed) model itself.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from gossipfl.algorithms._util import check_bool, check_choice, check_int, check_real
from gossipfl.algorithms.base import AlgorithmBase, Channel, Inbox, Requirements, Send, State, TensorSpecs
from gossipfl.algorithms.compression import COMPRESSORS, QSGD, Compressor, RandomK, TopK, _Sparse, make_compressor

__all__ = ["CHOCO", "choco_consensus", "default_gamma"]


def choco_consensus(
    x: torch.Tensor, x_hat: torch.Tensor, s: torch.Tensor, weight_sum: torch.Tensor | float, gamma: float
) -> torch.Tensor:
    """``x + gamma (s - weight_sum x̂)``; ``weight_sum`` = sum of the neighbours' weights (``[...,1]`` or float)."""
    return x + gamma * (s - weight_sum * x_hat)


def default_gamma(compressor: Compressor) -> float:
    """A consensus step size that trained in ``scripts/bench_compression.py`` (tune it for your problem).

    Stronger compression needs a smaller gamma (the paper's gamma scales with the contraction
    delta): 1 uncompressed, sqrt(fraction) for top-k, fraction for random-k (its delta is exactly
    k/D), 1 / 0.8 / 0.4 for 8- / 4- / 2-bit QSGD.
    """
    if isinstance(compressor, TopK):
        return min(1.0, math.sqrt(compressor.fraction))
    if isinstance(compressor, RandomK):
        return compressor.fraction
    if isinstance(compressor, QSGD):
        return {8: 1.0, 4: 0.8, 2: 0.4}[compressor.bits]
    return 1.0


class CHOCO(AlgorithmBase):
    """CHOCO-SGD with a configurable compression operator.

    Hyperparameters: ``compression`` (``"none"``, ``"topk"``, ``"randomk"``, ``"qsgd"``),
    ``fraction`` (share of entries top-k/random-k send), ``bits`` (QSGD: 8, 4 or 2), ``norm``
    (QSGD scale: ``"max"`` or ``"l2"``), ``gamma`` (consensus step size in (0, 1]; omitted: a
    default for the operator, `default_gamma`), ``rescale`` (divide
    unbiased operators by tau), ``seed`` (compression draws; mixed with the node's seed).
    """

    name: ClassVar[str] = "choco"
    requirements: ClassVar[Requirements] = Requirements(
        rounds=True, lossless=True, weights="symmetric", undirected=True, static_topology=True
    )
    channels = (Channel("q", "weighted", latest=False),)

    def __init__(
        self,
        *,
        compression: str = "qsgd",
        fraction: float = 0.1,
        bits: int = 8,
        norm: str = "max",
        gamma: float | None = None,
        rescale: bool = True,
        seed: int = 0,
    ) -> None:
        check_choice("compression", compression, tuple(COMPRESSORS))
        _Sparse(fraction=fraction)  # validate every hyperparameter, used or not
        QSGD(bits=bits, norm=norm)
        self.compressor: Compressor = make_compressor(compression, fraction=fraction, bits=bits, norm=norm)
        self.gamma = default_gamma(self.compressor) if gamma is None else check_real(
            "gamma", gamma, low=0.0, high=1.0, low_open=True)
        self.rescale = check_bool("rescale", rescale)
        self.seed = check_int("seed", seed)

    def tensor_specs(self, numel: int, dtype: torch.dtype) -> TensorSpecs:
        return self.compressor.specs(numel, dtype)

    def init_state(self, state: State) -> None:
        state["x_hat"] = torch.zeros_like(state["params"])
        state["s"] = torch.zeros_like(state["params"])

    def decode(self, tensors: dict[str, torch.Tensor], numel: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {"q": self.compressor.decompress(tensors, numel, dtype, contract=self.rescale)}

    @torch.no_grad()
    def message(self, state: State, send: Send) -> dict[str, torch.Tensor]:
        p, x_hat = state["params"], state["x_hat"]
        diff = p - x_hat
        if send.rng.per_node:  # each node compresses with its own generator (on the host, as a node)
            parts = [self.compressor.compress(diff[i].cpu(), g, contract=self.rescale)
                     for i, g in enumerate(send.rng.each(p.shape[0]))]
            wire_tensors = {k: torch.stack([t[k] for t in parts]).to(p.device) for k in parts[0]} if parts else {}
        else:
            g = send.rng.generators
            assert isinstance(g, torch.Generator)
            wire_tensors = self.compressor.compress(diff, g, contract=self.rescale)
        x_hat.add_(self.decode(wire_tensors, p.shape[-1], p.dtype)["q"])
        return wire_tensors

    @torch.no_grad()
    def merge(self, state: State, inbox: Inbox) -> None:
        # every q_j counts once (x̂_j is the sum of all q_j ever sent); the consensus step uses the
        # whole row of W (sum over ALL in-neighbours), as x̂ of a silent neighbour still counts
        state["s"].add_(inbox["q"])
        nw = inbox.neighbour_weight.to(state["params"].dtype).unsqueeze(1)
        state["params"] = choco_consensus(state["params"], state["x_hat"], state["s"], nw, self.gamma)
