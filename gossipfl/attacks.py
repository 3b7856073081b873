"""Malicious peers for robustness studies: the ``[attack]`` table, who attacks, and what they send.

An attacker follows the protocol (it trains, receives and merges like any node) but replaces the
model it sends with a poisoned one from its step ``start`` on. The table::

    [attack]
    kind = "sign_flip"     # one of ATTACKS (below), or "none"
    fraction = 0.1         # share of the nodes that attack (or nodes = [3, 17, ...])
    placement = "random"   # random, hubs (most central first) or given (with nodes)
    hubs_by = "degree"     # hubs: rank by "degree" or "betweenness" (sampled beyond 2000 nodes)
    start = 0              # first step whose message is poisoned
    scale = 1.0            # sign_flip / scaled: the factor
    sigma = 1.0            # gaussian: the noise's standard deviation
    z = 1.0                # alie: how many standard deviations (default: Baruch et al.'s z_max)
    eps = 0.1              # ipm / dissensus: the strength
    seed = 0               # which nodes a random placement picks (default: the run's seed)

A strength key another kind takes is ignored, so one table can serve a sweep over kinds.

The kinds, for an attacker with model x and honest neighbours' models x_1 .. x_k (mean mu,
coordinate-wise population standard deviation sigma):

``sign_flip``   sends -scale x.            ``scaled``  sends scale x.
``gaussian``    sends x + N(0, sigma^2 I).
``alie``        "A little is enough" (Baruch, Baruch, Goldberg, NeurIPS 2019): mu - z sigma,
                coordinate-wise; inside the honest spread, so distance and median filters pass it.
                z defaults to z_max = Phi^-1((n - s) / n), s = floor(n / 2 + 1) - f (n nodes, f attackers).
``ipm``         Inner-product manipulation (Xie, Koyejo, Gupta, UAI 2020): -eps mu.
``dissensus``   (He, Karimireddy, Jaggi 2022) crafted per receiver i from i's inbox: every attacking
                neighbour j sends x_i - eps (sum_{k honest} W_ik (x_k - x_i)) / (sum_{j attacking} W_ij),
                so that under the plain mix x_i moves by (1 - eps) of its honest mixing step (eps > 1
                pushes the honest nodes apart). Only an omniscient adversary sees every receiver's
                inbox: the vectorised engine models it; a node service cannot (refused there).
``label_flip``  data poisoning: the attacker trains on labels C - 1 - y; what it sends is its model.
``free_rider``  contributes nothing of its own: it echoes its neighbours, sending mu.

ALIE, IPM and the free rider are omniscient about their neighbours: in the vectorised engine
mu and sigma are over the honest neighbours' current models; a node service (``gossipfl node
--attack alie``) uses the newest model each neighbour sent it, all it can know.

`poison` is a pure batched function of the messages' model rows, so every engine calls the same
code; `Attack.nodes` are node indices (the vectorised engine's rows, the cluster's n00, n01, ...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import networkx as nx
import torch

from gossipfl.errors import ConfigError

__all__ = ["ATTACKS", "NEIGHBOURS", "Attack", "alie_z", "dissensus_mix", "dissensus_slots", "flip_labels",
           "neighbour_stats", "parse_attack", "poison"]

ATTACKS = ("sign_flip", "scaled", "gaussian", "alie", "ipm", "dissensus", "label_flip", "free_rider")
NEIGHBOURS = frozenset({"alie", "ipm", "free_rider"})  # kinds whose message is built from the neighbours' models
MESSAGE = frozenset({"sign_flip", "scaled", "gaussian"}) | NEIGHBOURS  # kinds that rewrite the sent model
PLACEMENTS = ("random", "hubs", "given")
_KEYS = {"kind", "fraction", "nodes", "placement", "hubs_by", "start", "scale", "sigma", "z", "eps", "seed"}
HUBS_BY = ("degree", "betweenness")
_DEFAULT_EPS = {"ipm": 0.1, "dissensus": 1.5}


@dataclass(frozen=True)
class Attack:
    """Who attacks (sorted node indices) and how."""

    kind: str
    nodes: tuple[int, ...]
    start: int = 0
    scale: float = 1.0
    sigma: float = 1.0
    z: float = 1.0
    eps: float = 0.1

    def mask(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """``[n]`` bool: the attackers."""
        out = torch.zeros(n, dtype=torch.bool, device=device)
        if self.nodes:
            out[list(self.nodes)] = True
        return out

    @property
    def rewrites_message(self) -> bool:
        """The attacker's sent model is replaced (not so for label flipping and dissensus)."""
        return self.kind in MESSAGE


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s z_max for n workers of which f attack: the largest z whose mu - z sigma still
    has more than half the honest values on its far side (s = floor(n/2 + 1) - f of them)."""
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    return NormalDist().inv_cdf(min(max(p, 1e-6), 1 - 1e-6)) if n else 1.0


def _number(key: str, value: Any, *, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigError(f"attack.{key}: expected a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def parse_attack(table: Mapping[str, Any] | None, graph: nx.Graph, *, seed: int) -> Attack | None:
    """The attack of a run on ``graph`` (None without an ``[attack]`` table); errors name the key."""
    if not table:
        return None
    t = dict(table)
    unknown = sorted(set(t) - _KEYS)
    if unknown:
        raise ConfigError(f"attack: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(_KEYS))}")
    kind = t.get("kind")
    if kind == "none":  # no attack (a sweep's baseline column)
        return None
    if kind not in ATTACKS:
        raise ConfigError(f"attack.kind: expected one of {', '.join(ATTACKS)} or none, got {kind!r}")
    n = graph.number_of_nodes()
    placement = t.get("placement", "given" if "nodes" in t else "random")
    if placement not in PLACEMENTS:
        raise ConfigError(f"attack.placement: expected one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if placement == "given":
        nodes = t.get("nodes")
        if not isinstance(nodes, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n
                                              for i in nodes):
            raise ConfigError(f"attack.nodes: expected a list of node indices in 0..{n - 1}, got {nodes!r}")
        chosen = sorted(set(nodes))
    else:
        if "nodes" in t:
            raise ConfigError("attack.nodes: give the nodes with placement = \"given\" (or fraction alone)")
        count = round(_number("fraction", t.get("fraction", 0.1), low=0.0, high=1.0) * n)
        if placement == "hubs":  # most central first, then lowest index
            centrality = _centrality(graph, t.get("hubs_by", "degree"), seed=int(t.get("seed", seed)))
            order = sorted(range(n), key=lambda i: (-centrality[i], i))
        else:
            g = torch.Generator().manual_seed(int(t.get("seed", seed)))
            order = torch.randperm(n, generator=g).tolist()
        chosen = sorted(order[:count])
    start = t.get("start", 0)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ConfigError(f"attack.start: expected a step >= 0, got {start!r}")
    z = _number("z", t["z"], low=0.0) if "z" in t else alie_z(n, len(chosen))
    return Attack(kind=kind, nodes=tuple(chosen), start=start, scale=_number("scale", t.get("scale", 1.0), low=0.0),
                  sigma=_number("sigma", t.get("sigma", 1.0), low=0.0), z=z,
                  eps=_number("eps", t.get("eps", _DEFAULT_EPS.get(kind, 0.1)), low=0.0))


def _centrality(graph: nx.Graph, by: Any, *, seed: int) -> dict[int, float]:
    """Each node's rank key for a hubs placement: its degree, or its betweenness (exact up to 2000
    nodes; estimated from 256 sampled sources beyond, as exact betweenness is O(n m))."""
    if by not in HUBS_BY:
        raise ConfigError(f"attack.hubs_by: expected one of {', '.join(HUBS_BY)}, got {by!r}")
    if by == "degree":
        return {i: float(d) for i, d in graph.degree()}
    n = graph.number_of_nodes()
    return nx.betweenness_centrality(graph, k=None if n <= 2000 else 256, seed=seed)


def neighbour_stats(values: torch.Tensor, owner: torch.Tensor,
                    rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row r < ``rows``, over the ``values`` ``[M, D]`` whose ``owner`` ``[M]`` is r: the mean and
    the coordinate-wise population standard deviation (``[rows, D]``, zeros for a row with none)
    and how many there are (``[rows]``). Two passes, so no cancellation in the variance."""
    count = torch.bincount(owner, minlength=rows)
    c = count.clamp_min(1).to(values.dtype).unsqueeze(1)
    mu = values.new_zeros(rows, values.shape[1]).index_add_(0, owner, values) / c
    var = values.new_zeros(rows, values.shape[1]).index_add_(0, owner, (values - mu[owner]) ** 2) / c
    return mu, var.sqrt(), count


