"""Tests for gossipfl.wire: round trips, zero-copy decoding, and rejection of every bad frame.

Malformed frames are built by re-packing a real frame's header with one defect and laying the
rest out canonically again (offsets, total length), so that each case trips exactly the check it
names; the expected message pins which check fired.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import math
import warnings
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossipfl import wire
from gossipfl.errors import BadSignature, FingerprintMismatch, MessageTooLarge, WireError
from gossipfl.wire import Envelope, decode, encode, encode_into, encoded_size, require_finite

SECRET = b"cluster-secret"
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- helpers


def _envelope(**overrides: Any) -> Envelope:
    fields: dict[str, Any] = {
        "cluster": "lab",
        "sender": "node-1",
        "algorithm": "gossip",
        "fingerprint": "ab" * 32,
        "step": 7,
        "age": 3.5,
        "round": 2,
        "weight": 0.25,
        "meta": {"degree": 4, "lr": 0.1, "tag": "x", "flag": True, "none": None},
        # Sizes that are not multiples of 64, so the frame has padding between blocks.
        "tensors": {
            "w": torch.arange(15, dtype=torch.float32).reshape(3, 5),
            "b": torch.arange(3, dtype=torch.int64),
            "m": torch.tensor([True, False]),
        },
    }
    fields.update(overrides)
    return Envelope(**fields)


def _align(n: int) -> int:
    return (n + 63) // 64 * 64


def _header(frame: bytes | bytearray) -> dict[str, Any]:
    header_len = int.from_bytes(frame[4:8], "little")
    return msgpack.unpackb(bytes(frame[8 : 8 + header_len]), raw=False)


def _blobs(frame: bytes | bytearray) -> list[bytes]:
    return [bytes(frame[off : off + nb]) for _, _, _, off, nb in _header(frame)["tensors"]]


def _raw(header_bytes: bytes, rest: bytes = b"", header_len: int | None = None) -> bytes:
    """A frame with arbitrary header bytes, padded to 64 like a real one."""
    n = len(header_bytes) if header_len is None else header_len
    body = wire.MAGIC + n.to_bytes(4, "little") + header_bytes
    return body + bytes(_align(len(body)) - len(body)) + rest


def _build(
    header: dict[str, Any],
    blobs: list[bytes],
    *,
    tweak: Callable[[list[Any], int], None] | None = None,
    set_total: bool = True,
    extra: bytes = b"",
    trailer: bytes = b"",
) -> bytearray:
    """Lay out ``header`` + ``blobs`` canonically, then let ``tweak`` break the tensor table.

    ``tweak(table, data_start)`` edits the table in place after the canonical layout; the frame
    keeps the canonical length plus ``extra`` (bytes after the tensors) and ``trailer``.
    """
    data_start = 64
    while True:
        h = copy.deepcopy(header)
        end = data_start
        table = h.get("tensors")
        if isinstance(table, list):
            for i, row in enumerate(table):
                if isinstance(row, list) and len(row) == 5 and i < len(blobs):
                    row[3] = _align(end)
                    end = row[3] + len(blobs[i])
            if tweak is not None:
                tweak(table, data_start)
        length = end + len(extra) + len(trailer)
        if set_total and "total" in h:
            h["total"] = length
        packed = msgpack.packb(h, use_bin_type=True)
        needed = _align(8 + len(packed))
        if needed <= data_start:
            break
        data_start = needed
    out = bytearray(length)
    out[:4] = wire.MAGIC
    out[4:8] = len(packed).to_bytes(4, "little")
    out[8 : 8 + len(packed)] = packed
    if isinstance(table, list):
        for i, row in enumerate(table):
            if i < len(blobs) and isinstance(row, list) and len(row) == 5:
                off = row[3]
                if type(off) is int and data_start <= off < end:  # never over the header
                    chunk = blobs[i][: max(0, end - off)]
                    out[off : off + len(chunk)] = chunk
    out[end : end + len(extra)] = extra
    if trailer:
        out[length - len(trailer) :] = trailer
    return out


def _rebuilt(edit: Callable[[dict[str, Any]], None], **kwargs: Any) -> bytearray:
    """The base frame with its header edited by ``edit`` and laid out again."""
    frame = encode(_envelope())
    header = _header(frame)
    edit(header)
    return _build(header, _blobs(frame), **kwargs)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        header[key] = value

    return edit


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        del header[key]

    return edit


def _row(index: int, column: int, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        header["tensors"][index][column] = value

    return edit


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    # Fresh standard-stride copies: .contiguous() keeps odd strides on size-1 dims.
    flat_a = torch.empty(a.numel(), dtype=a.dtype).copy_(a.reshape(-1))
    flat_b = torch.empty(b.numel(), dtype=b.dtype).copy_(b.reshape(-1))
    return torch.equal(flat_a.view(torch.uint8), flat_b.view(torch.uint8))


def _assert_same(sent: Envelope, got: Envelope) -> None:
    for key in ("cluster", "sender", "algorithm", "fingerprint", "kind", "step", "round"):
        assert getattr(got, key) == getattr(sent, key), key
    assert got.age == float(sent.age)
    assert got.weight == float(sent.weight)
    assert got.meta == sent.meta
    assert got.version == wire.PROTOCOL_VERSION
    assert list(got.tensors) == list(sent.tensors)
    for name, t in sent.tensors.items():
        assert _same_bits(t, got.tensors[name]), name


# --------------------------------------------------------------------------- round trips

DTYPES = list(wire.SUPPORTED_DTYPES.values())


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """Any allowed dtype and shape (0-dim, empty, multi-dim), arbitrary bits, maybe strided."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=4))
    layout = draw(st.sampled_from(["plain", "transposed", "strided", "expanded"]))
    if layout == "strided":
        shape = [*shape[:-1], 2 * shape[-1]] if shape else shape
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = bytearray(draw(st.binary(min_size=numel * itemsize, max_size=numel * itemsize)))
    if dtype == torch.bool:  # only 0 and 1 are valid bools
        raw = bytearray(b & 1 for b in raw)
    if raw:
        t = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape).clone()
    else:
        t = torch.empty(shape, dtype=dtype)
    if layout == "transposed" and t.dim() >= 2:
        t = t.transpose(0, -1)
    elif layout == "strided" and t.dim() >= 1:
        t = t[..., ::2]
    elif layout == "expanded" and t.dim() == 0:
        t = t.expand(3, 2)
    return t


