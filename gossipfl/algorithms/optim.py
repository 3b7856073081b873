"""The one optimiser every engine and algorithm uses: SGD with momentum and weight decay.

``v <- momentum v + (g + weight_decay p)``;  ``p <- p - lr v``  (PyTorch's ``torch.optim.SGD``
without dampening or Nesterov). Rows: ``p``, ``v`` and ``g`` may carry a leading node axis; the
`gossipfl.learning.Trainer` calls it on one flat vector, the vectorised engine on ``[n, D]`` rows
(its fused MLP kernel on each layer's slice of the rows as soon as the backward pass has it).
"""

from __future__ import annotations

import torch

__all__ = ["sgd_update"]


def sgd_update(p: torch.Tensor, v: torch.Tensor | None, grad: torch.Tensor, *, lr: float, momentum: float,
               weight_decay: float, fused: bool = False) -> None:
    """One SGD step in place on ``p`` (and the momentum buffer ``v``, None without momentum).

    ``fused``: update ``v`` in one pass (``torch.add(g, v, alpha=momentum)``), faster on large
    rows; its multiply-add may round the last bit differently depending on where a row sits in
    memory, so engines that must agree bit for bit (a node, ``exact`` sampling) leave it off.
    """
    if torch.is_grad_enabled():  # a Trainer's leaf parameters; engines call it without grad (no 15 us wrapper)
        with torch.no_grad():
            sgd_update(p, v, grad, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused)
        return
    if weight_decay:
        grad = grad + weight_decay * p
    if v is not None:
        if fused:
            torch.add(grad, v, alpha=momentum, out=v)
        else:
            v.mul_(momentum).add_(grad)
        grad = v
    p.sub_(grad, alpha=lr)
