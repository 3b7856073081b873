"""Losses other than cross-entropy, and D-SGD's fixed points in closed form, in both engines.

Per-node least squares (``data = "regression"``, ``loss = "mse"``, the linear model ``logreg``
with one output, full-batch gradients): f_i(t) = mean_k (a_k . t - y_k)^2 over node i's shard, so
grad f_i(t) = H_i t - c_i with H_i = (2/m) A^T A, c_i = (2/m) A^T y (A with a column of ones: the
bias). Stacking the nodes' models as X, D-SGD's three orders converge to (float64, to 1e-8):

  lian  X = W X - lr G(X):          ((I - W) (x) I + lr H) x = lr c
  atc   X = W (X - lr G(X)):        (I - (W (x) I)(I - lr H)) x = lr (W (x) I) c
  cta   X = W X - lr G(W X):        (I - (I - lr H)(W (x) I)) x = lr c

(H block-diagonal in the H_i), and DIGing to the minimiser of sum_i f_i, (sum H_i)^-1 sum c_i, on
every node. The orders' fixed points differ from each other and from that minimiser.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from gossipfl.config import RunConfig
from gossipfl.errors import ConfigError
from gossipfl.plan import resolve
from gossipfl.sim.vectorized import VectorizedSim
from gossipfl.topology.weights import mixing_matrix

N, LR = 16, 0.2


def _cfg(**kw: object) -> RunConfig:
    base = {"nodes": N, "topology": "ring", "schedule": "sync", "engine": "vectorized", "data": "regression",
            "loss": "mse", "model": "logreg", "momentum": 0.0, "batch_size": 10_000, "lr": LR,
            "dtype": "float64", "steps": 1500, "eval_every": 500}
    return RunConfig(**{**base, **kw})


def _problem(cfg: RunConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [N, N], block-diagonal H [N D, N D] and c [N D] of the run's per-node least squares."""
    plan = resolve(cfg)
    x, y = plan.data.x_train.double().numpy(), plan.data.y_train.double().numpy()
    blocks, cs = [], []
    for i in range(cfg.nodes):
        idx = plan.shard(i).numpy()
        a = np.hstack([x[idx], np.ones((len(idx), 1))])  # the layout: weight row, then bias
        blocks.append(2.0 / len(idx) * a.T @ a)
        cs.append(2.0 / len(idx) * a.T @ y[idx])
    d = blocks[0].shape[0]
    h = np.zeros((cfg.nodes * d, cfg.nodes * d))
    for i, b in enumerate(blocks):
        h[i * d:(i + 1) * d, i * d:(i + 1) * d] = b
    return mixing_matrix(plan.schedule(0)), h, np.concatenate(cs)


def _fixed_point(order: str, w: np.ndarray, h: np.ndarray, c: np.ndarray) -> np.ndarray:
    d = h.shape[0] // w.shape[0]
    wk, eye = np.kron(w, np.eye(d)), np.eye(h.shape[0])
    if order == "lian":
        x = np.linalg.solve(eye - wk + LR * h, LR * c)
    elif order == "atc":
        x = np.linalg.solve(eye - wk @ (eye - LR * h), LR * wk @ c)
    else:
        x = np.linalg.solve(eye - (eye - LR * h) @ wk, LR * c)
    return x.reshape(w.shape[0], d)


def _models(cfg: RunConfig) -> np.ndarray:
    sim = VectorizedSim(cfg, sampling="exact")
    sim.run(None)
    return sim.models().double().numpy()


@pytest.mark.parametrize("order", ["lian", "atc", "cta"])
def test_dsgd_reaches_each_orders_closed_form_fixed_point(order: str) -> None:
    cfg = _cfg(algorithm_params={"order": order})
    w, h, c = _problem(cfg)
    want = _fixed_point(order, w, h, c)
    got = _models(cfg)
    assert np.abs(got - want).max() < 1e-8 * np.abs(want).max()
    others = [_fixed_point(o, w, h, c) for o in ("lian", "atc", "cta") if o != order]
    assert min(np.abs(want - o).max() for o in others) > 1e-4  # the orders' points really differ


@pytest.mark.slow
def test_diging_reaches_the_minimiser_of_the_sum() -> None:
    cfg = _cfg(algorithm="diging", lr=0.05, steps=3000)  # gradient tracking diverges at lr 0.1 here
    w, h, c = _problem(cfg)
    d = h.shape[0] // N
    total_h = sum(h[i * d:(i + 1) * d, i * d:(i + 1) * d] for i in range(N))
    total_c = c.reshape(N, d).sum(0)
    star = np.linalg.solve(total_h, total_c)
    got = _models(cfg)
    assert np.abs(got - star).max() < 1e-8 * np.abs(star).max()
    lian = _fixed_point("lian", w, h, c)  # (at this run's lr 0.2)
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