meta_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
names = st.text(min_size=1, max_size=30)


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    return Envelope(
        cluster=draw(st.text(max_size=20)),
        sender=draw(st.text(max_size=20)),
        algorithm=draw(st.text(max_size=20)),
        fingerprint=draw(st.text(alphabet="0123456789abcdef", max_size=64)),
        kind=draw(st.sampled_from(["gossip", "exchange", "reply", ""])),
        step=draw(st.integers(0, 2**64 - 1)),
        age=draw(st.floats(min_value=0, allow_infinity=False)),
        round=draw(st.integers(0, 2**64 - 1)),
        weight=draw(st.floats(allow_nan=False, allow_infinity=False)),
        meta=draw(st.dictionaries(st.text(max_size=10), meta_values, max_size=5)),
        tensors=draw(st.dictionaries(names, tensors(), max_size=5)),
    )


@FAST
@given(env=envelopes(), signed=st.booleans(), as_bytes=st.booleans())
def test_round_trip_is_bit_exact(env: Envelope, signed: bool, as_bytes: bool) -> None:
    secret = SECRET if signed else None
    frame = encode(env, secret=secret)
    assert len(frame) == encoded_size(env, secret=secret)
    got = decode(bytes(frame) if as_bytes else frame, secret=secret)
    _assert_same(env, got)


@FAST
@given(env=envelopes())
def test_encode_into_a_dirty_reused_buffer_matches_encode(env: Envelope) -> None:
    frame = encode(env, secret=SECRET)
    out = bytearray(b"\xab" * (len(frame) + 100))
    used = encode_into(env, out, secret=SECRET)
    assert used == len(frame)
    assert out[:used] == frame  # padding was re-zeroed, not left from the previous contents
    assert out[used:] == b"\xab" * 100
    _assert_same(env, decode(memoryview(out)[:used], secret=SECRET))
    view = memoryview(bytearray(len(frame) + 10))[5:]  # a memoryview works as well
    assert encode_into(env, view, secret=SECRET) == len(frame)
    assert view[:used] == frame


@FAST
@given(env=envelopes())
def test_encode_reusing_grows_only_a_buffer_too_small(env: Envelope) -> None:
    frame = encode(env, secret=SECRET)
    made: list[int] = []

    def alloc(size: int) -> bytearray:
        made.append(size)
        return bytearray(b"\xcd" * size)

    small = bytearray(3)
    buf, n = wire.encode_reusing(env, small, alloc, secret=SECRET)
    assert made == [len(frame)]
    assert buf is not small
    assert n == len(frame)
    assert buf[:n] == frame
    dirty = bytearray(b"\xab" * (len(frame) + 7))
    again, n = wire.encode_reusing(env, dirty, alloc, secret=SECRET)
    assert again is dirty  # big enough: reused, nothing allocated
    assert made == [len(frame)]
    assert dirty[:n] == frame
    assert dirty[n:] == b"\xab" * 7


