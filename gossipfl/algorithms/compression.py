"""Compression operators for compressed gossip (CHOCO-SGD): top-k, random-k, QSGD-style quantisation.

Each operator turns a dense vector ``x`` (shape ``[..., D]``, any leading node axes) into the few
tensors that travel on the wire, and back. The wire tensors have fixed shapes for a given ``D``
(``k`` is derived from the ``fraction`` hyperparameter and ``D`` deterministically), so a node can
validate a message against :meth:`Compressor.specs` before touching it.

============  ==============================================  ======================  ===========
operator      on the wire                                     bytes / dense bytes     E[C(x)]
============  ==============================================  ======================  ===========
``none``      ``q`` (D,) values                                1                       x
``topk``      ``idx`` (k,) int32, ``val`` (k,) values          2k/D (float32)          biased
``randomk``   ``idx`` (k,) int32, ``val`` (k,) values          2k/D (float32)          x (scaled D/k)
``qsgd``      ``codes`` (ceil(D b / 8),) uint8, ``norm`` (1,)  b/32 (float32)          x
============  ==============================================  ======================  ===========

Top-k keeps the k entries of largest magnitude (Stich, Cordonnier, Jaggi, "Sparsified SGD with
memory", NeurIPS 2018); random-k keeps k uniformly drawn entries, scaled by D/k so that it is
unbiased. QSGD (Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD: Communication-Efficient SGD via
Gradient Quantization and Encoding", NeurIPS 2017) with ``b`` bits per entry: one sign bit and
``s = 2^(b-1) - 1`` magnitude levels; entry i becomes ``sign(x_i) * M / s * l_i`` with
``l_i = floor(s |x_i| / M + u_i)``, ``u_i ~ U[0, 1)``, which is unbiased. ``M`` is ``||x||_2``
(``norm="l2"``, the paper's choice) or ``max_i |x_i|`` (``norm="max"``, the default: the same
bytes, far less variance). Codes of 4 and 2 bits are packed two and four to a byte, low bits first.

``tau`` bounds the second moment, ``E||C(x)||^2 <= tau ||x||^2``. For an unbiased operator,
``C / tau`` is a contraction (``E||x - C(x)/tau||^2 <= (1 - 1/tau) ||x||^2``), which is what
CHOCO-SGD needs (Koloskova et al., ICML 2019, rescale their unbiased operators the same way).
``compress(x, g, contract=True)`` returns that contractive form, with the tightest ``tau`` the
sender can know: random-k simply drops its D/k scaling (``tau = D/k`` for every x); QSGD
computes ``tau(x) = E||Q(x)||^2 / ||x||^2 = 1 + sum_i (M/s)^2 f_i (1 - f_i) / ||x||^2`` exactly
(``f_i`` the fractional part of ``s|x_i|/M``: the variance of stochastic rounding) and sends
``M / tau(x)`` as its scale, so the receiver decodes the contraction without knowing ``tau``.
The worst case over x, :meth:`Compressor.tau`, is ``1 + min(D / (4 s^2), sqrt(D) / s)`` for
either norm (``f(1-f) <= 1/4`` and ``f(1-f) <= s|x_i|/M``, with ``max|x_i| <= M <= ||x||_2``),
far above typical values for 2 and 4 bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from gossipfl.algorithms._util import check_choice, check_fraction, check_int
from gossipfl.algorithms.base import TensorSpecs

__all__ = [
    "COMPRESSORS",
    "Compressor",
    "Identity",
    "QSGD",
    "RandomK",
    "TopK",
    "index_dtype",
    "make_compressor",
    "pack_bits",
    "qsgd_dequantize",
    "qsgd_quantize",
    "random_indices",
    "scatter",
    "topk",
    "unpack_bits",
]


# --------------------------------------------------------------------------- pure functions


def index_dtype(numel: int) -> torch.dtype:
    """int32 indices while they fit (half the bytes of int64), int64 beyond."""
    return torch.int32 if numel <= 2**31 - 1 else torch.int64


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and values of the ``k`` largest-magnitude entries along the last axis."""
    idx = x.abs().topk(k, dim=-1, sorted=False).indices
    return idx, x.gather(-1, idx)


