"""Large frame copies shared with a helper thread: byte-exact, and never held up by the helper."""

from __future__ import annotations

import ctypes
import os
import queue
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from gossipfl import wire, wire_copy
from gossipfl.wire_copy import PARALLEL_FROM, PIECE, _Helper, _Job, split


def _pieces(src: bytearray, dst: bytearray, cuts: list[int]) -> list[tuple[int, int, int]]:
    s = ctypes.addressof(ctypes.c_char.from_buffer(src))
    d = ctypes.addressof(ctypes.c_char.from_buffer(dst))
    out: list[tuple[int, int, int]] = []
    bounds = [0, *sorted(set(cuts)), len(src)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        if b > a:
            split(d + a, s + a, b - a, out)
    return out


def test_split_covers_every_byte_once_in_pieces_of_at_most_piece() -> None:
    pieces: list[tuple[int, int, int]] = []
    split(1000, 5000, 3 * PIECE + 17, pieces)
    assert [n for *_, n in pieces] == [PIECE, PIECE, PIECE, 17]
    assert [d - 1000 for d, _, _ in pieces] == [s - 5000 for _, s, _ in pieces] == [0, PIECE, 2 * PIECE, 3 * PIECE]


def test_shared_copies_are_byte_exact() -> None:
    rng = random.Random(0)
    src = bytearray(rng.randbytes(9 * PIECE + 123))
    for _ in range(5):
        dst = bytearray(len(src))
        wire_copy.copy_pieces(_pieces(src, dst, [rng.randrange(len(src)) for _ in range(4)]))
        assert dst == src


def test_a_large_frame_is_the_same_bytes_as_one_copied_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(PARALLEL_FROM // 4 + 5, generator=gen), "b": torch.randn(3, 7, generator=gen),
               "c": torch.randn(2 * PIECE // 8 + 1, generator=gen, dtype=torch.float64)}
    env = wire.Envelope(cluster="c", sender="s", algorithm="g", fingerprint="f" * 64, tensors=tensors)
    shared = bytes(wire.encode(env, secret=b"k"))
    monkeypatch.setattr(wire, "PARALLEL_FROM", 1 << 62)
    assert bytes(wire.encode(env, secret=b"k")) == shared
    back = wire.decode(shared, secret=b"k")
    assert all(torch.equal(back.tensors[k], v) for k, v in tensors.items())


def test_a_helper_that_never_wakes_does_not_hold_the_caller_up() -> None:
    """The helper thread is stuck (descheduled, say) before it takes anything: the caller copies
    every piece itself and returns; it does not wait for the helper."""
    gate = threading.Event()
    helper = _Helper()
    real_serve = helper._serve

    def stuck_serve(jobs: queue.SimpleQueue[_Job]) -> None:
        gate.wait()
        real_serve(jobs)

    helper._serve = stuck_serve  # type: ignore[method-assign]
    src = bytearray(os.urandom(6 * PIECE))
    dst = bytearray(len(src))
    caller = threading.Thread(target=helper.copy, args=(_pieces(src, dst, []),))
    caller.start()
    caller.join(timeout=30)
    stuck = caller.is_alive()
    gate.set()
    caller.join()
    assert not stuck, "the caller waited for a helper that had not started"
    assert dst == src


def test_the_caller_waits_for_the_piece_the_helper_is_copying() -> None:
    """Closing a job while the helper holds a piece says so; the helper's next take signals done."""
    job = _Job([(0, 0, 1), (0, 0, 1)])
    assert job.take(helper=True) is not None  # the helper is copying piece 0
    assert job.take(helper=False) is not None  # the caller took piece 1
    assert job.close()  # the helper is busy: the caller must wait
    assert not job.done.is_set()
    assert job.take(helper=True) is None  # the helper finished its piece, and finds the job closed
    assert job.done.is_set()
    idle = _Job([(0, 0, 1)])
    assert idle.take(helper=False) is not None
    assert not idle.close()  # the helper holds nothing: no wait


def test_copies_from_two_threads_at_once_are_both_exact() -> None:
    srcs = [bytearray(os.urandom(5 * PIECE)) for _ in range(2)]
    dsts = [bytearray(5 * PIECE) for _ in range(2)]
    threads = [threading.Thread(target=wire_copy.copy_pieces, args=(_pieces(s, d, [PIECE // 3]),))
               for s, d in zip(srcs, dsts, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert dsts == srcs


_FORK_SCRIPT = """
import os
from gossipfl import wire_copy
from tests.test_wire_copy import _pieces
src = bytearray(os.urandom(5 * wire_copy.PIECE))
wire_copy.copy_pieces(_pieces(src, bytearray(len(src)), []))  # the parent's helper is running
pid = os.fork()
if pid == 0:  # the child: no helper thread came along; a copy must still complete, and exactly
    dst = bytearray(len(src))
    wire_copy.copy_pieces(_pieces(src, dst, []))
    os._exit(0 if dst == src else 3)
_, status = os.waitpid(pid, 0)
raise SystemExit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_its_own_helper() -> None:
    # In a fresh interpreter: forking pytest's own process, with its threads, is not what is tested.
    done = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], cwd=Path(__file__).parent.parent,
                          timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
