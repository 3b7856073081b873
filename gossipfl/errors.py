"""Every error gossipfl raises on purpose, in one hierarchy.

    GossipflError                      base of everything below
    ├── ConfigError (ValueError)       a bad setting: CLI flag, TOML key, topology or data spec
    │   ├── TopologyError              a topology that cannot be built or loaded
    │   └── DataError                  a dataset, model or partition that cannot be built
    ├── WireError (ValueError)         a message that cannot be trusted or decoded  -> HTTP 400
    │   ├── FingerprintMismatch        a model of another shape/dtype layout        -> HTTP 409
    │   ├── MessageTooLarge            a body over the configured size limit       -> HTTP 413
    │   └── BadSignature               HMAC missing or wrong under the secret      -> HTTP 401
    └── PeerError                      a peer that could not be reached
        └── PeerTimeout (TimeoutError) a peer exchange that ran past its deadline

User mistakes (ConfigError and subclasses) make the CLI exit with code 2 and a one-line
message that names the key; nothing in this tree is meant to reach a user as a traceback.
"""

from __future__ import annotations

__all__ = [
    "BadSignature",
    "ConfigError",
    "DataError",
    "FingerprintMismatch",
    "GossipflError",
    "MessageTooLarge",
    "PeerError",
    "PeerTimeout",
    "TopologyError",
    "WireError",
]


class GossipflError(Exception):
    """Base class of every error gossipfl raises deliberately."""


class ConfigError(GossipflError, ValueError):
    """A setting is missing, of the wrong type or out of range; the message names the key."""


class TopologyError(ConfigError):
    """A topology name, file or parameter cannot produce a usable graph."""


class DataError(ConfigError):
    """A dataset, model, partition or import path cannot be built."""


class WireError(GossipflError, ValueError):
    """A received message is malformed, inconsistent or untrusted; the node state is untouched."""

    http_status: int = 400


class FingerprintMismatch(WireError):
    """The sender's model has other parameter names, shapes or dtypes than ours."""

    http_status = 409


class MessageTooLarge(WireError):
    """The message is larger than the configured limit."""

    http_status = 413


class BadSignature(WireError):
    """The message's HMAC is missing or does not verify under the cluster secret."""

    http_status = 401


class PeerError(GossipflError):
    """A peer could not be reached or answered with an error."""


class PeerTimeout(PeerError, TimeoutError):
    """A peer exchange did not finish before its deadline."""
