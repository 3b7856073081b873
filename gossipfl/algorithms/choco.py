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
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from gossipfl.algorithms._util import check_bool, check_choice, check_int, check_real, generator, keep_generator
from gossipfl.algorithms.base import AlgorithmBase, LocalState, Message, Requirements, TensorSpecs
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

    def init_state(self, state: LocalState) -> None:
        state.extra["x_hat"] = torch.zeros_like(state.params)
        state.extra["s"] = torch.zeros_like(state.params)

    def _decoded(self, tensors: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        return self.compressor.decompress(tensors, like.shape[-1], like.dtype, contract=self.rescale)

    @torch.no_grad()
    def message(self, state: LocalState, *, targets: Sequence[str] = ()) -> Message:
        x_hat = state.extra["x_hat"]
        g = generator(state, self.seed)
        wire_tensors = self.compressor.compress(state.params - x_hat, g, contract=self.rescale)
        keep_generator(state, g)
        x_hat.add_(self._decoded(wire_tensors, state.params))
        return Message(tensors=wire_tensors, step=state.step, round=state.step, age=state.age)

    @torch.no_grad()
    def merge(self, state: LocalState, messages: Sequence[Message], weights: Mapping[str, float]) -> None:
        s = state.extra["s"]
        merged = False
        for m in messages:  # every q_j counts once: x̂_j is the sum of all q_j ever sent
            w = weights.get(m.sender)
            if w is None:
                continue
            s.add_(self._decoded(m.tensors, state.params), alpha=w)
            merged = True
        if merged:
            state.params.copy_(
                choco_consensus(state.params, state.extra["x_hat"], s, sum(weights.values()), self.gamma)
            )
