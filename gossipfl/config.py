"""Settings for a node, a local cluster or a simulation: one frozen dataclass, TOML + CLI overrides.

Every CLI flag is also a top-level TOML key of the same name (``--batch-size`` <-> ``batch_size``).
Values are checked in ``__post_init__``, so a bad value from a file, a flag or code gets the same
error, naming the key. Precedence: built-in defaults < ``--config FILE.toml`` < CLI flags.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gossipfl.errors import ConfigError

__all__ = ["MAX_SEED", "RunConfig", "config_to_toml", "from_mapping", "load_config"]

ENGINES = ("cluster", "vectorized")
TRANSPORTS = ("http", "memory")
WEIGHTS = ("metropolis", "max_degree", "uniform")
SCHEDULES = ("async", "sync")
DTYPES = ("float32", "float64")
UNBOUNDED_STEPS = 2**62  # `gossipfl node` without a budget: it trains until it is stopped
MAX_SEED = 2**32 - 1  # numpy and scikit-learn take seeds in [0, 2**32 - 1]


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything a run needs; the resolved copy is written to the run folder as config.toml."""

    # what is learned
    seed: int = 0
    data: str = "digits"
    model: str = "mlp"
    hidden: tuple[int, ...] = (32,)
    partition: str = "iid"
    test_fraction: float = 0.2
    same_init: bool = False  # all nodes start from one model (else each node seeds its own)
    dtype: str = "float32"  # the models' parameters (and the data fed to them): float32 or float64
    loss: str = "cross_entropy"  # or "mse", or a user's "pkg.mod:fn" (gossipfl.learning.losses)
    # local training
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    steps: int = 300  # local steps per node (ignored when duration is set)
    duration: float | None = None  # seconds of training per node instead of a step count
    eval_every: int = 20  # local steps between metric rows
    # gossip
    algorithm: str = "dpsgd"
    algorithm_params: dict[str, Any] = field(default_factory=dict)
    aggregator: str | None = None  # robust merge rule (algorithms/aggregation.py); None: the algorithm's own
    aggregator_params: dict[str, Any] = field(default_factory=dict)  # the rule's parameters (b, f, m, tau, ...)
    topology: str = "ring"
    weights: str = "metropolis"
    gossip_every: int = 1  # local steps between gossip points
    timeout: float = 5.0  # seconds for one peer exchange
    peer_timeout: float = 10.0  # seconds without contact before a peer leaves the view
    max_clock_skew: float = 60.0  # signed clusters: a message further off in time is refused as stale
    max_peer_rate: float = 500.0  # messages per second one sender may deliver (bursts of as many); 0: no limit
    max_message_mb: float = 256.0
    # simulation (gossipfl sim)
    engine: str = "cluster"
    device: str = "cpu"  # vectorised engine: "cpu" or "cuda"
    emulation: dict[str, Any] = field(default_factory=dict)  # compute speeds, latency, loss, churn (emulation.py)
    attack: dict[str, Any] = field(default_factory=dict)  # malicious peers: kind, fraction, placement (attacks.py)
    schedule: str = "async"  # "sync": lock-step rounds driven by the simulator (engines agree exactly)
    nodes: int = 8
    transport: str = "http"
    out: str | None = None
    # single node (gossipfl node)
    id: str | None = None
    cluster: str = "default"
    listen: str = "127.0.0.1:0"
    peers: tuple[str, ...] = ()
    state_dir: str | None = None
    secret_file: str | None = None
    mdns: bool = True  # gossipfl node: advertise and discover peers over mDNS (zeroconf)
    mdns_interfaces: tuple[str, ...] = ()  # IPs of the interfaces mDNS runs on (default: the listen IP, or all)
    node_index: int | None = None  # which data shard this node trains on; default from its id
    shards: int | None = None  # how many shards the data is split into on a LAN; default 1 per node

    def __post_init__(self) -> None:
        _positive_int(self, "nodes", "batch_size", "steps", "eval_every", "gossip_every")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed: must be an integer in [0, {MAX_SEED}], got {self.seed}")
        _positive_float(self, "timeout", "peer_timeout", "max_message_mb", "max_clock_skew")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr: must be a finite number >= 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum: must be in [0, 1), got {self.momentum}")
        if not (self.max_peer_rate >= 0 and math.isfinite(self.max_peer_rate)):
            raise ConfigError(f"max_peer_rate: must be a number >= 0 (0: no limit), got {self.max_peer_rate}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction: must be in (0, 1), got {self.test_fraction}")
        if self.duration is not None and not (self.duration > 0 and math.isfinite(self.duration)):
            raise ConfigError(f"duration: must be a positive number of seconds, got {self.duration}")
        for key, allowed in (("engine", ENGINES), ("transport", TRANSPORTS), ("weights", WEIGHTS),
                             ("schedule", SCHEDULES), ("dtype", DTYPES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        from gossipfl.learning.losses import check_loss_spec

        check_loss_spec(self.loss)
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden: layer sizes must be positive integers, got {list(self.hidden)}")
        for addr in (self.listen, *self.peers):
            parse_address(addr, key="listen" if addr == self.listen else "peer")
        if self.node_index is not None and self.node_index < 0:
            raise ConfigError(f"node_index: must be >= 0, got {self.node_index}")
        if self.shards is not None and self.shards < 1:
            raise ConfigError(f"shards: must be >= 1, got {self.shards}")
        if self.node_index is not None and self.shards is not None and self.node_index >= self.shards:
            raise ConfigError(f"node_index: must be < shards ({self.shards}), got {self.node_index}")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 2**20)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied and checked (unknown keys are an error)."""
        return from_mapping(changes, base=self, source="override")


def _positive_int(cfg: RunConfig, *keys: str) -> None:
    for key in keys:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}: must be a positive integer, got {getattr(cfg, key)}")


def _positive_float(cfg: RunConfig, *keys: str) -> None:
    for key in keys:
        v = getattr(cfg, key)
        if not (v > 0 and math.isfinite(v)):
            raise ConfigError(f"{key}: must be a positive number, got {v}")


def parse_address(addr: str, *, key: str = "address") -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6) with a clear error."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{key}: {addr!r} is not HOST:PORT")
    host = host.strip("[]")
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"{key}: port {port!r} in {addr!r} is not a number") from None
    if not 0 <= p <= 65535:
        raise ConfigError(f"{key}: port {p} in {addr!r} is out of range")
    return host, p


_FIELDS = {f.name: f for f in fields(RunConfig)}


def _coerce(key: str, value: Any, default: Any, annotation: str) -> Any:
    """Check a TOML/CLI value against the field's type; bool is never accepted as a number."""
    if value is None:
        if "None" in annotation:
            return None
        raise ConfigError(f"{key}: a value is required")
    if annotation.startswith("tuple"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        inner = int if "int" in annotation else str
        if any(isinstance(v, bool) or not isinstance(v, inner) for v in value):
            raise ConfigError(f"{key}: every item must be a {inner.__name__}, got {list(value)}")
        return tuple(value)
    if annotation.startswith("dict"):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return dict(value)
    if annotation.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def from_mapping(values: Mapping[str, Any], *, base: RunConfig | None = None, source: str) -> RunConfig:
    """Build a config from ``values`` over ``base``; unknown keys and bad types name the key."""
    base = base or RunConfig()
    changes: dict[str, Any] = {}
    try:
        for key, value in values.items():
            f = _FIELDS.get(key)
            if f is None:
                close = [k for k in _FIELDS if k.startswith(key[:3])]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(f"unknown key {key!r}{hint}")
            changes[key] = _coerce(key, value, getattr(base, key), str(f.type))
        return dataclasses.replace(base, **changes)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults, then the TOML file (if any), then ``overrides`` (CLI flags that were given)."""
    cfg = RunConfig()
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"config: cannot read {p}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config: {p} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {p} is not valid TOML: {exc}") from None
        cfg = from_mapping(data, base=cfg, source=str(p))
    if overrides:
        # a table given on the command line adds keys to the file's (--algorithm-param KEY=VALUE)
        merged = {k: ({**getattr(cfg, k), **v} if isinstance(v, Mapping) and isinstance(getattr(cfg, k, None), dict)
                      else v) for k, v in overrides.items()}
        cfg = from_mapping(merged, base=cfg, source="command line")
    return cfg


def config_to_toml(cfg: RunConfig) -> str:
    """Serialise the resolved configuration (None values are left out, as TOML has no null)."""
    lines: list[str] = []
    tables: list[str] = []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if v is None:
            continue
        if isinstance(v, dict):  # a table; its sub-tables (aggregator_params.krum) after its own keys
            tables.append(f"[{f.name}]")
            tables += [f"{k} = {_toml_value(x)}" for k, x in v.items() if not isinstance(x, dict)]
            for k, sub in v.items():
                if isinstance(sub, dict):
                    tables.append(f"[{f.name}.{k}]")
                    tables += [f"{kk} = {_toml_value(x)}" for kk, x in sub.items()]
            continue
        lines.append(f"{f.name} = {_toml_value(v)}")
    return "\n".join(lines + ([""] + tables if tables else [])) + "\n"


def _toml_value(v: Any) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")
