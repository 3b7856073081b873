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
import mmap
import sys
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, TypeVar

import msgpack
import numpy as np
import torch

from gossipfl.errors import BadSignature, FingerprintMismatch, MessageTooLarge, WireError
from gossipfl.wire_checks import (
    _ALIGN,
    _BITS_NUMPY,
    _BITS_TORCH,
    _DTYPE_NAMES,
    _HEADER_KEYS,  # noqa: F401  (part of the format; tests and tools read it here)
    _MAX_FIELD_LEN,
    _MAX_HEADER_BYTES,
    _MAX_NAME_LEN,
    _MAX_NDIM,
    _MAX_TENSORS,
    _PREFIX,
    _SIG_LEN,
    _STR_FIELDS,
    _UINT32,
    _UINT_MAX,
    _ZEROS,
    SUPPORTED_DTYPES,
    MetaValue,
    _align,
    _check_count,
    _check_meta,
    _check_real,
    _check_str,
    _check_table,
    _check_zero,
    _type_name,
    _unpack_header,
    _views,
    require_finite,
)
from gossipfl.wire_copy import PARALLEL_FROM, copy_pieces, split

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAGIC",
    "PROTOCOL_VERSION",
    "SUPPORTED_DTYPES",
    "Envelope",
    "MetaValue",
    "decode",
    "encode",
    "encode_into",
    "encode_reusing",
    "encoded_size",
    "require_finite",
]

PROTOCOL_VERSION: Final[int] = 1
"""Version of the header's schema; a node refuses frames of any other version."""

DEFAULT_MAX_BYTES: Final[int] = 512 * 2**20
"""Largest frame :func:`decode` accepts unless told otherwise (512 MiB)."""

MAGIC: Final[bytes] = b"GFL\x01"
"""First four bytes of every frame; the last byte is the frame layout's version."""

_LITTLE_ENDIAN_HOST: bool = sys.byteorder == "little"  # a module global so tests can flip it
_NOT_WRITABLE_WARNING: Final = "The given buffer is not writable"


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
#
# Gossip sends the same model shape over and over, so what depends only on the tensors' names,
# dtypes and shapes -- their validation, the block offsets, the packed tensor table -- is worked out
# once per shape (`_Layout`) and looked up after that; a message then costs one small msgpack pack
# of its scalar fields, a few slices and one memcpy per tensor.


class _Layout:
    """The blocks of one tensor signature (names, dtypes, shapes, in order).

    Blocks sit at fixed distances from the first one (``data_start``, itself 64-byte aligned, so
    each block stays aligned); only ``data_start`` moves with the header's length. The packed
    table is kept for each ``data_start`` met (one or two in practice).
    """

    __slots__ = ("blocks", "length", "packed", "rows", "starts", "writes")

    def __init__(self, rows: list[tuple[str, str, list[int], int]]) -> None:
        self.rows = rows  # (name, dtype name, shape, nbytes)
        # (offset from data_start, nbytes, zero padding before it), one per row
        self.blocks: list[tuple[int, int, int]] = []
        end = 0
        for *_, nbytes in rows:
            off = _align(end)
            self.blocks.append((off, nbytes, off - end))
            end = off + nbytes
        self.length = end  # from data_start to the end of the last block
        self.packed: dict[int, bytes] = {}
        self.starts: dict[int, int] = {}  # length of the packed scalar fields -> data_start
        self.writes: dict[int, list[tuple[int, int, int, bytes]]] = {}

    def data_start(self, scalars_len: int, trailer: int) -> int:
        """Where the first block starts after a header whose scalar fields pack to
        ``scalars_len`` bytes: the least fixed point of data_start == align(8 + len(header)).

        Offsets depend on the header's length and the header holds the offsets. Starting from the
        smallest possible start the iteration climbs monotonically (a later start never shortens
        the header) to the fixed point decode insists on; it depends on nothing but the scalars'
        length (and the trailer, which only moves ``total``), so it is remembered per length.
        """
        key = scalars_len + (trailer << 32)
        start = self.starts.get(key)
        if start is None:
            start = _ALIGN
            while True:
                end = start + self.length + trailer
                header_len = scalars_len + len(self.table(start)) + len(_TOTAL_KEY) + len(msgpack.packb(end))
                needed = _align(_PREFIX + header_len)  # the map's marker byte is replaced, not added
                if needed == start:
                    break
                start = needed
            if len(self.starts) >= 64:
                self.starts.clear()
            self.starts[key] = start
        return start

    def blocks_at(self, data_start: int) -> list[tuple[int, int, int, bytes]]:
        """Each block's (offset, nbytes, where its zero padding starts, the padding) for blocks
        from ``data_start`` on: `_write`'s loop, with nothing left to work out per message."""
        writes = self.writes.get(data_start)
        if writes is None:
            writes = [(data_start + rel, nbytes, data_start + rel - gap, _ZEROS[:gap])
                      for rel, nbytes, gap in self.blocks]
            if len(self.writes) >= 8:
                self.writes.clear()
            self.writes[data_start] = writes
        return writes

    def table(self, data_start: int) -> bytes:
        """The header's ``"tensors"`` key and table, packed, for blocks from ``data_start`` on."""
        packed = self.packed.get(data_start)
        if packed is None:
            table = [[name, dtype, shape, data_start + rel, nbytes]
                     for (name, dtype, shape, nbytes), (rel, _, _) in zip(self.rows, self.blocks, strict=True)]
            packed = _TENSORS_KEY + msgpack.packb(table, use_bin_type=True)
            if len(self.packed) >= 8:
                self.packed.clear()
            self.packed[data_start] = packed
        return packed


