"""``dtype = "float64"``: models, data, messages and both simulators in double precision, so that
theory checks see what float32 rounding would hide (exact averages, conserved sums)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from gossipfl.build import build_data, build_trainer
from gossipfl.config import RunConfig
from gossipfl.errors import ConfigError
from gossipfl.sim.vectorized import VectorizedSim


def _drift(cfg: RunConfig) -> tuple[float, dict]:
    sim = VectorizedSim(cfg)
    start = sim.models().double().mean(0)
    summary = sim.run(None)
    return float((sim.models().double().mean(0) - start).norm() / start.norm()), summary


def test_averaging_keeps_the_mean_exactly_in_float64_and_not_in_float32() -> None:
    """D-PSGD's mix with symmetric weights keeps the nodes' average: float64 to 1e-14, where
    float32 drifts by about 1e-7 (the test has teeth), and the measured rate is rho^2 to 1e-6."""
    base = RunConfig(nodes=64, topology="ring", algorithm="averaging", engine="vectorized", schedule="sync", steps=200)
    d64, s64 = _drift(base.replace(dtype="float64"))
    d32, _ = _drift(base)
    assert d64 < 1e-14
    assert d32 > 1e-9
    assert s64["consensus_rate"] == pytest.approx(s64["predicted_rate"], rel=2e-3)
    ring16 = base.replace(nodes=16, steps=100, dtype="float64")
    _, s = _drift(ring16)
    assert s["consensus_rate"] == pytest.approx(s["predicted_rate"], rel=1e-6)


def test_push_sum_reaches_the_exact_average_on_a_directed_graph_in_float64() -> None:
    cfg = RunConfig(nodes=32, topology="exponential_directed", algorithm="pushsum_averaging", engine="vectorized",
                    schedule="sync", steps=200, dtype="float64")
    sim = VectorizedSim(cfg)
    start = sim.models().mean(0)
    sim.run(None)
    assert sim.models().dtype == torch.float64
    assert float((sim.models() - start).norm(dim=1).max() / start.norm()) < 1e-12


def test_both_engines_train_in_float64_and_agree(tmp_path: Path) -> None:
    """Real node services (messages in the wire format, float64 tensors, over loopback HTTP) and
    the vectorised engine: the same lock-step D-PSGD run ends with the same accuracy and, in
    float64, the same consensus distance to 1e-12 (float32 agrees to about 1e-7)."""
    from gossipfl.sim.cluster import run_cluster

    cfg = RunConfig(nodes=8, topology="ring", schedule="sync", steps=40, eval_every=20, dtype="float64",
                    same_init=True, momentum=0.0)
    clu = asyncio.run(run_cluster(cfg.replace(transport="http"), tmp_path, progress=None))
    vec = VectorizedSim(cfg.replace(engine="vectorized"), sampling="exact").run(None)
    assert clu["mean_accuracy"] > 0.4  # it learned (chance: 0.1)
    assert clu["mean_accuracy"] == pytest.approx(vec["mean_accuracy"], abs=1e-9)
    assert clu["consensus_distance"] == pytest.approx(vec["consensus_distance"], rel=1e-12)


def test_a_float64_model_has_its_own_fingerprint_and_a_bad_dtype_is_refused() -> None:
    cfg = RunConfig()
    data32, data64 = build_data(cfg), build_data(cfg.replace(dtype="float64"))
    t32 = build_trainer(cfg, data32, 0, 1)
    t64 = build_trainer(cfg.replace(dtype="float64"), data64, 0, 1)
    assert t64.params.dtype == torch.float64
    assert data64.x_train.dtype == torch.float64
    assert t32.layout.fingerprint != t64.layout.fingerprint  # nodes of different precision refuse each other
    assert torch.equal(t64.params.float(), t32.params)  # the same initial draws, cast
    with pytest.raises(ConfigError, match="dtype"):
        RunConfig(dtype="float16")
