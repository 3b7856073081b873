"""The vectorised engine's learner: minibatches for many nodes and the `Learner` the algorithms use.

`Batches` draws every node's minibatches (per node, shuffled passes over its shard, as the
`gossipfl.learning.Trainer` does); `BatchedLearner` is the `gossipfl.algorithms.base.Learner` of
any set of nodes: gradients and SGD steps (the shared optimiser) with the batched model, in blocks
sized to the CPU cache, each node's momentum a row of one ``[N, D]`` buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gossipfl.algorithms.optim import sgd_update
from gossipfl.sim._batched_models import BatchedModel

__all__ = ["BatchedLearner", "Batches", "RowLearner"]


class Batches:
    """Minibatch indices for many nodes: per node, shuffled passes over its shard (see module doc)."""

    def __init__(self, shards: Sequence[torch.Tensor], batch_size: int, *, device: torch.device,
                 generator: torch.Generator, seeds: Sequence[int] | None) -> None:
        n = len(shards)
        lengths = torch.tensor([len(s) for s in shards], dtype=torch.int64)
        smax = int(lengths.max())
        idx = torch.zeros(n, smax, dtype=torch.int64)
        for i, s in enumerate(shards):
            idx[i, : len(s)] = s
        self.exact = seeds is not None
        home = torch.device("cpu") if self.exact else device  # exact mode keeps its state on the host
        self.device = device
        self.idx = idx.to(device)
        self.n = lengths.to(home)
        self.b = lengths.clamp_max(batch_size).to(home)
        self.bmax = int(self.b.max())
        self.full = bool((self.b == self.bmax).all())
        self.pad = (torch.arange(smax) >= lengths.unsqueeze(1)).to(home)
        self.order = torch.zeros(n, smax, dtype=torch.int64, device=home)
        self.pos = self.n.clone()  # every node starts with a new epoch, like a fresh Trainer
        self.ar = torch.arange(self.bmax, device=home)
        self.gen = generator
        self.smax = smax
        if seeds is not None:
            self.gens = [torch.Generator().manual_seed(s) for s in seeds]
            self.lengths = lengths.tolist()

    def next(self, rows: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Global training-set indices ``[n, bmax]`` for ``rows``, and a 0/1 weight if batches differ."""
        if self.exact and isinstance(rows, torch.Tensor):  # exact mode keeps its state on the host
            rows = rows.cpu()
        n, b, pos = self.n[rows], self.b[rows], self.pos[rows]
        need = pos + b > n
        if self.exact:
            r = torch.arange(self.n.shape[0])[rows] if isinstance(rows, slice) else rows
            for i in r[need].tolist():  # epoch boundaries only: the Trainer's own randperm
                self.order[i, : self.lengths[i]] = torch.randperm(self.lengths[i], generator=self.gens[i])
            rows_h: slice | torch.Tensor = rows if isinstance(rows, slice) else r
            pos = torch.where(need, 0, pos)
            local = self.order[rows_h].gather(1, (pos.unsqueeze(1) + self.ar).clamp_max(self.smax - 1))
            self.pos[rows_h] = pos + b
            local = local.to(self.device)
        else:
            keys = torch.rand(b.shape[0], self.smax, generator=self.gen, device=self.device)
            perm = keys.masked_fill_(self.pad[rows], 2.0).argsort(1)
            order = torch.where(need.unsqueeze(1), perm, self.order[rows])
            self.order[rows] = order
            pos = torch.where(need, 0, pos)
            local = order.gather(1, (pos.unsqueeze(1) + self.ar).clamp_max(self.smax - 1))
            self.pos[rows] = pos + b
        gidx = self.idx[rows].gather(1, local)
        if self.full:
            return gidx, None
        weight = (self.ar.to(self.device) < b.to(self.device).unsqueeze(1)).float()
        return gidx, weight