def poison(attack: Attack, models: torch.Tensor, attacking: torch.Tensor,
           generator: torch.Generator | None = None, *, mu: torch.Tensor | None = None,
           std: torch.Tensor | None = None, heard: torch.Tensor | None = None) -> torch.Tensor:
    """The models ``[S, D]`` to send, with the rows where ``attacking`` (``[S]`` bool) poisoned.

    ``mu``, ``std`` ``[S, D]`` and ``heard`` ``[S]`` (how many honest neighbours they are over):
    `neighbour_stats` of each sender's honest neighbours, for the kinds in `NEIGHBOURS`; a row that
    heard no one sends its own model. A new tensor: the senders' own models are left as they are
    (an attacker still learns). Kinds that do not rewrite the message return ``models``."""
    if not attack.rewrites_message or not bool(attacking.any()):
        return models
    if attack.kind == "sign_flip":
        bad = models * -attack.scale
    elif attack.kind == "scaled":
        bad = models * attack.scale
    elif attack.kind == "gaussian":
        noise = torch.randn(models.shape, generator=generator, dtype=models.dtype, device=models.device)
        bad = models + attack.sigma * noise
    else:
        if mu is None or std is None or heard is None:
            raise ValueError(f"attack {attack.kind!r} needs the neighbours' mean, deviation and count")
        mu, std = mu.to(models.dtype), std.to(models.dtype)
        if attack.kind == "alie":
            bad = mu - attack.z * std
        elif attack.kind == "ipm":
            bad = -attack.eps * mu
        else:  # free_rider
            bad = mu.clone()
        attacking = attacking & (heard > 0)
    return torch.where(attacking.unsqueeze(1), bad, models)


