"""The one codec: how a message between two nodes looks on the wire.

Nothing is pickled, so a peer's bytes can never execute code here. A frame is a small msgpack
header followed by the raw tensor data, so that :func:`decode` can hand out tensors that *alias*
the received buffer (``torch.frombuffer``) instead of copying them, which msgpack ``bin`` values
would force::

    offset 0   magic  b"GFL\\x01"                         4 bytes
    offset 4   header_len                                  uint32, little-endian
    offset 8   header                                      msgpack map, use_bin_type=True
               zero padding to the next multiple of 64
               tensor blocks, each at a 64-byte aligned offset, separated by zero padding
               [HMAC-SHA256 of every byte before it]       32 bytes, only if signed

Tensor bytes are little-endian whatever the host. The header holds the envelope's scalar fields,
``signed``, ``total`` (the whole frame's length, trailer included) and ``tensors``, a table of
``[name, dtype, shape, offset, nbytes]`` rows with offsets counted from the frame's first byte.

The layout is canonical: the first tensor starts at the first 64-byte boundary after the header
and each further tensor at the first boundary after the previous one ends, in table order; all
padding is zero and nothing follows the last tensor but the trailer. A decoder therefore accepts
exactly one byte string per message, and no bytes in a frame go unchecked or unaccounted for.

Every malformed, oversized, foreign or forged frame makes :func:`decode` raise
:class:`~gossipfl.errors.WireError` (or one of its subclasses) with a message that says what is
wrong; the node turns those into HTTP status codes and rejection counts.
"""

from __future__ import annotations

import ctypes
import hmac
import math
import struct
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import msgpack
import numpy as np
import torch

from gossipfl.errors import BadSignature, FingerprintMismatch, MessageTooLarge, WireError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAGIC",
    "PROTOCOL_VERSION",
    "SUPPORTED_DTYPES",
    "Envelope",
    "decode",
    "encode",
    "encode_into",
    "encoded_size",
    "require_finite",
]

PROTOCOL_VERSION: Final[int] = 1
"""Version of the header's schema; a node refuses frames of any other version."""

DEFAULT_MAX_BYTES: Final[int] = 512 * 2**20
"""Largest frame :func:`decode` accepts unless told otherwise (512 MiB)."""

MAGIC: Final[bytes] = b"GFL\x01"
"""First four bytes of every frame; the last byte is the frame layout's version."""

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
_LITTLE_ENDIAN_HOST: bool = sys.byteorder == "little"  # a module global so tests can flip it
_NOT_WRITABLE_WARNING: Final = "The given buffer is not writable"
# Same-size integer types, for moving any dtype's bits through NumPy.
_BITS_TORCH: Final = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BITS_NUMPY: Final = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}

MetaValue = int | float | str | bool | None


@dataclass(frozen=True, kw_only=True, eq=False)
class Envelope:
    """One message between nodes: who sent it, for which model and algorithm, and the payload.

    ``eq=False``: tensors have no single truth value, so envelopes compare by identity. Tensors
    returned by :func:`decode` alias the received buffer; see there before writing to them.
    """

    cluster: str
    sender: str
    algorithm: str
    fingerprint: str  # hex digest of the model's names/shapes/dtypes, computed by the trainer
    kind: str = "gossip"  # message type, e.g. "gossip", "exchange", "reply"
    step: int = 0  # sender's local step
    age: float = 0.0  # gossip-learning model age
    round: int = 0  # round number for round-based algorithms
    weight: float = 1.0  # push-sum weight
    meta: dict[str, MetaValue] = field(default_factory=dict)  # small algorithm scalars
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    version: int = PROTOCOL_VERSION

    def __repr__(self) -> str:
        # The default repr would print every tensor's values.
        shown = ", ".join(
            f"{name}:{_DTYPE_NAMES.get(t.dtype, t.dtype)}{list(t.shape)}" for name, t in self.tensors.items()
        )
        return (
            f"Envelope(cluster={self.cluster!r}, sender={self.sender!r}, "
            f"algorithm={self.algorithm!r}, kind={self.kind!r}, step={self.step}, "
            f"age={self.age}, round={self.round}, weight={self.weight}, meta={self.meta!r}, "
            f"fingerprint={self.fingerprint!r}, version={self.version}, tensors={{{shown}}})"
        )


# --------------------------------------------------------------------------- encoding