class BatchedLearner:
    """Minibatches, model kernel and momentum rows of all N nodes; `rows` gives a batch's `Learner`."""

    def __init__(self, model: BatchedModel, batches: Batches, x_train: torch.Tensor, y_train: torch.Tensor, *,
                 lr: float, momentum: float, weight_decay: float, velocity: torch.Tensor | None, block: int) -> None:
        self.model, self.batches = model, batches
        self.x_train, self.y_train = x_train, y_train
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.velocity = velocity
        self.block = block
        self.n = batches.n.shape[0]

    def rows(self, rows: torch.Tensor | None) -> RowLearner:
        """The learner of nodes ``rows`` (sorted node indices; None: all nodes, in order)."""
        return RowLearner(self, rows)

    def minibatch(self, rows: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The next minibatch of each node ``rows``: inputs ``[k, B, ...]``, labels ``[k, B]``, 0/1 weights."""
        gidx, weight = self.batches.next(rows)
        k, b = gidx.shape
        flat = gidx.reshape(-1)
        x = self.x_train.index_select(0, flat).view(k, b, *self.x_train.shape[1:])
        return x, self.y_train.index_select(0, flat).view(k, b), weight


class RowLearner:
    """`gossipfl.algorithms.base.Learner` of the nodes ``rows``: row i of every ``params`` argument is node
    ``rows[i]``."""

    def __init__(self, owner: BatchedLearner, rows: torch.Tensor | None) -> None:
        self.owner = owner
        self.rows = rows
        self.lr, self.momentum, self.weight_decay = owner.lr, owner.momentum, owner.weight_decay
        self.count = owner.n if rows is None else rows.shape[0]

    def _blocks(self) -> list[tuple[int, int, slice | torch.Tensor]]:
        """(first row, end row, the nodes' selector) per block of rows."""
        step, out = self.owner.block, []
        for a in range(0, self.count, step):
            b = min(a + step, self.count)
            out.append((a, b, slice(a, b) if self.rows is None else self.rows[a:b]))
        return out

    def grad(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses, grads = [], []
        for a, b, sel in self._blocks():
            x, y, w = self.owner.minibatch(sel)
            loss, g = self.owner.model.loss_and_grad(params[a:b], x, y, w)
            losses.append(loss.detach())
            grads.append(g)
        if len(grads) == 1:
            return losses[0], grads[0]
        return torch.cat(losses), torch.cat(grads)

    def _velocity(self, sel: slice | torch.Tensor) -> torch.Tensor | None:
        v = self.owner.velocity
        if v is None:
            return None
        return v[sel] if isinstance(sel, slice) else v.index_select(0, sel)

    def _keep_velocity(self, sel: slice | torch.Tensor, v: torch.Tensor | None) -> None:
        if v is not None and self.owner.velocity is not None and not isinstance(sel, slice):
            self.owner.velocity.index_copy_(0, sel, v)

    def sgd_step(self, params: torch.Tensor) -> torch.Tensor:
        losses = []
        o = self.owner
        for a, b, sel in self._blocks():
            x, y, w = o.minibatch(sel)
            v = self._velocity(sel)
            losses.append(o.model.sgd_step(params[a:b], v, x, y, w, lr=o.lr, momentum=o.momentum,
                                           weight_decay=o.weight_decay).detach())
            self._keep_velocity(sel, v)
        return losses[0] if len(losses) == 1 else torch.cat(losses)

    def apply(self, params: torch.Tensor, grad: torch.Tensor, where: torch.Tensor | None = None) -> None:
        o = self.owner
        if where is None:
            sel: slice | torch.Tensor = slice(None) if self.rows is None else self.rows
            v = self._velocity(sel)
            sgd_update(params, v, grad, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
            self._keep_velocity(sel, v)
            return
        idx = where.nonzero().squeeze(1)  # only these rows move (and only their momentum)
        nodes = idx if self.rows is None else self.rows.index_select(0, idx)
        sub = params.index_select(0, idx)
        v = self._velocity(nodes)
        sgd_update(sub, v, grad.index_select(0, idx), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        params.index_copy_(0, idx, sub)
        self._keep_velocity(nodes, v)
