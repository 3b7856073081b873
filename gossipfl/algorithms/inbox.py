"""How a node combines the messages it received into an `Inbox`, by looping over them.

The vectorised engine combines the same way for all receivers at once (sparse products over the
node axis); this module is the reference form, used by `gossipfl.node.Node` (N = 1) and by the
vectorised engine's ``exact`` sampling, where float summation order must match the node's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import torch

from gossipfl.algorithms.base import Channel, Inbox, Message

__all__ = ["combine", "count_tensor", "latest_per_sender", "mix", "mix_into"]


@functools.lru_cache(maxsize=4096)
def _weight_tensor(x: float) -> torch.Tensor:
    """``[x]`` in float64, shared: a node merges with the same few weights again and again, and a
    new tiny tensor costs more than the merge's arithmetic. Inbox tensors are read, never written."""
    return torch.tensor([x], dtype=torch.float64)


@functools.lru_cache(maxsize=4096)
def _weights_row(ws: tuple[float, ...], dtype: torch.dtype) -> torch.Tensor:
    """The mixing weights of one merge's senders, shared like `_weight_tensor`."""
    return torch.tensor(ws, dtype=dtype)


@functools.lru_cache(maxsize=1024)
def count_tensor(n: int) -> torch.Tensor:
    """``[n]`` in int64, shared like `_weight_tensor` (counts of messages, of targets)."""
    return torch.tensor([n], dtype=torch.int64)


