"""Random and mutated wire frames for the decoder fuzzer (`scripts/fuzz_wire.py`).

Every mutated frame starts from a real one (``wire.encode`` of an envelope, signed or unsigned,
as a node sends it) and breaks it in one or two ways: at the byte level (flips, truncation,
extension, insertion, splicing two frames), in the fixed prefix (magic, declared header length),
or inside the msgpack header, which is then laid out canonically again and re-signed, so the
defect gets past the signature and the layout checks and reaches the check it is aimed at
(fields of the wrong type or size, tensor tables with other dtypes, shapes, counts, offsets and
lengths, huge declared sizes, NaN and Inf payloads). A few cases are pure noise.

``make_case(rng, pool)`` returns ``(operator name, frame bytes)``; the pool holds the valid frames
the mutations start from and the secret they are re-signed with.
"""

from __future__ import annotations

import hmac
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from gossipfl import wire
from gossipfl.node.replay import stamp

__all__ = ["FramePool", "OPERATORS", "make_case", "relayout", "split"]

_ALIGN = 64
_DTYPES = list(wire.SUPPORTED_DTYPES)
# Values a hostile header may hold: type confusion, boundaries of msgpack's integers, non-finite
# floats, over-long strings, containers where scalars belong and the reverse.
_ODD_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 63, 64, 65, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**64 - 1,
    -(2**63), 0.0, -0.0, 0.5, 1e308, -1e308, float("nan"), float("inf"), float("-inf"), "", "x",
    "a" * 255, "a" * 256, "a" * 257, "é" * 200, "\x00", [], [0], [[]], {}, {"a": 1}, {1: 2},
    [0] * 40, "float32", "params", "gossip",
]
_DIMS = [0, 1, 2, 3, 7, 63, 64, 65, 1000, 2**31 - 1, 2**32, 2**62, 2**63 - 1, 2**64 - 1, -1]


@dataclass
class FramePool:
    """Valid frames to start from, as a node of this model would send and receive them.

    ``numel``/``dtype``: the receiving node's flat parameter vector; frames also carry other
    shapes and dtypes (and several tensors), so that mutations reach every table check."""

    cluster: str
    algorithm: str
    fingerprint: str
    numel: int
    dtype: torch.dtype
    secret: bytes | None = None  # the signed frames' key (the receiver's, when fuzzing a node)
    seed: int = 0
    frames: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        for i in range(24):
            if i % 3 == 0:  # the node's own message: one flat params vector
                tensors = {"params": torch.randn(self.numel, generator=gen).to(self.dtype)}
            elif i % 3 == 1:  # several tensors, mixed dtypes, padding between them
                tensors = {
                    "params": torch.randn(self.numel, generator=gen).to(self.dtype),
                    "w": torch.randn(3, 5, generator=gen),
                    "b": (torch.arange(7) % 2).to(_pick_dtype(rng)),
                    "e": torch.empty(0, 4),
                }
            else:
                tensors = {
                    f"t{k}": torch.randn(rng.randint(0, 40), generator=gen).to(_pick_dtype(rng))
                    for k in range(rng.randint(0, 4))
                }
            meta: dict[str, Any] = {"degree": rng.randint(1, 8), "lr": 0.1, "tag": "x", "flag": True}
            self.frames.append(self.encode(tensors, meta=meta, signed=self.secret is not None and i % 2 == 0,
                                           step=rng.randint(0, 10**6)))

    def encode(self, tensors: dict[str, torch.Tensor], *, meta: dict[str, Any] | None = None,
               signed: bool = False, step: int = 0, sender: str = "fuzzer") -> bytes:
        """A frame from the real encoder (signed frames carry a fresh time and nonce, as a node's)."""
        meta = dict(meta or {})
        if signed:
            meta = stamp(meta, time.time)
        env = wire.Envelope(cluster=self.cluster, sender=sender, algorithm=self.algorithm,
                            fingerprint=self.fingerprint, step=step, age=1.5, round=step % 5, weight=0.5,
                            meta=meta, tensors=tensors)
        return bytes(wire.encode(env, secret=self.secret if signed else None))


def _pick_dtype(rng: random.Random) -> torch.dtype:
    return wire.SUPPORTED_DTYPES[rng.choice(_DTYPES)]


# --------------------------------------------------------------------------- frame surgery


def split(frame: bytes) -> tuple[dict[str, Any], list[bytes], bool]:
    """A valid frame's header, tensor blobs (in table order) and whether it is signed."""
    (n,) = struct.unpack_from("<I", frame, 4)
    header = msgpack.unpackb(frame[8 : 8 + n], raw=False, strict_map_key=False)
    blobs = [frame[off : off + nb] for _, _, _, off, nb in header["tensors"]]
    return header, blobs, bool(header["signed"])