def dissensus_slots(own: torch.Tensor, others: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor,
                    byzantine: torch.Tensor, eps: float) -> torch.Tensor:
    """The gathered inbox ``others`` ``[R, K, D]`` with every attacking slot (``byzantine`` ``[R, K]``)
    replaced by He et al.'s dissensus message for its receiver:
    ``x_i - eps * sum_{k honest} W_ik (x_k - x_i) / sum_{j attacking} W_ij``."""
    honest = mask & ~byzantine
    bad = mask & byzantine
    w = weights.to(own.dtype)
    step = ((w * honest).unsqueeze(2) * (others - own.unsqueeze(1))).sum(1)  # [R, D]
    b = (w * bad).sum(1, keepdim=True).clamp_min(torch.finfo(own.dtype).tiny)
    crafted = own - eps * step / b
    return torch.where(bad.unsqueeze(2), crafted.unsqueeze(1).expand_as(others), others)


def dissensus_mix(own: torch.Tensor, honest_mix: torch.Tensor, hit: torch.Tensor, eps: float) -> torch.Tensor:
    """D-PSGD's mix when dissensus messages arrive: ``honest_mix`` is the mix over the honest
    arrivals alone (x_i + d_i); a receiver with an attacking arrival (``hit`` ``[R]``) gets
    x_i + (1 - eps) d_i, the closed form of mixing `dissensus_slots`' messages."""
    moved = own + (1.0 - eps) * (honest_mix - own)
    return torch.where(hit.view(-1, *([1] * (own.dim() - 1))), moved, honest_mix)


def flip_labels(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Label flipping's labels: class c becomes C - 1 - c."""
    return (n_classes - 1) - y
