"""Losses other than cross-entropy, and D-SGD's fixed points in closed form, in both engines.

Per-node least squares (``data = "regression"``, ``loss = "mse"``, the linear model ``logreg``
with one output, full-batch gradients); the closed forms are `gossipfl.convergence_ls`'s: each
D-SGD order's fixed point (float64, to 1e-8), and DIGing's minimiser of the sum on every node.
The orders' fixed points differ from each other and from that minimiser.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from gossipfl.config import RunConfig
from gossipfl.convergence_ls import least_squares
from gossipfl.errors import ConfigError
from gossipfl.sim.vectorized import VectorizedSim

N, LR = 16, 0.2


def _cfg(**kw: object) -> RunConfig:
    base = {"nodes": N, "topology": "ring", "schedule": "sync", "engine": "vectorized", "data": "regression",
            "loss": "mse", "model": "logreg", "momentum": 0.0, "batch_size": 10_000, "lr": LR,
            "dtype": "float64", "steps": 1500, "eval_every": 500}
    return RunConfig(**{**base, **kw})


def _models(cfg: RunConfig) -> np.ndarray:
    sim = VectorizedSim(cfg, sampling="exact")
    sim.run(None)
    return sim.models().double().numpy()


@pytest.mark.parametrize("order", ["lian", "atc", "cta"])
def test_dsgd_reaches_each_orders_closed_form_fixed_point(order: str) -> None:
    cfg = _cfg(algorithm_params={"order": order})
    problem = least_squares(cfg)
    want = problem.fixed_point(order, LR)
    got = _models(cfg)
    assert np.abs(got - want).max() < 1e-8 * np.abs(want).max()
    others = [problem.fixed_point(o, LR) for o in ("lian", "atc", "cta") if o != order]
    assert min(np.abs(want - o).max() for o in others) > 1e-4  # the orders' points really differ


@pytest.mark.slow
def test_diging_reaches_the_minimiser_of_the_sum() -> None:
    cfg = _cfg(algorithm="diging", lr=0.05, steps=3000)  # gradient tracking diverges at lr 0.1 here
    problem = least_squares(cfg)
    star = problem.optimum()
    got = _models(cfg)
    assert np.abs(got - star).max() < 1e-8 * np.abs(star).max()
    lian = problem.fixed_point("lian", LR)  # D-SGD at lr 0.2
    assert np.abs(lian - star).max() > 1e-4  # D-SGD's point is biased; DIGing's is not


def test_both_engines_run_mse_regression_alike(tmp_path: Path) -> None:
    """Real node services and the vectorised engine: the same loss, gradients and R^2."""
    from gossipfl.sim.cluster import run_cluster

    cfg = _cfg(nodes=8, steps=30, eval_every=10, batch_size=32, lr=0.05)
    vec = VectorizedSim(cfg, sampling="exact").run(None)
    clu = asyncio.run(run_cluster(cfg.replace(engine="cluster", transport="memory"), tmp_path, progress=None))
    assert vec["mean_accuracy"] > 0.95  # R^2 of y = x . w + noise
    assert clu["mean_accuracy"] == pytest.approx(vec["mean_accuracy"], rel=1e-12)
    assert clu["consensus_distance"] == pytest.approx(vec["consensus_distance"], rel=1e-10)
    func = VectorizedSim(cfg, sampling="exact", kernel="func").run(None)  # torch.func vs hand-written backward
    assert func["consensus_distance"] == pytest.approx(vec["consensus_distance"], rel=1e-10)


def _absolute_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.squeeze(-1) - target).abs()


def _scalar_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.squeeze(-1) - target).abs().mean()


def test_a_user_loss_by_import_path_trains_in_every_engine(tmp_path: Path) -> None:
    cfg = _cfg(nodes=4, steps=40, eval_every=20, batch_size=32, lr=0.05,
               loss="tests.test_least_squares:_absolute_error")
    vec = VectorizedSim(cfg, sampling="exact").run(None)
    from gossipfl.sim.cluster import run_cluster

    clu = asyncio.run(run_cluster(cfg.replace(engine="cluster", transport="memory"), tmp_path, progress=None))
    assert vec["mean_accuracy"] > 0.5
    assert clu["consensus_distance"] == pytest.approx(vec["consensus_distance"], rel=1e-9)


@pytest.mark.parametrize(("settings", "match"), [
    ({"loss": "hinge"}, "loss: unknown 'hinge'"),
    ({"loss": "cross_entropy"}, "real-valued targets"),
    ({"partition": "dirichlet:0.5"}, "regression"),
    ({"loss": "tests.test_least_squares:_scalar_loss"}, "one loss per sample"),
])
def test_bad_loss_settings_are_refused_with_the_key(settings: dict[str, object], match: str) -> None:
    from gossipfl.runs import preflight

    with pytest.raises(ConfigError, match=match):
        preflight(_cfg(nodes=4, steps=1, **settings))


def test_the_closed_forms_refuse_a_run_they_do_not_describe() -> None:
    with pytest.raises(ValueError, match="model = 'mlp'.*batch_size = 32"):
        least_squares(_cfg(model="mlp", batch_size=32))
