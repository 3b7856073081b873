"""Topology names: the aliases, the list of valid names, and calling a generator by name.

A name is looked up case-insensitively with ``-`` read as ``_``; an alias stands for its
generator (``er`` for ``erdos_renyi``). :func:`_call_generator` checks the parameters a spec
gives against the generator's keyword-only signature, so a typo names the valid ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import networkx as nx

from gossipfl.topology._common import _fail
from gossipfl.topology.generators import GENERATORS, TIME_VARYING

ALIASES: dict[str, str] = {
    "er": "erdos_renyi",
    "ws": "watts_strogatz",
    "regular": "random_regular",
    "path": "line",
}


def topology_names() -> list[str]:
    """Every name :func:`build_graph` / :func:`build_schedule` accept, aliases included."""
    return sorted([*GENERATORS, *TIME_VARYING, *ALIASES])


def _lookup(name: str) -> str | None:
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    return key if key in GENERATORS or key in TIME_VARYING else None


def _call_generator(name: str, n: int, seed: int, params: Mapping[str, Any], *, t: int | None = None) -> nx.Graph:
    fn = GENERATORS.get(name) or TIME_VARYING[name]
    accepted = {p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    if "seed" in params:
        _fail(f"{name}: give the seed as the top-level seed, not as a parameter")
    unknown = sorted(set(params) - accepted)
    if unknown:
        valid = ", ".join(sorted(accepted - {"seed"})) or "none"
        _fail(f"{name}: unknown parameter {unknown[0]!r}; valid parameters: {valid}")
    kwargs = dict(params)
    if "seed" in accepted:
        kwargs["seed"] = seed
    return fn(n, **kwargs) if t is None else fn(n, t, **kwargs)
