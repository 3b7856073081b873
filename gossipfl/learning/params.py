"""Parameters as one flat contiguous vector, plus a fingerprint of their layout.

A flat vector makes every message one buffer, every merge one vector operation, and lets the
vectorised simulator stack N models as an [N, D] tensor. The fingerprint (names, shapes, dtypes)
lets a node refuse a peer whose model differs before it averages nonsense.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ParamLayout", "param_layout"]


@dataclass(frozen=True)
class ParamLayout:
    """Where each named parameter lives in the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int
    dtype: torch.dtype
    fingerprint: str

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views into ``flat`` (no copy) keyed by parameter name; works with a leading batch axis."""
        lead = flat.shape[:-1]
        out = {}
        for name, shape, off in zip(self.names, self.shapes, self.offsets, strict=True):
            n = _prod(shape)
            out[name] = flat[..., off : off + n].reshape(*lead, *shape)
        return out

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Copy named tensors into a new flat vector in layout order."""
        return torch.cat([tensors[n].detach().reshape(-1).to(self.dtype) for n in self.names])


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def param_layout(model: nn.Module) -> ParamLayout:
    """Describe ``model``'s parameters; the fingerprint is a short SHA-256 of names/shapes/dtypes."""
    names, shapes, offsets = [], [], []
    off = 0
    dtype = None
    for name, p in model.named_parameters():
        names.append(name)
        shapes.append(tuple(p.shape))
        offsets.append(off)
        off += p.numel()
        dtype = p.dtype if dtype is None else dtype
    assert dtype is not None, "build_model refuses models without parameters"
    desc = json.dumps([[n, list(s), str(dtype)] for n, s in zip(names, shapes, strict=True)])
    fp = hashlib.sha256(desc.encode()).hexdigest()[:16]
    return ParamLayout(tuple(names), tuple(shapes), tuple(offsets), off, dtype, fp)