_LAYOUTS: dict[tuple[tuple[Any, ...], ...], _Layout] = {}
_MAX_LAYOUTS: Final = 64  # distinct tensor signatures remembered (a node uses one or two)
_LAYOUTS_LOCK = threading.Lock()
_TENSORS_KEY: Final = msgpack.packb("tensors")
_TOTAL_KEY: Final = msgpack.packb("total")
_FIXMAP_14: Final = b"\x8e"  # a msgpack map of the 12 scalar fields plus "tensors" and "total"
_STRIDED: Final = torch.strided
_TENSOR: Final = torch.Tensor


class _Plan(NamedTuple):
    """Where everything goes in one frame; computed once per message."""

    head: bytes  # the frame's first data_start bytes: magic, header length, header, zero padding
    data_start: int
    body_end: int  # end of the last tensor; the trailer (if any) starts here
    total: int
    layout: _Layout
    items: list[torch.Tensor]  # in table order
    sources: list[int]  # each item's data address when one memcpy copies it, else 0


def _check_field_types(env: Envelope) -> None:
    """Refuse to build a frame that the receiving node would reject anyway."""
    # The usual envelope in one expression (this is part of every message's fixed cost): exact
    # types, numbers in range, short strings; anything else gets the checks below, which explain.
    step, round_, age, weight = env.step, env.round, env.age, env.weight
    cluster, sender, algorithm, fingerprint, kind = env.cluster, env.sender, env.algorithm, env.fingerprint, env.kind
    if (
        env.version == PROTOCOL_VERSION
        and type(step) is int and 0 <= step <= _UINT_MAX
        and type(round_) is int and 0 <= round_ <= _UINT_MAX
        and type(age) is float and 0 <= age < math.inf
        and type(weight) is float and -math.inf < weight < math.inf
        and type(cluster) is str and type(sender) is str and type(algorithm) is str
        and type(fingerprint) is str and type(kind) is str
        and max(len(cluster), len(sender), len(algorithm), len(fingerprint), len(kind)) <= _MAX_FIELD_LEN
    ):
        _check_meta(env.meta, prefix="cannot encode: ")
        return
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


