"""A node merging a large model holds the receive buffer and nothing else model-sized.

Peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``) is read around
`NodeLearning.merge` of one 40 MB D-PSGD message; the message already lies in its receive buffer,
and D-PSGD's mix channel ``replaces`` the model, so the node mixes into the model itself, slice by
slice. The former combine (``torch.cat``, then ``self_w * x``, the product and their sum) peaked
at four model copies; a separate result tensor would be one.
"""

from __future__ import annotations

import gc
import mmap
from pathlib import Path

import pytest
import torch
from torch import nn

from gossipfl.algorithms import Message, get_algorithm
from gossipfl.algorithms.inbox import mix, mix_into
from gossipfl.learning import Dataset, Trainer
from gossipfl.node.learner import NodeLearning

SIDE = 3163  # 10M float32 parameters, 40 MB: above glibc's largest mmap threshold, so freed memory leaves RSS


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        return False
    return True


def _learning() -> NodeLearning:
    torch.manual_seed(0)
    model = nn.Linear(SIDE, SIDE, bias=False)
    data = Dataset(name="big", x_train=torch.zeros(4, SIDE), y_train=torch.zeros(4, dtype=torch.long),
                   x_test=torch.zeros(2, SIDE), y_test=torch.zeros(2, dtype=torch.long),
                   n_classes=SIDE, input_shape=(SIDE,))
    return NodeLearning(get_algorithm("dpsgd"), Trainer(model, data, torch.arange(4)), remember=False)


def test_dpsgd_merge_adds_no_model_sized_tensor() -> None:
    if not Path("/proc/self/clear_refs").exists() or not _reset_peak():
        pytest.skip("needs Linux /proc/self/clear_refs")
    node = _learning()
    numel = node.params.numel()
    nbytes = numel * 4
    buf = mmap.mmap(-1, nbytes)  # the receive buffer, filled as the body streamed in
    received = torch.frombuffer(buf, dtype=torch.float32)
    received.copy_(torch.randn(numel))
    expected = mix(node.params.clone(), received.view(1, -1), torch.tensor([0.5]))
    msg = Message(sender="peer", tensors={"params": received}, step=0, round=0)
    gc.collect()
    base = _status("VmRSS")
    assert _reset_peak()
    node.merge([msg], {"peer": 0.5})
    extra = _status("VmHWM") - base
    assert extra <= 0.25 * nbytes, f"merge peaked {extra / nbytes:.2f} model copies above its start"
    assert torch.equal(node.params, expected)  # the same numbers as the out-of-place mix
    assert node.state["params"].data_ptr() == node.params.data_ptr()  # still the trainer's storage
    del received, msg
    buf.close()


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 3])
def test_mix_into_is_bit_identical_to_mix(dtype: torch.dtype, k: int, in_place: bool) -> None:
    torch.manual_seed(k)
    d = 3 * (1 << 16) + 5  # several slices and a ragged last one
    x, others, w = torch.randn(d, dtype=dtype), torch.randn(k, d, dtype=dtype), torch.rand(k, dtype=dtype) / k
    a = mix(x, others, w)
    y = x.clone()
    b = mix_into(y, others, w, in_place=in_place)
    assert (b.data_ptr() == y.data_ptr()) == in_place
    bits = torch.int64 if dtype == torch.float64 else torch.int32
    assert torch.equal(a.view(bits), b.view(bits))
