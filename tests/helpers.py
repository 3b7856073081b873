"""Small builders shared by tests: a configured node, a running node, an HTTP client."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from gossipfl.build import build_algorithm, build_data, build_trainer
from gossipfl.config import RunConfig
from gossipfl.learning import Dataset
from gossipfl.node import MemoryNetwork, Node

_DATA: dict[str, Dataset] = {}


def data_for(cfg: RunConfig) -> Dataset:
    if cfg.data not in _DATA:
        _DATA[cfg.data] = build_data(cfg)
    return _DATA[cfg.data]


def make_node(cfg: RunConfig, node_id: str, index: int = 0, shards: int = 1,
              network: MemoryNetwork | None = None, **kw: Any) -> Node:
    return Node(cfg, node_id=node_id, trainer=build_trainer(cfg, data_for(cfg), index, shards),
                algorithm=build_algorithm(cfg), network=network, **kw)


@contextlib.asynccontextmanager
async def running(node: Node) -> AsyncIterator[Node]:
    async with node:
        yield node
