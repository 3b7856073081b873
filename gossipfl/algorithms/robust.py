"""Robust aggregation rules: how a node folds its neighbours' models into its own when some
neighbours may be faulty or malicious. Pure batched functions, written once for every engine.

Every rule takes, for N receivers at once,

- ``own``     ``[N, D]``: each receiver's own model x_i,
- ``others``  ``[N, K, D]``: the models that arrived, padded to the largest in-degree K,
- ``mask``    ``[N, K]`` bool: which of the K slots hold a message,
- ``weights`` ``[N, K]``: the receiver's mixing weight w_ij for each slot (0 where masked),

and returns the aggregated models ``[N, D]``. A node has N = 1; the vectorised engine gathers each
receiver's arrivals into the padded stack. The rules:

``mean``            x_i + sum_j w_ij (x_j - x_i): D-PSGD's mix, no defence (the reference).
``median``          coordinate-wise median of {x_i} and the x_j (the lower one of an even count).
``trimmed_mean``    coordinate-wise: drop the ``b`` largest and ``b`` smallest of {x_i} and the x_j,
                    average the rest (needs 2b + 1 values; with fewer the node keeps x_i).
``krum``            Krum / multi-Krum (Blanchard et al., NeurIPS 2017) over {x_i} and the x_j: each
                    candidate's score is the sum of squared distances to its c - f - 2 nearest
                    others (c candidates); the mean of the ``m`` best-scored candidates.
``clipped_gossip``  x_i + sum_j w_ij clip_tau(x_j - x_i), clip_tau(z) = z min(1, tau / |z|)
                    (He, Karimireddy, Jaggi, "Byzantine-robust decentralized learning via
                    ClippedGossip", 2022). A neighbour moves x_i by at most w_ij tau; with tau = inf
                    it is ``mean``. clip is odd, so on symmetric weights the rule keeps the nodes'
                    average exactly, as D-PSGD's mix does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["AGGREGATORS", "clipped_gossip", "krum", "mean", "median", "trimmed_mean"]


def _check(own: torch.Tensor, others: torch.Tensor, mask: torch.Tensor) -> None:
    if others.dim() != 3 or own.dim() != 2 or others.shape[0] != own.shape[0] or others.shape[2] != own.shape[1]:
        raise ValueError(f"expected own [N, D] and others [N, K, D], got {list(own.shape)} and {list(others.shape)}")
    if tuple(mask.shape) != tuple(others.shape[:2]):
        raise ValueError(f"mask must be [N, K] = {list(others.shape[:2])}, got {list(mask.shape)}")


def mean(own: torch.Tensor, others: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """D-PSGD's mix: ``x_i + sum_j w_ij (x_j - x_i)`` over the slots that hold a message."""
    _check(own, others, mask)
    w = torch.where(mask, weights, torch.zeros_like(weights)).to(own.dtype)
    return own + (w.unsqueeze(2) * (others - own.unsqueeze(1))).sum(1)


