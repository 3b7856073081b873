"""Staleness as a reader can take it: the signed step lag and its two sides, alike in every engine.

The lag of a merged message is the receiver's step at the merge minus the sender's step when it
sent. It is negative where a slower node merges a faster neighbour's model, so its mean alone can
read as "negative staleness"; runs also report how far the merged models were behind (mean of
max(0, lag)) and ahead (mean of max(0, -lag)); mean = behind - ahead.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gossipfl.config import RunConfig
from gossipfl.metrics import StalenessTally
from gossipfl.sim.vectorized import VectorizedSim


def _check(summary: dict) -> None:
    mean, behind, ahead = (summary[k] for k in ("staleness_mean", "staleness_behind_mean", "staleness_ahead_mean"))
    assert mean == pytest.approx(behind - ahead, abs=1e-12)
    assert behind > 0
    assert ahead > 0  # slow nodes merged faster neighbours' models
    assert summary["staleness_min"] < 0 < summary["staleness_max"]


def test_the_tally_splits_the_signed_lag_into_behind_and_ahead() -> None:
    t = StalenessTally()
    for lag in (3, -5, 0, 2):
        t.add(lag)
    assert t.mean == pytest.approx(0.0)
    assert t.behind_mean == pytest.approx(5 / 4)
    assert t.ahead_mean == pytest.approx(5 / 4)
    assert (t.min, t.max) == (-5, 3)


def test_heterogeneous_speeds_in_the_vectorised_engine() -> None:
    cfg = RunConfig(nodes=16, steps=40, engine="vectorized", emulation={"speed": "lognormal:0.8"})
    _check(VectorizedSim(cfg).run(None))


def test_lock_step_rounds_have_no_lag_either_way() -> None:
    s = VectorizedSim(RunConfig(nodes=8, steps=10, engine="vectorized", schedule="sync")).run(None)
    assert (s["staleness_mean"], s["staleness_behind_mean"], s["staleness_ahead_mean"]) == (0, 0, 0)
    assert s["staleness_min"] == s["staleness_max"] == 0


def test_heterogeneous_speeds_in_the_local_cluster(tmp_path: Path) -> None:
    from gossipfl.sim.cluster import run_cluster

    cfg = RunConfig(nodes=6, steps=40, transport="memory",
                    emulation={"speed": "lognormal:0.8", "step_time": 0.004})
    _check(asyncio.run(run_cluster(cfg, tmp_path, progress=None)))
