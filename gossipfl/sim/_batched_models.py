"""Loss, gradient and logits of many models at once, their parameters stacked as ``[n, D]`` rows.

Two implementations of one small interface (`BatchedModel`):

- `BatchedMLP`: the built-in ``mlp`` and ``logreg`` (``Flatten`` then ``Linear``/``ReLU`` layers)
  with batched matmuls and a hand-written backward pass. On a 2-core CPU it is 2-3x faster than
  the ``torch.func`` path for the MLP 64-32-10 at 256-4096 nodes (``scripts/bench_sim.py``): no
  per-op batching rules, no autograd graph, no ``[n, D]`` gradient (the SGD update is applied layer
  by layer), and the log-softmax runs over the class axis of ``[n, classes, batch]`` logits (over a
  last axis of 10 it is slow on CPU).
- `FuncModel`: any ``nn.Module`` (the CNN, user models) through ``torch.func``:
  ``vmap(grad_and_value(loss))`` over ``functional_call`` on views of each row.

Both compute, per node, the mean of the run's loss (`gossipfl.learning.losses`: cross-entropy,
mse, or a user's per-sample loss, which only the torch.func path runs) over its minibatch
(optionally over a ``weight`` mask, for nodes whose shard is smaller than the batch) and its
gradient, exactly the quantities `gossipfl.learning.Trainer.loss_and_grad` computes for one node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from gossipfl.algorithms.optim import sgd_update
from gossipfl.errors import ConfigError
from gossipfl.learning.losses import Loss, get_loss
from gossipfl.learning.params import ParamLayout

__all__ = ["BatchedMLP", "BatchedModel", "FuncModel", "batched_model"]


class BatchedModel(Protocol):
    """What the vectorised engine needs from a model family."""

    kind: str
    loss: Loss  # the run's training loss (also the test loss a run reports)

    def loss_and_grad(self, p: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-node minibatch loss ``[n]`` and gradient ``[n, D]`` at rows ``p [n, D]``.

        ``x [n, B, *input]``, ``y [n, B]``; ``weight [n, B]`` (1 for real samples, 0 for padding)
        or None when every node has a full batch.
        """
        ...

    def sgd_step(self, p: torch.Tensor, v: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor,
                 weight: torch.Tensor | None, *, lr: float, momentum: float, weight_decay: float) -> torch.Tensor:
        """One local SGD step in place on rows ``p`` (and velocity ``v``); returns the loss ``[n]``."""
        ...

    def logits(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[n, T, classes]``: every node's model applied to the same inputs ``x [T, *input]``."""
        ...


class BatchedMLP:
    """Batched-matmul forward and backward for ``Sequential(Flatten, Linear, ReLU, ..., Linear)``."""

    kind = "batched"

    def __init__(self, layers: list[tuple[int, int, int, int]], numel: int, loss: Loss | None = None) -> None:
        # (weight offset, bias offset, out features, in features) per Linear, in order
        self.layers = layers
        self.numel = numel
        self.loss = loss if loss is not None else get_loss("cross_entropy")

    @classmethod
    def from_module(cls, model: nn.Module, layout: ParamLayout, loss: Loss | None = None) -> BatchedMLP | None:
        """The fast path for ``model`` if it is a plain MLP (or logistic regression), else None."""
        if not isinstance(model, nn.Sequential) or len(model) < 2 or not isinstance(model[0], nn.Flatten):
            return None
        mods = list(model)[1:]
        if not all(isinstance(m, nn.Linear) if i % 2 == 0 else type(m) is nn.ReLU for i, m in enumerate(mods)):
            return None
        if not isinstance(mods[-1], nn.Linear) or any(m.bias is None for m in mods[::2]):
            return None
        offsets = dict(zip(layout.names, layout.offsets, strict=True))
        layers = []
        for i, m in enumerate(mods[::2]):
            assert isinstance(m, nn.Linear)
            idx = 1 + 2 * i
            layers.append((offsets[f"{idx}.weight"], offsets[f"{idx}.bias"], m.out_features, m.in_features))
        return cls(layers, layout.numel, loss)

    def _weights(self, p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        w_off, b_off, out, inp = self.layers[k]
        return p[:, w_off:w_off + out * inp].view(-1, out, inp), p[:, b_off:b_off + out]

    def _forward(self, p: torch.Tensor, xt: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Inputs of every layer and outputs of every layer (after ReLU, logits last).

        Activations are kept feature-major, ``[n, features, batch]``: then every matmul takes the
        weights as stored (``[out, in]`` rows of the flat vector, no transposed copies) and the
        gradients come out in the stored layout too. A plain ``bmm`` and an in-place bias add beat
        ``baddbmm`` with a broadcast bias (which first copies the bias into every output)."""
        acts, out = [xt], []
        for k in range(len(self.layers)):
            w, b = self._weights(p, k)
            z = torch.bmm(w, acts[-1]).add_(b.unsqueeze(2))
            if k < len(self.layers) - 1:
                acts.append(z.relu_())  # in place: relu(z) > 0 exactly where z > 0, all backward needs
            out.append(z)
        return acts, out

    def _backward(self, p: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None,
                  sink: Callable[[int, torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
        """Forward, loss, and backward; hands each layer's (weight, bias) gradient to ``sink``."""
        acts, pre = self._forward(p, x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2))
        z = pre[-1]  # [n, classes, B]
        # the loss over the class axis (not the last one: no slow short-axis kernel), per sample
        nll, dz = self.loss.output_grad(z, y)  # [n, B], [n, classes, B]
        if weight is None:
            loss = nll.mean(1)
            dz.mul_(1.0 / z.shape[2])
        else:
            count = weight.sum(1, keepdim=True)
            loss = (nll * weight).sum(1) / count.squeeze(1)
            dz.mul_((weight / count).unsqueeze(1))
        for k in range(len(self.layers) - 1, -1, -1):
            gw = torch.bmm(dz, acts[k].transpose(1, 2))
            gb = dz.sum(2)
            if k:  # propagate through the pre-update weights before anyone changes them
                w, _ = self._weights(p, k)
                dz = torch.ops.aten.threshold_backward(torch.bmm(w.transpose(1, 2), dz), pre[k - 1], 0.0)
            sink(k, gw, gb)
        return loss

    def loss_and_grad(self, p: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        grad = torch.empty(p.shape[0], self.numel, dtype=p.dtype, device=p.device)

        def sink(k: int, gw: torch.Tensor, gb: torch.Tensor) -> None:
            w, b = self._weights(grad, k)
            w.copy_(gw)
            b.copy_(gb)

        return self._backward(p, x, y, weight, sink), grad

    @torch.no_grad()
    def sgd_step(self, p: torch.Tensor, v: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor,
                 weight: torch.Tensor | None, *, lr: float, momentum: float, weight_decay: float) -> torch.Tensor:
        """One SGD step in place on rows ``p`` (and velocity ``v``); returns the per-node loss.

        The shared optimiser (`gossipfl.algorithms.optim.sgd_update`, as the Trainer), applied layer
        by layer as gradients come out of the backward pass, so no ``[n, D]`` gradient is materialised.
        A layer's weights are updated only after the backward pass has propagated through them
        (`_backward` calls ``sink`` after that), and while its velocity is still in cache.
        """

        def sink(k: int, gw: torch.Tensor, gb: torch.Tensor) -> None:
            for g, (pw, vw) in ((gw, self._pair(p, v, k, 0)), (gb, self._pair(p, v, k, 1))):
                sgd_update(pw, vw, g, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)

        return self._backward(p, x, y, weight, sink)

    def _pair(self, p: torch.Tensor, v: torch.Tensor | None, k: int,
              which: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._weights(p, k)[which], None if v is None else self._weights(v, k)[which]

    @torch.no_grad()
    def logits(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        xt = x.reshape(x.shape[0], -1).t().unsqueeze(0).expand(p.shape[0], -1, -1)
        return self._forward(p, xt)[1][-1].transpose(1, 2)


class FuncModel:
    """Any module, batched with ``torch.func``: ``vmap`` over rows of the flat parameter matrix."""

    kind = "func"

    def __init__(self, model: nn.Module, layout: ParamLayout, loss_fn: Loss | None = None) -> None:
        self.model, self.layout = model, layout
        self.loss = loss_fn if loss_fn is not None else get_loss("cross_entropy")
        per_sample = self.loss.per_sample

        def loss(p: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            out = functional_call(model, layout.unflatten(p), (x,))
            return (per_sample(out, y) * w).sum() / w.sum()

        def forward(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return functional_call(model, layout.unflatten(p), (x,))

        self._grad = vmap(grad_and_value(loss))
        self._logits = vmap(forward, in_dims=(0, None))

    def loss_and_grad(self, p: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.ones(y.shape, dtype=p.dtype, device=p.device) if weight is None else weight
        grad, loss = self._grad(p, x, y, w)
        return loss, grad

    def sgd_step(self, p: torch.Tensor, v: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor,
                 weight: torch.Tensor | None, *, lr: float, momentum: float, weight_decay: float) -> torch.Tensor:
        loss, grad = self.loss_and_grad(p, x, y, weight)
        sgd_update(p, v, grad, lr=lr, momentum=momentum, weight_decay=weight_decay)
        return loss

    @torch.no_grad()
    def logits(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._logits(p, x)


def batched_model(model: nn.Module, layout: ParamLayout, kernel: str = "auto",
                  loss: Loss | None = None) -> BatchedModel:
    """``kernel``: ``auto`` (batched matmuls for plain MLPs under a built-in loss, torch.func
    otherwise), ``batched``, ``func``. ``loss``: the run's (default cross-entropy)."""
    if kernel not in ("auto", "batched", "func"):
        raise ConfigError(f"kernel: {kernel!r} is not one of auto, batched, func")
    builtin = loss is None or loss.builtin
    if kernel != "func" and builtin:
        fast = BatchedMLP.from_module(model, layout, loss)
        if fast is not None:
            return fast
    if kernel == "batched":
        raise ConfigError("kernel: batched matmuls cover only the built-in mlp and logreg under a built-in loss; "
                          "use func")
    return FuncModel(model, layout, loss)
