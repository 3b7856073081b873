"""Bundled datasets (scikit-learn digits, synthetic classification and regression) and user data
by import path.

Nothing is downloaded: digits ships inside scikit-learn, synthetic data is generated from the seed.
A data set is classification (int64 labels in [0, n_classes)) or regression (float targets, one
per sample; ``n_classes`` is then the model's number of outputs, 1). User data may also say which
node trains on which samples (``shards``), instead of the run's ``partition``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gossipfl.errors import DataError
from gossipfl.learning.imports import is_import_path, load_callable

__all__ = ["BUILTIN_DATASETS", "Dataset", "load_data"]

BUILTIN_DATASETS = ("digits", "synthetic", "regression")


@dataclass(frozen=True)
class Dataset:
    """A train/test split held as tensors; features are float32, labels int64 in [0, n_classes),
    or (``regression``) float targets ``[N]`` with ``n_classes`` = 1 output.

    ``shards``: node i trains on ``x_train[shards[i % len(shards)]]`` (indices into the train
    split), where the data's owner knows which node holds what; None: the run's ``partition``."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    input_shape: tuple[int, ...]
    regression: bool = False
    shards: tuple[torch.Tensor, ...] | None = None

    def __post_init__(self) -> None:
        self._check_splits()
        if self.shards is not None:
            self._check_shards()

    def _check_shards(self) -> None:
        n = self.x_train.shape[0]
        if not self.shards:
            raise DataError(f"data {self.name!r}: shards is empty; give one index list per node")
        for k, idx in enumerate(self.shards):
            if idx.dtype != torch.int64 or idx.dim() != 1:
                raise DataError(f"data {self.name!r}: shard {k} must be a 1-D int64 index tensor")
            if idx.numel() == 0:
                raise DataError(f"data {self.name!r}: shard {k} is empty; every node needs a sample")
            if int(idx.min()) < 0 or int(idx.max()) >= n:
                raise DataError(f"data {self.name!r}: shard {k} indexes outside the {n} training samples")

    def _check_splits(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.shape[0] != y.shape[0]:
                raise DataError(f"data {self.name!r}: {split} has {x.shape[0]} rows but {y.shape[0]} labels")
            if x.shape[0] == 0:
                raise DataError(f"data {self.name!r}: the {split} split is empty")
            if tuple(x.shape[1:]) != self.input_shape:
                raise DataError(
                    f"data {self.name!r}: {split} features have shape {tuple(x.shape[1:])}, "
                    f"expected {self.input_shape}"
                )
            if not torch.isfinite(x).all():
                raise DataError(f"data {self.name!r}: {split} features contain NaN or Inf")
            if self.regression:
                if y.dim() != 1 or not y.is_floating_point():
                    raise DataError(f"data {self.name!r}: regression targets must be 1-D floats, got "
                                    f"{y.dtype} of shape {tuple(y.shape)}")
                if not torch.isfinite(y).all():
                    raise DataError(f"data {self.name!r}: {split} targets contain NaN or Inf")
                if self.n_classes != 1:
                    raise DataError(f"data {self.name!r}: regression has one output (n_classes = 1)")
                continue
            if y.dtype != torch.int64:
                raise DataError(f"data {self.name!r}: class labels must be int64, got {y.dtype} (real-valued "
                                "targets: regression = True)")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
                raise DataError(f"data {self.name!r}: {split} labels outside [0, {self.n_classes})")


def _split(
    x: np.ndarray, y: np.ndarray, *, test_fraction: float, seed: int, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # Stratified so that every class appears in the test split even for small data.
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y if stratify else None
    )
    return x_tr, y_tr, x_te, y_te


def _from_arrays(name: str, x_tr: Any, y_tr: Any, x_te: Any, y_te: Any, n_classes: int | None) -> Dataset:
    """A Dataset from arrays; float targets make it regression, integer ones classification."""
    try:
        xs = [torch.as_tensor(np.asarray(a), dtype=torch.float32) for a in (x_tr, x_te)]
        raw = [torch.as_tensor(np.asarray(a)) for a in (y_tr, y_te)]
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"data {name!r}: cannot convert to tensors: {exc}") from exc
    for y in raw:
        if y.dim() != 1:
            raise DataError(f"data {name!r}: labels must be 1-D, got shape {tuple(y.shape)}")
    if any(y.is_floating_point() for y in raw):
        ys = [y.to(torch.float32) for y in raw]
        return Dataset(name=name, x_train=xs[0].contiguous(), y_train=ys[0], x_test=xs[1].contiguous(),
                       y_test=ys[1], n_classes=1, input_shape=tuple(xs[0].shape[1:]), regression=True)
    ys = [y.long() for y in raw]
    if n_classes is None:
        n_classes = int(max(int(ys[0].max()), int(ys[1].max()))) + 1
    return Dataset(
        name=name, x_train=xs[0].contiguous(), y_train=ys[0], x_test=xs[1].contiguous(), y_test=ys[1],
        n_classes=n_classes, input_shape=tuple(xs[0].shape[1:]),
    )


def _digits(seed: int, test_fraction: float) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)  # pixel intensities 0..16 -> 0..1
    y = bunch.target.astype(np.int64)
    return _from_arrays("digits", *_split(x, y, test_fraction=test_fraction, seed=seed), n_classes=10)


def _synthetic(seed: int, test_fraction: float) -> Dataset:
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=4000, n_features=32, n_informative=16, n_redundant=4, n_classes=4,
        n_clusters_per_class=2, class_sep=1.5, random_state=seed,
    )
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    return _from_arrays("synthetic", *_split(x, y, test_fraction=test_fraction, seed=seed), n_classes=4)


def _regression(seed: int, test_fraction: float) -> Dataset:
    """Least squares with noise: y = x . w + 0.1 e, x ~ N(0, I_16), 2000 samples (w from the seed)."""
    rng = np.random.default_rng(seed + 1_000_003)
    x = rng.standard_normal((2000, 16))
    w = rng.standard_normal(16)
    y = x @ w + 0.1 * rng.standard_normal(2000)
    parts = _split(x.astype(np.float32), y.astype(np.float32), test_fraction=test_fraction, seed=seed,
                   stratify=False)
    return _from_arrays("regression", *parts, n_classes=1)


def load_data(spec: str, *, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Build a dataset from a name (``digits``, ``synthetic``) or a user's ``pkg.mod:fn``.

    A user function is called as ``fn(seed=seed)`` and returns either a `Dataset` (which may carry
    ``shards``: which node trains on which samples) or a tuple ``(x_train, y_train, x_test,
    y_test)`` of arrays or tensors (float targets: regression).
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if spec == "digits":
        return _digits(seed, test_fraction)
    if spec == "synthetic":
        return _synthetic(seed, test_fraction)
    if spec == "regression":
        return _regression(seed, test_fraction)
    if not is_import_path(spec):
        raise DataError(
            f"data: unknown dataset {spec!r}; choose one of {', '.join(BUILTIN_DATASETS)} "
            "or give 'package.module:function'"
        )
    fn = load_callable(spec, what="data")
    try:
        out = fn(seed=seed)
    except Exception as exc:  # user code: report, do not crash with a traceback
        raise DataError(f"data: {spec} raised {type(exc).__name__}: {exc}") from exc
    if isinstance(out, Dataset):
        return out
    if isinstance(out, tuple) and len(out) == 4:
        return _from_arrays(spec, *out, n_classes=None)
    raise DataError(f"data: {spec} must return a Dataset or (x_train, y_train, x_test, y_test)")