def test_layout_matches_the_documented_format() -> None:
    env = _envelope()
    frame = encode(env, secret=SECRET)
    assert frame[:4] == b"GFL\x01"
    header = _header(frame)
    assert set(header) == {
        "version", "cluster", "sender", "algorithm", "fingerprint", "kind", "step", "age",
        "round", "weight", "meta", "signed", "total", "tensors",
    }  # fmt: skip
    assert header["signed"] is True
    assert header["total"] == len(frame)
    data_start = _align(8 + int.from_bytes(frame[4:8], "little"))
    assert header["tensors"][0] == ["w", "float32", [3, 5], data_start, 60]
    for _, _, _, offset, _ in header["tensors"]:
        assert offset % 64 == 0
    assert frame[-32:] == hmac.new(SECRET, frame[:-32], hashlib.sha256).digest()
    assert _header(encode(env))["signed"] is False


def test_edge_tensors_round_trip() -> None:
    env = _envelope(
        tensors={
            "scalar": torch.tensor(1.5, dtype=torch.float64),
            "empty": torch.zeros(0),
            "empty2d": torch.zeros(4, 0, dtype=torch.int16),
            "bf16": torch.randn(7, dtype=torch.bfloat16),
            "half": torch.randn(2, 3, dtype=torch.float16),
            "param": torch.nn.Parameter(torch.randn(3, 3)),  # requires_grad
            "expanded": torch.tensor([1, 2], dtype=torch.int8).expand(3, 2),
            "permuted": torch.randn(2, 3, 4).permute(2, 0, 1),
        }
    )
    got = decode(encode(env))
    _assert_same(env, got)
    assert got.tensors["scalar"].shape == ()
    assert got.tensors["empty2d"].shape == (4, 0)
    assert not got.tensors["param"].requires_grad


def test_no_tensors_and_defaults() -> None:
    env = Envelope(cluster="c", sender="s", algorithm="a", fingerprint="f")
    got = decode(encode(env))
    _assert_same(env, got)
    assert (got.kind, got.step, got.age, got.round, got.weight) == ("gossip", 0, 0.0, 0, 1.0)


def test_repr_summarises_tensors() -> None:
    text = repr(_envelope())
    assert "w:float32[3, 5]" in text
    assert "tensor(" not in text


def test_decoded_tensors_alias_the_input_buffer() -> None:
    env = _envelope(tensors={"w": torch.randn(1000), "b": torch.randn(10, 10)})
    frame = encode(env)
    start = torch.frombuffer(frame, dtype=torch.uint8).data_ptr()
    got = decode(frame)
    for t in got.tensors.values():
        assert start <= t.data_ptr()
        assert t.data_ptr() + t.nbytes <= start + len(frame)
        assert t.data_ptr() % 64 == start % 64  # 64-byte aligned within the frame
    # Writing through the buffer shows up in the tensor: it is a view, not a copy.
    offset = got.tensors["w"].data_ptr() - start
    frame[offset : offset + 4] = torch.tensor([42.0]).view(torch.uint8).numpy().tobytes()
    assert got.tensors["w"][0].item() == 42.0


