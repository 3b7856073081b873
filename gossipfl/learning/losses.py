"""Training losses and test scores, one definition for every engine.

``loss = "cross_entropy"`` (classification, the default), ``"mse"`` (mean squared error: against
the targets of regression data, or against one-hot labels of classification data) or a user's
``"pkg.mod:fn"``. A user loss is called as ``fn(output, target)`` with ``output [B, k]`` and the
batch's targets, and returns the per-sample losses ``[B]`` (``reduction="none"``), so that every
engine can average it the same way (also over a padded minibatch); it runs in the vectorised
engine under ``torch.func.vmap``, so it must be plain tensor code.

Scores (what a run reports as ``accuracy``): the fraction of test samples classified right for
classification data; for regression data the coefficient of determination
R² = 1 - sum (y - f(x))² / sum (y - mean y)² on the test split (1: perfect, 0: no better than
predicting the mean), written as a per-sample mean so that it averages like accuracy.

The batched MLP kernel (`gossipfl.sim._batched_models.BatchedMLP`) differentiates the two
built-in losses by hand (`Loss.output_grad`); a user loss runs on the ``torch.func`` kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gossipfl.errors import ConfigError
from gossipfl.learning.imports import is_import_path, load_callable

__all__ = ["BUILTIN_LOSSES", "Loss", "check_loss_spec", "get_loss", "score"]

BUILTIN_LOSSES = ("cross_entropy", "mse")


def _target(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What ``out [..., k]`` is compared with under mse: one-hot classes, or the float targets."""
    if y.dtype in (torch.int64, torch.int32):
        return F.one_hot(y, out.shape[-1]).to(out.dtype)
    return y.to(out.dtype).reshape(out.shape)


@dataclass(frozen=True)
class Loss:
    """A training loss: ``per_sample(out [B, k], y [B]) -> [B]``; ``name`` as configured."""

    name: str
    per_sample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN_LOSSES

    def mean(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.per_sample(out, y).mean()

    def output_grad(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample loss ``[n, B]`` and its gradient with respect to the outputs, for outputs
        held class-major, ``z [n, k, B]`` (the batched MLP's layout); ``y [n, B]``."""
        if self.name == "cross_entropy":
            logp = torch.log_softmax(z, 1)
            yi = y.unsqueeze(1)
            nll = logp.gather(1, yi).squeeze(1).neg_()
            dz = logp.exp_()
            dz.scatter_add_(1, yi, torch.full(yi.shape, -1.0, dtype=dz.dtype, device=dz.device))
            return nll, dz
        if self.name == "mse":
            if y.dtype in (torch.int64, torch.int32):
                t = F.one_hot(y, z.shape[1]).to(z.dtype).transpose(1, 2)
            else:
                t = y.to(z.dtype).unsqueeze(1)
            diff = z - t
            k = z.shape[1]
            return diff.square().sum(1) / k, diff.mul_(2.0 / k)
        raise ConfigError(f"loss: {self.name!r} has no hand-written gradient; the torch.func kernel runs it")


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - _target(out, y)).square().mean(-1)


def check_loss_spec(spec: str) -> None:
    """Refuse a loss that is neither built in nor an import path (ConfigError naming the key)."""
    if spec not in BUILTIN_LOSSES and not is_import_path(spec):
        raise ConfigError(f"loss: unknown {spec!r}; choose one of {', '.join(BUILTIN_LOSSES)} "
                          "or give 'package.module:function'")


def get_loss(spec: str, *, regression: bool = False) -> Loss:
    """The `Loss` named ``spec``; ``regression``: the data's targets are real numbers, which
    cross-entropy cannot take (ConfigError)."""
    check_loss_spec(spec)
    if spec == "cross_entropy":
        if regression:
            raise ConfigError("loss: cross_entropy needs class labels, and this data has real-valued "
                              "targets (regression); use loss = \"mse\"")
        return Loss(spec, _cross_entropy)
    if spec == "mse":
        return Loss(spec, _mse)
    fn = load_callable(spec, what="loss")
    return Loss(spec, fn)


def score(out: torch.Tensor, y: torch.Tensor, spread: float | None) -> torch.Tensor:
    """Per-sample score of outputs ``out [..., T, k]`` against test targets ``y [T]``: 1 for a right
    class (float64), or for regression (``spread`` = sum (y - mean y)² / T of the test targets)
    1 - (y - f(x))² / spread, whose mean over the test split is R²."""
    if spread is None:
        return (out.argmax(-1) == y).double()
    err = (out.double().squeeze(-1) - y.double()).square()
    return 1.0 - err / spread


def spread_of(y: torch.Tensor) -> float | None:
    """``score``'s ``spread`` for test targets ``y``: None for class labels (accuracy)."""
    if y.dtype in (torch.int64, torch.int32):
        return None
    v = float((y.double() - y.double().mean()).square().mean())
    return v if v > 0 else 1.0