def relayout(header: dict[str, Any], blobs: list[bytes], *, secret: bytes | None,
             tweak: Callable[[dict[str, Any]], None] | None = None) -> bytes:
    """Lay ``header`` and ``blobs`` out canonically (offsets, nbytes, total); sign if ``secret``.

    ``tweak`` edits the header after the layout is fixed (a wrong offset, length or total that
    should stay wrong); the header is packed once more with it, so sizes may then shift."""
    header = dict(header)
    table = header.get("tensors")
    rows = [list(r) if isinstance(r, list) else r for r in table] if isinstance(table, list) else None
    trailer = 32 if secret is not None else 0
    data_start = _ALIGN
    for _ in range(8):  # the fixed point of "offsets depend on the header's length"
        end = data_start
        if rows is not None:
            for row, blob in zip(rows, blobs, strict=False):
                off = -(-end // _ALIGN) * _ALIGN
                if isinstance(row, list) and len(row) == 5:
                    row[3], row[4] = off, len(blob)
                end = off + len(blob)
            header["tensors"] = rows
        header["total"] = end + trailer
        packed = msgpack.packb(header, use_bin_type=True)
        needed = -(-(8 + len(packed)) // _ALIGN) * _ALIGN
        if needed == data_start:
            break
        data_start = needed
    if tweak is not None:
        tweak(header)
        packed = msgpack.packb(header, use_bin_type=True)
    out = bytearray(wire.MAGIC + struct.pack("<I", len(packed)) + packed)
    out += bytes(data_start - len(out)) if data_start > len(out) else b""
    for blob in blobs:
        out += bytes(-len(out) % _ALIGN) + blob
    if secret is not None:
        out += hmac.digest(secret, bytes(out), "sha256")
    return bytes(out)


def _rebuild(rng: random.Random, pool: FramePool, frame: bytes,
             edit: Callable[[dict[str, Any], list[bytes]], Callable[[dict[str, Any]], None] | None]) -> bytes:
    """Edit a frame's header (and blobs), lay it out again, and sign it as the original was.

    A signed frame gets a fresh nonce, so a node's replay guard passes it on to the real checks."""
    header, blobs, signed = split(frame)
    if signed and isinstance(header.get("meta"), dict):
        header["meta"] = stamp({k: v for k, v in header["meta"].items() if k not in ("ts", "nonce")},
                               time.time)
    tweak = edit(header, blobs)
    return relayout(header, blobs, secret=pool.secret if signed else None, tweak=tweak)


# --------------------------------------------------------------------------- operators

Operator = Callable[[random.Random, FramePool, bytes], bytes]


def flip_bytes(rng: random.Random, pool: FramePool, f: bytes) -> bytes:
    b = bytearray(f)
    for _ in range(rng.choice((1, 1, 2, 4, 16))):
        b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


def flip_bits(rng: random.Random, pool: FramePool, f: bytes) -> bytes:
    b = bytearray(f)
    pos = rng.randrange(min(len(b), 8 + struct.unpack_from("<I", f, 4)[0])) if rng.random() < 0.7 \
        else rng.randrange(len(b))  # mostly inside the prefix and header, where decisions are made
    b[pos] ^= 1 << rng.randrange(8)
    return bytes(b)


def truncate(rng: random.Random, pool: FramePool, f: bytes) -> bytes:
    return f[: rng.choice((0, 1, 4, 7, 8, rng.randrange(len(f)), len(f) - 1, len(f) - 32))]


def extend(rng: random.Random, pool: FramePool, f: bytes) -> bytes:
    tail = rng.choice((b"\x00", bytes(32), bytes(64), rng.randbytes(rng.randint(1, 200)), f))
    if rng.random() < 0.1:
        tail = bytes(70_000)  # past 64 KiB: the node reads such bodies into a pooled buffer
    return f + tail


def insert_delete(rng: random.Random, pool: FramePool, f: bytes) -> bytes:
    pos = rng.randrange(len(f))
    if rng.random() < 0.5:
        return f[:pos] + rng.randbytes(rng.randint(1, 64)) + f[pos:]
    return f[:pos] + f[pos + rng.randint(1, 64):]


def splice(rng: random.Random, pool: FramePool, f: bytes) -> bytes:
    """One frame's prefix and header with another's data (or the cut anywhere)."""
    g = rng.choice(pool.frames)
    if rng.random() < 0.5:
        cut_f = 8 + struct.unpack_from("<I", f, 4)[0]
        cut_g = 8 + struct.unpack_from("<I", g, 4)[0]
        return f[:cut_f] + g[cut_g:]
    return f[: rng.randrange(len(f))] + g[rng.randrange(len(g)):]


def prefix(rng: random.Random, pool: FramePool, f: bytes) -> bytes:
    """The magic or the declared header length: off by a little, or huge."""
    b = bytearray(f)
    if rng.random() < 0.25:
        b[rng.randrange(4)] = rng.randrange(256)
    else:
        (n,) = struct.unpack_from("<I", f, 4)
        new = rng.choice((0, 1, n - 1, n + 1, n + 64, n - 64, len(f), 2**22, 2**22 + 1, 2**32 - 1,
                          rng.randrange(2**32)))
        struct.pack_into("<I", b, 4, new % 2**32)
    return bytes(b)


def header_field(rng: random.Random, pool: FramePool, f: bytes) -> bytes:
    """One envelope field replaced, removed or added, then re-laid-out and re-signed."""

    def edit(h: dict[str, Any], blobs: list[bytes]) -> None:
        key = rng.choice([*h, "extra"])
        roll = rng.random()
        if roll < 0.15:
            h.pop(key, None)
        elif roll < 0.25 and isinstance(h.get("meta"), dict):
            h["meta"][rng.choice(("k", "ts", "nonce", "a" * 65, "degree"))] = rng.choice(_ODD_VALUES)
            for _ in range(rng.choice((0, 0, 70))):  # too many entries
                h["meta"][f"m{len(h['meta'])}"] = 1
        else:
            h[key] = rng.choice(_ODD_VALUES)

    return _rebuild(rng, pool, f, edit)


def _row_edit(rng: random.Random, rows: list[list[Any]], blobs: list[bytes]) -> None:
    i = rng.randrange(len(rows))
    row = rows[i]
    what = rng.choice(("dtype", "shape", "name", "dup", "drop", "swap", "resize", "row"))
    if what == "dtype":
        row[1] = rng.choice([*_DTYPES, "complex64", "float8", "", "FLOAT32", 3])
    elif what == "shape":
        shape = list(row[2]) if isinstance(row[2], list) else []
        op = rng.randrange(4)
        if op == 0 and shape:
            shape[rng.randrange(len(shape))] = rng.choice(_DIMS)
        elif op == 1:
            shape.append(rng.choice(_DIMS))
        elif op == 2:
            shape = shape[::-1] if len(shape) > 1 else [0, *shape]
        else:
            shape = [1] * rng.choice((33, 40)) if rng.random() < 0.5 else rng.choice(_ODD_VALUES)
        row[2] = shape
    elif what == "name":
        row[0] = rng.choice(("", "a" * 513, "params", rows[0][0], 7, None, "é"))
    elif what == "dup":
        rows.insert(i, list(row))
        blobs.insert(i, blobs[i])
    elif what == "drop":
        del rows[i]
        del blobs[i]
    elif what == "swap" and len(rows) > 1:
        j = rng.randrange(len(rows))
        rows[i], rows[j] = rows[j], rows[i]  # names and shapes move, blobs stay: sizes disagree
    elif what == "resize":
        # Shape, dtype and data all consistent with each other, but not what the receiver expects.
        dtype = rng.choice(_DTYPES)
        n = rng.choice((0, 1, 5, 64))
        row[1], row[2] = dtype, [n]
        blobs[i] = rng.randbytes(n * torch.empty((), dtype=wire.SUPPORTED_DTYPES[dtype]).element_size())
    else:
        rows[i] = rng.choice((row[:4], [*row, 0], "row", None, {}))


def tensor_table(rng: random.Random, pool: FramePool, f: bytes) -> bytes:
    """Dtype, shape, name or count of the tensors changed, laid out again (lengths follow the data)."""

    def edit(h: dict[str, Any], blobs: list[bytes]) -> None:
        rows = h["tensors"]
        if not rows:
            rows.append(["x", rng.choice(_DTYPES), [rng.choice(_DIMS)], 0, 0])
            blobs.append(rng.randbytes(rng.choice((0, 4, 64))))
        else:
            _row_edit(rng, rows, blobs)
        if rng.random() < 0.05:  # thousands of rows
            rows.extend([f"r{k}", "uint8", [1], 0, 1] for k in range(rng.choice((100, 5000))))
            blobs.extend(b"\x01" for _ in range(len(rows) - len(blobs)))

    return _rebuild(rng, pool, f, edit)


def declared_sizes(rng: random.Random, pool: FramePool, f: bytes) -> bytes:
    """Offsets, nbytes or total that lie about the data (huge, off by one, negative)."""

    def edit(h: dict[str, Any], blobs: list[bytes]) -> Callable[[dict[str, Any]], None]:
        def tweak(h2: dict[str, Any]) -> None:
            rows = h2["tensors"]
            choice = rng.random()
            if choice < 0.3 or not rows:
                h2["total"] = rng.choice((0, h2["total"] + 1, h2["total"] - 1, 2**63, 2**64 - 1, -1))
            else:
                row = rows[rng.randrange(len(rows))]
                col = rng.choice((3, 4))
                row[col] = rng.choice((row[col] + 1, row[col] - 1, row[col] + 64, row[col] - 64, 0, -1,
                                       2**31, 2**62, 2**63 - 1, 2**64 - 1, 1.0))
        return tweak

    return _rebuild(rng, pool, f, edit)


def nonfinite(rng: random.Random, pool: FramePool, f: bytes) -> bytes:
    """NaN or Inf written into a float tensor's data; the frame is otherwise valid (re-signed)."""
    header, blobs, signed = split(f)
    floats = [i for i, r in enumerate(header["tensors"])
              if r[1] in ("float16", "bfloat16", "float32", "float64") and r[4]]
    if not floats:
        return flip_bytes(rng, pool, f)

    def edit(h: dict[str, Any], bl: list[bytes]) -> None:
        i = rng.choice(floats)
        t = torch.frombuffer(bytearray(bl[i]), dtype=wire.SUPPORTED_DTYPES[h["tensors"][i][1]]).clone()
        bad = rng.choice((float("nan"), float("inf"), float("-inf")))
        idx = torch.randint(t.numel(), (rng.choice((1, 1, 3, t.numel())),))
        t[idx] = bad
        bl[i] = bytes(t.view(torch.uint8).numpy())

    return _rebuild(rng, pool, f, edit)


def noise(rng: random.Random, pool: FramePool, f: bytes) -> bytes:
    """Random bytes, with or without the magic and a plausible header length in front."""
    body = rng.randbytes(rng.choice((0, 1, 7, 8, 9, 64, 200, 1000)))
    if rng.random() < 0.5:
        return body
    return wire.MAGIC + struct.pack("<I", min(len(body), rng.randrange(len(body) + 2))) + body


def random_header(rng: random.Random, pool: FramePool, f: bytes) -> bytes:
    """A valid prefix and layout around a header that is some other msgpack value entirely."""
    if rng.random() < 0.2:  # arrays nested deeper than any packer would write
        packed = b"\x91" * rng.choice((10, 500, 5000, 100_000)) + b"\x90"
    else:
        value = rng.choice([*_ODD_VALUES, [1] * 5000, {"version": 1}, msgpack.ExtType(1, b"x"), b"bin"])
        packed = msgpack.packb(value, use_bin_type=True)
    out = wire.MAGIC + struct.pack("<I", len(packed)) + packed
    return out + bytes(-len(out) % _ALIGN)


def valid(rng: random.Random, pool: FramePool, f: bytes) -> bytes:
    """A fresh frame straight from the encoder (the fuzzer's control: it must be accepted)."""
    return _rebuild(rng, pool, f, lambda h, b: None)


OPERATORS: dict[str, tuple[Operator, float]] = {  # name -> (operator, relative weight)
    "flip_bytes": (flip_bytes, 3),
    "flip_bits": (flip_bits, 3),
    "truncate": (truncate, 1.5),
    "extend": (extend, 1),
    "insert_delete": (insert_delete, 1),
    "splice": (splice, 1),
    "prefix": (prefix, 1),
    "header_field": (header_field, 3),
    "tensor_table": (tensor_table, 3),
    "declared_sizes": (declared_sizes, 2),
    "nonfinite": (nonfinite, 1),
    "noise": (noise, 0.5),
    "random_header": (random_header, 0.5),
    "valid": (valid, 0.5),
}


def make_case(rng: random.Random, pool: FramePool) -> tuple[str, bytes]:
    """One fuzz case: an operator (sometimes two in a row) applied to a random pool frame."""
    names = list(OPERATORS)
    weights = [OPERATORS[n][1] for n in names]
    frame = rng.choice(pool.frames)
    name = rng.choices(names, weights)[0]
    frame = OPERATORS[name][0](rng, pool, frame)
    if rng.random() < 0.15 and len(frame) > 8:  # and then a byte-level defect on top
        second = rng.choice(("flip_bytes", "truncate", "extend", "flip_bits"))
        frame = OPERATORS[second][0](rng, pool, frame)
        name = f"{name}+{second}"
    return name, frame
