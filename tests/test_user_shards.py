"""User data that says which node trains on which samples (``Dataset.shards``)."""

from __future__ import annotations

import pytest
import torch

from gossipfl.config import RunConfig
from gossipfl.errors import ConfigError, DataError
from gossipfl.learning.data import Dataset, load_data
from gossipfl.plan import resolve


def by_class(seed: int = 0) -> Dataset:
    """Digits, node k holding exactly the training samples of class k (10 nodes, 10 classes)."""
    d = load_data("digits", seed=seed)
    shards = tuple(torch.nonzero(d.y_train == k).squeeze(1) for k in range(10))
    return Dataset(name="digits_by_class", x_train=d.x_train, y_train=d.y_train, x_test=d.x_test,
                   y_test=d.y_test, n_classes=10, input_shape=d.input_shape, shards=shards)


def test_each_node_trains_on_the_shard_its_data_names() -> None:
    plan = resolve(RunConfig(nodes=10, data="tests.test_user_shards:by_class"))
    for k in range(10):
        labels = plan.data.y_train[plan.shard(k)]
        assert bool((labels == k).all())
        assert len(labels) == int((plan.data.y_train == k).sum())
    assert plan.trainer(3).y.unique().tolist() == [3]  # the node's own Trainer, too


def test_own_shards_and_a_partition_conflict() -> None:
    with pytest.raises(ConfigError, match="brings its own 10 shards"):
        resolve(RunConfig(nodes=10, data="tests.test_user_shards:by_class", partition="dirichlet:0.1"))


def test_bad_shards_are_refused() -> None:
    d = load_data("digits")
    base = {"name": "x", "x_train": d.x_train, "y_train": d.y_train, "x_test": d.x_test, "y_test": d.y_test,
            "n_classes": 10, "input_shape": d.input_shape}
    with pytest.raises(DataError, match="outside"):
        Dataset(**base, shards=(torch.tensor([0, len(d.y_train)]),))
    with pytest.raises(DataError, match="empty"):
        Dataset(**base, shards=(torch.tensor([0]), torch.tensor([], dtype=torch.int64)))


def test_a_lan_node_trains_on_the_shard_its_data_names_too() -> None:
    """`gossipfl node` builds its Trainer without a plan (`build_trainer` cuts the shards itself)."""
    from gossipfl.build import build_data, build_trainer

    cfg = RunConfig(data="tests.test_user_shards:by_class", shards=10)
    trainer = build_trainer(cfg, build_data(cfg), 7, 10)
    assert trainer.y.unique().tolist() == [7]
    with pytest.raises(ConfigError, match="brings its own 10 shards"):
        build_trainer(cfg.replace(shards=4), build_data(cfg), 1, 4)
    reg = RunConfig(data="regression", loss="mse", partition="dirichlet:0.5")
    reg_data = build_data(reg)
    with pytest.raises(ConfigError, match="regression"):
        build_trainer(reg, reg_data, 0, 4)