def _new_layout(tensors: Mapping[Any, Any]) -> _Layout:
    """Validate every tensor of a signature not seen before and lay its blocks out."""
    rows: list[tuple[str, str, list[int], int]] = []
    for name, t in tensors.items():
        if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME_LEN:
            raise WireError(f"cannot encode tensor name {name!r}: need a str of 1-{_MAX_NAME_LEN}")
        if not isinstance(t, torch.Tensor):
            raise WireError(f"cannot encode tensor {name!r}: a {type(t).__name__}, not a tensor")
        dtype = _DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise WireError(
                f"cannot encode tensor {name!r}: dtype {t.dtype} is not one of {', '.join(SUPPORTED_DTYPES)}"
            )
        if t.layout is not _STRIDED or t.is_meta:
            raise WireError(f"cannot encode tensor {name!r}: only dense tensors with data")
        shape = list(t.shape)
        if len(shape) > _MAX_NDIM:
            raise WireError(f"cannot encode tensor {name!r}: more than {_MAX_NDIM} dimensions")
        rows.append((name, dtype, shape, t.nbytes))
    return _Layout(rows)


def _layout(tensors: object) -> tuple[_Layout, list[torch.Tensor], list[int]]:
    """The layout of ``tensors`` (from the cache when its signature was seen), the tensors, and
    where each one's bytes start when a plain memcpy can take them (else 0: `_copy_tensor`)."""
    if type(tensors) is not dict and not isinstance(tensors, Mapping):  # the ABC check is slow
        raise WireError("cannot encode: tensors must be a dict of name -> tensor")
    if len(tensors) > _MAX_TENSORS:
        raise WireError(f"cannot encode more than {_MAX_TENSORS} tensors, got {len(tensors)}")
    key: list[tuple[Any, ...]] = []
    items: list[torch.Tensor] = []
    sources: list[int] = []
    little = _LITTLE_ENDIAN_HOST
    for name, t in tensors.items():
        # Layout and device-type are part of the key's validity: a sparse or meta tensor of a
        # cached shape must still be refused, so anything unusual takes the full check.
        if not isinstance(t, _TENSOR) or t.layout is not _STRIDED:
            _new_layout(tensors)  # raises, naming the tensor
            raise AssertionError("unreachable: _new_layout refuses this tensor")
        if t.is_cpu:  # (never meta) the common case: one memcpy when contiguous and not negated
            sources.append(t.data_ptr() if little and t.is_contiguous() and not t.is_neg() else 0)
        elif t.is_meta:
            _new_layout(tensors)
            raise AssertionError("unreachable: _new_layout refuses a meta tensor")
        else:
            sources.append(0)
        key.append((name, t.dtype, t.shape))
        items.append(t)
    signature = tuple(key)
    layout = _LAYOUTS.get(signature)
    if layout is None:
        layout = _new_layout(tensors)
        with _LAYOUTS_LOCK:
            if len(_LAYOUTS) >= _MAX_LAYOUTS:
                _LAYOUTS.clear()
            _LAYOUTS[signature] = layout
    return layout, items, sources


def _plan(env: Envelope, secret: bytes | None) -> _Plan:
    """Validate ``env`` and lay out its frame without touching any tensor data."""
    _check_field_types(env)
    _check_secret(secret)
    layout, items, sources = _layout(env.tensors)
    signed = secret is not None
    trailer = _SIG_LEN if signed else 0
    # The header is a msgpack map of these twelve fields followed by "tensors" and "total"; the
    # map is packed once here and the two entries that depend on where the data starts appended.
    scalars = msgpack.packb(
        {
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
        },
        use_bin_type=True,
    )
    data_start = layout.data_start(len(scalars), trailer)
    table = layout.table(data_start)
    end = data_start + layout.length
    total = _TOTAL_KEY + msgpack.packb(end + trailer)
    header_len = len(scalars) + len(table) + len(total)  # the map's marker byte is replaced
    if header_len > _MAX_HEADER_BYTES:
        raise WireError(f"cannot encode: header of {header_len} bytes is over the limit")
    # Padded with zeros explicitly: a reused buffer holds the previous message's bytes.
    head = b"".join((MAGIC, _UINT32.pack(header_len), _FIXMAP_14, memoryview(scalars)[1:], table, total,
                     _ZEROS[: data_start - _PREFIX - header_len]))
    return _Plan(head, data_start, end, end + trailer, layout, items, sources)


