"""Reading a graph from a file: edge lists and GraphML.

An edge-list file (``.txt``/``.edges``/``.edgelist``) holds one ``u v`` pair of non-negative
integers per line (whitespace or a comma between them); ``#`` starts a comment. GraphML node
ids that are all integers must be exactly ``0..n-1``; other string ids are relabelled
``0..n-1`` in natural sort order (``n2`` before ``n10``). Missing files, self-loops and node
ids that are not ``0..n-1`` raise :class:`~gossipfl.errors.TopologyError` naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import networkx as nx

from gossipfl.topology._common import _empty, _fail, _is_int

EDGE_LIST_SUFFIXES: tuple[str, ...] = (".txt", ".edges", ".edgelist")
_GRAPHML_SUFFIXES = (".graphml",)


def _graph_from_pairs(pairs: list[tuple[str, object, object]], *, directed: bool, where: str) -> nx.Graph:
    """Build a graph from ``(label, u, v)`` triples; ``label`` names the entry in errors."""
    if not pairs:
        _fail(f"{where}: no edges")
    edges: list[tuple[int, int]] = []
    for label, u, v in pairs:
        if not (_is_int(u) and _is_int(v) and int(u) >= 0 and int(v) >= 0):  # type: ignore[call-overload]
            _fail(f"{where}: {label} must be a pair of non-negative integer node ids, got {[u, v]!r}")
        if u == v:
            _fail(f"{where}: {label} = {[u, v]!r} is a self-loop")
        edges.append((int(u), int(v)))  # type: ignore[call-overload]
    graph = _empty(max(max(e) for e in edges) + 1, directed=directed)
    graph.add_edges_from(edges)
    return graph


def _read_edge_list(path: Path, *, directed: bool, where: str) -> nx.Graph:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        _fail(f"{where}: file not found: {path}")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"{where}: cannot read {path}: {exc}")
    pairs: list[tuple[str, object, object]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        body = raw.split("#", 1)[0].replace(",", " ").split()
        if not body:
            continue
        label = f"{path.name} line {lineno}"
        if len(body) != 2 or not all(re.fullmatch(r"\d+", tok) for tok in body):
            _fail(f"{where}: {label} must be two non-negative integer node ids, got {raw.strip()!r}")
        pairs.append((label, int(body[0]), int(body[1])))
    return _graph_from_pairs(pairs, directed=directed, where=where)


def _natural_key(label: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", label)]


def _read_graphml(path: Path, *, directed: bool | None, where: str) -> nx.Graph:
    import xml.etree.ElementTree as ET

    if not path.is_file():
        _fail(f"{where}: file not found: {path}")
    try:
        raw = nx.read_graphml(path)
    except (OSError, ET.ParseError, nx.NetworkXError, KeyError, ValueError, TypeError) as exc:
        _fail(f"{where}: cannot read GraphML {path}: {exc}")
    if raw.number_of_nodes() == 0:
        _fail(f"{where}: {path.name} has no nodes")
    if directed is not None and directed != raw.is_directed():
        kind = "directed" if raw.is_directed() else "undirected"
        _fail(f"{where}: directed = {str(directed).lower()} but {path.name} is {kind}")
    labels = [str(node) for node in raw.nodes()]
    numeric = [bool(re.fullmatch(r"-?\d+", label)) for label in labels]
    if all(numeric):
        mapping = {node: int(str(node)) for node in raw.nodes()}
        if set(mapping.values()) != set(range(len(labels))):
            bad = sorted(set(mapping.values()) - set(range(len(labels))))
            _fail(f"{where}: node ids in {path.name} must be 0..{len(labels) - 1}, found {bad[:5]}")
    elif any(numeric):
        _fail(f"{where}: {path.name} mixes integer and non-integer node ids")
    else:
        ordered = sorted(raw.nodes(), key=lambda node: _natural_key(str(node)))
        mapping = {node: i for i, node in enumerate(ordered)}
    loops = list(nx.selfloop_edges(raw))
    if loops:
        _fail(f"{where}: {path.name} has a self-loop at node {loops[0][0]!r}")
    graph = _empty(len(labels), directed=raw.is_directed())
    # A multigraph's parallel edges collapse: gossip weights are per neighbour, not per link.
    graph.add_edges_from(sorted({(mapping[u], mapping[v]) for u, v in raw.edges()}))
    return graph


def _read_graph_file(path: Path, *, directed: bool | None, where: str) -> nx.Graph:
    suffix = path.suffix.lower()
    if suffix in _GRAPHML_SUFFIXES:
        return _read_graphml(path, directed=directed, where=where)
    if suffix in EDGE_LIST_SUFFIXES:
        return _read_edge_list(path, directed=bool(directed), where=where)
    valid = ", ".join([*_GRAPHML_SUFFIXES, *EDGE_LIST_SUFFIXES])
    _fail(f"{where}: unsupported graph file suffix {suffix!r} for {path.name}; use {valid}")
