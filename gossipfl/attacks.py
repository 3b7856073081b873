"""Malicious peers for robustness studies: the ``[attack]`` table, who attacks, and what they send.

An attacker follows the protocol (it trains, receives and merges like any node) but replaces the
model it sends with a poisoned one from its step ``start`` on. The table::

    [attack]
    kind = "sign_flip"     # sign_flip: -scale x; scaled: scale x; gaussian: x + N(0, sigma^2)
    fraction = 0.1         # share of the nodes that attack (or nodes = [3, 17, ...])
    placement = "random"   # random, hubs (highest degree first) or given (with nodes)
    start = 0              # first step whose message is poisoned
    scale = 1.0            # sign_flip / scaled: the factor
    sigma = 1.0            # gaussian: the noise's standard deviation
    seed = 0               # which nodes a random placement picks (default: the run's seed)

`poison` is a pure batched function of the messages' model rows, so every engine calls the same
code; `Attack.nodes` are node indices (the vectorised engine's rows, the cluster's n00, n01, ...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch

from gossipfl.errors import ConfigError

__all__ = ["ATTACKS", "Attack", "parse_attack", "poison"]

ATTACKS = ("sign_flip", "scaled", "gaussian")
PLACEMENTS = ("random", "hubs", "given")
_KEYS = {"kind", "fraction", "nodes", "placement", "start", "scale", "sigma", "seed"}


@dataclass(frozen=True)
class Attack:
    """Who attacks (sorted node indices) and how."""

    kind: str
    nodes: tuple[int, ...]
    start: int = 0
    scale: float = 1.0
    sigma: float = 1.0

    def mask(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """``[n]`` bool: the attackers."""
        out = torch.zeros(n, dtype=torch.bool, device=device)
        if self.nodes:
            out[list(self.nodes)] = True
        return out


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
    if kind not in ATTACKS:
        raise ConfigError(f"attack.kind: expected one of {', '.join(ATTACKS)}, got {kind!r}")
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
        if placement == "hubs":  # highest degree first, then lowest index
            order = sorted(range(n), key=lambda i: (-graph.degree(i), i))
        else:
            g = torch.Generator().manual_seed(int(t.get("seed", seed)))
            order = torch.randperm(n, generator=g).tolist()
        chosen = sorted(order[:count])
    start = t.get("start", 0)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ConfigError(f"attack.start: expected a step >= 0, got {start!r}")
    return Attack(kind=kind, nodes=tuple(chosen), start=start, scale=_number("scale", t.get("scale", 1.0), low=0.0),
                  sigma=_number("sigma", t.get("sigma", 1.0), low=0.0))


def poison(attack: Attack, models: torch.Tensor, attacking: torch.Tensor,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The models ``[S, D]`` to send, with the rows where ``attacking`` (``[S]`` bool) poisoned.

    A new tensor: the senders' own models are left as they are (an attacker still learns)."""
    if not bool(attacking.any()):
        return models
    if attack.kind == "sign_flip":
        bad = models * -attack.scale
    elif attack.kind == "scaled":
        bad = models * attack.scale
    else:
        noise = torch.randn(models.shape, generator=generator, dtype=models.dtype, device=models.device)
        bad = models + attack.sigma * noise
    return torch.where(attacking.unsqueeze(1), bad, models)