def test_decoding_read_only_bytes_emits_no_warning() -> None:
    frame = bytes(encode(_envelope()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = decode(frame)
        got2 = decode(memoryview(frame))
    assert torch.equal(got.tensors["w"], got2.tensors["w"])


def test_decode_reads_any_contiguous_buffer_as_bytes() -> None:
    env = _envelope(tensors={"w": torch.randn(5)})
    frame = encode(env, secret=SECRET)
    assert len(frame) % 4 == 0
    _assert_same(env, decode(memoryview(frame).cast("I"), secret=SECRET))
    with pytest.raises(TypeError, match="contiguous"):
        decode(memoryview(frame)[::2])


def test_cuda_like_and_non_contiguous_sources_are_copied_once() -> None:
    base = torch.randn(64, 64)
    env = _envelope(tensors={"t": base.t(), "s": base[::3, ::5]})
    _assert_same(env, decode(encode(env)))


def test_negative_bit_views_are_resolved() -> None:
    base = torch.arange(6, dtype=torch.float32)
    negated = torch._neg_view(base)  # lazily negated: the raw bytes are still base's
    assert negated.is_neg()
    got = decode(encode(_envelope(tensors={"n": negated})))
    assert torch.equal(got.tensors["n"], -base)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_tensors_are_moved_to_cpu() -> None:
    gpu = torch.randn(4, 5, device="cuda")
    env = _envelope(tensors={"g": gpu, "gt": gpu.t()})
    got = decode(encode(env))
    assert got.tensors["g"].device.type == "cpu"
    assert torch.equal(got.tensors["g"], gpu.cpu())
    assert torch.equal(got.tensors["gt"], gpu.t().cpu())


def test_big_endian_host_byteswaps_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    # We cannot run on a big-endian host, so pretend: the swap must run on encode and undo
    # itself on decode, and a 1-byte dtype must be left alone.
    env = _envelope(tensors={"f": torch.tensor([1.0, -2.5]), "u": torch.tensor([1, 2, 3]).byte()})
    little = encode(env)
    monkeypatch.setattr(wire, "_LITTLE_ENDIAN_HOST", False)
    swapped = encode(env)
    off = _header(swapped)["tensors"][0][3]
    assert swapped[off : off + 8] == torch.tensor([1.0, -2.5]).numpy().astype(">f4").tobytes()
    assert little != swapped
    got = decode(swapped)
    _assert_same(env, got)
    assert swapped == encode(env)  # decoding swapped a copy, not the caller's buffer


# --------------------------------------------------------------------------- encode refusals


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"tensors": {"c": torch.zeros(2, dtype=torch.complex64)}}, "dtype"),
        ({"tensors": {"": torch.zeros(2)}}, "tensor name"),
        ({"tensors": {"x": [1.0, 2.0]}}, "not a tensor"),
        ({"tensors": {"s": torch.zeros(3).to_sparse()}}, "dense"),
        ({"step": -1}, "step"),
        ({"step": True}, "step"),
        ({"round": 1.5}, "round"),
        ({"age": math.nan}, "age"),
        ({"age": -1.0}, "age"),
        ({"weight": math.inf}, "weight"),
        ({"cluster": 3}, "cluster"),
        ({"sender": "x" * 300}, "sender"),
        ({"meta": {"x": [1]}}, "meta"),
        ({"meta": {1: 2}}, "meta key"),
        ({"version": 2}, "protocol version"),
    ],
)
def test_encode_refuses_what_the_wire_cannot_carry(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(WireError, match=match):
        encode(_envelope(**overrides))


def test_encode_into_checks_the_buffer() -> None:
    env = _envelope()
    with pytest.raises(ValueError, match="too small"):
        encode_into(env, bytearray(encoded_size(env) - 1))
    with pytest.raises(TypeError, match="read-only"):
        encode_into(env, memoryview(bytes(encoded_size(env))))


def test_secret_must_be_non_empty_bytes() -> None:
    with pytest.raises(ValueError, match="empty"):
        encode(_envelope(), secret=b"")
    with pytest.raises(TypeError, match="bytes"):
        decode(encode(_envelope()), secret="text")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- decode refusals


def _valid() -> bytearray:
    return encode(_envelope())


def _with_header_len(value: int) -> bytearray:
    frame = _valid()
    frame[4:8] = value.to_bytes(4, "little")
    return frame


def _padding_byte(after_header: bool) -> bytearray:
    frame = _valid()
    header_end = 8 + int.from_bytes(frame[4:8], "little")
    if after_header:
        assert header_end % 64, "test needs header padding"
        frame[header_end] = 1
    else:
        _, _, _, off, nbytes = _header(frame)["tensors"][0]
        assert (off + nbytes) % 64, "test needs padding after the first tensor"
        frame[off + nbytes] = 1
    return frame


def _tensor_table(rows: Any) -> bytearray:
    frame = _valid()
    header = _header(frame)
    header["tensors"] = rows
    return _build(header, [])


def _many_meta() -> bytearray:
    return _rebuilt(_set("meta", {f"k{i}": i for i in range(65)}))


def _dup_names() -> bytearray:
    frame = _valid()
    header = _header(frame)
    header["tensors"][1][0] = "w"
    return _build(header, _blobs(frame))


def _nbytes_mismatch() -> bytearray:
    frame = _valid()
    header = _header(frame)
    header["tensors"][0][2] = [5, 3, 1, 2]  # 30 elements, but still 60 bytes
    return _build(header, _blobs(frame))


def _tweaked(tweak: Callable[[list[Any], int], None], **kwargs: Any) -> bytearray:
    frame = _valid()
    return _build(_header(frame), _blobs(frame), tweak=tweak, **kwargs)


def _misaligned(table: list[Any], start: int) -> None:
    table[1][3] += 8


def _over_header(table: list[Any], start: int) -> None:
    table[0][3] = start - 64


def _over_tensor(table: list[Any], start: int) -> None:
    table[1][3] = table[0][3]


def _past_end(table: list[Any], start: int) -> None:
    table[2][3] += 64


def _gap(table: list[Any], start: int) -> None:
    table[0][3] += 64
    table[1][3] += 64
    table[2][3] += 64


def _negative_offset(table: list[Any], start: int) -> None:
    table[0][3] = -64


def _signed_without_room() -> bytearray:
    env = Envelope(cluster="c", sender="s", algorithm="a", fingerprint="f")
    frame = encode(env)
    header = _header(frame)
    header["signed"] = True
    return _build(header, [])


def _unsigned_flag_with_valid_hmac() -> bytearray:
    """A frame whose HMAC verifies although its header says unsigned."""
    frame = encode(_envelope())
    header = _header(frame)
    framed = _build(header, _blobs(frame), trailer=bytes(32))
    framed[-32:] = hmac.new(SECRET, framed[:-32], hashlib.sha256).digest()
    return framed


MALFORMED: list[Any] = [
    # framing
    pytest.param(lambda: b"", "empty message", id="empty"),
    pytest.param(lambda: b"GFL\x01\x00", "too short", id="short"),
    pytest.param(lambda: b"XFL\x01" + _valid()[4:], "bad magic", id="bad-magic"),
    pytest.param(lambda: b"GFL\x02" + _valid()[4:], "bad magic", id="other-frame-version"),
    pytest.param(lambda: _with_header_len(2**31), "over the limit", id="header-len-limit"),
    pytest.param(lambda: _with_header_len(len(_valid())), "runs past", id="header-len-past-end"),
    pytest.param(lambda: _valid()[:-1], "length mismatch", id="truncated-by-1"),
    pytest.param(lambda: _valid() + b"\0", "length mismatch", id="appended-byte"),
    pytest.param(lambda: _rebuilt(lambda h: None, extra=bytes(64)), "trailing garbage", id="garbage-in-total"),
    # header encoding
    pytest.param(lambda: _raw(b"\xc1"), "not valid msgpack", id="never-used-byte"),
    pytest.param(lambda: _raw(b"\x85\xa1a"), "not valid msgpack", id="truncated-map"),
    pytest.param(lambda: _raw(msgpack.packb({}) + b"\x01"), "not valid msgpack", id="extra-data"),
    pytest.param(lambda: _raw(b"\x91" * 5000), "not valid msgpack", id="deep-nesting"),
    pytest.param(lambda: _raw(msgpack.packb([1, 2])), "must be a msgpack map", id="array-header"),
    pytest.param(lambda: _raw(msgpack.packb(b"xyz")), "not valid msgpack", id="bin-header"),
    pytest.param(lambda: _raw(msgpack.packb({1: 2})), "not valid msgpack", id="int-key"),
    pytest.param(lambda: _rebuilt(_set("meta", msgpack.ExtType(1, b"abc"))), "not valid msgpack", id="ext"),
    pytest.param(lambda: _rebuilt(_set("cluster", b"lab")), "not valid msgpack", id="bin-instead-of-str"),
    pytest.param(lambda: _rebuilt(_set("cluster", b"")), "must be a str", id="empty-bin-for-str"),
    pytest.param(lambda: _raw(b"\xa3\xff\xfe\xfd"), "not valid msgpack", id="invalid-utf8"),  # str with invalid UTF-8
    # version and keys
    pytest.param(lambda: _rebuilt(_drop("version")), "missing the 'version'", id="no-version"),
    pytest.param(lambda: _rebuilt(_set("version", 2)), "unsupported protocol", id="version-2"),
    pytest.param(lambda: _rebuilt(_set("version", "1")), "'version' must be an int", id="ver-str"),
    pytest.param(lambda: _rebuilt(_set("version", True)), "'version' must be an int", id="v-bool"),
    *[
        pytest.param(lambda k=k: _rebuilt(_drop(k)), f"missing field.*{k}", id=f"no-{k}")
        for k in sorted(wire._HEADER_KEYS - {"version"})
    ],
    pytest.param(lambda: _rebuilt(_set("extra", 1)), "unknown field", id="unknown-key"),
    # field types and values
    pytest.param(lambda: _rebuilt(_set("step", True)), "'step' must be an int", id="step-bool"),
    pytest.param(lambda: _rebuilt(_set("step", "7")), "'step' must be an int", id="step-str"),
    pytest.param(lambda: _rebuilt(_set("step", 7.0)), "'step' must be an int", id="step-float"),
    pytest.param(lambda: _rebuilt(_set("step", -1)), "'step' must be >= 0", id="step-negative"),
    pytest.param(lambda: _rebuilt(_set("round", False)), "'round' must be an int", id="round-bool"),
    pytest.param(lambda: _rebuilt(_set("round", -5)), "'round' must be >= 0", id="round-neg"),
    pytest.param(lambda: _rebuilt(_set("age", math.nan)), "'age' must be finite", id="age-nan"),
    pytest.param(lambda: _rebuilt(_set("age", math.inf)), "'age' must be finite", id="age-inf"),
    pytest.param(lambda: _rebuilt(_set("age", -1.0)), "'age' must be >= 0", id="age-negative"),
    pytest.param(lambda: _rebuilt(_set("age", "1")), "'age' must be a float", id="age-str"),
    pytest.param(lambda: _rebuilt(_set("age", True)), "'age' must be a float", id="age-bool"),
    pytest.param(lambda: _rebuilt(_set("weight", math.nan)), "'weight' must be finite", id="weight-nan"),
    pytest.param(lambda: _rebuilt(_set("weight", -math.inf)), "'weight' must be finite", id="weight-inf"),
    pytest.param(lambda: _rebuilt(_set("weight", None)), "'weight' must be a float", id="weight-none"),
    pytest.param(lambda: _rebuilt(_set("cluster", 3)), "'cluster' must be a str", id="cluster-int"),
    pytest.param(lambda: _rebuilt(_set("sender", None)), "'sender' must be a str", id="sender-nil"),
    pytest.param(lambda: _rebuilt(_set("sender", "s" * 300)), "longer than", id="sender-too-long"),
    pytest.param(lambda: _rebuilt(_set("kind", "k" * 600)), "not valid msgpack", id="kind-huge"),
    pytest.param(lambda: _rebuilt(_set("signed", 1)), "'signed' must be a bool", id="signed-int"),
    pytest.param(lambda: _rebuilt(_set("total", "99"), set_total=False), "'total' must", id="total-str"),
    pytest.param(lambda: _rebuilt(_set("total", 10**6), set_total=False), "length mismatch", id="total-big"),
    pytest.param(_signed_without_room, "frame ends at byte", id="signed-without-room"),
    # meta
    pytest.param(lambda: _rebuilt(_set("meta", [1])), "meta must be a map", id="meta-array"),
    pytest.param(lambda: _rebuilt(_set("meta", {"x": [1]})), "meta\\['x'\\] must be", id="meta-list"),
    pytest.param(lambda: _rebuilt(_set("meta", {"x": {}})), "meta\\['x'\\] must be", id="meta-map"),
    pytest.param(lambda: _rebuilt(_set("meta", {"x": b""})), "meta\\['x'\\] must be", id="meta-bin"),
    pytest.param(lambda: _rebuilt(_set("meta", {"k" * 65: 1})), "meta key", id="meta-long-key"),
    pytest.param(lambda: _rebuilt(_set("meta", {"x": "v" * 300})), "longer than", id="meta-long-str"),
    pytest.param(_many_meta, "not valid msgpack", id="meta-too-many"),
    # tensor table
    pytest.param(lambda: _tensor_table({}), "'tensors' must be an array", id="table-map"),
    pytest.param(lambda: _tensor_table([["w", "float32", [0], 64]]), "must be \\[name", id="row-4"),
    pytest.param(lambda: _tensor_table([5]), "must be \\[name", id="row-int"),
    pytest.param(lambda: _tensor_table([["w"] * 5] * 4097), "not valid msgpack", id="too-many-tensors"),
    pytest.param(lambda: _rebuilt(_row(0, 0, 1)), "name must be a str", id="name-int"),
    pytest.param(lambda: _rebuilt(_row(0, 0, "")), "name must be a str", id="name-empty"),
    pytest.param(_dup_names, "appears twice", id="duplicate-name"),
    pytest.param(lambda: _rebuilt(_row(0, 1, "complex64")), "unsupported dtype", id="dtype-cplx"),
    pytest.param(lambda: _rebuilt(_row(0, 1, "Float32")), "unsupported dtype", id="dtype-case"),
    pytest.param(lambda: _rebuilt(_row(0, 1, 7)), "unsupported dtype", id="dtype-int"),
    pytest.param(lambda: _rebuilt(_row(0, 2, [-3, -5])), "negative or non-int", id="shape-neg"),
    pytest.param(lambda: _rebuilt(_row(0, 2, [3.0, 5])), "negative or non-int", id="shape-float"),
    pytest.param(lambda: _rebuilt(_row(0, 2, [True, 15])), "negative or non-int", id="shape-bool"),
    pytest.param(lambda: _rebuilt(_row(0, 2, 15)), "shape must be an array", id="shape-int"),
    pytest.param(lambda: _rebuilt(_row(0, 2, [1] * 33)), "at most 32", id="shape-ndim"),
    pytest.param(lambda: _rebuilt(_row(0, 2, [0, 2**40, 2**40])), "absurdly", id="shape-huge"),
    pytest.param(_nbytes_mismatch, "nbytes 60 != 30 elements", id="nbytes-mismatch"),
    pytest.param(lambda: _rebuilt(_row(0, 4, "60")), "nbytes must be", id="nbytes-str"),
    pytest.param(lambda: _tweaked(_misaligned), "not 64-byte aligned", id="offset-misaligned"),
    pytest.param(lambda: _tweaked(_over_header), "overlaps the header", id="offset-in-header"),
    pytest.param(lambda: _tweaked(_over_tensor), "overlaps tensor 'w'", id="offset-overlap"),
    pytest.param(lambda: _tweaked(_past_end), "run past the data", id="offset-out-of-bounds"),
    pytest.param(lambda: _tweaked(_gap, extra=bytes(64)), "gap", id="offset-gap"),
    pytest.param(lambda: _tweaked(_negative_offset), "offset must be", id="offset-negative"),
    pytest.param(lambda: _padding_byte(True), "non-zero padding after the header", id="pad-header"),
    pytest.param(lambda: _padding_byte(False), "non-zero padding before tensor 'b'", id="pad-gap"),
]


@pytest.mark.parametrize(("make", "match"), MALFORMED)
def test_malformed_frames_are_rejected(make: Callable[[], bytes | bytearray], match: str) -> None:
    frame = make()
    with pytest.raises(WireError, match=match):
        decode(frame)
    with pytest.raises(WireError):  # read-only input goes through the same checks
        decode(bytes(frame))


def test_header_length_limit_is_checked_before_reading_the_header() -> None:
    frame = _raw(b"", rest=bytes(5 * 2**20), header_len=5 * 2**20)
    with pytest.raises(WireError, match="over the limit of"):
        decode(frame)


@pytest.mark.parametrize(
    ("make", "secret", "match"),
    [
        pytest.param(lambda: encode(_envelope()), SECRET, "does not verify", id="unsigned"),
        pytest.param(lambda: encode(_envelope(), secret=b"other"), SECRET, "does not verify", id="wrong-key"),
        pytest.param(lambda: b"GFL\x01" + bytes(4), SECRET, "too short", id="no-room"),
        pytest.param(_unsigned_flag_with_valid_hmac, SECRET, "marked unsigned", id="flag-off"),
    ],
)
def test_bad_signatures(make: Callable[[], bytes], secret: bytes, match: str) -> None:
    with pytest.raises(BadSignature, match=match):
        decode(make(), secret=secret)


def test_every_tampered_byte_of_a_signed_frame_is_caught() -> None:
    frame = encode(_envelope(), secret=SECRET)
    # Flipping a tensor byte leaves a structurally perfect frame: only the HMAC can notice.
    header = _header(frame)
    off = header["tensors"][0][3]
    for pos in [8, 12, off - 1, off, off + 59, len(frame) - 33, len(frame) - 1]:
        bad = bytearray(frame)
        bad[pos] ^= 0x01
        with pytest.raises(BadSignature):
            decode(bad, secret=SECRET)
    tampered = bytearray(frame)
    tampered[off] ^= 0x01
    decode(tampered)  # without the secret the same frame decodes: the HMAC is what caught it


def test_signed_frame_without_secret_is_accepted() -> None:
    env = _envelope()
    _assert_same(env, decode(encode(env, secret=SECRET)))


def test_oversize_is_rejected_before_anything_else() -> None:
    frame = encode(_envelope())
    decode(frame, max_bytes=len(frame))
    with pytest.raises(MessageTooLarge, match="over the limit"):
        decode(frame, max_bytes=len(frame) - 1)
    with pytest.raises(MessageTooLarge):
        decode(b"garbage" * 100, max_bytes=100, secret=SECRET)


def test_cluster_and_fingerprint_checks() -> None:
    frame = encode(_envelope(cluster="a", fingerprint="f1"))
    decode(frame, cluster="a", fingerprint="f1")
    with pytest.raises(WireError, match="message for cluster 'a', this node is in 'b'"):
        decode(frame, cluster="b")
    with pytest.raises(FingerprintMismatch, match="'f1'.*'f2'"):
        decode(frame, fingerprint="f2")


def test_error_statuses() -> None:
    assert WireError.http_status == 400
    assert FingerprintMismatch.http_status == 409
    assert MessageTooLarge.http_status == 413
    assert BadSignature.http_status == 401


# --------------------------------------------------------------------------- fuzz


def _decode_or_wire_error(frame: bytes | bytearray, **kwargs: Any) -> Envelope | None:
    try:
        return decode(frame, **kwargs)
    except WireError:
        return None


@FAST
@given(data=st.binary(max_size=300))
def test_random_bytes_raise_only_wire_errors(data: bytes) -> None:
    _decode_or_wire_error(data)
    _decode_or_wire_error(wire.MAGIC + data)
    _decode_or_wire_error(wire.MAGIC + len(data).to_bytes(4, "little") + data)


_BASE = bytes(encode(_envelope()))
_BASE_SIGNED = bytes(encode(_envelope(), secret=SECRET))


@settings(max_examples=1000, deadline=None)
@given(pos=st.integers(0, len(_BASE_SIGNED) - 1), value=st.integers(0, 255))
def test_single_byte_mutations_raise_only_wire_errors(pos: int, value: int) -> None:
    for base in (_BASE, _BASE_SIGNED):
        if pos >= len(base):
            continue
        frame = bytearray(base)
        frame[pos] = value
        _decode_or_wire_error(frame)
    signed = bytearray(_BASE_SIGNED)
    signed[pos] = value
    if signed != _BASE_SIGNED:
        # Magic and header length are checked before the HMAC (a plain WireError); any later
        # byte can only be caught by the signature.
        with pytest.raises(BadSignature if pos >= 8 else WireError):
            decode(signed, secret=SECRET)


def test_every_truncation_is_rejected() -> None:
    for n in range(len(_BASE)):
        with pytest.raises(WireError):
            decode(_BASE[:n])


msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=10),
        st.binary(max_size=4),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)),
    max_leaves=12,
)


