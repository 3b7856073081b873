"""Learning core: data, partitions, models, flat parameters, the Trainer, user code by import path."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gossipfl.errors import DataError
from gossipfl.learning import Trainer, build_model, load_data, param_layout, partition


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", seed=0)


def test_digits_split_is_stratified_and_scaled(digits) -> None:
    assert digits.x_train.shape == (1437, 64)
    assert digits.x_test.shape == (360, 64)
    assert 0.0 <= float(digits.x_train.min())
    assert float(digits.x_train.max()) <= 1.0
    assert set(digits.y_test.tolist()) == set(range(10))


def test_synthetic_is_seeded() -> None:
    a, b, c = load_data("synthetic", seed=1), load_data("synthetic", seed=1), load_data("synthetic", seed=2)
    assert torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.x_train, c.x_train)
    assert a.n_classes == 4


def test_iid_partition_is_a_disjoint_cover(digits) -> None:
    parts = partition(digits.y_train, 8, "iid", seed=3)
    allidx = torch.cat(parts)
    assert len(allidx) == len(digits.y_train) == len(set(allidx.tolist()))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    assert [p.tolist() for p in parts] == [p.tolist() for p in partition(digits.y_train, 8, "iid", seed=3)]


def test_dirichlet_small_alpha_skews_labels(digits) -> None:
    parts = partition(digits.y_train, 8, "dirichlet:0.1", seed=0)
    assert all(len(p) > 0 for p in parts)
    assert len(torch.cat(parts).unique()) == len(digits.y_train)
    # With alpha = 0.1 most nodes are dominated by few classes; IID nodes see all ten.
    dominant = [torch.bincount(digits.y_train[p], minlength=10).max() / len(p) for p in parts]
    assert sum(float(d) > 0.4 for d in dominant) >= 4


def test_shards_give_each_node_few_labels(digits) -> None:
    parts = partition(digits.y_train, 10, "shards:2", seed=0)
    assert all(len(digits.y_train[p].unique()) <= 4 for p in parts)


@pytest.mark.parametrize("spec", ["iid:3", "dirichlet", "dirichlet:-1", "shards:0", "shards:x", "zipf"])
def test_bad_partition_specs(digits, spec: str) -> None:
    with pytest.raises(DataError, match="partition"):
        partition(digits.y_train, 4, spec)


def test_more_nodes_than_samples_is_refused(digits) -> None:
    with pytest.raises(DataError, match="cannot be split"):
        partition(digits.y_train[:5], 8, "iid")


def test_flat_params_are_views_and_roundtrip(digits) -> None:
    model = build_model("mlp", input_shape=(64,), n_classes=10, hidden=(16, 8))
    layout = param_layout(model)
    flat = layout.flatten(dict(model.named_parameters()))
    assert flat.numel() == sum(p.numel() for p in model.parameters()) == layout.numel
    views = layout.unflatten(flat)
    for name, p in model.named_parameters():
        assert torch.equal(views[name], p.detach())
    views["0.weight" if "0.weight" in views else layout.names[0]].add_(1.0)  # a view, not a copy
    assert float(flat[0]) == pytest.approx(float(next(model.parameters()).detach().reshape(-1)[0]) + 1)
    batched = layout.unflatten(torch.stack([flat, flat]))
    assert batched[layout.names[0]].shape[0] == 2


def test_fingerprint_tracks_layout_not_values() -> None:
    a = param_layout(build_model("mlp", input_shape=(64,), n_classes=10, seed=1))
    b = param_layout(build_model("mlp", input_shape=(64,), n_classes=10, seed=2))
    c = param_layout(build_model("mlp", input_shape=(64,), n_classes=10, hidden=(33,)))
    assert a.fingerprint == b.fingerprint != c.fingerprint


@pytest.mark.parametrize("model", ["logreg", "mlp", "cnn"])
def test_trainer_learns_digits(digits, model: str) -> None:
    torch.manual_seed(0)
    trainer = Trainer(build_model(model, input_shape=(64,), n_classes=10), digits,
                      torch.arange(len(digits.y_train)), lr=0.1, seed=0)
    _, acc0 = trainer.evaluate()
    for _ in range(300):
        trainer.step()
    loss, acc = trainer.evaluate()
    assert acc > 0.85 > acc0, (model, acc0, acc)


def test_user_model_and_data_by_import_path(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "mylab.py").write_text(textwrap.dedent("""
        import torch
        def load(seed):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(200, 5, generator=g)
            y = (x[:, 0] > 0).long()
            return x[:150], y[:150], x[150:], y[150:]
        def make(input_shape, n_classes):
            return torch.nn.Linear(input_shape[0], n_classes)
        def broken(seed):
            raise RuntimeError("disk on fire")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    data = load_data("mylab:load", seed=0)
    assert data.n_classes == 2
    assert data.input_shape == (5,)
    model = build_model("mylab:make", input_shape=data.input_shape, n_classes=2)
    trainer = Trainer(model, data, torch.arange(150), lr=0.5)
    for _ in range(100):
        trainer.step()
    assert trainer.evaluate()[1] > 0.9
    with pytest.raises(DataError, match="disk on fire"):
        load_data("mylab:broken")
    with pytest.raises(DataError, match="no attribute"):
        load_data("mylab:missing")
    with pytest.raises(DataError, match="cannot import"):
        build_model("nosuchpkg_xyz.mod:fn", input_shape=(5,), n_classes=2)
    sys.modules.pop("mylab", None)


@pytest.mark.parametrize("spec", ["mnist", "digit"])
def test_unknown_dataset_names_the_choices(spec: str) -> None:
    with pytest.raises(DataError, match="digits"):
        load_data(spec)


def test_unknown_model_and_bad_cnn_input() -> None:
    with pytest.raises(DataError, match="unknown model"):
        build_model("resnet", input_shape=(64,), n_classes=10)
    with pytest.raises(DataError, match="square"):
        build_model("cnn", input_shape=(32,), n_classes=4)


def test_evaluation_from_another_thread_does_not_corrupt_training(digits) -> None:
    """The cluster monitor evaluates a node's trainer while the node trains in a worker thread.

    functional_call swaps the module's parameters during a forward pass; without the trainer's
    forward lock a concurrent evaluate made the step differentiate through detached tensors."""
    import threading

    torch.manual_seed(0)
    trainer = Trainer(build_model("mlp", input_shape=(64,), n_classes=10, seed=0), digits,
                      torch.arange(512), lr=0.05, seed=0)
    twin = Trainer(build_model("mlp", input_shape=(64,), n_classes=10, seed=0), digits,
                   torch.arange(512), lr=0.05, seed=0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def evaluator() -> None:
        other = torch.randn_like(trainer.params)
        while not stop.is_set():
            try:
                trainer.evaluate(other)
            except BaseException as exc:  # surfaced by the assertion below
                errors.append(exc)
                return

    threads = [threading.Thread(target=evaluator) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(300):
            trainer.step()
            twin.step()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    # Same seeds, same batches: the concurrently evaluated trainer took exactly the same steps.
    assert torch.allclose(trainer.params, twin.params, atol=1e-6)
