"""Closed forms of decentralized SGD on per-node least squares, to check the engines against.

A run on ``data = "regression"`` (or user data), ``loss = "mse"``, the linear model ``logreg``
(one output) and full-batch gradients (``batch_size`` at least the data set) gives node i
f_i(t) = mean_k (a_k . t - y_k)^2 over its shard, so grad f_i(t) = H_i t - c_i with
H_i = (2/m) A^T A, c_i = (2/m) A^T y (A with a column of ones for the bias, the model's layout:
weight row, then bias). With the nodes' models stacked as x and W the run's mixing matrix, D-SGD's
update orders (`gossipfl.algorithms.dpsgd`) converge to

  lian  X = W X - lr G(X):      ((I - W) (x) I + lr H) x = lr c
  atc   X = W (X - lr G(X)):    (I - (W (x) I)(I - lr H)) x = lr (W (x) I) c
  cta   X = W X - lr G(W X):    (I - (I - lr H)(W (x) I)) x = lr c

(H block-diagonal in the H_i), and gradient tracking (DIGing) to the minimiser of sum_i f_i,
(sum_i H_i)^-1 sum_i c_i, on every node (Nedic, Olshevsky, Shi, SIAM J. Optim. 2017).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gossipfl.config import RunConfig
from gossipfl.plan import resolve
from gossipfl.topology.weights import mixing_matrix

__all__ = ["LeastSquares", "least_squares"]


@dataclass(frozen=True)
class LeastSquares:
    """A run's per-node least squares: W ``[N, N]``, the H_i ``[N, D, D]`` and c_i ``[N, D]``."""

    w: np.ndarray
    h: np.ndarray
    c: np.ndarray

    def fixed_point(self, order: str, lr: float) -> np.ndarray:
        """``[N, D]``: where D-SGD in ``order`` (lian, atc, cta) with step ``lr`` converges."""
        n, d = self.c.shape
        big = np.zeros((n * d, n * d))
        for i in range(n):
            big[i * d:(i + 1) * d, i * d:(i + 1) * d] = self.h[i]
        wk, eye, c = np.kron(self.w, np.eye(d)), np.eye(n * d), self.c.reshape(-1)
        if order == "lian":
            x = np.linalg.solve(eye - wk + lr * big, lr * c)
        elif order == "atc":
            x = np.linalg.solve(eye - wk @ (eye - lr * big), lr * wk @ c)
        elif order == "cta":
            x = np.linalg.solve(eye - (eye - lr * big) @ wk, lr * c)
        else:
            raise ValueError(f"order: {order!r} is not one of lian, atc, cta")
        return x.reshape(n, d)

    def optimum(self) -> np.ndarray:
        """``[D]``: the minimiser of sum_i f_i (where gradient tracking converges on every node)."""
        return np.linalg.solve(self.h.sum(0), self.c.sum(0))


def least_squares(cfg: RunConfig) -> LeastSquares:
    """The closed-form problem of ``cfg`` (regression data, one linear output), from its plan's
    shards and graph 0's mixing weights (``cfg.weights``)."""
    plan = resolve(cfg)
    if not plan.data.regression:
        raise ValueError("least_squares: the run's data must be regression (real-valued targets)")
    # the closed forms hold for exactly this problem: say which setting breaks them
    wrong = [f"{key} = {getattr(cfg, key)!r} (needs {want!r})" for key, want in
             (("model", "logreg"), ("loss", "mse"), ("momentum", 0.0), ("weight_decay", 0.0))
             if getattr(cfg, key) != want]
    if cfg.batch_size < max(len(s) for s in plan.shards):
        wrong.append(f"batch_size = {cfg.batch_size} (needs full batches: at least {max(len(s) for s in plan.shards)})")
    if wrong:
        raise ValueError("least_squares: " + "; ".join(wrong))
    x, y = plan.data.x_train.double().numpy(), plan.data.y_train.double().numpy()
    hs, cs = [], []
    for i in range(cfg.nodes):
        idx = plan.shard(i).numpy()
        a = np.hstack([x[idx], np.ones((len(idx), 1))])
        hs.append(2.0 / len(idx) * a.T @ a)
        cs.append(2.0 / len(idx) * a.T @ y[idx])
    return LeastSquares(mixing_matrix(plan.schedule(0), cfg.weights), np.stack(hs), np.stack(cs))
