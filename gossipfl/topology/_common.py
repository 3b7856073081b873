"""Helpers every topology module shares: the error helper, argument checks, the empty graph.

Private to :mod:`gossipfl.topology`. Every check raises :class:`~gossipfl.errors.TopologyError`
with a message that starts with ``where`` (the generator or file being built).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import NoReturn, TypeVar

import networkx as nx
import numpy as np

from gossipfl.errors import TopologyError

_N = TypeVar("_N", bound=Hashable)


class _TooFewNodes(TopologyError):
    """The generator needs more nodes than it got.

    A distinct (private) type so :func:`graph_for_members` can tell "the cluster is still
    small" apart from a real configuration mistake and fall back to a complete graph.
    """

    def __init__(self, message: str, minimum: int) -> None:
        super().__init__(message)
        self.minimum = minimum


def _fail(message: str) -> NoReturn:
    raise TopologyError(message)


def _is_int(value: object) -> bool:
    # bool is an int subclass; `nodes = true` in a TOML file is a mistake, not 1.
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_int(where: str, name: str, value: object, *, minimum: int | None = None) -> int:
    if not _is_int(value):
        _fail(f"{where}: {name} must be an integer, got {value!r}")
    number = int(value)  # type: ignore[call-overload]
    if minimum is not None and number < minimum:
        _fail(f"{where}: {name} must be >= {minimum}, got {number}")
    return number


def _check_prob(where: str, name: str, value: object, *, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        _fail(f"{where}: {name} must be a number in [0, 1], got {value!r}")
    prob = float(value)
    low_ok = prob >= 0.0 if allow_zero else prob > 0.0
    if not (low_ok and prob <= 1.0):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        _fail(f"{where}: {name} must be in {interval}, got {value!r}")
    return prob


def _check_n(where: str, n: object, *, minimum: int = 1, why: str = "") -> int:
    count = _check_int(where, "n (the node count)", n, minimum=1)
    if count < minimum:
        reason = f" ({why})" if why else ""
        raise _TooFewNodes(f"{where}: needs at least {minimum} nodes{reason}, got {count}", minimum)
    return count


def _check_round(where: str, t: object) -> int:
    return _check_int(where, "t (the round)", t, minimum=0)


def _empty(n: int, *, directed: bool = False) -> nx.Graph:
    graph: nx.Graph = nx.DiGraph() if directed else nx.Graph()
    graph.add_nodes_from(range(n))
    return graph
