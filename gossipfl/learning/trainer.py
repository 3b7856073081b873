"""Local training on one node's shard: minibatch SGD over a flat parameter vector."""

from __future__ import annotations

import threading

import torch
from torch import nn
from torch.func import functional_call

from gossipfl.algorithms.optim import sgd_update
from gossipfl.learning.data import Dataset
from gossipfl.learning.losses import Loss, get_loss, score, spread_of
from gossipfl.learning.params import ParamLayout, param_layout

__all__ = ["Trainer", "TrainerLearner"]


class Trainer:
    """Runs local SGD steps and evaluates, holding the model as one flat vector ``params``.

    The module only supplies the forward function (``functional_call`` over views of the flat
    vector), so the gossip layer can read, replace and average ``params`` as a plain tensor.
    Steps are not thread-safe (the node serialises steps and merges), but every forward pass
    holds ``_forward_lock``: ``functional_call`` swaps the module's parameters for the duration of
    the call, so an evaluation from another thread (cluster metrics) would otherwise make a
    concurrent training step differentiate through the wrong tensors.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Dataset,
        indices: torch.Tensor,
        *,
        lr: float = 0.1,
        batch_size: int = 32,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        seed: int = 0,
        loss: Loss | None = None,
    ) -> None:
        self.model = model
        self.layout: ParamLayout = param_layout(model)
        self.params = self.layout.flatten(dict(model.named_parameters())).contiguous()
        self.x = data.x_train[indices]
        self.y = data.y_train[indices]
        self.x_test, self.y_test = data.x_test, data.y_test
        self.loss = loss if loss is not None else get_loss("cross_entropy", regression=data.regression)
        self._spread = spread_of(self.y_test)  # None: accuracy; else R^2's denominator per sample
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.batch_size = min(batch_size, len(self.y))
        self._velocity = torch.zeros_like(self.params) if momentum else None
        self._gen = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)
        self._pos = 0
        self.steps = 0
        self.last_loss = float("nan")
        self._forward_lock = threading.Lock()

    @property
    def velocity(self) -> torch.Tensor | None:
        """The momentum buffer (None without momentum): a node checkpoints it with the model, so
        a restarted node does not lose its optimizer state."""
        return self._velocity

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        # One shuffled pass over the shard per epoch: every sample seen, order seeded.
        if self._pos + self.batch_size > len(self._order):
            self._order = torch.randperm(len(self.y), generator=self._gen)
            self._pos = 0
        idx = self._order[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.x[idx], self.y[idx]

    def loss_and_grad(self, params: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """Stochastic loss and gradient at ``params`` (default: the current model) on a minibatch."""
        p = (self.params if params is None else params).detach().requires_grad_(True)
        xb, yb = self._batch()
        with self._forward_lock:
            out = functional_call(self.model, self.layout.unflatten(p), (xb,))
        loss = self.loss.mean(out, yb)
        (grad,) = torch.autograd.grad(loss, p)
        return float(loss.detach()), grad

    def apply_gradient(self, grad: torch.Tensor, params: torch.Tensor | None = None) -> None:
        """One step of the shared optimiser (`sgd_update`: momentum, weight decay) in place on
        ``params`` (default: the model), with this trainer's momentum buffer."""
        sgd_update(self.params if params is None else params, self._velocity, grad, lr=self.lr,
                   momentum=self.momentum, weight_decay=self.weight_decay)

    def step(self) -> float:
        """One local SGD step on the node's own data; returns the minibatch loss."""
        loss, grad = self.loss_and_grad()
        self.apply_gradient(grad)
        self.steps += 1
        self.last_loss = loss
        return loss

    @torch.no_grad()
    def evaluate(self, params: torch.Tensor | None = None) -> tuple[float, float]:
        """(loss, accuracy) of ``params`` (default: the current model) on the held-out test split
        (accuracy: R^2 for regression data, `gossipfl.learning.losses.score`)."""
        p = self.params if params is None else params
        with self._forward_lock:
            out = functional_call(self.model, self.layout.unflatten(p), (self.x_test,))
        loss = self.loss.mean(out, self.y_test)
        # float64: k / n_test exactly as every engine computes it (regression: R^2)
        acc = score(out, self.y_test, self._spread).mean()
        return float(loss), float(acc)


class TrainerLearner:
    """The `gossipfl.algorithms.base.Learner` of one node (N = 1) around its `Trainer`.

    Rows ``[1, D]`` in, rows out; gradients on the trainer's next minibatch, steps with its momentum
    buffer (so a checkpoint of the trainer keeps the optimiser state whatever the algorithm).
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.lr, self.momentum, self.weight_decay = trainer.lr, trainer.momentum, trainer.weight_decay

    def grad(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.trainer
        loss, grad = t.loss_and_grad(params=params[0])
        t.steps += 1
        t.last_loss = loss
        return torch.tensor([loss]), grad.unsqueeze(0)

    def sgd_step(self, params: torch.Tensor) -> torch.Tensor:
        loss, grad = self.grad(params)
        self.trainer.apply_gradient(grad[0], params[0])
        return loss

    def apply(self, params: torch.Tensor, grad: torch.Tensor, where: torch.Tensor | None = None) -> None:
        if where is not None and not bool(where[0]):
            return
        self.trainer.apply_gradient(grad[0], params[0])
