"""What every decoded frame is checked against: the format's constants and limits, the header's
field checks, the tensor table's canonical layout, the zero-copy views, and the NaN/Inf check.

Split from :mod:`gossipfl.wire` (which re-exports the public names) so that the codec's two halves
each stay readable; nothing here is public API apart from :func:`require_finite` and the dtype
table. Every check raises :class:`~gossipfl.errors.WireError` naming what is wrong.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import msgpack
import numpy as np
import torch

from gossipfl.errors import WireError

if TYPE_CHECKING:
    from gossipfl.wire import Envelope

__all__ = ["SUPPORTED_DTYPES", "require_finite"]

SUPPORTED_DTYPES: Final[Mapping[str, torch.dtype]] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
"""Wire name -> dtype. Anything else (complex, quantised, fp8, ...) is refused both ways."""

_DTYPE_NAMES: Final[dict[torch.dtype, str]] = {dt: name for name, dt in SUPPORTED_DTYPES.items()}
_ITEMSIZE: Final[dict[str, int]] = {
    name: torch.empty((), dtype=dt).element_size() for name, dt in SUPPORTED_DTYPES.items()
}

# Limits. They bound what a hostile header can make us allocate before it is rejected; every one
# is far above what a real state dict needs (and the design sends one flat parameter vector).
_ALIGN: Final = 64
_PREFIX: Final = 8  # magic + header_len
_SIG_LEN: Final = 32  # HMAC-SHA256 digest
_MAX_HEADER_BYTES: Final = 4 * 2**20
_MAX_TENSORS: Final = 4096
_MAX_NDIM: Final = 32
_MAX_NAME_LEN: Final = 512  # tensor names
_MAX_FIELD_LEN: Final = 256  # cluster, sender, algorithm, kind, fingerprint, meta string values
_MAX_META: Final = 64
_MAX_META_KEY_LEN: Final = 64
_MAX_ELEMENTS: Final = 2**62  # product of a shape's dims (zeros counted as one): no int64 overflow
_INT_MIN: Final = -(2**63)  # what msgpack can carry
_UINT_MAX: Final = 2**64 - 1

_STR_FIELDS: Final = ("cluster", "sender", "algorithm", "fingerprint", "kind")
_HEADER_KEYS: Final = frozenset(
    (
        *_STR_FIELDS,
        "version",
        "step",
        "age",
        "round",
        "weight",
        "meta",
        "signed",
        "total",
        "tensors",
    )
)
_UINT32: Final = struct.Struct("<I")
_ZEROS: Final = bytes(_ALIGN)
# Same-size integer types, for moving any dtype's bits through NumPy.
_BITS_TORCH: Final = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BITS_NUMPY: Final = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}

MetaValue = int | float | str | bool | None


def _align(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


def _type_name(value: object) -> str:
    return type(value).__name__


def _check_str(header: Mapping[str, Any], key: str, limit: int) -> str:
    value = header[key]
    if type(value) is not str:
        raise WireError(f"header field {key!r} must be a str, got {_type_name(value)}")
    if len(value) > limit:
        raise WireError(f"header field {key!r} is longer than {limit} characters")
    return value


def _check_count(header: Mapping[str, Any], key: str) -> int:
    value = header[key]
    if type(value) is not int:  # bool is an int subclass, but True is not a step number
        raise WireError(f"header field {key!r} must be an int, got {_type_name(value)}")
    if value < 0:
        raise WireError(f"header field {key!r} must be >= 0, got {value}")
    return value


def _check_real(header: Mapping[str, Any], key: str) -> float:
    value = header[key]
    if type(value) not in (float, int):
        raise WireError(f"header field {key!r} must be a float, got {_type_name(value)}")
    if not math.isfinite(value):
        raise WireError(f"header field {key!r} must be finite, got {value}")
    return float(value)


def _check_meta(meta: object, *, prefix: str = "") -> dict[str, MetaValue]:
    if not isinstance(meta, dict):
        raise WireError(f"{prefix}meta must be a map, got {_type_name(meta)}")
    if len(meta) > _MAX_META:
        raise WireError(f"{prefix}meta has {len(meta)} entries, more than {_MAX_META}")
    for key, value in meta.items():
        if not isinstance(key, str) or len(key) > _MAX_META_KEY_LEN:
            raise WireError(f"{prefix}meta key {key!r} must be a str of at most {_MAX_META_KEY_LEN} characters")
        if value is None or isinstance(value, bool | float):
            continue
        if isinstance(value, int):
            if not _INT_MIN <= value <= _UINT_MAX:
                raise WireError(f"{prefix}meta[{key!r}] = {value} does not fit in 64 bits")
        elif isinstance(value, str):
            if len(value) > _MAX_FIELD_LEN:
                raise WireError(f"{prefix}meta[{key!r}] is longer than {_MAX_FIELD_LEN} characters")
        else:
            raise WireError(f"{prefix}meta[{key!r}] must be None, bool, int, float or str, got {_type_name(value)}")
    return meta


def _unpack_header(mv: memoryview, header_len: int) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(
            mv[_PREFIX : _PREFIX + header_len],
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=_MAX_NAME_LEN,
            max_bin_len=0,  # the header never carries raw bytes; tensors live outside it
            max_ext_len=0,
            max_array_len=_MAX_TENSORS,
            max_map_len=_MAX_META,
        )
    except Exception as exc:  # untrusted bytes: whatever msgpack dislikes is the peer's fault
        raise WireError(f"header is not valid msgpack: {exc}") from exc
    if not isinstance(header, dict):
        raise WireError(f"header must be a msgpack map, got {_type_name(header)}")
    return header


# One validated tensor-table row: name, dtype name, shape, offset, nbytes.
_Row = tuple[str, str, list[int], int, int]


def _check_table(table: object, data_start: int, body_end: int) -> list[_Row]:
    """Validate the tensor table against the canonical layout (see the module docstring)."""
    if not isinstance(table, list):
        raise WireError(f"header field 'tensors' must be an array, got {_type_name(table)}")
    if len(table) > _MAX_TENSORS:
        raise WireError(f"frame has {len(table)} tensors, more than {_MAX_TENSORS}")
    rows: list[_Row] = []
    seen: set[str] = set()
    prev_end = data_start
    prev_name: str | None = None
    for i, entry in enumerate(table):
        if not isinstance(entry, list) or len(entry) != 5:
            raise WireError(f"tensor table entry {i} must be [name, dtype, shape, offset, nbytes]")
        name, dtype, shape, offset, nbytes = entry
        if type(name) is not str or not 0 < len(name) <= _MAX_NAME_LEN:
            raise WireError(f"tensor table entry {i}: name must be a str of 1-{_MAX_NAME_LEN} chars")
        if name in seen:
            raise WireError(f"tensor {name!r} appears twice in the tensor table")
        seen.add(name)
        if type(dtype) is not str or dtype not in SUPPORTED_DTYPES:
            raise WireError(f"tensor {name!r}: unknown or unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > _MAX_NDIM:
            raise WireError(f"tensor {name!r}: shape must be an array of at most {_MAX_NDIM} dims")
        elements = 1
        numel = 1
        for dim in shape:
            if type(dim) is not int or dim < 0:
                raise WireError(f"tensor {name!r}: shape {shape!r} has a negative or non-int dim")
            if dim:
                elements *= dim
            else:
                numel = 0
        if elements > _MAX_ELEMENTS:
            raise WireError(f"tensor {name!r}: shape {shape!r} is absurdly large")
        if numel:
            numel = elements
        if type(offset) is not int or offset < 0:
            raise WireError(f"tensor {name!r}: offset must be a non-negative int, got {offset!r}")
        if type(nbytes) is not int or nbytes < 0:
            raise WireError(f"tensor {name!r}: nbytes must be a non-negative int, got {nbytes!r}")
        if nbytes != numel * _ITEMSIZE[dtype]:
            raise WireError(f"tensor {name!r}: nbytes {nbytes} != {numel} elements x {_ITEMSIZE[dtype]} bytes")
        if offset % _ALIGN:
            raise WireError(f"tensor {name!r}: offset {offset} is not {_ALIGN}-byte aligned")
        if offset < data_start:
            raise WireError(f"tensor {name!r}: offset {offset} overlaps the header")
        if offset < prev_end:
            raise WireError(f"tensor {name!r}: offset {offset} overlaps tensor {prev_name!r}")
        if offset + nbytes > body_end:
            raise WireError(
                f"tensor {name!r}: bytes {offset}..{offset + nbytes} run past the data, which ends at {body_end}"
            )
        if offset - prev_end >= _ALIGN:
            raise WireError(
                f"tensor {name!r}: offset {offset} leaves a gap of unreferenced bytes (expected {_align(prev_end)})"
            )
        rows.append((name, dtype, shape, offset, nbytes))
        prev_end = offset + nbytes
        prev_name = name
    if prev_end != body_end:
        raise WireError(f"{body_end - prev_end} bytes of trailing garbage after the last tensor")
    return rows


def _check_zero(mv: memoryview, start: int, end: int, what: str) -> None:
    # Padding is always shorter than _ALIGN: the layout was checked to be canonical first.
    if end > start and mv[start:end] != _ZEROS[: end - start]:
        raise WireError(f"non-zero padding {what}")


def _views(mv: memoryview, rows: list[_Row], body_end: int, *, little_endian: bool) -> dict[str, torch.Tensor]:
    """One tensor per row, each a view of ``mv`` (one ``frombuffer`` per dtype, then strides)."""
    bases: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype, shape, offset, nbytes in rows:
        itemsize = _ITEMSIZE[dtype]
        if nbytes == 0:
            tensors[name] = torch.empty(shape, dtype=SUPPORTED_DTYPES[dtype])
            continue
        base = bases.get(dtype)
        if base is None:
            base = torch.frombuffer(mv, dtype=SUPPORTED_DTYPES[dtype], count=body_end // itemsize)
            bases[dtype] = base
        if len(shape) == 1:
            t = base[offset // itemsize : (offset + nbytes) // itemsize]
        else:
            strides = [1] * len(shape)
            for i in range(len(shape) - 1, 0, -1):
                strides[i - 1] = strides[i] * shape[i]
            t = base.as_strided(shape, strides, offset // itemsize)
        if not little_endian and itemsize > 1:
            # Big-endian host: swap a copy; the caller's buffer stays as received.
            t = t.clone()
            t.view(_BITS_TORCH[itemsize]).numpy().byteswap(inplace=True)
        tensors[name] = t
    return tensors


def require_finite(env: Envelope) -> None:
    """Raise :class:`WireError` naming the first floating tensor holding NaN or Inf.

    Separate from :func:`decode` so that decoding never reads the tensor data; a node calls both
    before merging, because one NaN from a peer would poison every model it reaches.
    """
    for name, t in env.tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        if not _all_finite(t):
            raise WireError(nonfinite_message(name, t))


def nonfinite_message(name: str, t: torch.Tensor) -> str:
    """What a refusal says about tensor ``name`` found holding NaN or Inf (the rare path: counts)."""
    t = t.detach()
    return f"tensor {name!r} holds {int(torch.isnan(t).sum())} NaN and {int(torch.isinf(t).sum())} Inf values"


# IEEE-754 exponent bits per 16-bit float (by wire name): all ones means Inf or NaN.
EXPONENT_16: Final = {"float16": 0x7C00, "bfloat16": 0x7F80}
_CHUNK: Final = 1 << 16
_SMALL: Final = 1 << 16  # elements: an array this small is checked by max and min (see floats_finite)


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite; one pass on the calling thread, no full-size temporary.

    Torch reductions are avoided for the same reason as ``Tensor.copy_`` in encoding (they stall
    when the cores are busy training). NumPy has no bfloat16, and float16 arithmetic there is
    slow, so 16-bit floats are checked on their exponent bits (`bits16_finite`).
    """
    t = t.detach()
    if t.device.type != "cpu":
        return bool(torch.isfinite(t).all())
    if t.is_neg():
        t = t.resolve_neg()
    mask = EXPONENT_16.get(_DTYPE_NAMES[t.dtype])
    if mask is None:
        return floats_finite(t.numpy())  # any shape: strided views are not copied
    return bits16_finite(t.view(torch.int16).numpy().reshape(-1), mask)


def floats_finite(arr: np.ndarray) -> bool:
    """Whether a float32/64 array (any shape) holds no NaN or Inf.

    A small array (in cache) by its maximum and minimum, which are finite exactly when every
    element is (both propagate NaN, an Inf is one of them) and never warn; a large one by its sum,
    one pass, which wins once the data is past the cache: a finite sum proves every element finite,
    and only a non-finite one (maybe a harmless overflow) needs the exact check."""
    if arr.size <= _SMALL:
        return arr.size == 0 or (math.isfinite(arr.max()) and math.isfinite(arr.min()))
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(arr.sum()):
            return True
    return bool(np.isfinite(arr).all())


def bits16_finite(bits: np.ndarray, mask: int) -> bool:
    """Whether a 1-D array of 16-bit floats' bits (int16 or uint16) holds no NaN or Inf: no element
    has all of ``mask``'s exponent bits set. Chunk by chunk, so no full-size temporary."""
    scratch = np.empty(min(bits.size, _CHUNK), dtype=bits.dtype)
    for start in range(0, bits.size, _CHUNK):
        chunk = bits[start : start + _CHUNK]
        out = scratch[: chunk.size]
        np.bitwise_and(chunk, mask, out=out)
        if (out == mask).any():
            return False
    return True
