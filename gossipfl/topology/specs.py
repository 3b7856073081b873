"""From a topology spec (a name or a file path) to a connected graph: :func:`build_graph`.

A spec is a generator name or alias (:func:`~gossipfl.topology.names.topology_names`), an
edge list or GraphML file (:mod:`gossipfl.topology.graph_files`), or a topology file
(``topologies/*.toml``), read with :mod:`tomllib`::

    # exactly one of these three:
    generator = "watts_strogatz"       # a generator name (or alias) ...
    [params]                           # ... with its keyword parameters
    k = 4
    p = 0.1

    edges = [[0, 1], [1, 2], [2, 0]]   # explicit edges; node count = max id + 1
    directed = false                   # optional, edges/file only (default false)

    file = "my_graph.graphml"          # relative to this TOML file; the suffix picks the
                                       # format: .graphml, or an edge list (.txt/.edges/.edgelist)

    # optional with any of them:
    nodes = 16                         # default: the node count asked for (--nodes);
                                       # if both are given they must agree
    seed = 3                           # pins a random graph; default: the run's seed

Unknown keys, wrong types, missing files, self-loops and node ids that are not ``0..n-1``
raise :class:`~gossipfl.errors.TopologyError` naming the file and the key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from gossipfl.errors import TopologyError
from gossipfl.topology._common import _check_int, _fail
from gossipfl.topology.generators import TIME_VARYING
from gossipfl.topology.graph_files import _GRAPHML_SUFFIXES, EDGE_LIST_SUFFIXES, _graph_from_pairs, _read_graph_file
from gossipfl.topology.names import _call_generator, _lookup, topology_names

_TOML_KEYS = frozenset({"generator", "params", "edges", "directed", "file", "nodes", "seed"})


@dataclass(frozen=True)
class _Resolved:
    """A spec after parsing: either a generator call still to make, or a loaded graph."""

    source: str
    generator: str | None = None
    params: Mapping[str, Any] | None = None
    n: int | None = None
    seed: int = 0
    graph: nx.Graph | None = None


def _prefix(error: TopologyError, where: str) -> TopologyError:
    """Prepend the file name to an error raised while building from that file (keeps the type)."""
    error.args = (f"{where}: {error}",)
    return error


def _load_toml(path: Path, n: int | None, seed: int, params: Mapping[str, Any]) -> _Resolved:
    where = str(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        _fail(f"topology file not found: {path}")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        _fail(f"{where}: not valid TOML: {exc}")
    except OSError as exc:
        _fail(f"cannot read topology file {path}: {exc}")

    unknown = sorted(set(data) - _TOML_KEYS)
    if unknown:
        _fail(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(_TOML_KEYS))}")
    sources = [key for key in ("generator", "edges", "file") if key in data]
    if len(sources) != 1:
        found = f" (found {', '.join(sources)})" if sources else ""
        _fail(f"{where}: exactly one of 'generator', 'edges' or 'file' is required{found}")

    nodes: int | None = None
    if "nodes" in data:
        nodes = _check_int(where, "nodes", data["nodes"], minimum=1)
        if n is not None and nodes != n:
            _fail(f"{where}: nodes = {nodes} but {n} nodes were asked for (--nodes)")
    count = nodes if nodes is not None else n
    if "seed" in data:
        seed = _check_int(where, "seed", data["seed"])
    directed: bool | None = None
    if "directed" in data:
        if not isinstance(data["directed"], bool):
            _fail(f"{where}: directed must be true or false, got {data['directed']!r}")
        directed = data["directed"]

    if "generator" in data:
        name = data["generator"]
        if not isinstance(name, str):
            _fail(f"{where}: generator must be a string, got {name!r}")
        canonical = _lookup(name)
        if canonical is None:
            _fail(f"{where}: generator = {name!r} is not a known topology; valid names: {', '.join(topology_names())}")
        if directed is not None:
            _fail(f"{where}: directed only applies to edges/file; the generator decides it")
        table = data.get("params", {})
        if not isinstance(table, dict):
            _fail(f"{where}: params must be a table ([params]), got {table!r}")
        if "seed" in table:
            _fail(f"{where}: params.seed: give the seed as the top-level key 'seed'")
        merged = {**table, **params}  # caller's parameters (CLI) override the file's
        return _Resolved(where, generator=canonical, params=merged, n=count, seed=seed)

    if "params" in data:
        _fail(f"{where}: params only applies to generator topologies")
    if params:
        _fail(f"{where}: parameters {sorted(params)} only apply to generator topologies")
    if "edges" in data:
        edges = data["edges"]
        if not isinstance(edges, list) or not edges:
            _fail(f"{where}: edges must be a non-empty list of [u, v] pairs")
        pairs: list[tuple[str, object, object]] = []
        for i, edge in enumerate(edges):
            if not isinstance(edge, list) or len(edge) != 2:
                _fail(f"{where}: edges[{i}] must be a pair [u, v], got {edge!r}")
            pairs.append((f"edges[{i}]", edge[0], edge[1]))
        graph = _graph_from_pairs(pairs, directed=bool(directed), where=where)
        what = "edges (max id + 1)"
    else:
        target = data["file"]
        if not isinstance(target, str) or not target:
            _fail(f"{where}: file must be a non-empty string path, got {target!r}")
        file_path = path.parent / target
        if file_path.suffix.lower() == ".toml":
            _fail(f"{where}: file = {target!r}: a topology file cannot include another TOML file")
        graph = _read_graph_file(file_path, directed=directed, where=f"{where}: file")
        what = f"file {target!r}"
    if count is not None and graph.number_of_nodes() != count:
        asked = "nodes" if nodes is not None else "--nodes"
        _fail(f"{where}: {what} gives {graph.number_of_nodes()} nodes but {asked} is {count}")
    return _Resolved(where, graph=graph, n=graph.number_of_nodes(), seed=seed)


def _resolve(spec: str | os.PathLike[str], n: int | None, seed: int, params: Mapping[str, Any]) -> _Resolved:
    if n is not None:
        n = _check_int("topology", "nodes", n, minimum=1)
    seed = _check_int("topology", "seed", seed)
    if isinstance(spec, str):
        canonical = _lookup(spec)
        if canonical is not None:
            return _Resolved(canonical, generator=canonical, params=dict(params), n=n, seed=seed)
        path = Path(spec)
        known = (".toml", *EDGE_LIST_SUFFIXES, *_GRAPHML_SUFFIXES)
        if path.suffix.lower() not in known and "/" not in spec and os.sep not in spec:
            _fail(
                f"unknown topology {spec!r}; valid names: {', '.join(topology_names())}, "
                f"or a path to a {'/'.join(known)} file"
            )
    elif isinstance(spec, os.PathLike):
        path = Path(spec)
    else:
        _fail(f"a topology is a name or a file path, got {spec!r}")
    if path.suffix.lower() == ".toml":
        return _load_toml(path, n, seed, params)
    where = str(path)
    if params:
        _fail(f"{where}: parameters {sorted(params)} only apply to generator topologies")
    if not path.is_file():
        _fail(f"topology file not found: {path}")
    graph = _read_graph_file(path, directed=None, where=where)
    if n is not None and graph.number_of_nodes() != n:
        _fail(f"{where}: the graph has {graph.number_of_nodes()} nodes but --nodes is {n}")
    return _Resolved(where, graph=graph, n=graph.number_of_nodes(), seed=seed)


def _check_connected(graph: nx.Graph, where: str) -> None:
    if graph.is_directed():
        if not nx.is_strongly_connected(graph):
            parts = nx.number_strongly_connected_components(graph)
            _fail(f"{where}: the graph is not strongly connected ({parts} components)")
    elif not nx.is_connected(graph):
        parts = nx.number_connected_components(graph)
        _fail(f"{where}: the graph is not connected ({parts} components)")


def _generate(resolved: _Resolved, *, t: int | None = None) -> nx.Graph:
    assert resolved.generator is not None
    if resolved.n is None:
        _fail(f"{resolved.source}: the node count is required (--nodes or nodes = N)")
    try:
        return _call_generator(resolved.generator, resolved.n, resolved.seed, resolved.params or {}, t=t)
    except TopologyError as exc:
        if resolved.source != resolved.generator:
            raise _prefix(exc, resolved.source) from None
        raise


def build_graph(spec: str | os.PathLike[str], n: int | None = None, *, seed: int = 0, **params: Any) -> nx.Graph:
    """The connected graph a topology spec names.

    ``spec`` is a generator name or alias (see :func:`topology_names`), or a path to a
    ``.toml`` topology file, an edge list (``.txt``/``.edges``/``.edgelist``) or ``.graphml``.
    ``n`` is required for generators and, when given, must match a file's node count.
    ``params`` go to the generator (and override a TOML file's ``[params]``); a TOML file's
    ``seed`` overrides ``seed``. The result is checked to be connected (strongly connected
    for a digraph), so a run never starts on a graph that cannot reach consensus.
    Time-varying names raise ``TopologyError``: use :func:`build_schedule`.
    """
    resolved = _resolve(spec, n, seed, params)
    if resolved.graph is not None:
        graph = resolved.graph
    elif resolved.generator in TIME_VARYING:
        _fail(f"{resolved.source}: {resolved.generator} gives a new graph every round; use build_schedule()")
    else:
        graph = _generate(resolved)
    _check_connected(graph, resolved.source)
    return graph


def check_spec(spec: str | os.PathLike[str], *, seed: int = 0) -> None:
    """Check a topology spec without a node count (a name, or a file that exists and parses).

    For ``gossipfl node``, whose graph is laid over a membership that is not known yet: a typo in
    the name or a broken file is a ``TopologyError`` at start-up rather than a silent fallback later.
    """
    _resolve(spec, None, seed, {})
