"""One asynchrony model for every engine: compute speeds, stragglers, link latency, jitter, loss, churn.

The ``[emulation]`` table of a run configuration is parsed here, once, into a frozen `Emulation`;
the vectorised simulator draws its events from it and the local cluster can honour the very same
knobs. Every key is optional; an empty table means identical nodes on a perfect network::

    [emulation]
    step_time = 0.01              # simulated seconds one local step takes at speed 1
    speed = "lognormal:0.5"       # per-node speed factors: a number, "constant",
                                  # "uniform:LO:HI" or "lognormal:SIGMA" (median 1)
    speeds = [1.0, 0.5, ...]      # or explicit factors, one per node (overrides speed)
    stragglers = 0.1              # fraction of nodes that are stragglers ...
    straggler_slowdown = 10.0     # ... whose steps take this many times longer
    latency = 0.005               # one-way seconds per link: a number or "uniform:LO:HI" (per link)
    jitter = 0.002                # each message's delay varies uniformly by +-jitter (like netem)
    loss = 0.01                   # probability that a message is lost
    bandwidth = 100.0             # Mbit/s per link: adds size / bandwidth to every delay
    churn = 0.1                   # long-run fraction of time a node is offline
    churn_period = 1.0            # mean seconds of one offline + online cycle
    time_slice = 0.01             # vectorised engine: events this close are processed as a batch
    seed = 7                      # seed of the draws below (default: the run's seed)

Node-level and link-level draws (speed factors, stragglers, per-link latency) are pure functions
of ``(seed, node index[, peer index])`` computed by an integer hash, so a node in its own process
computes its own speed and its links' latencies without knowing the others, and the engines agree
on them. Per-message draws (jitter, loss) and churn periods are random per event; each engine
draws them from its own seeded generator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from gossipfl.errors import ConfigError

__all__ = ["Emulation", "parse_emulation"]

# Hash constants: arithmetic modulo a prime below 2**31 keeps every product below 2**62, so the
# same integers come out of Python ints and of torch.int64 tensors on any device.
_PRIME = 2_147_483_629
_MULS = (1_103_515_245 % _PRIME, 1_664_525, 69_069, 2_891_336_453 % _PRIME)
_SALT_SPEED, _SALT_STRAGGLER, _SALT_LATENCY = 1, 2, 3


def _hash_uniform(seed: int, salt: int, a: torch.Tensor, b: torch.Tensor | int = 0) -> torch.Tensor:
    """Deterministic pseudo-uniform numbers in (0, 1) from integer keys (float64, a's device)."""
    h = (a.to(torch.int64) * 2_654_435 + (torch.as_tensor(b, device=a.device).to(torch.int64) + 1) * 40_503
         + (seed % _PRIME) * 97 + salt * 7_919) % _PRIME
    for m in _MULS:
        h = (h * m + 12_345) % _PRIME
        h = (h ^ (h >> 13)) % _PRIME
    return (h.to(torch.float64) + 0.5) / _PRIME


def _number(key: str, value: Any, *, lo: float, hi: float = math.inf, lo_open: bool = False,
            hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"emulation.{key}: expected a number, got {value!r}")
    v = float(value)
    ok_lo = v > lo if lo_open else v >= lo
    ok_hi = v < hi if hi_open else v <= hi
    if not (math.isfinite(v) and ok_lo and ok_hi):
        left, right = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
        raise ConfigError(f"emulation.{key}: must be in {left}{lo}, {hi}{right}, got {value!r}")
    return v


def _distribution(key: str, value: Any, kinds: tuple[str, ...]) -> tuple[str, tuple[float, ...]]:
    """Parse a number or ``KIND:ARG[:ARG]`` into (kind, args); errors name the key."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "constant", (_number(key, value, lo=0.0),)
    if not isinstance(value, str):
        raise ConfigError(f"emulation.{key}: expected a number or a string like {kinds[-1]}:..., got {value!r}")
    kind, *args = value.split(":")
    try:
        nums = tuple(float(a) for a in args)
    except ValueError:
        raise ConfigError(f"emulation.{key}: {value!r} has a non-numeric argument") from None
    arity = {"constant": (0, 1), "uniform": (2,), "lognormal": (1,)}
    if kind not in kinds or len(nums) not in arity[kind]:
        forms = {"constant": "constant", "uniform": "uniform:LO:HI", "lognormal": "lognormal:SIGMA"}
        raise ConfigError(f"emulation.{key}: {value!r} is not one of a number, "
                          + ", ".join(forms[k] for k in kinds))
    if any(not math.isfinite(x) or x < 0 for x in nums):
        raise ConfigError(f"emulation.{key}: arguments must be finite and >= 0, got {value!r}")
    if kind == "uniform" and nums[0] > nums[1]:
        raise ConfigError(f"emulation.{key}: uniform:LO:HI needs LO <= HI, got {value!r}")
    if kind == "constant":
        nums = nums or (1.0,)
    return kind, nums


@dataclass(frozen=True, kw_only=True)
class Emulation:
    """The parsed ``[emulation]`` table; see the module docstring for the meaning of each key."""

    step_time: float = 0.01
    speed: tuple[str, tuple[float, ...]] = ("constant", (1.0,))
    speeds: tuple[float, ...] | None = None
    stragglers: float = 0.0
    straggler_slowdown: float = 10.0
    latency: tuple[str, tuple[float, ...]] = ("constant", (0.0,))
    jitter: float = 0.0
    loss: float = 0.0
    bandwidth: float | None = None  # Mbit/s
    churn: float = 0.0
    churn_period: float = 1.0
    time_slice: float | None = None
    seed: int | None = None

    # ------------------------------------------------------------------ what is trivial

    @property
    def ideal(self) -> bool:
        """Identical nodes on a perfect network (the case the sync schedule also covers)."""
        return (self.speed == ("constant", (1.0,)) and self.speeds is None and self.stragglers == 0
                and self.max_latency == 0 and self.jitter == 0 and self.loss == 0
                and self.bandwidth is None and self.churn == 0)

    @property
    def max_latency(self) -> float:
        """Largest per-link base latency (seconds), without jitter or bandwidth delay."""
        kind, args = self.latency
        return args[-1] if kind in ("constant", "uniform") else 0.0

    def _seed(self, seed: int) -> int:
        return self.seed if self.seed is not None else seed

    # ------------------------------------------------------------------ node-level draws

    def node_speeds(self, n: int, *, seed: int) -> torch.Tensor:
        """Speed factor of each of ``n`` nodes (float64, CPU); a straggler's is divided by the slowdown."""
        s = self._seed(seed)
        idx = torch.arange(n, dtype=torch.int64)
        if self.speeds is not None:
            if len(self.speeds) != n:
                raise ConfigError(f"emulation.speeds: has {len(self.speeds)} entries for {n} nodes")
            speeds = torch.tensor(self.speeds, dtype=torch.float64)
        else:
            kind, args = self.speed
            u = _hash_uniform(s, _SALT_SPEED, idx)
            if kind == "constant":
                speeds = torch.full((n,), args[0], dtype=torch.float64)
            elif kind == "uniform":
                speeds = args[0] + (args[1] - args[0]) * u
            else:  # lognormal with median 1
                speeds = torch.exp(args[0] * torch.special.ndtri(u))
        count = round(self.stragglers * n)
        if count:
            chosen = torch.argsort(_hash_uniform(s, _SALT_STRAGGLER, idx))[:count]
            speeds[chosen] /= self.straggler_slowdown
        return speeds

    def step_seconds(self, n: int, *, seed: int) -> torch.Tensor:
        """Simulated seconds one local step takes on each node (float64, CPU)."""
        return self.step_time / self.node_speeds(n, seed=seed)

    def link_latency(self, src: torch.Tensor, dst: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Base one-way latency of each directed link ``src[k] -> dst[k]`` (float64, src's device)."""
        kind, args = self.latency
        if kind == "constant":
            return torch.full(src.shape, args[0], dtype=torch.float64, device=src.device)
        u = _hash_uniform(self._seed(seed), _SALT_LATENCY, src, dst)
        return args[0] + (args[1] - args[0]) * u

    def transfer_seconds(self, nbytes: int) -> float:
        """Serialisation delay of one message of ``nbytes`` on a link (0 without a bandwidth limit)."""
        return 0.0 if self.bandwidth is None else nbytes * 8 / (self.bandwidth * 1e6)

    def churn_means(self) -> tuple[float, float]:
        """Mean seconds a node stays online, then offline (exponentially distributed periods)."""
        return self.churn_period * (1 - self.churn), self.churn_period * self.churn

    def slice_width(self, step_seconds: torch.Tensor) -> float:
        """Width of one batch of simultaneous events: ``time_slice``, else the fastest step time."""
        if self.time_slice is not None:
            return self.time_slice
        return float(step_seconds.min()) if step_seconds.numel() else self.step_time


_KEYS = {f.name for f in fields(Emulation)}


def parse_emulation(table: Mapping[str, Any] | None) -> Emulation:
    """Validate the ``[emulation]`` table; every error is a ConfigError naming ``emulation.KEY``."""
    table = dict(table or {})
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ConfigError(f"emulation: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(_KEYS))}")
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key == "speed":
            out[key] = _distribution(key, value, ("constant", "uniform", "lognormal"))
            if out[key][0] != "lognormal" and out[key][1][0] <= 0:
                raise ConfigError(f"emulation.speed: speed factors must be > 0, got {value!r}")
        elif key == "latency":
            out[key] = _distribution(key, value, ("constant", "uniform"))
        elif key == "speeds":
            if not isinstance(value, list | tuple) or not value:
                raise ConfigError(f"emulation.speeds: expected a non-empty list of numbers, got {value!r}")
            out[key] = tuple(_number(f"speeds[{i}]", v, lo=0.0, lo_open=True) for i, v in enumerate(value))
        elif key in ("stragglers", "loss", "churn"):
            out[key] = _number(key, value, lo=0.0, hi=1.0, hi_open=True)
        elif key == "straggler_slowdown":
            out[key] = _number(key, value, lo=1.0)
        elif key == "jitter":
            out[key] = _number(key, value, lo=0.0)
        elif key in ("step_time", "churn_period", "time_slice", "bandwidth"):
            out[key] = _number(key, value, lo=0.0, lo_open=True)
        elif key == "seed":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"emulation.seed: expected an integer, got {value!r}")
            out[key] = value
    return Emulation(**out)
