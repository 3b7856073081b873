"""Small helpers the algorithm modules share: hyperparameter checks and per-node random draws.

Hyperparameters come from the ``[algorithm_params]`` TOML table as constructor keyword
arguments. The checks raise ``ValueError`` naming the key; `get_algorithm` turns it into a
``ConfigError``. TOML writes ``1`` and ``1.0`` differently, so a float parameter accepts an int;
``true`` is never a number.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "check_bool", "check_choice", "check_fraction", "check_int", "check_real", "csr", "generator_seed",
    "node_generator",
]


def check_int(key: str, value: Any, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{key} must be >= {minimum}, got {value}")
    return value


def check_real(key: str, value: Any, *, low: float | None = None, high: float | None = None,
               low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    v = float(value)
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{key} must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{key} must be <= {high}, got {v}")
    return v


def check_fraction(key: str, value: Any) -> float:
    """A fraction in (0, 1]."""
    return check_real(key, value, low=0.0, high=1.0, low_open=True)


def check_choice(key: str, value: Any, choices: Sequence[Any]) -> Any:
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def generator_seed(algorithm_seed: int, node_seed: int) -> int:
    """Seed of a node's algorithm generator (compression draws, partition choice): engines seed one
    ``torch.Generator`` per node with it, from the algorithm's ``seed`` hyperparameter and the
    node's own seed, so two nodes draw differently and every engine draws alike."""
    return (algorithm_seed * 1_000_003 + node_seed * 7_919 + 12_345) % 2**63


def node_generator(algorithm_seed: int, node_seed: int) -> torch.Generator:
    """A node's algorithm generator on the host (see `generator_seed`)."""
    return torch.Generator().manual_seed(generator_seed(algorithm_seed, node_seed))


def csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from parts built here (valid by construction, so invariants go unchecked)."""
    with warnings.catch_warnings():
        # torch warns once per process that sparse CSR is "beta"; not a concern of our callers.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, val, size=size, check_invariants=False)