def _check_secret(secret: bytes | None) -> None:
    if secret is None:
        return
    if not isinstance(secret, bytes | bytearray):
        raise TypeError(f"secret must be bytes, not {type(secret).__name__}")
    if len(secret) == 0:
        # An empty key "signs" with a value anyone can compute: almost surely a config mistake.
        raise ValueError("secret must not be empty")


def _write(plan: _Plan, out: bytearray | memoryview | mmap.mmap, secret: bytes | None) -> int:
    mv = memoryview(out)
    if mv.readonly:
        raise TypeError("output buffer is read-only")
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    if mv.nbytes < plan.total:
        raise ValueError(f"output buffer of {mv.nbytes} bytes is too small for {plan.total}")
    data_start = plan.data_start
    mv[:data_start] = plan.head
    if plan.items:
        address = ctypes.addressof(ctypes.c_char.from_buffer(mv))
        memmove = ctypes.memmove
        shared = plan.layout.length >= PARALLEL_FROM
        pieces: list[tuple[int, int, int]] = []
        for (off, nbytes, pad_start, pad), src, t in zip(plan.layout.blocks_at(data_start), plan.sources,
                                                           plan.items, strict=True):
            if pad:
                mv[pad_start:off] = pad
            if not nbytes:
                continue
            if src:
                # The common case, and the fastest way there is: one memcpy of the tensor's
                # bytes without the GIL (ctypes drops it); a large frame's shared with a helper
                # thread that never makes this one wait (`gossipfl.wire_copy`).
                # In bounds: nbytes is the tensor's size and the plan fits `out`.
                if shared:
                    split(address + off, src, nbytes, pieces)
                else:
                    memmove(address + off, src, nbytes)
            else:
                _copy_tensor(t, np.frombuffer(mv, dtype=np.uint8, count=nbytes, offset=off))
        if pieces:
            copy_pieces(pieces)  # the tensors and `out` outlive the call: it waits for every piece
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


_B = TypeVar("_B", bytearray, memoryview, mmap.mmap)


def encode_reusing(env: Envelope, buf: _B, alloc: Callable[[int], _B], *,
                   secret: bytes | None = None) -> tuple[_B, int]:
    """Write ``env``'s frame into ``buf``, or into ``alloc(size)`` when ``buf`` is too small;
    return the buffer written and the frame's length.

    For a sender that keeps one buffer for every message: the same as `encoded_size` and then
    `encode_into`, with the frame laid out once instead of twice (a small message's fixed cost).
    """
    plan = _plan(env, secret)
    if len(buf) < plan.total:
        buf = alloc(plan.total)
    return buf, _write(plan, buf, secret)


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

_readonly_probe: list[bool] = []  # [whether torch warns on every read-only frombuffer], once known


def _readonly_warns() -> bool:
    """Whether views of a read-only buffer need the warning filter (see :func:`decode`).

    torch warns about read-only buffers once per process (a C++ warn-once), so after it has
    spoken the filter -- a swap of process-wide state that costs more than the rest of a small
    decode -- is skipped. Probed once, on two throwaway buffers, under the filter: should a torch
    version warn every time, the filter stays on.
    """
    if not _readonly_probe:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.frombuffer(bytes(8), dtype=torch.uint8)  # the warn-once fires here, if at all
            del caught[:]
            torch.frombuffer(bytes(8), dtype=torch.uint8)
        _readonly_probe.append(any(_NOT_WRITABLE_WARNING in str(w.message) for w in caught))
    return _readonly_probe[0]


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
        if mv.readonly and _readonly_warns():
            # torch.frombuffer warns that it cannot mark tensors read-only; the docstring says
            # so instead. Only that warning (matched by its text), and only here. In Python 3.11
            # catch_warnings swaps process-wide state, so decoding bytes from two threads at once
            # is best avoided; torch emits this warning only once per process, so in practice
            # only the first read-only decode gets here (see _readonly_warns).
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_NOT_WRITABLE_WARNING, category=UserWarning)
                tensors = _views(mv, rows, body_end, little_endian=_LITTLE_ENDIAN_HOST)
        else:
            tensors = _views(mv, rows, body_end, little_endian=_LITTLE_ENDIAN_HOST)

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


