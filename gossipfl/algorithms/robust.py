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
                    average exactly, as D-PSGD's mix does. ``tau = "auto"``: each receiver picks its
                    own radius, the weighted (1 - ``delta``) quantile of its neighbours' distances
                    |x_j - x_i|, so that the farthest neighbours holding a ``delta`` share of the
                    weight are clipped (the adaptive choice of He et al.'s experiments).
                    `clipped_gossip_edges` is the same rule on an edge list (no stack).
``balance``         BALANCE (Fang, Liu, Jia, Gong, CCS 2024): a neighbour is accepted when
                    |x_j - x_i| <= gamma exp(-kappa t / T) |x_i| (t: the receiver's step, T: the
                    run's steps); x_i <- alpha x_i + (1 - alpha) mean(accepted x_j), or x_i kept when
                    none is.

Every rule can also report, per receiver, how many neighbour contributions it ``clipped`` (clipped
gossip) and how many it ``discarded`` (Krum: not chosen; BALANCE: not accepted; trimmed mean and
median: trimmed in more than half of the coordinates; the median is the trimmed mean with the
largest b), into a ``stats`` dict the caller passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from gossipfl.algorithms._util import csr

__all__ = [
    "AGGREGATORS", "balance", "clip_scale", "clipped_gossip", "clipped_gossip_edges", "krum", "mean", "median",
    "trimmed_mean",
]


Stats = dict[str, torch.Tensor]
"""Per-receiver counts a rule reports: ``clipped`` and ``discarded``, ``[N]`` int64 each."""


def _check(own: torch.Tensor, others: torch.Tensor, mask: torch.Tensor) -> None:
    if others.dim() != 3 or own.dim() != 2 or others.shape[0] != own.shape[0] or others.shape[2] != own.shape[1]:
        raise ValueError(f"expected own [N, D] and others [N, K, D], got {list(own.shape)} and {list(others.shape)}")
    if tuple(mask.shape) != tuple(others.shape[:2]):
        raise ValueError(f"mask must be [N, K] = {list(others.shape[:2])}, got {list(mask.shape)}")


def _candidates(own: torch.Tensor, others: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """{x_i} and the x_j as one ``[N, 1 + K, D]`` stack, and its validity ``[N, 1 + K]`` (own first)."""
    stack = torch.cat([own.unsqueeze(1), others], 1)
    valid = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
    return stack, valid


def mean(own: torch.Tensor, others: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor,
         stats: Stats | None = None) -> torch.Tensor:
    """D-PSGD's mix: ``x_i + sum_j w_ij (x_j - x_i)`` over the slots that hold a message."""
    _check(own, others, mask)
    _report(stats, own, clipped=None, discarded=None)
    w = torch.where(mask, weights, torch.zeros_like(weights)).to(own.dtype)
    return own + (w.unsqueeze(2) * (others - own.unsqueeze(1))).sum(1)


def _report(stats: Stats | None, own: torch.Tensor, *, clipped: torch.Tensor | None,
            discarded: torch.Tensor | None) -> None:
    """Write the per-receiver counts ``[N]`` (int64) a rule produced into ``stats``."""
    if stats is None:
        return
    zero = torch.zeros(own.shape[0], dtype=torch.int64, device=own.device)
    stats["clipped"] = zero if clipped is None else clipped.to(torch.int64)
    stats["discarded"] = zero if discarded is None else discarded.to(torch.int64)


def _mostly_trimmed(keep_rank: torch.Tensor, order: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per receiver, how many neighbours (candidates 1..) were trimmed in more than half of the
    coordinates; ``order`` ``[N, C, D]``: the candidate at each sorted position, ``keep_rank``
    ``[N, C]``: which sorted positions are kept."""
    kept = torch.zeros(order.shape, dtype=torch.float32, device=order.device)
    kept.scatter_(1, order, keep_rank.unsqueeze(2).expand_as(order).to(torch.float32))
    share = kept.mean(2)  # [N, C]: the share of coordinates where candidate c was kept
    trimmed = (share < 0.5) & valid
    return trimmed[:, 1:].sum(1)


def median(own: torch.Tensor, others: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor,
           stats: Stats | None = None) -> torch.Tensor:
    """Coordinate-wise median of the receiver's own model and what arrived (``weights`` unused)."""
    _check(own, others, mask)
    stack, valid = _candidates(own, others, mask)
    stack = torch.where(valid.unsqueeze(2), stack, torch.full_like(stack, math.nan))
    med = stack.nanmedian(1)
    if stats is not None:  # the lower median's position is the one value kept per coordinate
        kept = torch.zeros(stack.shape, dtype=torch.float32, device=own.device)
        kept.scatter_(1, med.indices.unsqueeze(1), 1.0)
        trimmed = (kept.mean(2) < 0.5) & valid  # one value kept per coordinate: the rest trimmed
        _report(stats, own, clipped=None, discarded=trimmed[:, 1:].sum(1))
    return med.values


def trimmed_mean(own: torch.Tensor, others: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, *,
                 b: int = 1, stats: Stats | None = None) -> torch.Tensor:
    """Coordinate-wise mean after dropping the ``b`` largest and ``b`` smallest values."""
    _check(own, others, mask)
    if b < 0:
        raise ValueError(f"b must be >= 0, got {b}")
    stack, valid = _candidates(own, others, mask)
    count = valid.sum(1)  # [N]
    big = torch.finfo(stack.dtype).max
    # invalid slots sort last (+max) so the valid values take ranks 0 .. count - 1
    ordered, order = torch.where(valid.unsqueeze(2), stack, torch.full_like(stack, big)).sort(1)
    rank = torch.arange(stack.shape[1], device=stack.device).unsqueeze(0)  # [1, 1 + K]
    keep = (rank >= b) & (rank < (count - b).unsqueeze(1))  # [N, 1 + K]
    kept = keep.sum(1, keepdim=True)
    total = torch.where(keep.unsqueeze(2), ordered, torch.zeros_like(ordered)).sum(1)
    if stats is not None:
        _report(stats, own, clipped=None, discarded=_mostly_trimmed(keep, order, valid))
    return torch.where(kept > 0, total / kept.clamp_min(1).to(stack.dtype), own)


def krum(own: torch.Tensor, others: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, *,
         f: int = 1, m: int = 1, stats: Stats | None = None) -> torch.Tensor:
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
    if stats is not None:  # neighbours (candidates 1..) left out of the chosen m
        picked = torch.zeros_like(valid).scatter_(1, best, ok_pick)
        left = (valid & ~picked)[:, 1:].sum(1)
        _report(stats, own, clipped=None, discarded=torch.where(enough.squeeze(1), left, torch.zeros_like(left)))
    return torch.where(enough, agg, own)


def _weighted_quantile(values: torch.Tensor, weights: torch.Tensor, q: float) -> torch.Tensor:
    """Per row of ``values`` ``[N, K]`` (``weights`` ``[N, K]``, 0 for absent slots): the smallest value
    whose cumulative weight reaches the share ``q`` of the row's weight (+inf for a row without weight)."""
    ordered, idx = torch.where(weights > 0, values, torch.full_like(values, math.inf)).sort(1)
    w = weights.gather(1, idx)
    cum = w.cumsum(1)
    total = cum[:, -1:] if cum.shape[1] else cum.new_zeros(cum.shape[0], 1)
    reach = cum >= q * total - 1e-12 * total
    first = torch.where(reach, torch.arange(values.shape[1], device=values.device).expand_as(reach),
                        torch.full_like(idx, values.shape[1])).min(1).values
    out = ordered.gather(1, first.clamp_max(max(values.shape[1] - 1, 0)).unsqueeze(1)).squeeze(1) \
        if values.shape[1] else values.new_full((values.shape[0],), math.inf)
    return torch.where(total.squeeze(1) > 0, out, torch.full_like(out, math.inf))


def clip_scale(norm: torch.Tensor, radius: torch.Tensor | float) -> torch.Tensor:
    """clip_tau's factor min(1, tau / |z|) for distances ``norm`` (a zero distance: 1)."""
    return torch.clamp(radius / norm.clamp_min(torch.finfo(norm.dtype).tiny), max=1.0)


def clipped_gossip(own: torch.Tensor, others: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, *,
                   tau: float | str = 1.0, delta: float = 0.1, stats: Stats | None = None) -> torch.Tensor:
    """ClippedGossip: ``x_i + sum_j w_ij clip_tau(x_j - x_i)``; ``tau`` > 0 (inf: `mean`), or
    ``"auto"``: per receiver the weighted (1 - ``delta``) quantile of its neighbours' distances."""
    _check(own, others, mask)
    diff = others - own.unsqueeze(1)  # [N, K, D]
    norm = diff.norm(dim=2, keepdim=True)
    w = torch.where(mask, weights, torch.zeros_like(weights)).to(own.dtype)
    if tau == "auto":
        if not 0 <= delta < 1:
            raise ValueError(f"delta must be in [0, 1), got {delta}")
        radius = _weighted_quantile(norm.squeeze(2), w, 1.0 - delta).view(-1, 1, 1)
    else:
        if not isinstance(tau, int | float) or not tau > 0:
            raise ValueError(f"tau must be > 0 or \"auto\", got {tau!r}")
        radius = torch.full((own.shape[0], 1, 1), float(tau), dtype=own.dtype, device=own.device)
    scale = clip_scale(norm, radius)
    if stats is not None:
        _report(stats, own, clipped=((norm.squeeze(2) > radius.view(-1, 1)) & mask).sum(1), discarded=None)
    coef = (w * scale.squeeze(2)).unsqueeze(1)  # [N, 1, K]: one batched product reads diff once
    return own + torch.bmm(coef, diff).squeeze(1)


def clipped_gossip_edges(own: torch.Tensor, values: torch.Tensor, r: torch.Tensor, col: torch.Tensor,
                         w: torch.Tensor, *, tau: float | str = 1.0, delta: float = 0.1,
                         stats: Stats | None = None) -> torch.Tensor:
    """`clipped_gossip` for many receivers on an edge list instead of a padded stack: message m
    brings ``values[col[m]]`` (``values`` ``[V, D]``) to receiver ``r[m]`` (``own`` ``[R, D]``) with
    weight ``w[m]``. ``x_i + sum_m w_m s_m (x_m - x_i)`` with ``s_m = clip_scale(|x_m - x_i|, tau)``
    is a mix with weights ``w_m s_m``: one sparse product, so no ``[R, K, D]`` stack is built.

    The squared distances come from one sampled product ``<y_i, y_m>`` on the edges' pattern, with
    the models centred on the mean of a sample of them (``y = x - c``), so the rounding scales with
    the models' spread rather than their size; an edge whose estimate lies within that rounding's bound of
    tau^2 is measured directly, so every clip decision is the dense rule's, and a clipped edge's
    scale differs from it only by the product's rounding. A fixed ``tau`` only (``delta`` is not
    used; the adaptive radius needs each receiver's sorted distances: the dense form)."""
    if not isinstance(tau, int | float) or not tau > 0:
        raise ValueError(f"the edge form takes a fixed tau > 0, got {tau!r}")
    rows, dt = own.shape[0], own.dtype
    mine, theirs = own.reshape(rows, -1), values.reshape(values.shape[0], -1)
    if not r.numel():
        _report(stats, own, clipped=None, discarded=None)
        return own.clone()
    order = torch.argsort(r * theirs.shape[0] + col)
    rs, cs = r[order], col[order]
    crow = torch.zeros(rows + 1, dtype=torch.int64, device=r.device)
    crow[1:] = torch.cumsum(torch.bincount(rs, minlength=rows), 0)
    # any centre is exact (x - c rounds to within u |x - c|); one near the models keeps the spread small
    centre = theirs[:: max(1, theirs.shape[0] // 64)].mean(0)
    y_val = theirs - centre
    y_own = y_val if mine is theirs else mine - centre
    pattern = csr(crow, cs, torch.zeros(rs.shape[0], dtype=dt, device=r.device), (rows, theirs.shape[0]))
    dots = torch.sparse.sampled_addmm(pattern, y_own, y_val.T, beta=0.0).values().double()
    sq_val = torch.linalg.vector_norm(y_val, dim=1).double() ** 2
    sq_own = sq_val if mine is theirs else torch.linalg.vector_norm(y_own, dim=1).double() ** 2
    a, b = sq_own[rs], sq_val[cs]
    d2 = (a + b - 2.0 * dots).clamp_min(0.0)
    radius = float(torch.tensor(float(tau), dtype=dt))  # the dense rule compares in the models' dtype
    u, dim = torch.finfo(dt).eps, mine.shape[1]
    # |error| of d2: the product's and the norms' rounding (dim u (a + b) each, doubled for safety)
    # plus the centring's (2 |d| u (|y_i| + |y_j|) at |d| near the radius)
    band = 4.0 * dim * u * (a + b) + 4.0 * u * radius * (a.sqrt() + b.sqrt()) + 1e-300
    dist = d2.sqrt()
    near = ((d2 - radius * radius).abs() <= band).nonzero().squeeze(1)
    if near.numel():
        dist[near] = (theirs.index_select(0, cs[near]) - mine.index_select(0, rs[near])).norm(dim=1).double()
    clipped = dist > radius
    coef = w.double()[order] * torch.where(clipped, radius / dist.clamp_min(1e-300), torch.ones_like(dist))
    if stats is not None:
        _report(stats, own, clipped=torch.bincount(rs[clipped], minlength=rows), discarded=None)
    wsum = torch.zeros(rows, dtype=torch.float64, device=r.device).index_add_(0, rs, coef)
    out = torch.sparse.mm(csr(crow, cs, coef.to(dt), pattern.shape), theirs)
    return out.addcmul_(mine, (1.0 - wsum).to(dt).unsqueeze(1)).view_as(own)


def balance(own: torch.Tensor, others: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, *,
            gamma: float = 0.5, kappa: float = 1.0, alpha: float = 0.5, progress: torch.Tensor | float = 0.0,
            stats: Stats | None = None) -> torch.Tensor:
    """BALANCE: accept x_j when |x_j - x_i| <= gamma exp(-kappa lambda) |x_i| (``progress`` lambda =
    t / T, per receiver ``[N]`` or one number), then x_i <- alpha x_i + (1 - alpha) mean(accepted)."""
    _check(own, others, mask)
    lam = torch.as_tensor(progress, dtype=own.dtype, device=own.device).expand(own.shape[0])
    bound = gamma * torch.exp(-kappa * lam) * own.norm(dim=1)  # [N]
    dist = (others - own.unsqueeze(1)).norm(dim=2)  # [N, K]
    ok = mask & (dist <= bound.unsqueeze(1))
    n_ok = ok.sum(1, keepdim=True)
    accepted = (others * ok.unsqueeze(2)).sum(1) / n_ok.clamp_min(1).to(own.dtype)
    if stats is not None:
        _report(stats, own, clipped=None, discarded=(mask & ~ok).sum(1))
    return torch.where(n_ok > 0, alpha * own + (1.0 - alpha) * accepted, own)


Aggregator = Callable[..., torch.Tensor]
AGGREGATORS: dict[str, Aggregator] = {
    "mean": mean, "median": median, "trimmed_mean": trimmed_mean, "krum": krum, "clipped_gossip": clipped_gossip,
    "balance": balance,
}
"""Every rule by the name a run configuration gives (``aggregator = "..."``)."""