def _align(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


class _Plan(NamedTuple):
    """Where everything goes in one frame; computed once per message."""

    header: bytes
    data_start: int
    body_end: int  # end of the last tensor; the trailer (if any) starts here
    total: int
    blocks: list[tuple[int, int, torch.Tensor]]  # (offset, nbytes, tensor)


def _check_field_types(env: Envelope) -> None:
    """Refuse to build a frame that the receiving node would reject anyway."""
    if env.version != PROTOCOL_VERSION:
        raise WireError(f"cannot encode protocol version {env.version!r}; this is {PROTOCOL_VERSION}")
    for key in _STR_FIELDS:
        value = getattr(env, key)
        if not isinstance(value, str):
            raise WireError(f"cannot encode: {key} must be a str, not {type(value).__name__}")
        if len(value) > _MAX_FIELD_LEN:
            raise WireError(f"cannot encode: {key} is longer than {_MAX_FIELD_LEN} characters")
    for key in ("step", "round"):
        value = getattr(env, key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _UINT_MAX:
            raise WireError(f"cannot encode: {key} must be an int in [0, 2**64), got {value!r}")
    for key in ("age", "weight"):
        value = getattr(env, key)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise WireError(f"cannot encode: {key} must be a finite float, got {value!r}")
    if env.age < 0:
        raise WireError(f"cannot encode: age must be >= 0, got {env.age!r}")
    _check_meta(env.meta, prefix="cannot encode: ")


def _plan(env: Envelope, secret: bytes | None) -> _Plan:
    """Validate ``env`` and lay out its frame without touching any tensor data."""
    _check_field_types(env)
    _check_secret(secret)
    if not isinstance(env.tensors, Mapping):
        raise WireError("cannot encode: tensors must be a dict of name -> tensor")
    if len(env.tensors) > _MAX_TENSORS:
        raise WireError(f"cannot encode more than {_MAX_TENSORS} tensors, got {len(env.tensors)}")
    rows: list[tuple[str, str, list[int], int]] = []
    items: list[torch.Tensor] = []
    for name, t in env.tensors.items():
        if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME_LEN:
            raise WireError(f"cannot encode tensor name {name!r}: need a str of 1-{_MAX_NAME_LEN}")
        if not isinstance(t, torch.Tensor):
            raise WireError(f"cannot encode tensor {name!r}: a {type(t).__name__}, not a tensor")
        dtype = _DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise WireError(
                f"cannot encode tensor {name!r}: dtype {t.dtype} is not one of {', '.join(SUPPORTED_DTYPES)}"
            )
        if t.layout is not torch.strided or t.is_meta:
            raise WireError(f"cannot encode tensor {name!r}: only dense tensors with data")
        shape = list(t.shape)
        if len(shape) > _MAX_NDIM:
            raise WireError(f"cannot encode tensor {name!r}: more than {_MAX_NDIM} dimensions")
        rows.append((name, dtype, shape, t.nbytes))
        items.append(t)
    signed = secret is not None
    trailer = _SIG_LEN if signed else 0
    header_fields: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "cluster": env.cluster,
        "sender": env.sender,
        "algorithm": env.algorithm,
        "fingerprint": env.fingerprint,
        "kind": env.kind,
        "step": int(env.step),
        "age": float(env.age),
        "round": int(env.round),
        "weight": float(env.weight),
        "meta": dict(env.meta),
        "signed": signed,
    }
    # Offsets depend on the header's length and the header holds the offsets. Iterate to the fixed
    # point data_start == align(8 + len(header)), which decode insists on; starting from the
    # smallest possible start it climbs monotonically (a later start never shortens the header),
    # and it takes two packs in practice.
    data_start = _ALIGN
    mask = ~(_ALIGN - 1)
    while True:
        table: list[list[Any]] = []
        blocks: list[tuple[int, int, torch.Tensor]] = []
        end = data_start
        for (name, dtype, shape, nbytes), t in zip(rows, items, strict=True):
            off = (end + _ALIGN - 1) & mask
            table.append([name, dtype, shape, off, nbytes])
            blocks.append((off, nbytes, t))
            end = off + nbytes
        header_fields["tensors"] = table
        header_fields["total"] = end + trailer
        header = msgpack.packb(header_fields, use_bin_type=True)
        needed = _align(_PREFIX + len(header))
        if needed == data_start:
            break
        data_start = needed
    if len(header) > _MAX_HEADER_BYTES:
        raise WireError(f"cannot encode: header of {len(header)} bytes is over the limit")
    return _Plan(header, data_start, end, end + trailer, blocks)


def _check_secret(secret: bytes | None) -> None:
    if secret is None:
        return
    if not isinstance(secret, bytes | bytearray):
        raise TypeError(f"secret must be bytes, not {type(secret).__name__}")
    if len(secret) == 0:
        # An empty key "signs" with a value anyone can compute: almost surely a config mistake.
        raise ValueError("secret must not be empty")


def _write(plan: _Plan, out: bytearray | memoryview, secret: bytes | None) -> int:
    mv = memoryview(out)
    if mv.readonly:
        raise TypeError("output buffer is read-only")
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    if mv.nbytes < plan.total:
        raise ValueError(f"output buffer of {mv.nbytes} bytes is too small for {plan.total}")
    mv[0:4] = MAGIC
    _UINT32.pack_into(mv, 4, len(plan.header))
    header_end = _PREFIX + len(plan.header)
    mv[_PREFIX:header_end] = plan.header
    # Pad with zeros explicitly: a reused buffer holds the previous message's bytes.
    mv[header_end : plan.data_start] = bytes(plan.data_start - header_end)
    if plan.blocks:
        dst = np.frombuffer(mv, dtype=np.uint8, count=plan.body_end)
        address = dst.ctypes.data
        prev_end = plan.data_start
        for off, nbytes, t in plan.blocks:
            if off > prev_end:
                mv[prev_end:off] = _ZEROS[: off - prev_end]
            if nbytes:
                if t.is_cpu and t.is_contiguous() and not t.is_neg() and _LITTLE_ENDIAN_HOST:
                    # The common case, and the fastest way there is: one memcpy of the
                    # tensor's bytes, on this thread, without the GIL (ctypes drops it).
                    # In bounds: nbytes is the tensor's size and the plan fits `out`.
                    ctypes.memmove(address + off, t.data_ptr(), nbytes)
                else:
                    _copy_tensor(t, dst[off : off + nbytes])
            prev_end = off + nbytes
    if secret is not None:
        mv[plan.body_end : plan.total] = hmac.digest(secret, mv[: plan.body_end], "sha256")
    return plan.total


def _copy_tensor(t: torch.Tensor, region: np.ndarray) -> None:
    """Copy ``t``'s elements, in row-major order and little-endian, into the uint8 ``region``.

    For what the memcpy fast path cannot take: strided views, GPU tensors, big-endian hosts.
    Copies here and there run on the calling thread, never ``Tensor.copy_``: torch splits large
    copies over its intra-op threads, which is about 2x faster on an idle machine but, when the
    cores are busy (a node trains while it gossips), one descheduled thread stalls the whole copy:
    measured 100x slower for 1 MB. NumPy copies strided data in one pass without the GIL.
    Elements are moved as same-size integers: NumPy has no bfloat16, and bits stay bits.
    """
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_neg() or t.is_conj():
        t = t.resolve_neg().resolve_conj()
    itemsize = t.element_size()
    src = t.view(_BITS_TORCH[itemsize]).numpy()
    dst = region.view(_BITS_NUMPY[itemsize]).reshape(src.shape)
    np.copyto(dst, src, casting="no")
    if not _LITTLE_ENDIAN_HOST and itemsize > 1:
        dst.byteswap(inplace=True)


def encoded_size(env: Envelope, *, secret: bytes | None = None) -> int:
    """Bytes :func:`encode` will produce for ``env``; for sizing a reusable buffer.

    Cheap: it lays out the frame from the tensors' shapes and dtypes without reading their data.
    """
    return _plan(env, secret).total


def encode_into(env: Envelope, out: bytearray | memoryview, *, secret: bytes | None = None) -> int:
    """Write ``env``'s frame to the start of ``out`` and return how many bytes it used.

    Lets a sender reuse one buffer for every message: a freshly allocated large buffer is
    page-faulted in again on every use on Linux, which costs more than the copy itself. ``out``
    must be writable and at least :func:`encoded_size` bytes; bytes past the frame are untouched.
    With ``secret`` the frame is signed (HMAC-SHA256 over everything before the trailer).
    Raises :class:`WireError` if ``env`` holds something the wire cannot carry.
    """
    return _write(_plan(env, secret), out, secret)


def encode(env: Envelope, *, secret: bytes | None = None) -> bytearray:
    """Encode ``env`` into a new frame; signed (HMAC-SHA256) when ``secret`` is given.

    Returns a ``bytearray`` rather than ``bytes``: converting would copy the whole frame once
    more, and every consumer (aiohttp bodies, sockets, :func:`decode`) takes any bytes-like object.
    Tensors may be non-contiguous (made contiguous on the way) or on a GPU (brought to the CPU
    first); a CPU tensor's data is copied into the frame exactly once.
    """
    plan = _plan(env, secret)
    out = bytearray(plan.total)
    _write(plan, out, secret)
    return out


# --------------------------------------------------------------------------- decoding


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


def _views(mv: memoryview, rows: list[_Row], body_end: int) -> dict[str, torch.Tensor]:
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
        if not _LITTLE_ENDIAN_HOST and itemsize > 1:
            # Big-endian host: swap a copy; the caller's buffer stays as received.
            t = t.clone()
            t.view(_BITS_TORCH[itemsize]).numpy().byteswap(inplace=True)
        tensors[name] = t
    return tensors


def decode(
    buf: bytes | bytearray | memoryview,
    *,
    secret: bytes | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    cluster: str | None = None,
    fingerprint: str | None = None,
) -> Envelope:
    """Parse and validate one frame; the tensors alias ``buf`` (no copy).

    Raises :class:`MessageTooLarge` if ``buf`` is over ``max_bytes`` (checked before anything
    else), :class:`BadSignature` if ``secret`` is given and the frame is unsigned or its HMAC does
    not verify (checked before the header is parsed, so unauthenticated bytes never reach
    msgpack), :class:`FingerprintMismatch` if ``fingerprint`` is given and differs, and
    :class:`WireError` naming the problem for anything else malformed or for another ``cluster``.

    Without ``secret`` a signed frame is accepted and its trailer ignored: a node that has no
    secret has nothing to check it against, and the sender does not know who lacks one.

    The returned tensors share memory with ``buf``, which they keep alive (and a ``bytearray``
    cannot be resized while they exist). Writing to them writes into ``buf``. If ``buf`` is
    read-only (``bytes``), the tensors must be treated as read-only too: torch cannot mark them
    so, and writing would mutate an immutable object. Clone what you need to modify.
    NaN/Inf values are not checked here, to keep decoding free of passes over the data; the node
    calls :func:`require_finite` as well.
    """
    _check_secret(secret)
    mv = memoryview(buf)
    if not mv.c_contiguous:
        raise TypeError("buffer must be C-contiguous")
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    n = mv.nbytes
    if n > max_bytes:
        raise MessageTooLarge(f"message of {n} bytes is over the limit of {max_bytes}")
    if n == 0:
        raise WireError("empty message")
    if n < _PREFIX:
        raise WireError(f"message of {n} bytes is too short for a frame (at least {_PREFIX})")
    if mv[:4] != MAGIC:
        raise WireError(f"bad magic {bytes(mv[:4])!r}: not a gossipfl frame (expected {MAGIC!r})")
    (header_len,) = _UINT32.unpack_from(mv, 4)
    if header_len > _MAX_HEADER_BYTES:
        raise WireError(f"header length {header_len} is over the limit of {_MAX_HEADER_BYTES}")
    if _PREFIX + header_len > n:
        raise WireError(f"header length {header_len} runs past the end of the {n}-byte message")

    if secret is not None:
        if n < _PREFIX + header_len + _SIG_LEN:
            raise BadSignature("message is too short to carry a signature")
        expected = hmac.digest(secret, mv[: n - _SIG_LEN], "sha256")
        if not hmac.compare_digest(expected, mv[n - _SIG_LEN :]):
            raise BadSignature(
                "signature does not verify under this cluster's secret "
                "(unsigned, tampered with, or signed with another secret)"
            )

    header = _unpack_header(mv, header_len)
    # The version first: a newer peer's frame should say so, not complain about some field.
    if "version" not in header:
        raise WireError("header is missing the 'version' field")
    version = header["version"]
    if type(version) is not int:
        raise WireError(f"header field 'version' must be an int, got {_type_name(version)}")
    if version != PROTOCOL_VERSION:
        raise WireError(f"unsupported protocol version {version} (this node speaks {PROTOCOL_VERSION})")
    missing = _HEADER_KEYS.difference(header)
    if missing:
        raise WireError(f"header is missing field(s): {', '.join(sorted(missing))}")
    if len(header) != len(_HEADER_KEYS):
        unknown = sorted(repr(k) for k in header if k not in _HEADER_KEYS)
        raise WireError(f"header has unknown field(s): {', '.join(unknown)}")

    signed = header["signed"]
    if type(signed) is not bool:
        raise WireError(f"header field 'signed' must be a bool, got {_type_name(signed)}")
    if secret is not None and not signed:
        raise BadSignature("message carries a valid HMAC but is marked unsigned")
    total = _check_count(header, "total")
    if total != n:
        raise WireError(f"frame length mismatch: header says {total} bytes, message has {n}")
    body_end = n - (_SIG_LEN if signed else 0)
    header_end = _PREFIX + header_len
    data_start = _align(header_end)
    if body_end < data_start:
        raise WireError(f"frame ends at byte {body_end}, inside the header or its padding (up to {data_start})")

    fields = {key: _check_str(header, key, _MAX_FIELD_LEN) for key in _STR_FIELDS}
    step = _check_count(header, "step")
    round_ = _check_count(header, "round")
    age = _check_real(header, "age")
    if age < 0:
        raise WireError(f"header field 'age' must be >= 0, got {age}")
    weight = _check_real(header, "weight")
    meta = _check_meta(header["meta"])
    rows = _check_table(header["tensors"], data_start, body_end)
    _check_zero(mv, header_end, data_start, "after the header")

    if cluster is not None and fields["cluster"] != cluster:
        raise WireError(f"message for cluster {fields['cluster']!r}, this node is in {cluster!r}")
    if fingerprint is not None and fields["fingerprint"] != fingerprint:
        raise FingerprintMismatch(
            f"model fingerprint {fields['fingerprint']!r} from {fields['sender']!r} "
            f"does not match ours ({fingerprint!r})"
        )

    tensors: dict[str, torch.Tensor] = {}
    prev_end = data_start
    for name, _, _, offset, nbytes in rows:
        if offset != prev_end:
            _check_zero(mv, prev_end, offset, f"before tensor {name!r}")
        prev_end = offset + nbytes
    if rows:
        if mv.readonly:
            # torch.frombuffer warns that it cannot mark tensors read-only; the docstring says
            # so instead. Only that warning (matched by its text), and only here. In Python 3.11
            # catch_warnings swaps process-wide state, so decoding bytes from two threads at once
            # is best avoided; torch emits this warning only once per process anyway.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_NOT_WRITABLE_WARNING, category=UserWarning)
                tensors = _views(mv, rows, body_end)
        else:
            tensors = _views(mv, rows, body_end)

    return Envelope(
        cluster=fields["cluster"],
        sender=fields["sender"],
        algorithm=fields["algorithm"],
        fingerprint=fields["fingerprint"],
        kind=fields["kind"],
        step=step,
        age=age,
        round=round_,
        weight=weight,
        meta=meta,
        tensors=tensors,
        version=version,
    )


def require_finite(env: Envelope) -> None:
    """Raise :class:`WireError` naming the first floating tensor holding NaN or Inf.

    Separate from :func:`decode` so that decoding never reads the tensor data; a node calls both
    before merging, because one NaN from a peer would poison every model it reaches.
    """
    for name, t in env.tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        if _all_finite(t):
            continue
        t = t.detach()
        nan = int(torch.isnan(t).sum())
        inf = int(torch.isinf(t).sum())
        raise WireError(f"tensor {name!r} holds {nan} NaN and {inf} Inf values")


# IEEE-754 exponent bits per 16-bit float: all ones means Inf or NaN.
_EXPONENT_16: Final = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}
_CHUNK: Final = 1 << 16


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite; one pass on the calling thread, no full-size temporary.

    Torch reductions are avoided for the same reason as ``Tensor.copy_`` in encoding (they stall
    when the cores are busy training). For float32/64 a finite sum proves every element finite
    (NaN and Inf propagate); only a non-finite sum, maybe a harmless overflow, needs the exact
    check. NumPy has no bfloat16, and float16 arithmetic there is slow, so 16-bit floats are
    checked on their exponent bits, chunk by chunk.
    """
    t = t.detach()
    if t.device.type != "cpu":
        return bool(torch.isfinite(t).all())
    if t.is_neg():
        t = t.resolve_neg()
    mask = _EXPONENT_16.get(t.dtype)
    if mask is None:
        arr = t.numpy()
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(arr.sum()):
                return True
        return bool(np.isfinite(arr).all())
    bits = t.view(torch.int16).numpy().reshape(-1)
    scratch = np.empty(min(bits.size, _CHUNK), dtype=np.int16)
    for start in range(0, bits.size, _CHUNK):
        chunk = bits[start : start + _CHUNK]
        out = scratch[: chunk.size]
        np.bitwise_and(chunk, mask, out=out)
        if (out == mask).any():
            return False
    return True
