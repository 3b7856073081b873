"""Combining what arrived, for many receivers at once: the vectorised engine's side of the seam.

An algorithm declares per message channel how a receiver combines what arrived (see
`gossipfl.algorithms.base`); here every combining channel becomes one sparse product on the node
axis: the ``[R, K]`` matrix of (receiver, message) weights times the ``[K, ...]`` message values.
``exact`` mode instead combines receiver by receiver with the node's own loop
(`gossipfl.algorithms.inbox.combine`), so float sums round exactly as in a node (CHOCO's
stochastic quantisation turns a last-bit difference into a whole quantisation step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gossipfl.algorithms._util import csr
from gossipfl.algorithms.base import Channel, Edges, Inbox, Message, State
from gossipfl.algorithms.inbox import combine as node_combine

__all__ = ["Arrivals", "combine_inbox", "exact_inbox", "gather_index", "gather_slots", "stack_slots"]


@dataclass
class Arrivals:
    """The messages that enter one channel: receiver position ``r`` (in the receivers' list), row
    ``col`` of the channel's value tensor, the receiver's weight ``w`` for the sender (float64) and
    the sender's node index ``send`` (``[M]`` each)."""

    r: torch.Tensor
    col: torch.Tensor
    w: torch.Tensor
    send: torch.Tensor


def _by_row(r: torch.Tensor, cols: torch.Tensor, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries (row ``r``, column ``cols``) in CSR order: (sort order, row pointers of ``rows`` rows)."""
    order = torch.argsort(r * width + cols)
    crow = torch.zeros(rows + 1, dtype=torch.int64, device=r.device)
    crow[1:] = torch.cumsum(torch.bincount(r, minlength=rows), 0)
    return order, crow


def _distinct_weight(a: Arrivals, rows: int, n: int) -> torch.Tensor:
    """Per receiver, the sum of its weights over the distinct senders among its arrivals (float64)."""
    out = torch.zeros(rows, dtype=torch.float64, device=a.r.device)
    if not a.r.numel():
        return out
    key = a.r * n + a.send
    uniq, inv = torch.unique(key, return_inverse=True)
    first = torch.full((uniq.shape[0],), -1, dtype=torch.int64, device=key.device)
    first.scatter_reduce_(0, inv, torch.arange(key.shape[0], device=key.device), reduce="amax", include_self=False)
    return out.index_add_(0, a.r[first], a.w[first].double())


def _product(a: Arrivals, values: torch.Tensor, rows: int, weighted: bool) -> torch.Tensor:
    """``sum_m A[r_m, col_m] values[col_m]`` per receiver row: ``[rows, ...]``."""
    shape = values.shape[1:]
    flat = values.reshape(values.shape[0], -1)
    order, crow = _by_row(a.r, a.col, rows, flat.shape[0])
    vals = (a.w if weighted else torch.ones_like(a.w)).to(flat.dtype)[order]
    m = csr(crow, a.col[order], vals, (rows, flat.shape[0]))
    return torch.sparse.mm(m, flat).reshape(rows, *shape)


def gather_index(a: Arrivals, rows: int, count: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each receiver's slots in sender order: the arrival in each slot ``[rows, K]`` (-1: an empty
    slot) and its weight ``[rows, K]`` (float64, 0 for an empty slot)."""
    k = int(count.max()) if count.numel() else 0
    idx = torch.full((rows, k), -1, dtype=torch.int64, device=a.r.device)
    w = torch.zeros(rows, k, dtype=torch.float64, device=a.r.device)
    if a.r.numel():
        order = torch.argsort(a.r * n + a.send)  # by receiver, then by sender
        r = a.r[order]
        first = torch.cumsum(count, 0) - count
        slot = torch.arange(r.shape[0], device=r.device) - first[r]
        idx[r, slot] = order
        w[r, slot] = a.w[order].double()
    return idx, w


def stack_slots(a: Arrivals, values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The values in the slots ``idx`` (from `gather_index`): ``[R, K, ...]``, zeros in empty slots."""
    flat = idx.reshape(-1)
    stack = values.index_select(0, a.col[flat.clamp_min(0)]).view(*idx.shape, *values.shape[1:])
    if bool((flat < 0).any()):
        stack[idx < 0] = 0
    return stack


def gather_slots(a: Arrivals, values: torch.Tensor, rows: int, count: torch.Tensor,
                 n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each receiver's messages in slots by sender order: ``[rows, K, ...]`` and their weights ``[rows, K]``."""
    idx, w = gather_index(a, rows, count, n)
    return stack_slots(a, values, idx), w


def combine_inbox(channels: Sequence[Channel], own: State, arrivals: dict[str, Arrivals],
                  values: dict[str, torch.Tensor], neighbour_weight: torch.Tensor, n: int, *,
                  fused: dict[str, torch.Tensor] | None = None, stacks: bool = True,
                  edges: bool = False) -> Inbox:
    """The `Inbox` of R receivers (``own``: their state rows) for combining channels.

    ``values[key]``: the message values the arrivals' ``col`` index; ``fused[key]``: a precomputed
    combined value (the sync schedule's ``M @ x`` with the cached mixing matrix) used as it is.
    ``stacks = False``: a ``gather`` channel's value is its slot index (`gather_index`), for the
    caller to build the stacks a block of receivers at a time (`stack_slots`); ``edges``: a
    ``gather`` channel's value is its arrivals as an `Edges` list (a rule with a sparse form).
    """
    rows = neighbour_weight.shape[0]
    out: dict[str, torch.Tensor | Edges] = {}
    count: dict[str, torch.Tensor] = {}
    weight: dict[str, torch.Tensor] = {}
    for c in channels:
        a = arrivals[c.key]
        count[c.key] = torch.bincount(a.r, minlength=rows)
        weight[c.key] = _distinct_weight(a, rows, n)
        if fused is not None and c.key in fused:
            out[c.key] = fused[c.key]
            continue
        v = values[c.key]
        if c.combine == "gather" and edges:
            out[c.key] = Edges(a.r, a.col, a.w, v)
            continue
        if c.combine == "gather":
            idx, weight[c.key] = gather_index(a, rows, count[c.key], n)
            out[c.key] = stack_slots(a, v, idx) if stacks else idx
            continue
        if c.combine == "mix":
            wsum = torch.zeros(rows, dtype=a.w.dtype, device=a.w.device).index_add_(0, a.r, a.w)
            base = own[c.key]
            res = base * (1.0 - wsum).to(base.dtype).view(-1, *([1] * (base.dim() - 1)))
            out[c.key] = res + _product(a, v, rows, True) if a.r.numel() else res
        elif c.combine == "mean":
            base = own[c.key]
            k = (1.0 + count[c.key].to(base.dtype)).view(-1, *([1] * (base.dim() - 1)))
            out[c.key] = (base + _product(a, v, rows, False)) / k if a.r.numel() else base.clone()
        else:
            like = own.get(c.key, v[:0])
            if a.r.numel():
                out[c.key] = _product(a, v, rows, c.combine == "weighted")
            else:
                out[c.key] = torch.zeros(rows, *v.shape[1:], dtype=v.dtype, device=v.device) \
                    if like.numel() == 0 else torch.zeros_like(like)
    return Inbox(values=out, count=count, weight=weight, neighbour_weight=neighbour_weight)


def exact_inbox(channels: Sequence[Channel], own: State, arrivals: dict[str, Arrivals],
                values: dict[str, torch.Tensor], neighbour_weight: torch.Tensor) -> Inbox:
    """`combine_inbox` receiver by receiver with the node's loop (``exact`` sampling): each
    receiver's messages in sender order, weights as Python floats (freshness was settled by the
    caller: the arrivals of a ``latest`` channel hold one message per sender)."""
    rows = neighbour_weight.shape[0]
    per_receiver: list[dict[tuple[int, int], dict[str, torch.Tensor]]] = [{} for _ in range(rows)]
    weights: list[dict[str, float]] = [{} for _ in range(rows)]
    for k, a in arrivals.items():
        for rr, cc, ww, ss in zip(a.r.tolist(), a.col.tolist(), a.w.double().tolist(), a.send.tolist(), strict=True):
            per_receiver[rr].setdefault((ss, cc), {})[k] = values[k][cc]
            weights[rr][f"{ss:012d}"] = ww  # zero-padded: names sort as indices, as node ids do
    per: list[Inbox] = []
    for i in range(rows):
        messages = [Message(sender=f"{s:012d}", tensors=t) for (s, _), t in sorted(per_receiver[i].items())]
        mine = {k: v[i:i + 1] for k, v in own.items()}
        got = node_combine(channels, mine, messages, weights[i], float(neighbour_weight[i]), lambda t: t)
        per.append(got[0])
    dev = neighbour_weight.device
    keys = [c.key for c in channels]
    for c in channels:  # gather: pad every receiver's slots to the widest
        if c.combine == "gather":
            k = max(b.values[c.key].shape[1] for b in per)
            for b in per:
                v, w = b.values[c.key], b.weight[c.key]
                b.values[c.key] = torch.cat([v, v.new_zeros(1, k - v.shape[1], *v.shape[2:])], 1)
                b.weight[c.key] = torch.cat([w, w.new_zeros(1, k - w.shape[1])], 1)
    return Inbox(values={k: torch.cat([b.values[k] for b in per]).to(dev) for k in keys},
                 count={k: torch.cat([b.count[k] for b in per]).to(dev) for k in keys},
                 weight={k: torch.cat([b.weight[k] for b in per]).to(dev) for k in keys},
                 neighbour_weight=neighbour_weight)
