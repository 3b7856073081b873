"""Shared fixtures: a guard that every test stops the threads and tasks it starts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

torch.set_num_threads(1)  # tiny models: intra-op threads only add contention on 2 cores


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves non-daemon threads running (a node it forgot to close)."""
    before = {t.ident for t in threading.enumerate()}
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = [t for t in threading.enumerate()
                  if t.ident not in before and t.is_alive() and not t.daemon
                  and not t.name.startswith("asyncio_")]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"