@FAST
@given(key=st.sampled_from(sorted(wire._HEADER_KEYS)), value=msgpack_values)
def test_random_header_values_raise_only_wire_errors(key: str, value: Any) -> None:
    frame = _valid()
    header = _header(frame)
    header[key] = value
    _decode_or_wire_error(_build(header, _blobs(frame)))


@FAST
@given(column=st.integers(0, 4), row=st.integers(0, 2), value=msgpack_values)
def test_random_table_values_raise_only_wire_errors(column: int, row: int, value: Any) -> None:
    frame = _valid()
    header = _header(frame)
    header["tensors"][row][column] = value
    _decode_or_wire_error(_build(header, _blobs(frame)))


# --------------------------------------------------------------------------- require_finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_require_finite_names_the_tensor(dtype: torch.dtype, bad: float) -> None:
    poisoned = torch.ones(10, dtype=dtype)
    poisoned[3] = bad
    env = decode(encode(_envelope(tensors={"ok": torch.ones(3), "poisoned": poisoned})))
    with pytest.raises(WireError, match="'poisoned'"):
        require_finite(env)


def test_require_finite_checks_every_chunk_and_strided_views() -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        long = torch.zeros(3 * 2**16 + 5, dtype=dtype)  # several chunks of the 16-bit scan
        long[-1] = math.nan
        with pytest.raises(WireError, match="'long' holds 1 NaN and 0 Inf"):
            require_finite(_envelope(tensors={"long": long}))
        grid = torch.zeros(8, 8, dtype=dtype)
        grid[7, 6] = math.inf  # row 6 of the transpose: kept by [::2]
        with pytest.raises(WireError, match="'view' holds 0 NaN and 1 Inf"):
            require_finite(_envelope(tensors={"view": grid.t()[::2]}))


def test_require_finite_passes_finite_and_non_float_tensors() -> None:
    # Their sums overflow although each value is finite: no false alarm.
    env = _envelope(
        tensors={
            "big16": torch.full((8,), 60000.0, dtype=torch.float16),
            "big32": torch.full((8,), 3e38),
            "i": torch.arange(4),
            "e": torch.zeros(0),
            "s": torch.tensor(1.0),
            "grad": torch.nn.Parameter(torch.ones(3)),
        }
    )
    require_finite(decode(encode(env)))


@pytest.mark.parametrize("shape", [[0, 2**61], [0, 2**31, 2**31], [2**62, 0], [0] * 32])
def test_empty_tensors_with_huge_dims_decode_without_crashing(shape: list[int]) -> None:
    frame = encode(_envelope(tensors={"w": torch.zeros(0)}))
    header = _header(frame)
    header["tensors"][0][2] = shape
    got = decode(_build(header, _blobs(frame)))
    assert list(got.tensors["w"].shape) == shape
