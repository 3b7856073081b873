"""Small built-in models and user models by import path."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from gossipfl.errors import DataError
from gossipfl.learning.imports import is_import_path, load_callable

__all__ = ["BUILTIN_MODELS", "build_model"]

BUILTIN_MODELS = ("logreg", "mlp", "cnn")


class _CNN(nn.Module):
    """Two small conv layers for square one-channel images (8x8 digits and up)."""

    def __init__(self, side: int, n_classes: int) -> None:
        super().__init__()
        self.side = side
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * (side // 2) ** 2, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, self.side, self.side)
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def build_model(
    spec: str,
    *,
    input_shape: tuple[int, ...],
    n_classes: int,
    hidden: Sequence[int] = (32,),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Build ``logreg``, ``mlp``, ``cnn`` or a user's ``pkg.mod:fn`` with seeded initial weights.

    A user function is called as ``fn(input_shape=..., n_classes=...)`` and must return an
    ``nn.Module`` whose parameters are floating point; they travel as one flat vector, so the
    model is cast to ``dtype`` (float32, or float64 for theory checks that float32 would blur).
    """
    torch.manual_seed(seed)  # initial weights depend on the seed alone, in every process
    n_in = math.prod(input_shape)
    model: nn.Module
    if spec == "logreg":
        model = nn.Sequential(nn.Flatten(), nn.Linear(n_in, n_classes))
    elif spec == "mlp":
        if any(h < 1 for h in hidden):
            raise DataError(f"hidden: layer sizes must be positive, got {list(hidden)}")
        layers: list[nn.Module] = [nn.Flatten()]
        prev = n_in
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        layers.append(nn.Linear(prev, n_classes))
        model = nn.Sequential(*layers)
    elif spec == "cnn":
        side = math.isqrt(n_in)
        if side * side != n_in or side < 2:
            raise DataError(f"model: cnn needs square one-channel images, got input shape {input_shape}")
        model = _CNN(side, n_classes)
    elif is_import_path(spec):
        fn = load_callable(spec, what="model")
        try:
            model = fn(input_shape=input_shape, n_classes=n_classes)
        except Exception as exc:  # user code: report, never a traceback
            raise DataError(f"model: {spec} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise DataError(f"model: {spec} returned {type(model).__name__}, not a torch.nn.Module")
    else:
        raise DataError(
            f"model: unknown model {spec!r}; choose one of {', '.join(BUILTIN_MODELS)} "
            "or give 'package.module:function'"
        )
    bad = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if bad:
        raise DataError(f"model: parameters must be floating point; {bad[0]} is not")
    model = model.to(dtype)
    if not any(True for _ in model.parameters()):
        raise DataError(f"model: {spec} has no parameters to learn")
    return model