def mix(x: torch.Tensor, others: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x + sum_k w_k (others_k - x); shapes x [..., D], others [..., K, D], weights [..., K].

    Written as (1 - sum w) x + sum w_k others_k so it is one fused matmul on the node axis.
    """
    self_w = 1.0 - weights.sum(-1, keepdim=True)
    return self_w * x + (weights.unsqueeze(-2) @ others).squeeze(-2)


def latest_per_sender(messages: Sequence[Message]) -> dict[str, Message]:
    """Keep the newest message of each sender (by step; later arrival wins ties)."""
    latest: dict[str, Message] = {}
    for m in messages:
        old = latest.get(m.sender)
        if old is None or m.step >= old.step:
            latest[m.sender] = m
    return latest


Decoder = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def combine(
    channels: Sequence[Channel],
    own: Mapping[str, torch.Tensor],
    messages: Sequence[Message],
    weights: Mapping[str, float],
    neighbour_weight: float,
    decode: Decoder,
    *,
    in_place: bool = False,
) -> list[Inbox]:
    """The inbox(es) of one receiver: one `Inbox` for combining channels, one per message for
    ``each`` channels (in arrival order). ``own``: the receiver's state (``[1, ...]`` tensors);
    ``weights``: sender -> mixing weight (0 for senders it lacks); ``decode``: the algorithm's
    wire-to-channel decoding, applied to ``[1, ...]`` tensors. ``in_place``: a ``replaces``
    channel is combined into ``own[key]`` itself, whose old value is then gone (a node: its
    merge replaces it anyway; the same numbers, without a model-sized result)."""
    if not messages:
        return []
    nw = _weight_tensor(float(neighbour_weight))
    decoded = [decode({k: t.unsqueeze(0) for k, t in m.tensors.items()}) for m in messages]
    if all(c.combine == "each" for c in channels):
        return [Inbox(values={c.key: d[c.key] for c in channels},
                      count={c.key: count_tensor(1) for c in channels},
                      weight={c.key: _weight_tensor(float(weights.get(m.sender, 0.0))) for c in channels},
                      neighbour_weight=nw)
                for m, d in zip(messages, decoded, strict=True)]
    values: dict[str, torch.Tensor] = {}
    count: dict[str, torch.Tensor] = {}
    wsum: dict[str, torch.Tensor] = {}
    for c in channels:
        have = [(m, d[c.key]) for m, d in zip(messages, decoded, strict=True) if c.key in d]
        if c.latest:
            newest = latest_per_sender([m for m, _ in have])
            picked = {id(m) for m in newest.values()}
            by_sender = {m.sender: v for m, v in have if id(m) in picked}
            entries = [(s, by_sender[s]) for s in newest]
        else:
            entries = [(m.sender, v) for m, v in have]
        senders = {s for s, _ in entries}
        count[c.key] = count_tensor(len(entries))
        if c.combine == "gather":  # the slots as they are, in sender order
            entries.sort(key=lambda e: e[0])
            like = own[c.key] if c.key in own else own["params"]
            values[c.key] = torch.cat([v for _, v in entries]).unsqueeze(0) if entries else \
                like.new_zeros(1, 0, *like.shape[1:])
            wsum[c.key] = torch.tensor([[float(weights.get(s, 0.0)) for s, _ in entries]], dtype=torch.float64)
            continue
        wsum[c.key] = _weight_tensor(float(sum(weights.get(s, 0.0) for s in senders)))
        values[c.key] = _combine_one(c, own, entries, weights, in_place and c.replaces)
    return [Inbox(values=values, count=count, weight=wsum, neighbour_weight=nw)]


def _combine_one(c: Channel, own: Mapping[str, torch.Tensor], entries: list[tuple[str, torch.Tensor]],
                 weights: Mapping[str, float], in_place: bool = False) -> torch.Tensor:
    """One channel's combined value ``[1, ...]`` from (sender, value ``[1, ...]``) entries.

    One message is used where it lies (a view, no ``torch.cat`` copy), and ``mix`` builds its
    result in one fresh tensor: a node merging a 400 MB model then holds the receive buffer and
    that result, not four model-sized temporaries. The arithmetic is the same operations on the
    same values, so the numbers are the same bit for bit."""
    if not entries:
        if c.combine in ("mix", "mean"):
            return own[c.key]
        return torch.zeros_like(own[c.key] if c.key in own else own["params"])
    others = entries[0][1] if len(entries) == 1 else torch.cat([v for _, v in entries])  # [K, ...]
    shape = others.shape[1:]
    flat = others.reshape(others.shape[0], -1)
    if c.combine == "sum":
        return flat.sum(0, keepdim=True).reshape(1, *shape)
    if c.combine == "mean":
        return ((own[c.key].reshape(1, -1) + flat.sum(0, keepdim=True)) / (1 + flat.shape[0])).reshape(1, *shape)
    w = _weights_row(tuple(float(weights.get(s, 0.0)) for s, _ in entries), others.dtype)
    if c.combine == "weighted":
        return (w.unsqueeze(0) @ flat).reshape(1, *shape)
    x = own[c.key].reshape(-1)
    if x.dtype != flat.dtype or x.device != flat.device or not flat.is_contiguous():
        return mix(x, flat, w).reshape(1, *shape)  # "mix", with type promotion
    return mix_into(x, flat, w, in_place=in_place).reshape(1, *shape)  # "mix"


MIX_CHUNK = 1 << 16
"""Elements per slice of `mix_into`'s self term: a 256 KB scratch (float32) instead of a model-sized one."""


@torch.no_grad()
def mix_into(x: torch.Tensor, others: torch.Tensor, weights: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
    """`mix` for one receiver (x ``[D]``, others ``[K, D]`` contiguous, weights ``[K]``, one dtype)
    into one new ``[D]`` tensor, or with ``in_place`` into ``x`` itself, with no other
    model-sized temporary (one, the neighbour term, for K > 1 senders).

    Bit-identical to `mix`: the neighbour term is the same matrix product (for one sender, whose
    product is a single rounding w * v per element, the elementwise product), the self term
    ``(1 - sum w) * x`` the same elementwise product, and they are added slice by slice; each
    slice depends on the same slice of x only, and a + b == b + a in IEEE arithmetic.
    (``torch.add(..., alpha=)`` would fuse the multiply and add, rounding once: other numbers.)
    """
    self_w = 1.0 - weights.sum(-1, keepdim=True)
    n = x.shape[0]
    one = others.shape[0] == 1  # one sender: no BLAS call (nor its packing buffers)
    product = None if one else torch.mm(weights.unsqueeze(0), others)[0]  # rounded as `mix` rounds it
    out = x if in_place else product if product is not None else torch.empty_like(x)
    scratch = torch.empty(min(MIX_CHUNK, n), dtype=x.dtype, device=x.device)
    for start in range(0, n, MIX_CHUNK):
        end = min(start + MIX_CHUNK, n)
        part = scratch[:end - start]
        if in_place:  # x <- self_w * x + neighbour term
            neighbours = part if product is None else product[start:end]
            if product is None:
                torch.mul(others[0, start:end], weights, out=part)
            x[start:end].mul_(self_w).add_(neighbours)
        else:  # out (the neighbour term, or filled with it) += self_w * x
            if product is None:
                torch.mul(others[0, start:end], weights, out=out[start:end])
            torch.mul(x[start:end], self_w, out=part)
            out[start:end].add_(part)
    return out
