"""Small helpers the node's modules share: warn-once logging, JSON bodies, address checks, and
the step from a decoded envelope to the algorithm's `Message`."""

from __future__ import annotations

import json
import logging
from typing import Any

from gossipfl import wire
from gossipfl.algorithms import Message
from gossipfl.config import parse_address
from gossipfl.errors import ConfigError

__all__ = ["WarnOnce", "json_body", "message_of", "valid_address"]


class WarnOnce:
    """A logger's warnings keyed by what they are about: each key is logged once until forgotten."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self._warned: set[str] = set()

    def __call__(self, key: str, fmt: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.log.warning(fmt, *args)

    def forget(self, key: str) -> None:
        """Let ``key`` warn again (the condition cleared)."""
        self._warned.discard(key)


def json_body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def valid_address(addr: str) -> bool:
    try:
        parse_address(addr)
    except ConfigError:
        return False
    return True


def message_of(env: wire.Envelope) -> Message:
    return Message(sender=env.sender, tensors=env.tensors, step=env.step, round=env.round, meta=env.meta)