def random_indices(shape: torch.Size | tuple[int, ...], k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct indices drawn uniformly along the last axis of ``shape`` (one draw per row)."""
    keys = torch.rand(tuple(shape), generator=generator, device=generator.device)
    return keys.topk(k, dim=-1, sorted=False).indices


def scatter(idx: torch.Tensor, val: torch.Tensor, numel: int) -> torch.Tensor:
    """Dense ``[..., numel]`` vector with ``val`` at ``idx`` and zeros elsewhere."""
    out = torch.zeros((*val.shape[:-1], numel), dtype=val.dtype, device=val.device)
    return out.scatter_(-1, idx.long(), val)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``bits``-bit codes (uint8 ``[..., D]``, each < 2^bits) into ``ceil(D bits / 8)`` bytes.

    Code ``j`` of a byte sits at bit ``j * bits`` (low bits first); padding codes are zero.
    """
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    d = codes.shape[-1]
    pad = (-d) % per
    c = codes.to(torch.int32)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 codes ``[..., numel]``."""
    if bits == 8:
        return packed[..., :numel]
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], -1)[..., :numel].to(torch.uint8)


def qsgd_quantize(
    x: torch.Tensor, bits: int, generator: torch.Generator, *, norm: str = "max", contract: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic ``bits``-bit quantisation: (uint8 codes ``[..., D]``, scale ``[..., 1]``).

    A code holds the level in its low ``bits - 1`` bits and the sign in the top bit; the value
    of a code is ``sign * scale / s * level``. The scale is ``M``, or ``M / tau(x)`` with
    ``contract`` (see the module docstring).
    """
    s = 2 ** (bits - 1) - 1
    mag = x.abs()
    if norm == "max":
        scale = mag.amax(-1, keepdim=True)
    else:
        scale = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    v = mag * (s / safe)
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    level = torch.floor(v + u).clamp_(0, s)
    level = torch.where(scale > 0, level, torch.zeros_like(level))
    codes = level.to(torch.uint8) | ((x < 0).to(torch.uint8) << (bits - 1))
    if contract:
        f = v - torch.floor(v)
        variance = (f * (1 - f)).sum(-1, keepdim=True) * (safe / s) ** 2
        sq = x.pow(2).sum(-1, keepdim=True)
        tau = 1 + variance / torch.where(sq > 0, sq, torch.ones_like(sq))
        scale = scale / tau
    return codes, scale


def qsgd_dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Values of the codes: ``sign * scale / s * level``."""
    s = 2 ** (bits - 1) - 1
    level = (codes & s).to(dtype)
    sign = 1 - 2 * (codes >> (bits - 1)).to(dtype)
    return sign * level * (scale.to(dtype) / s)


# --------------------------------------------------------------------------- operators


class Compressor:
    """One compression operator: wire tensors from a dense vector and back."""

    name: ClassVar[str] = ""
    unbiased: ClassVar[bool] = True

    def specs(self, numel: int, dtype: torch.dtype) -> TensorSpecs:
        raise NotImplementedError

    def compress(
        self, x: torch.Tensor, generator: torch.Generator, *, contract: bool = False
    ) -> dict[str, torch.Tensor]:
        """Wire tensors of ``C(x)`` (of the contraction ``C(x) / tau`` with ``contract``)."""
        raise NotImplementedError

    def decompress(
        self, tensors: Mapping[str, torch.Tensor], numel: int, dtype: torch.dtype, *, contract: bool = False
    ) -> torch.Tensor:
        """The dense vector; ``contract`` must match the sender's."""
        raise NotImplementedError

    def tau(self, numel: int) -> float:
        """Bound on ``E||C(x)||^2 / ||x||^2``."""
        return 1.0

    def nominal_ratio(self, numel: int, dtype: torch.dtype) -> float:
        """Payload bytes of one compressed vector over its dense bytes (headers not counted)."""
        item = torch.empty((), dtype=dtype).element_size()
        payload = sum(math.prod(shape) * torch.empty((), dtype=dt).element_size()
                      for shape, dt in self.specs(numel, dtype).values())
        return payload / (numel * item)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Identity(Compressor):
    """No compression: the dense vector itself (CHOCO then is exact D-PSGD with gamma = 1)."""

    name: ClassVar[str] = "none"

    def specs(self, numel: int, dtype: torch.dtype) -> TensorSpecs:
        return {"q": ((numel,), dtype)}

    def compress(
        self, x: torch.Tensor, generator: torch.Generator, *, contract: bool = False
    ) -> dict[str, torch.Tensor]:
        return {"q": x}

    def decompress(
        self, tensors: Mapping[str, torch.Tensor], numel: int, dtype: torch.dtype, *, contract: bool = False
    ) -> torch.Tensor:
        return tensors["q"]


class _Sparse(Compressor):
    def __init__(self, *, fraction: float = 0.1) -> None:
        self.fraction = check_fraction("fraction", fraction)

    def k(self, numel: int) -> int:
        return max(1, min(numel, math.ceil(self.fraction * numel)))

    def specs(self, numel: int, dtype: torch.dtype) -> TensorSpecs:
        k = self.k(numel)
        return {"idx": ((k,), index_dtype(numel)), "val": ((k,), dtype)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fraction={self.fraction})"


class TopK(_Sparse):
    """The k largest-magnitude entries (biased; a contraction with delta = k / D)."""

    name: ClassVar[str] = "topk"
    unbiased: ClassVar[bool] = False

    def compress(
        self, x: torch.Tensor, generator: torch.Generator, *, contract: bool = False
    ) -> dict[str, torch.Tensor]:
        idx, val = topk(x, self.k(x.shape[-1]))
        return {"idx": idx.to(index_dtype(x.shape[-1])), "val": val}

    def decompress(
        self, tensors: Mapping[str, torch.Tensor], numel: int, dtype: torch.dtype, *, contract: bool = False
    ) -> torch.Tensor:
        return scatter(tensors["idx"], tensors["val"].to(dtype), numel)


class RandomK(_Sparse):
    """k uniformly random entries scaled by D / k (unbiased; ``tau = D / k``)."""

    name: ClassVar[str] = "randomk"

    def compress(
        self, x: torch.Tensor, generator: torch.Generator, *, contract: bool = False
    ) -> dict[str, torch.Tensor]:
        numel = x.shape[-1]
        idx = random_indices(x.shape, self.k(numel), generator)
        return {"idx": idx.to(index_dtype(numel)), "val": x.gather(-1, idx)}

    def decompress(
        self, tensors: Mapping[str, torch.Tensor], numel: int, dtype: torch.dtype, *, contract: bool = False
    ) -> torch.Tensor:
        # The unbiased form scales by D/k = tau; the contraction C / tau is plain random-k.
        val = tensors["val"].to(dtype)
        return scatter(tensors["idx"], val if contract else val * (numel / val.shape[-1]), numel)

    def tau(self, numel: int) -> float:
        return numel / self.k(numel)


class QSGD(Compressor):
    """Stochastic ``bits``-bit quantisation with one scale per vector (unbiased)."""

    name: ClassVar[str] = "qsgd"

    def __init__(self, *, bits: int = 8, norm: str = "max") -> None:
        self.bits = check_choice("bits", check_int("bits", bits), (2, 4, 8))
        self.norm = check_choice("norm", norm, ("max", "l2"))

    def specs(self, numel: int, dtype: torch.dtype) -> TensorSpecs:
        return {"codes": ((math.ceil(numel * self.bits / 8),), torch.uint8), "norm": ((1,), dtype)}

    def compress(
        self, x: torch.Tensor, generator: torch.Generator, *, contract: bool = False
    ) -> dict[str, torch.Tensor]:
        codes, scale = qsgd_quantize(x, self.bits, generator, norm=self.norm, contract=contract)
        return {"codes": pack_bits(codes, self.bits), "norm": scale}

    def decompress(
        self, tensors: Mapping[str, torch.Tensor], numel: int, dtype: torch.dtype, *, contract: bool = False
    ) -> torch.Tensor:
        codes = unpack_bits(tensors["codes"], self.bits, numel)
        return qsgd_dequantize(codes, tensors["norm"], self.bits, dtype)

    def tau(self, numel: int) -> float:
        s = 2 ** (self.bits - 1) - 1
        return 1.0 + min(numel / (4 * s * s), math.sqrt(numel) / s)

    def __repr__(self) -> str:
        return f"QSGD(bits={self.bits}, norm={self.norm!r})"


COMPRESSORS: dict[str, type[Compressor]] = {c.name: c for c in (Identity, TopK, RandomK, QSGD)}


def make_compressor(name: str, *, fraction: float = 0.1, bits: int = 8, norm: str = "max") -> Compressor:
    """The operator ``name`` with the hyperparameters that apply to it (others are ignored)."""
    check_choice("compression", name, tuple(COMPRESSORS))
    kwargs: dict[str, Any] = {}
    if name in ("topk", "randomk"):
        kwargs["fraction"] = fraction
    elif name == "qsgd":
        kwargs.update(bits=bits, norm=norm)
    return COMPRESSORS[name](**kwargs)