def _candidates(own: torch.Tensor, others: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """{x_i} and the x_j as one ``[N, 1 + K, D]`` stack, and its validity ``[N, 1 + K]`` (own first)."""
    stack = torch.cat([own.unsqueeze(1), others], 1)
    valid = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
    return stack, valid


def median(own: torch.Tensor, others: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of the receiver's own model and what arrived (``weights`` unused)."""
    _check(own, others, mask)
    stack, valid = _candidates(own, others, mask)
    stack = torch.where(valid.unsqueeze(2), stack, torch.full_like(stack, math.nan))
    return stack.nanmedian(1).values


def trimmed_mean(own: torch.Tensor, others: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, *,
                 b: int = 1) -> torch.Tensor:
    """Coordinate-wise mean after dropping the ``b`` largest and ``b`` smallest values."""
    _check(own, others, mask)
    if b < 0:
        raise ValueError(f"b must be >= 0, got {b}")
    stack, valid = _candidates(own, others, mask)
    count = valid.sum(1)  # [N]
    big = torch.finfo(stack.dtype).max
    # invalid slots sort last (+max) so the valid values take ranks 0 .. count - 1
    ordered = torch.where(valid.unsqueeze(2), stack, torch.full_like(stack, big)).sort(1).values
    rank = torch.arange(stack.shape[1], device=stack.device).unsqueeze(0)  # [1, 1 + K]
    keep = (rank >= b) & (rank < (count - b).unsqueeze(1))  # [N, 1 + K]
    kept = keep.sum(1, keepdim=True)
    total = torch.where(keep.unsqueeze(2), ordered, torch.zeros_like(ordered)).sum(1)
    return torch.where(kept > 0, total / kept.clamp_min(1).to(stack.dtype), own)


def krum(own: torch.Tensor, others: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, *,
         f: int = 1, m: int = 1) -> torch.Tensor:
    """(Multi-)Krum among the receiver's own model and what arrived; needs c >= f + 3 candidates
    (c - f - 2 >= 1 neighbours in each score), else the node keeps its own model."""
    _check(own, others, mask)
    if f < 0 or m < 1:
        raise ValueError(f"krum needs f >= 0 and m >= 1, got f={f}, m={m}")
    stack, valid = _candidates(own, others, mask)
    count = valid.sum(1)  # [N]
    c = stack.shape[1]
    d2 = torch.cdist(stack, stack, compute_mode="donot_use_mm_for_euclid_dist").square()  # [N, c, c], exact
    pair = valid.unsqueeze(1) & valid.unsqueeze(2)
    eye = torch.eye(c, dtype=torch.bool, device=stack.device).unsqueeze(0)
    d2 = torch.where(pair & ~eye, d2, torch.full_like(d2, math.inf))  # no self, no missing candidate
    near = (count - f - 2).clamp_min(0)  # neighbours that enter each score
    ordered = d2.sort(2).values
    rank = torch.arange(c, device=stack.device).view(1, 1, c)
    within = rank < near.view(-1, 1, 1)
    score = torch.where(within, ordered, torch.zeros_like(ordered)).sum(2)  # [N, c]
    score = torch.where(valid, score, torch.full_like(score, math.inf))
    pick = min(m, c)
    best = score.topk(pick, dim=1, largest=False).indices  # [N, pick]
    chosen = stack.gather(1, best.unsqueeze(2).expand(-1, -1, stack.shape[2]))
    ok_pick = valid.gather(1, best)  # fewer valid candidates than m: average the valid ones only
    agg = (chosen * ok_pick.unsqueeze(2)).sum(1) / ok_pick.sum(1, keepdim=True).clamp_min(1).to(stack.dtype)
    enough = (near >= 1).unsqueeze(1)
    return torch.where(enough, agg, own)


def clipped_gossip(own: torch.Tensor, others: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, *,
                   tau: float = 1.0) -> torch.Tensor:
    """ClippedGossip: ``x_i + sum_j w_ij clip_tau(x_j - x_i)``; ``tau`` > 0 (inf: `mean`)."""
    _check(own, others, mask)
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    diff = others - own.unsqueeze(1)  # [N, K, D]
    norm = diff.norm(dim=2, keepdim=True)
    scale = torch.clamp(tau / norm.clamp_min(torch.finfo(own.dtype).tiny), max=1.0)
    w = torch.where(mask, weights, torch.zeros_like(weights)).to(own.dtype)
    return own + (w.unsqueeze(2) * diff * scale).sum(1)


Aggregator = Callable[..., torch.Tensor]
AGGREGATORS: dict[str, Aggregator] = {
    "mean": mean, "median": median, "trimmed_mean": trimmed_mean, "krum": krum, "clipped_gossip": clipped_gossip,
}
"""Every rule by the name a run configuration gives (``aggregator = "..."``)."""
