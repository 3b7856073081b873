"""Exact diffusion (D²): diffusion with a correction step that removes the heterogeneous-data bias.

Yuan, Ying, Zhao, Sayed, "Exact Diffusion for Distributed Optimization and Learning -- Part I:
Algorithm Development", IEEE Trans. Signal Processing 67(3), 2019; in stochastic form as D², Tang,
Lian, Yan, Zhang, Liu, "D²: Decentralized Training over Decentralized Data", ICML 2018. With W
symmetric doubly stochastic (Metropolis weights) and the combination matrix ``A = (I + W) / 2``:

    psi_i^k = x_i^{k-1} - lr g_i(x_i^{k-1})                 adapt
    phi_i^k = psi_i^k + x_i^{k-1} - psi_i^{k-1}             correct
    x_i^k   = sum_j A_ij phi_j^k                            combine

with ``psi^{-1} = x^{-1}`` (the initial model), so ``phi^0 = psi^0`` and the first round is plain
adapt-then-combine diffusion. Eliminating psi and phi gives D²'s form with ``A`` in place of W:
``x^k = A (2 x^{k-1} - x^{k-2} - lr (g(x^{k-1}) - g(x^{k-2})))``. Since A is doubly stochastic,
``sum_i (x_i^k - psi_i^k) = 0`` in every round, so the network average takes exact gradient steps
on ``sum_i f_i``; with exact gradients and a constant step size every node converges to the
exact minimiser (D-PSGD stops at a point biased by how much the local minimisers differ). The
``(I + W) / 2`` is what makes it stable for every W: D² needs ``lambda_min(W) > -1/3``; A's
eigenvalues lie in ``(0, 1]``.

How it maps onto the seam, one engine step of node i (merge, local_step, message):

- ``local_step``: ``x = state["params"]`` is ``x^{k-1}`` (the combine of the previous round);
  ``psi_new = x - lr g(x)``; ``state["phi"] = psi_new + x - state["psi"]`` (``psi_new`` at the
  first step); ``state["psi"] = psi_new``; ``state["params"] = phi``, so that a round in which
  nothing is merged (no gossip point, ``gossip_every > 1``) combines with the identity.
- ``message``: ``phi`` (the ``phi`` channel, ``mix``, latest message per sender).
- ``merge``: the engine hands over ``m_i = sum_j W_ij phi_j + (1 - sum_j W_ij) phi_i``; the
  combine with ``A`` is ``(phi_i + m_i) / 2``, applied as ``params += (m_i - phi_i) / 2`` so that a
  round's messages merged in two parts (a late one) add up to the same combine.

Steps are PLAIN gradient steps at the learner's ``lr`` via ``learner.grad`` (weight decay, if
set, is part of every g): the correction ``x^{k-1} - psi^{k-1}`` assumes them, so the learner's
momentum (the run's ``momentum`` setting) is NOT applied. The model a node deploys between its
step and the next merge is ``phi^k`` (at the fixed point ``phi = x``). Needs neighbour-local
rounds and lossless delivery: a missing message folds its weight into the receiver's, the
combine is then no longer column stochastic and the invariant, hence exactness, is lost. The
papers analyse a static W; on a time-varying graph (doubly stochastic every round) the invariant
still holds and the exact minimiser is still the only fixed point, but convergence is not covered
by them (on random matchings it reaches the exact minimiser of quadratics).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from gossipfl.algorithms.base import AlgorithmBase, Channel, Inbox, Learner, Requirements, Send, State, TensorSpecs

__all__ = ["ExactDiffusion", "correct"]


def correct(psi: torch.Tensor, x_prev: torch.Tensor, psi_prev: torch.Tensor) -> torch.Tensor:
    """Exact diffusion's correction ``phi = psi + x_prev - psi_prev`` (any leading node axes)."""
    return psi + x_prev - psi_prev


class ExactDiffusion(AlgorithmBase):
    """Exact diffusion / D² with ``A = (I + W) / 2``; no hyperparameters (plain SGD at the run's lr)."""

    name: ClassVar[str] = "exact_diffusion"
    requirements: ClassVar[Requirements] = Requirements(rounds=True, lossless=True, weights="symmetric",
                                                        undirected=True)
    channels = (Channel("phi", "mix"),)

    def tensor_specs(self, numel: int, dtype: torch.dtype) -> TensorSpecs:
        return {"phi": ((numel,), dtype)}

    def init_state(self, state: State) -> None:
        p = state["params"]
        state["phi"] = torch.zeros_like(p)  # phi^k, sent and the receiver's own value of the mix
        state["psi"] = torch.zeros_like(p)  # psi^k, the previous adapt step
        state["started"] = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)

    def local_step(self, state: State, learner: Learner) -> torch.Tensor:
        x = state["params"]
        loss, grad = learner.grad(x)
        with torch.no_grad():
            if learner.weight_decay:
                grad = grad + learner.weight_decay * x
            psi = x - learner.lr * grad
            phi = torch.where(state["started"].unsqueeze(1), correct(psi, x, state["psi"]), psi)
            state["psi"] = psi
            state["phi"] = phi
            x.copy_(phi)  # in place: params may be a view of the trainer's model
        state["started"] = torch.ones_like(state["started"])
        return loss

    def message(self, state: State, send: Send) -> dict[str, torch.Tensor]:
        return {"phi": state["phi"]}

    @torch.no_grad()
    def merge(self, state: State, inbox: Inbox) -> None:
        p = state["params"]
        # sum_j W_ij (phi_j - phi_i): what the mix adds to the node's own phi
        delta = inbox["phi"] - state["phi"]
        # before a node's first step its phi is not its model yet: take the neighbours' part alone
        # (the mix is (1 - w) phi_own + sum_j w_j phi_j) and mix it with the model instead
        w = inbox.weight["phi"].to(device=p.device, dtype=p.dtype).unsqueeze(1)
        early = inbox["phi"] - (1.0 - w) * state["phi"] - w * p
        delta = torch.where(state["started"].unsqueeze(1), delta, early)
        state["params"] = p + 0.5 * delta
