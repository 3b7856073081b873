"""One node's learning state and the algorithm calls on it: the node's side of the algorithm seam.

The algorithm's math is batched-first; a node is a batch of one: every state tensor is ``[1, ...]``
and ``state["params"]`` is a ``[1, D]`` view of the `Trainer`'s own flat vector (same storage, so
a merge changes what the next local step starts from). This module combines received messages
by looping over them (`gossipfl.algorithms.inbox.combine`), takes the update-merge order's step on
arrivals, and turns the algorithm's ``[1, ...]`` message tensors into a wire-level `Message`.
Not thread-safe: the node calls it under its learning lock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from gossipfl.algorithms import Algorithm, Draws, Inbox, Message, Send, State
from gossipfl.algorithms._util import node_generator
from gossipfl.algorithms.inbox import combine, count_tensor
from gossipfl.attacks import NEIGHBOURS, Attack, neighbour_stats, poison
from gossipfl.learning import Trainer, TrainerLearner

__all__ = ["REMEMBER_NUMEL", "NodeLearning"]

REMEMBER_NUMEL = 2**21  # models up to 8 MB of float32: a node keeps its neighbours' newest for the page


class NodeLearning:
    """State, step counter and algorithm of one node (``seed``: the node's own, for its draws)."""

    def __init__(self, algorithm: Algorithm, trainer: Trainer, *, seed: int = 0, attack: Attack | None = None,
                 remember: bool = True) -> None:
        self.algorithm = algorithm
        self.attack = attack  # this node is an attacker: its messages carry a poisoned model
        self.trainer = trainer
        self.learner = TrainerLearner(trainer)
        self.step = 0
        self.state: State = {"params": trainer.params.view(1, -1)}
        algorithm.init_state(self.state)
        self.generator = node_generator(algorithm.seed, seed)
        self._draws = Draws([self.generator])
        self._numel, self._dtype = trainer.layout.numel, trainer.params.dtype
        self._update = any(c.local_update for c in algorithm.channels)
        self._every = {c.key: c.every for c in algorithm.channels if c.every > 1}
        # the newest model each neighbour sent: what an ALIE / IPM / free-rider attacker builds on,
        # and the live page's consensus estimate (``remember``, for models up to REMEMBER_NUMEL)
        needs = attack is not None and attack.kind in NEIGHBOURS
        self._heard: dict[str, torch.Tensor] | None = \
            {} if needs or (remember and self._numel <= REMEMBER_NUMEL) else None

    @property
    def params(self) -> torch.Tensor:
        """The flat model vector (the trainer's)."""
        return self.trainer.params

    def _realias(self) -> None:
        """Keep ``state["params"]`` the trainer's storage when the algorithm replaced the tensor."""
        p = self.state["params"]
        if p.data_ptr() != self.trainer.params.data_ptr():
            with torch.no_grad():
                self.trainer.params.copy_(p.reshape(-1))
            self.state["params"] = self.trainer.params.view(1, -1)

    def _decode(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.algorithm.decode(tensors, self._numel, self._dtype)

    def merge(self, messages: Sequence[Message], weights: Mapping[str, float]) -> None:
        """Fold ``messages`` in (in the order given); ``weights``: sender -> mixing weight."""
        inboxes = combine(self.algorithm.channels, self.state, messages, weights, sum(weights.values()),
                          self._decode, in_place=True)  # a ``replaces`` channel: into the state itself
        if self._heard is not None:
            self._listen(messages, weights)
        for inbox in inboxes:
            if self._update:
                self._update_arrival(inbox)
            self.algorithm.merge(self.state, inbox)
            self._realias()

    def _listen(self, messages: Sequence[Message], weights: Mapping[str, float]) -> None:
        """Keep the newest model each current neighbour sent (what an ALIE/IPM attacker knows)."""
        assert self._heard is not None
        for m in messages:
            if "params" in m.tensors:
                x = self._decode({"params": m.tensors["params"].unsqueeze(0)})["params"][0]
                if "weight" in m.tensors:  # push-sum: the model is the ratio
                    x = x / m.tensors["weight"].reshape(-1)[0].clamp_min(torch.finfo(x.dtype).tiny)
                else:  # a copy: the message's buffer is reused once merged
                    x = x.clone()
                self._heard[m.sender] = x
        for gone in [s for s in self._heard if s not in weights]:
            del self._heard[gone]

    def seen_spread(self) -> tuple[float | None, int]:
        """The consensus distance among this node's model and the newest model each current
        neighbour sent, (1 / m) sum_k |x_k - mean|^2 over those m models, and m (None, 0: no model
        heard, or a model too large to remember)."""
        if not self._heard:
            return None, 0
        models = torch.stack([self.model().to(torch.float64), *(x.to(torch.float64) for x in self._heard.values())])
        spread = float(((models - models.mean(0)) ** 2).sum(1).mean())
        return spread, models.shape[0]

    def _update_arrival(self, inbox: Inbox) -> None:
        """Gossip learning's update-merge order: one plain SGD step of the arrived model on our data."""
        for c in self.algorithm.channels:
            if c.local_update:
                x = inbox.values[c.key]
                _, grad = self.trainer.loss_and_grad(params=x[0])
                with torch.no_grad():
                    inbox.values[c.key] = x - self.trainer.lr * grad.unsqueeze(0)

    def local_step(self) -> float:
        loss = self.algorithm.local_step(self.state, self.learner)
        self._realias()
        return float(loss[0])

    def message(self, n_targets: int) -> Message:
        """This gossip point's message to ``n_targets`` targets (may update the state: push-sum)."""
        send = Send(targets=count_tensor(n_targets), step=torch.tensor([self.step]), rng=self._draws)
        out = self.algorithm.message(self.state, send)
        self._realias()
        if self.attack is not None and "params" in out and self.step >= self.attack.start:
            stats = {}
            if self._heard is not None:
                heard = list(self._heard.values())
                values = torch.stack(heard) if heard else out["params"][:0]
                mu, std, count = neighbour_stats(values.to(out["params"].dtype),
                                                 torch.zeros(len(heard), dtype=torch.int64), 1)
                stats = {"mu": mu, "std": std, "heard": count}
            out["params"] = poison(self.attack, out["params"], torch.ones(1, dtype=torch.bool), self.generator,
                                   **stats)
        tensors = {k: v[0] for k, v in out.items() if self.step % self._every.get(k, 1) == 0}
        return Message(tensors=tensors, step=self.step, round=self.step)

    def respond(self, incoming: Message, *,
                snapshot: Callable[[Message], dict[str, torch.Tensor]] | None = None) -> Message:
        """The responder's side of an exchange. ``snapshot``: copies the reply (a `Message` of this
        node's tensors from before the exchange) where it will travel and returns the copies, so
        that the reply is encoded once, straight from the state (`Algorithm.respond`)."""
        snap = None
        if snapshot is not None:
            def snap(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
                msg = Message(tensors={k: v[0] for k, v in tensors.items()}, step=self.step, round=self.step)
                return {k: v.unsqueeze(0) for k, v in snapshot(msg).items()}
        reply = self.algorithm.respond(self.state, {k: v.unsqueeze(0) for k, v in incoming.tensors.items()},
                                       snapshot=snap)
        self._realias()
        return Message(tensors={k: v[0] for k, v in reply.items()}, step=self.step, round=self.step)

    def apply_reply(self, reply: Message) -> None:
        self.algorithm.apply_reply(self.state, {k: v.unsqueeze(0) for k, v in reply.tensors.items()})
        self._realias()

    def model(self) -> torch.Tensor:
        """The model this node would deploy, flat ``[D]`` (push-sum: de-biased)."""
        return self.algorithm.model(self.state)[0]

    # checkpoints: the algorithm state by name (params under its own name), and the generator

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {k: v[0] for k, v in self.state.items()}
        out["rng"] = self.generator.get_state()
        return out

    def load_state(self, saved: Mapping[str, torch.Tensor]) -> None:
        for k, v in saved.items():
            if k == "rng":
                self.generator.set_state(v)
            elif k in self.state:
                with torch.no_grad():
                    if k == "params":
                        self.trainer.params.copy_(v)
                    else:
                        self.state[k] = v.clone().unsqueeze(0)
        self._realias()
