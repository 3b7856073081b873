"""The algorithm family, tested on the pure classes with a tiny lock-step driver (no sockets).

The driver is an engine in miniature: one `NodeLearning` per node (what a `gossipfl.node.Node`
holds: the node's state as a batch of one), and per round and per node it calls ``merge``
(messages due), ``local_step``, then draws targets (`draw_targets`) and calls ``message``, in the
order ``gossipfl.algorithms.base`` prescribes; every message is checked against ``tensor_specs``
and travels through ``wire.encode``/``wire.decode`` so that receivers see exactly what a node would.
"""

from __future__ import annotations

import math
import random
import re
import threading
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from gossipfl import wire
from gossipfl.algorithms import ALGORITHMS, Message, get_algorithm
from gossipfl.algorithms.adpsgd import ADPSGD
from gossipfl.algorithms.base import draw_targets
from gossipfl.algorithms.choco import CHOCO
from gossipfl.algorithms.compression import (
    QSGD,
    RandomK,
    TopK,
    make_compressor,
    pack_bits,
    qsgd_dequantize,
    qsgd_quantize,
    unpack_bits,
)
from gossipfl.algorithms.dpsgd import DPSGD
from gossipfl.algorithms.epidemic import EpidemicLearning
from gossipfl.algorithms.gossip import GossipLearning, PartitionedGossip, age_weighted_merge
from gossipfl.algorithms.gradex import GradientExchange
from gossipfl.algorithms.pushsum import PushSumAveraging
from gossipfl.algorithms.tracking import DIGing
from gossipfl.errors import ConfigError
from gossipfl.learning import Dataset, Trainer, build_model, load_data, partition
from gossipfl.node.learner import NodeLearning
from gossipfl.topology import complete, local_weights, one_peer_exponential, random_matching, ring

# --------------------------------------------------------------------------- the driver

Graph = Callable[[int], nx.Graph]


class FixedTrainer:
    """The part of the `Trainer` interface `NodeLearning` uses, for nodes given their parameters
    that never train (pure averaging, hand-made states): no data, no gradient."""

    lr = momentum = weight_decay = 0.0

    def __init__(self, params: torch.Tensor) -> None:
        self.params = params
        self.layout = SimpleNamespace(numel=params.numel())
        self.steps, self.last_loss = 0, float("nan")

    def loss_and_grad(self, params: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        raise AssertionError("this node has no data to take a gradient on")

    def apply_gradient(self, grad: torch.Tensor, params: torch.Tensor | None = None) -> None:
        raise AssertionError("this node does not train")


def node(algo: Any, params: torch.Tensor, seed: int = 0) -> NodeLearning:
    """A node holding ``params`` (its own storage), no training."""
    return NodeLearning(algo, FixedTrainer(params), seed=seed)  # type: ignore[arg-type]


def transmit(algo: Any, msg: Message, sender: str, numel: int, dtype: torch.dtype) -> tuple[Message, int]:
    """Validate against tensor_specs as a node does, then encode and decode; returns (message, bytes)."""
    specs = algo.tensor_specs(numel, dtype)
    assert msg.tensors, "a message carries at least one tensor"
    assert set(msg.tensors) <= set(specs), f"{sorted(msg.tensors)} not among {sorted(specs)}"
    for name, t in msg.tensors.items():
        shape, dt = specs[name]
        assert (tuple(t.shape), t.dtype) == (tuple(shape), dt), name
    env = wire.Envelope(
        cluster="test", sender=sender, algorithm=algo.name, fingerprint="f0", step=msg.step, round=msg.round,
        meta=dict(msg.meta), tensors=dict(msg.tensors),
    )
    frame = wire.encode(env)
    got = wire.decode(frame)
    return Message(sender=got.sender, tensors=got.tensors, step=got.step, round=got.round, meta=got.meta), len(frame)


class Driver:
    """N nodes in lock-step rounds; a message sent in round r is merged in round r + 1 + delay."""

    def __init__(
        self,
        algo: Any,
        n: int,
        graph: Graph,
        *,
        trainers: Sequence[Any] | None = None,
        params: Sequence[torch.Tensor] | None = None,
        weights: str = "metropolis",
        delay: Callable[[random.Random], int] | None = None,
        seed: int = 0,
    ) -> None:
        self.algo, self.n, self.graph, self.kind, self.delay = algo, n, graph, weights, delay
        self.ids = [f"n{i}" for i in range(n)]
        if trainers is None:
            assert params is not None
            trainers = [FixedTrainer(p.clone()) for p in params]
        self.trainers = list(trainers)
        self.nodes = [NodeLearning(algo, t, seed=i) for i, t in enumerate(self.trainers)]
        self.rngs = [random.Random(seed * 31 + i) for i in range(n)]
        self.net_rng = random.Random(seed + 12345)
        self.inflight: list[tuple[int, int, Message]] = []  # (due round, destination, message)
        self.round_no = 0
        self.bytes = self.msgs = 0

    def out_neighbours(self, i: int, t: int) -> list[str]:
        g = self.graph(t)
        peers = g.successors(i) if g.is_directed() else g.neighbors(i)
        return [self.ids[j] for j in sorted(peers)]

    def weights(self, i: int, t: int) -> dict[str, float]:
        g = self.graph(t)
        if self.algo.requirements.weights == "symmetric" and not g.is_directed():
            _, w = local_weights(g, i, self.kind)
            return {self.ids[j]: v for j, v in w.items()}
        ins = sorted(g.predecessors(i) if g.is_directed() else g.neighbors(i))
        return {self.ids[j]: 1.0 / (1 + len(ins)) for j in ins}

    def _deliver(self, i: int, due: Callable[[int], bool]) -> None:
        msgs = [m for d, dst, m in self.inflight if dst == i and due(d)]
        self.inflight = [x for x in self.inflight if not (x[1] == i and due(x[0]))]
        if msgs:
            self.merge(i, msgs)

    def merge(self, i: int, msgs: list[Message]) -> None:
        self.nodes[i].merge(msgs, self.weights(i, self.nodes[i].step))

    def round(self) -> None:
        r = self.round_no
        for i, nd in enumerate(self.nodes):
            self._deliver(i, lambda d: d <= r)
            if self.algo.requirements.trains:
                nd.local_step()
            nd.step += 1
            targets = draw_targets(self.algo.targets, self.out_neighbours(i, nd.step), self.rngs[i])
            if targets:
                msg = nd.message(len(targets))
                got, size = transmit(self.algo, msg, self.ids[i], nd.params.numel(), nd.params.dtype)
                for t in targets:
                    extra = self.delay(self.net_rng) if self.delay else 0
                    self.inflight.append((r + 1 + extra, self.ids.index(t), got))
                    self.bytes += size
                    self.msgs += 1
        self.round_no += 1

    def run(self, rounds: int) -> Driver:
        for _ in range(rounds):
            self.round()
        return self

    def flush(self) -> None:
        """Merge every message still in flight (the end of a run)."""
        for i in range(self.n):
            self._deliver(i, lambda d: True)

    def models(self) -> torch.Tensor:
        return torch.stack([nd.model() for nd in self.nodes])


# --------------------------------------------------------------------------- learning fixtures


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_data("digits", seed=0)


def make_trainers(data: Dataset, n: int, *, same_init: bool = True, lr: float = 0.1, momentum: float = 0.0,
                  batch_size: int = 16, seed: int = 0, model: str = "logreg") -> list[Trainer]:
    shards = partition(data.y_train, n, "iid", seed=seed)
    out = []
    for i in range(n):
        m = build_model(model, input_shape=data.input_shape, n_classes=data.n_classes, hidden=(16,),
                        seed=seed if same_init else seed + 1 + i)
        out.append(Trainer(m, data, shards[i], lr=lr, batch_size=batch_size, momentum=momentum, seed=seed * 7 + i))
    return out


def accuracy(trainer: Trainer, params: torch.Tensor) -> float:
    return trainer.evaluate(params)[1]


# --------------------------------------------------------------------------- 1. gradient exchange


@pytest.mark.parametrize("average_every", [1, 3])
def test_gradex_on_a_complete_graph_is_centralized_minibatch_sgd(digits: Dataset, average_every: int) -> None:
    n, rounds, lr, momentum = 4, 12, 0.2, 0.9
    trainers = make_trainers(digits, n, lr=lr, momentum=momentum)
    twins = make_trainers(digits, n, lr=lr, momentum=momentum)  # same shards and seeds: same batches
    drv = Driver(GradientExchange(average_every=average_every), n, lambda t: complete(n), trainers=trainers)
    drv.run(rounds)

    # Centralized SGD with momentum on the UNION of the n batches of each step: one cross-entropy
    # over the concatenated batch (equal batch sizes, so its gradient is the mean of the n).
    model, layout = twins[0].model, twins[0].layout
    x = twins[0].params.clone()
    v = torch.zeros_like(x)
    for _ in range(rounds - 1):  # the gradient of round r is applied in round r + 1: one round of lag
        batches = [t._batch() for t in twins]
        xb = torch.cat([b[0] for b in batches])
        yb = torch.cat([b[1] for b in batches])
        p = x.detach().requires_grad_(True)
        loss = F.cross_entropy(functional_call(model, layout.unflatten(p), (xb,)), yb)
        (g,) = torch.autograd.grad(loss, p)
        v = momentum * v + g
        x = x - lr * v
    models = drv.models()
    assert not torch.equal(x, twins[0].params)  # it did train
    for i in range(n):
        torch.testing.assert_close(models[i], x, atol=2e-6, rtol=1e-5)


def test_gradex_non_uniform_weights_are_not_centralized_sgd(digits: Dataset) -> None:
    """The equivalence test can fail: the same run with a ring's weights drifts from centralized SGD."""
    n = 4
    drv_ring = _driver_with(GradientExchange(), make_trainers(digits, n, lr=0.2), lambda t: ring(n)).run(8)
    drv_full = _driver_with(GradientExchange(), make_trainers(digits, n, lr=0.2), lambda t: complete(n)).run(8)
    assert (drv_ring.models() - drv_full.models()).abs().max() > 1e-4


def _driver_with(algo: Any, trainers: Sequence[Trainer], graph: Graph, **kw: Any) -> Driver:
    return Driver(algo, len(trainers), graph, trainers=trainers, **kw)


def test_gradex_trains_on_a_ring_and_models_stay_close(digits: Dataset) -> None:
    n = 6
    trainers = make_trainers(digits, n, same_init=False, lr=0.1)
    drv = _driver_with(GradientExchange(average_every=2), trainers, lambda t: ring(n)).run(80)
    models = drv.models()
    spread = (models - models.mean(0)).norm(dim=1).max() / models.mean(0).norm()
    assert spread < 0.05
    assert accuracy(trainers[0], models.mean(0)) > 0.85


# --------------------------------------------------------------------------- 2. AD-PSGD


def _vectors(n: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d, generator=g, dtype=torch.float64) * (i + 1) for i in range(n)]


def test_adpsgd_interleaved_exchanges_conserve_the_sum_and_lose_no_update() -> None:
    """Exchanges in flight overlap with local updates and with exchanges answered meanwhile."""
    n, d = 6, 5
    algo = ADPSGD()
    nodes = [node(algo, v, seed=i) for i, v in enumerate(_vectors(n, d))]
    ids = [f"n{i}" for i in range(n)]
    graph = ring(n)
    rng = random.Random(7)
    expected = sum(nd.params for nd in nodes)
    requests: list[tuple[int, int, Message]] = []  # (initiator, responder, request) not yet answered
    replies: list[tuple[int, Message]] = []  # (initiator, reply) not yet applied
    busy: set[int] = set()  # initiators with an exchange in flight (one each, as in the node)
    completed = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.35:
            i = rng.randrange(n)
            if i in busy:
                continue
            (j,) = draw_targets(algo.targets, [ids[k] for k in sorted(graph.neighbors(i))], rng)
            msg, _ = transmit(algo, nodes[i].message(1), ids[i], d, torch.float64)
            requests.append((i, ids.index(j), msg))
            busy.add(i)
        elif op < 0.6 and requests:
            i, j, msg = requests.pop(rng.randrange(len(requests)))
            reply, _ = transmit(algo, nodes[j].respond(msg), ids[j], d, torch.float64)
            replies.append((i, reply))
        elif op < 0.85 and replies:
            i, reply = replies.pop(rng.randrange(len(replies)))
            nodes[i].apply_reply(reply)
            busy.discard(i)
            completed += 1
        else:  # a local step meanwhile, possibly while this node's own exchange is in flight
            i = rng.randrange(n)
            delta = torch.randn(d, dtype=torch.float64) * 0.01
            nodes[i].params.add_(delta)
            expected = expected + delta
    for i, j, msg in requests:
        reply, _ = transmit(algo, nodes[j].respond(msg), ids[j], d, torch.float64)
        replies.append((i, reply))
    for i, reply in replies:
        nodes[i].apply_reply(reply)
    assert completed > 500
    torch.testing.assert_close(sum(nd.params for nd in nodes), expected, atol=1e-10, rtol=0)


def test_adpsgd_pure_averaging_reaches_the_average() -> None:
    n, d = 8, 4
    algo = ADPSGD()
    init = _vectors(n, d, seed=3)
    nodes = [node(algo, v.clone()) for v in init]
    avg = torch.stack(init).mean(0)
    ids = [f"n{i}" for i in range(n)]
    graph = ring(n)
    rng = random.Random(1)
    for _ in range(1500):
        i = rng.randrange(n)
        (j,) = draw_targets(algo.targets, [ids[k] for k in sorted(graph.neighbors(i))], rng)
        msg, _ = transmit(algo, nodes[i].message(1), ids[i], d, torch.float64)
        reply, _ = transmit(algo, nodes[ids.index(j)].respond(msg), j, d, torch.float64)
        nodes[i].apply_reply(reply)
        torch.testing.assert_close(nodes[i].params, nodes[ids.index(j)].params)  # both hold the average
    for nd in nodes:
        torch.testing.assert_close(nd.params, avg, atol=1e-9, rtol=0)


def test_adpsgd_concurrent_threads_neither_deadlock_nor_lose_mass() -> None:
    """Threads exchange at random with the node's lock discipline: one exchange in flight per
    initiator; a node's lock is held only to snapshot, to respond and to apply a reply (never two
    locks at once), so an initiator answers others while its own request is out."""
    n, d, workers = 6, 16, 4
    algo = ADPSGD()
    nodes = [node(algo, v) for v in _vectors(n, d, seed=5)]
    locks = [threading.Lock() for _ in range(n)]
    initiating = [threading.Lock() for _ in range(n)]  # the node waits for its reply before the next
    total = sum(nd.params for nd in nodes)
    done = [0] * workers
    answered_while_initiating = [0]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        rng = random.Random(k)
        try:
            for _ in range(300):
                i = rng.randrange(n)
                j = (i + rng.choice((-1, 1))) % n
                if not initiating[i].acquire(blocking=False):
                    continue
                try:
                    with locks[i]:
                        msg = nodes[i].message(1)
                    request = Message(sender=f"n{i}", tensors={"params": msg.tensors["params"].clone()})
                    if not locks[j].acquire(timeout=0.5):  # busy: the responder's lock stays held
                        continue
                    try:
                        answered_while_initiating[0] += initiating[j].locked()
                        reply = nodes[j].respond(request)
                        reply = Message(sender=f"n{j}", tensors={"params": reply.tensors["params"].clone()})
                    finally:
                        locks[j].release()
                    with locks[i]:
                        nodes[i].apply_reply(reply)
                    done[k] += 1
                finally:
                    initiating[i].release()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,), name=f"adpsgd-{k}") for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert not errors
    assert sum(done) > 100
    torch.testing.assert_close(sum(nd.params for nd in nodes), total, atol=1e-9, rtol=0)
    print("answered while initiating:", answered_while_initiating[0])
    assert answered_while_initiating[0] > 0  # the case the lock discipline exists for happened


# --------------------------------------------------------------------------- 3. push-sum / SGP


def _irregular_digraph(n: int) -> nx.DiGraph:
    """A strongly connected digraph with unequal out-degrees (so push-sum weights drift from 1)."""
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    g.add_edges_from((i, (i + 1) % n) for i in range(n))
    g.add_edges_from((u % n, v % n) for u, v in [(0, 4), (0, 5), (0, 2), (3, 1), (5, 1), (4, 3)] if u % n != v % n)
    return g


def _weight(nd: NodeLearning) -> float:
    """A push-sum node's weight w."""
    return float(nd.state["weight"][0])


def _mass(drv: Driver) -> tuple[torch.Tensor, float]:
    """Total numerator and weight, at the nodes and in flight (a message's share is a tensor of it)."""
    x = sum(nd.params for nd in drv.nodes) + sum((m.tensors["params"] for _, _, m in drv.inflight),
                                                 torch.zeros_like(drv.nodes[0].params))
    w = sum(_weight(nd) for nd in drv.nodes) + sum(float(m.tensors["weight"]) for _, _, m in drv.inflight)
    return x, w


@pytest.mark.parametrize("delayed", [False, True], ids=["prompt", "delayed"])
def test_pushsum_on_a_directed_graph_reaches_the_exact_average_and_conserves_mass(delayed: bool) -> None:
    n, d = 8, 6
    init = _vectors(n, d, seed=11)
    avg = torch.stack(init).mean(0)
    graph = _irregular_digraph(n)
    drv = Driver(PushSumAveraging(), n, lambda t: graph, params=init,
                 delay=(lambda r: r.randrange(4)) if delayed else None)
    total = sum(init)
    weights_moved = False
    for _ in range(250):
        drv.round()
        x, w = _mass(drv)
        torch.testing.assert_close(x, total, atol=1e-10, rtol=0)
        assert w == pytest.approx(n, abs=1e-12)
        weights_moved |= any(abs(_weight(nd) - 1) > 0.05 for nd in drv.nodes)
    drv.flush()
    assert weights_moved  # the graph is irregular: de-biasing by w is what makes it exact
    for z in drv.models():
        torch.testing.assert_close(z, avg, atol=1e-9, rtol=0)
    # without de-biasing the numerators are NOT the average
    assert max((nd.params - avg).abs().max() for nd in drv.nodes) > 1e-3


def test_pushsum_one_peer_exponential_graph_is_exact_after_log2_n_rounds() -> None:
    n, d = 8, 3
    init = _vectors(n, d, seed=2)
    avg = torch.stack(init).mean(0)
    for rounds, exact in ((2, False), (3, True)):
        drv = Driver(PushSumAveraging(), n, lambda t: one_peer_exponential(n, t), params=init)
        drv.run(rounds)
        drv.flush()
        err = (drv.models() - avg).abs().max()
        assert bool(err < 1e-12) is exact, (rounds, float(err))


def test_pushsum_time_varying_with_delays_conserves_mass_and_converges() -> None:
    n, d = 8, 4
    init = _vectors(n, d, seed=4)
    drv = Driver(PushSumAveraging(), n, lambda t: one_peer_exponential(n, t), params=init,
                 delay=lambda r: r.choice((0, 0, 1, 3)))
    for _ in range(200):
        drv.round()
        x, w = _mass(drv)
        torch.testing.assert_close(x, sum(init), atol=1e-10, rtol=0)
        assert w == pytest.approx(n, abs=1e-12)
    drv.flush()
    torch.testing.assert_close(drv.models(), torch.stack(init).mean(0).expand(n, d), atol=1e-9, rtol=0)


def test_sgp_trains_on_a_directed_graph(digits: Dataset) -> None:
    n = 6
    trainers = make_trainers(digits, n, same_init=False, lr=0.1)
    graph = _irregular_digraph(n)
    drv = _driver_with(get_algorithm("pushsum"), trainers, lambda t: graph).run(60)
    drv.flush()
    assert any(abs(_weight(nd) - 1) > 0.05 for nd in drv.nodes)  # x itself is not the model here
    assert min(accuracy(trainers[0], z) for z in drv.models()) > 0.85


# --------------------------------------------------------------------------- 4. compression, CHOCO


@pytest.mark.parametrize(
    ("name", "kw", "factor"),
    [
        ("topk", {"fraction": 0.01}, 0.02),
        ("topk", {"fraction": 0.1}, 0.2),
        ("randomk", {"fraction": 0.05}, 0.1),
        ("qsgd", {"bits": 8}, 8 / 32),
        ("qsgd", {"bits": 4}, 4 / 32),
        ("qsgd", {"bits": 2}, 2 / 32),
    ],
)
def test_wire_bytes_shrink_by_the_expected_factor(name: str, kw: dict[str, Any], factor: float) -> None:
    """Measured from CHOCO messages actually sent, encoded by wire.encode, against a dense message."""
    numel = 100_000
    params = torch.randn(numel)
    dense = wire.encode(wire.Envelope(cluster="c", sender="a", algorithm="dpsgd", fingerprint="f",
                                      tensors={"params": params}))
    algo = CHOCO(compression=name, **kw)
    nd = node(algo, params.clone(), seed=1)
    nd.step = 1
    _, size = transmit(algo, nd.message(1), "a", numel, torch.float32)
    ratio = size / len(dense)
    assert factor * 0.98 < ratio < factor * 1.03 + 0.002, ratio
    assert algo.compressor.nominal_ratio(numel, torch.float32) == pytest.approx(factor, rel=1e-3)


@pytest.mark.parametrize("op", [RandomK(fraction=0.25), QSGD(bits=4), QSGD(bits=2), QSGD(bits=8, norm="l2")],
                         ids=repr)
def test_random_k_and_qsgd_are_unbiased(op: Any) -> None:
    d, draws = 40, 20_000
    x = torch.randn(d, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    batch = x.expand(draws, d).contiguous()  # the operators take a leading node axis
    est = op.decompress(op.compress(batch, g), d, torch.float32)
    mean, sd = est.mean(0), est.std(0)
    assert (est != x).any()
    z = (mean - x).abs() / (sd / math.sqrt(draws)).clamp_min(1e-12)
    assert z.max() < 5.0, float(z.max())
    # the second-moment bound that CHOCO's rescaling relies on
    assert (est.pow(2).sum(1).mean() / x.pow(2).sum()) <= op.tau(d) + 1e-3


def test_top_k_picks_the_largest_magnitudes() -> None:
    d, k = 1000, 37
    x = torch.randperm(d).float().add(1) * torch.where(torch.rand(d) < 0.5, -1.0, 1.0)
    op = TopK(fraction=k / d)
    out = op.compress(x, torch.Generator())
    assert op.k(d) == k
    assert set(out["idx"].tolist()) == set(x.abs().argsort(descending=True)[:k].tolist())
    torch.testing.assert_close(out["val"], x[out["idx"].long()])
    dense = op.decompress(out, d, torch.float32)
    assert int((dense != 0).sum()) == k
    rows = torch.stack([x, -x.flip(0)])  # leading node axis: one top-k per row
    both = op.compress(rows, torch.Generator())
    torch.testing.assert_close(op.decompress(both, d, torch.float32)[1], op.decompress(
        op.compress(rows[1], torch.Generator()), d, torch.float32))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("d", [1, 7, 64, 1001])
def test_bit_packing_round_trips(bits: int, d: int) -> None:
    codes = torch.randint(0, 2**bits, (3, d), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, math.ceil(d * bits / 8))
    assert torch.equal(unpack_bits(packed, bits, d), codes)


def test_qsgd_represents_grid_values_exactly() -> None:
    for bits in (2, 4, 8):
        s = 2 ** (bits - 1) - 1
        levels = torch.tensor([0, 1, s, -s, -1, s // 2 + 1, 0, -(s // 2)], dtype=torch.float32)
        x = levels * (3.0 / s)
        codes, scale = qsgd_quantize(x, bits, torch.Generator().manual_seed(0))
        back = qsgd_dequantize(unpack_bits(pack_bits(codes, bits), bits, x.numel()), scale, bits, torch.float32)
        torch.testing.assert_close(back, x)


def test_choco_without_compression_and_gamma_one_is_dpsgd(digits: Dataset) -> None:
    """CHOCO steps, then mixes the replicas of what was sent: D-PSGD in combine-then-adapt order."""
    n = 5
    a = make_trainers(digits, n, same_init=False, lr=0.1, momentum=0.5)
    b = make_trainers(digits, n, same_init=False, lr=0.1, momentum=0.5)
    choco = _driver_with(CHOCO(compression="none", gamma=1.0), a, lambda t: ring(n)).run(15)
    dpsgd = _driver_with(DPSGD(order="cta"), b, lambda t: ring(n)).run(15)
    choco.flush()
    dpsgd.flush()
    torch.testing.assert_close(choco.models(), dpsgd.models(), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kw", [{"compression": "topk", "fraction": 0.1},
                                {"compression": "randomk", "fraction": 0.2},
                                {"compression": "qsgd", "bits": 4},
                                {"compression": "qsgd", "bits": 2},
                                {"compression": "qsgd", "bits": 8, "rescale": False}],
                         ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_choco_trains_and_keeps_its_replicas_consistent(digits: Dataset, kw: dict[str, Any]) -> None:
    n = 6
    trainers = make_trainers(digits, n, same_init=False, lr=0.1)
    algo = CHOCO(**kw)
    drv = _driver_with(algo, trainers, lambda t: ring(n)).run(120)
    drv.flush()
    # s_i is exactly the weighted sum of the neighbours' public copies x̂_j
    for i, nd in enumerate(drv.nodes):
        w = drv.weights(i, nd.step)
        expect = sum(wj * drv.nodes[drv.ids.index(j)].state["x_hat"][0] for j, wj in w.items())
        torch.testing.assert_close(nd.state["s"][0], expect, atol=1e-4, rtol=1e-4)
    models = drv.models()
    assert min(accuracy(trainers[0], z) for z in models) >= 0.85


# --------------------------------------------------------------------------- 5. gossip variants


def _gossip_message(params: torch.Tensor, age: float, sender: str = "peer") -> Message:
    """A gossip-learning message: the model and its age (a float64 scalar tensor)."""
    return Message(sender=sender, tensors={"params": params, "age": torch.tensor(age, dtype=torch.float64)})


def test_gossip_update_merge_updates_the_arrival_merges_then_steps(digits: Dataset) -> None:
    """update-merge: x <- update(merge(x, update(x_j))). The arrival takes one plain SGD step on
    the receiver's data (its age counting it) when it is merged; the node's own step follows."""
    t, twin = make_trainers(digits, 1, lr=0.1), make_trainers(digits, 1, lr=0.1)
    t, twin = t[0], twin[0]
    algo = GossipLearning(order="update_merge")
    nd = NodeLearning(algo, t)
    nd.state["age"].fill_(4.0)
    other = t.params.detach() + 0.1 * torch.randn_like(t.params)
    msg, _ = transmit(algo, _gossip_message(other, 2.0), "peer", other.numel(), other.dtype)
    nd.merge([msg], {})
    _, g = twin.loss_and_grad(params=other)  # update(x_j) on the receiver's data (its next minibatch) ...
    expect, age = age_weighted_merge(twin.params, 4.0, other - 0.1 * g, 3.0)  # ... merged at once (age 2 + 1)
    torch.testing.assert_close(nd.params, expect)
    assert float(nd.state["age"][0]) == age == 4.0  # max(4, 3)
    nd.local_step()  # ... then update(merge(...)) on the next minibatch
    with torch.no_grad():
        twin.params.copy_(expect)
    twin.step()
    torch.testing.assert_close(nd.params, twin.params)
    assert float(nd.state["age"][0]) == 5.0
    assert set(nd.state) == {"params", "age"}  # nothing waits in the state for a later step


def test_gossip_merge_update_order_is_the_default() -> None:
    algo = GossipLearning()
    nd = node(algo, torch.zeros(3))
    nd.state["age"].fill_(1.0)
    nd.merge([_gossip_message(torch.ones(3), 3.0, sender="p")], {})
    torch.testing.assert_close(nd.params, torch.full((3,), 0.75))
    assert float(nd.state["age"][0]) == 3.0


def test_partitioned_gossip_sends_and_merges_one_part_with_its_own_age() -> None:
    d, parts = 10, 3  # parts of 4, 3 and 3 entries, padded to 4
    algo = PartitionedGossip(partitions=parts, seed=3)
    a = node(algo, torch.arange(d, dtype=torch.float32), seed=0)
    b = node(algo, torch.zeros(d), seed=1)
    a.state["ages"][0] = torch.tensor([3.0, 1.0, 2.0])
    b.state["ages"][0] = torch.tensor([1.0, 1.0, 2.0])
    seen = set()
    for step in range(30):
        a.step = step
        before = b.params.clone()
        msg, size = transmit(algo, a.message(1), "a", d, torch.float32)
        p = int(msg.tensors["partition"])
        seen.add(p)
        mask = torch.zeros(d, dtype=torch.bool)
        mask[p::parts] = True
        age_a, age_b = float(a.state["ages"][0, p]), float(b.state["ages"][0, p])
        assert float(msg.tensors["age"]) == age_a
        b.merge([msg], {})
        assert torch.equal(b.params[~mask], before[~mask])  # other parts untouched
        wa = age_b / (age_a + age_b)
        torch.testing.assert_close(b.params[mask], wa * before[mask] + (1 - wa) * a.params[mask])
        assert float(b.state["ages"][0, p]) == max(age_a, age_b)
    assert seen == {0, 1, 2}  # random parts, all of them in time
    assert algo.tensor_specs(d, torch.float32) == {
        "part": ((4,), torch.float32), "partition": ((), torch.int64), "age": ((), torch.float64)}


def test_partitioned_gossip_messages_are_p_times_smaller() -> None:
    d = 60_000
    params = torch.randn(d)
    gossip = GossipLearning()
    _, whole = transmit(gossip, node(gossip, params.clone()).message(1), "a", d, torch.float32)
    algo = PartitionedGossip(partitions=4)
    _, part = transmit(algo, node(algo, params.clone()).message(1), "a", d, torch.float32)
    assert part / whole == pytest.approx(0.25, rel=0.02)


# --------------------------------------------------------------------------- 6. tracking, epidemic


class QuadraticTrainer(FixedTrainer):
    """f_i(x) = 1/2 sum_k a_k (x_k - b_k)^2 with exact gradients: the Trainer's interface, tiny."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, lr: float) -> None:
        super().__init__(torch.zeros_like(b))
        self.a, self.b, self.lr = a, b, lr

    def loss_and_grad(self, params: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        x = self.params if params is None else params
        r = x - self.b
        return float(0.5 * (self.a * r * r).sum()), self.a * r

    def apply_gradient(self, grad: torch.Tensor, params: torch.Tensor | None = None) -> None:
        (self.params if params is None else params).sub_(grad, alpha=self.lr)

    def step(self) -> float:
        loss, g = self.loss_and_grad()
        self.apply_gradient(g)
        self.steps += 1
        return loss


def _quadratics(n: int, d: int, lr: float) -> tuple[list[QuadraticTrainer], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(n, d, generator=g, dtype=torch.float64) * 2 + 0.5
    b = torch.randn(n, d, generator=g, dtype=torch.float64) * 3
    optimum = (a * b).sum(0) / a.sum(0)
    return [QuadraticTrainer(a[i], b[i], lr) for i in range(n)], optimum


@pytest.mark.parametrize("graph", ["ring", "random_matching"])
def test_diging_reaches_the_exact_optimum_where_dpsgd_is_biased(graph: str) -> None:
    n, d = 6, 3
    sched: Graph = (lambda t: ring(n)) if graph == "ring" else (lambda t: nx.compose(random_matching(n, t),
                                                                                     ring(n)))
    trainers, optimum = _quadratics(n, d, lr=0.05)
    drv = Driver(DIGing(), n, sched, trainers=trainers)
    for _ in range(400):
        drv.round()
        if drv.round_no > 1:  # the tracking invariant: sum_i y_i = sum_i g_i(x_i)
            ys = sum(nd.state["y"][0] for nd in drv.nodes)
            gs = sum(nd.state["g"][0] for nd in drv.nodes)
            torch.testing.assert_close(ys, gs, atol=1e-9, rtol=1e-9)
    assert (drv.models() - optimum).abs().max() < 1e-8
    trainers, _ = _quadratics(n, d, lr=0.05)
    dpsgd = Driver(DPSGD(), n, sched, trainers=trainers).run(400)
    assert (dpsgd.models() - optimum).abs().max() > 1e-3


def test_epidemic_sends_to_s_random_peers_and_averages_what_arrived() -> None:
    algo = EpidemicLearning(fanout=3)
    peers = [f"n{i}" for i in range(10)]
    rng = random.Random(0)
    picks = [draw_targets(algo.targets, peers, rng) for _ in range(200)]
    assert all(len(p) == len(set(p)) == 3 and set(p) <= set(peers) for p in picks)
    assert len({tuple(p) for p in picks}) > 50  # random
    assert len(draw_targets(EpidemicLearning().targets, peers, rng)) == math.ceil(math.log2(11))
    nd = node(algo, torch.zeros(2))
    msgs = [Message(sender=f"n{i}", tensors={"params": torch.full((2,), float(i))}) for i in (1, 2, 6)]
    nd.merge(msgs, {})
    torch.testing.assert_close(nd.params, torch.full((2,), 9.0 / 4))


# --------------------------------------------------------------------------- every algorithm


TRAINING_RUNS: dict[str, tuple[dict[str, Any], Graph]] = {
    "dpsgd": ({}, lambda t: ring(8)),
    "gossip": ({}, lambda t: ring(8)),
    "gossip_update_merge": ({"order": "update_merge"}, lambda t: ring(8)),
    "gossip_partitioned": ({"partitions": 4}, lambda t: ring(8)),
    "gradex": ({"average_every": 2}, lambda t: ring(8)),
    "pushsum": ({}, lambda t: one_peer_exponential(8, t)),
    "choco": ({"compression": "topk", "fraction": 0.2}, lambda t: ring(8)),
    "diging": ({}, lambda t: ring(8)),
    "epidemic": ({"fanout": 2}, lambda t: complete(8)),
}


@pytest.mark.parametrize("case", sorted(TRAINING_RUNS))
def test_every_pushing_algorithm_trains_in_lock_step(digits: Dataset, case: str) -> None:
    params, graph = TRAINING_RUNS[case]
    name = "gossip" if case.startswith("gossip_update") else case
    trainers = make_trainers(digits, 8, same_init=False, lr=0.05 if name == "diging" else 0.1)
    drv = _driver_with(get_algorithm(name, **params), trainers, graph).run(60)
    drv.flush()
    accs = [accuracy(trainers[0], z) for z in drv.models()]
    assert min(accs) > 0.8, accs


def test_algorithms_declare_their_requirements() -> None:
    req = {name: cls.requirements for name, cls in ALGORITHMS.items()}
    assert {"dpsgd", "gossip", "averaging"} <= set(req)
    assert req["pushsum"].weights == "column"
    assert not req["pushsum"].undirected
    assert req["adpsgd"].pairwise
    assert req["choco"].rounds
    assert req["choco"].lossless
    assert req["choco"].static_topology
    assert req["diging"].rounds
    assert req["diging"].lossless
    assert req["gradex"].weights == "symmetric"
    assert not req["pushsum_averaging"].trains
    assert req["epidemic"].weights == "none"
    for name, cls in ALGORITHMS.items():
        doc = __import__(cls.__module__, fromlist=["_"]).__doc__ or ""
        assert re.search(r"(19|20)\d\d", doc), f"{name}: module docstring names no reference year"


@pytest.mark.parametrize(
    ("name", "params", "key"),
    [
        ("choco", {"bits": 3}, "bits"),
        ("choco", {"compression": "gzip"}, "compression"),
        ("choco", {"fraction": 0.0}, "fraction"),
        ("choco", {"gamma": 2}, "gamma"),
        ("gradex", {"average_every": 0}, "average_every"),
        ("epidemic", {"fanout": -1}, "fanout"),
        ("gossip", {"order": "sideways"}, "order"),
        ("gossip_partitioned", {"partitions": True}, "partitions"),
        ("adpsgd", {"mix": 0}, "mix"),
        ("pushsum", {"self_weight": 1.0}, "self_weight"),
        ("diging", {"lr": -1}, "lr"),
        ("dpsgd", {"nonsense": 1}, "nonsense"),
    ],
)
def test_bad_hyperparameters_are_config_errors_naming_the_key(name: str, params: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        get_algorithm(name, **params)


def test_toml_style_hyperparameters_are_accepted() -> None:
    algo = get_algorithm("choco", compression="topk", fraction=1, gamma=1, rescale=False)
    assert isinstance(algo, CHOCO)
    assert algo.compressor.k(10) == 10
    assert make_compressor("qsgd", bits=4).specs(9, torch.float32)["codes"][0] == (5,)


class RecordingDriver(Driver):
    """Records, per merge, how much each received floating-point tensor changed during it."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.frozen: list[torch.Tensor] = []

    def merge(self, i: int, msgs: list[Message]) -> None:
        before = [t.clone() for m in msgs for t in m.tensors.values()]
        super().merge(i, msgs)
        after = [t for m in msgs for t in m.tensors.values()]
        self.frozen.extend(a - b for a, b in zip(after, before, strict=True) if a.is_floating_point())


@pytest.mark.parametrize(("name", "params"), [
    ("choco", {"compression": "none"}), ("dpsgd", {}), ("gossip", {"order": "update_merge"}),
    ("gossip_partitioned", {"partitions": 3}), ("gradex", {}), ("pushsum", {}), ("diging", {}),
    ("epidemic", {"fanout": 2}),
], ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_messages_never_write_into_received_buffers(digits: Dataset, name: str, params: dict[str, Any]) -> None:
    """Receivers share one decoded message (as a node's fan-out does): merges must only read it."""
    trainers = make_trainers(digits, 4, same_init=False)
    drv = RecordingDriver(get_algorithm(name, **params), 4, lambda t: ring(4), trainers=trainers).run(5)
    assert drv.frozen
    assert all(float(f.abs().max()) == 0 for f in drv.frozen)


def test_update_rules_take_a_leading_node_axis() -> None:
    """The vectorised engine may call the pure functions on [N, D] tensors: same numbers per row."""
    from gossipfl.algorithms.adpsgd import exchange_delta
    from gossipfl.algorithms.choco import choco_consensus
    from gossipfl.algorithms.epidemic import plain_average
    from gossipfl.algorithms.gossip import merge_partition
    from gossipfl.algorithms.gradex import accumulate_gradients
    from gossipfl.algorithms.tracking import tracker_update

    g = torch.Generator().manual_seed(0)
    n, k, d, parts = 3, 2, 7, 3
    x, acc, xh, s = (torch.randn(n, d, generator=g) for _ in range(4))
    others = torch.randn(n, k, d, generator=g)
    w = torch.rand(n, k, generator=g) / k
    batched = {
        "gradex": accumulate_gradients(acc, x, others, w),
        "adpsgd": exchange_delta(x, others[:, 0], 0.5),
        "choco": choco_consensus(x, xh, s, w.sum(-1, keepdim=True), 0.3),
        "epidemic": plain_average(x, others),
        "tracking": tracker_update(x, xh, s),
    }
    for i in range(n):
        torch.testing.assert_close(batched["gradex"][i], accumulate_gradients(acc[i], x[i], others[i], w[i]))
        torch.testing.assert_close(batched["adpsgd"][i], exchange_delta(x[i], others[i, 0], 0.5))
        torch.testing.assert_close(batched["choco"][i], choco_consensus(x[i], xh[i], s[i], float(w[i].sum()), 0.3))
        torch.testing.assert_close(batched["epidemic"][i], plain_average(x[i], others[i]))
        torch.testing.assert_close(batched["tracking"][i], x[i] + xh[i] - s[i])
    ages = torch.rand(n, parts, generator=g, dtype=torch.float64) * 5
    xb, ab = x.clone(), ages.clone()
    values = torch.randn(n, math.ceil(d / parts), generator=g)
    part = torch.tensor([1, 0, 2])  # a different part per row
    age = torch.tensor([2.0, 0.5, 9.0], dtype=torch.float64)
    merge_partition(xb, ab, part, values, age, parts)
    for i in range(n):  # merge_partition is batched: a batch of one per row gives the same numbers
        xi, ai = x[i : i + 1].clone(), ages[i : i + 1].clone()
        merge_partition(xi, ai, part[i : i + 1], values[i : i + 1], age[i : i + 1], parts)
        torch.testing.assert_close(xb[i], xi[0])
        torch.testing.assert_close(ab[i], ai[0])
        # and the closed form: part p of the row age-weighted with the values, its age the maximum
        p, own = int(part[i]), float(ages[i, int(part[i])])
        width = len(range(p, d, parts))
        wa = own / (own + float(age[i]))
        torch.testing.assert_close(xb[i, p::parts], wa * x[i, p::parts] + (1 - wa) * values[i, :width])
        keep = torch.ones(d, dtype=torch.bool)
        keep[p::parts] = False
        assert torch.equal(xb[i, keep], x[i, keep])
        assert float(ab[i, p]) == max(own, float(age[i]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [(), (3,)])
def test_the_chunked_exchange_update_is_the_plain_one_bit_for_bit(
        monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, rows: tuple[int, ...]) -> None:
    """`add_exchange_delta` slices its temporary (4 MB instead of two model-size ones): the floats
    must be exactly those of ``target += mix * (other - own)``, also with ``target`` as ``own``."""
    from gossipfl.algorithms import adpsgd

    monkeypatch.setattr(adpsgd, "_CHUNK", 7)  # 5 slices of a 31-wide model, the last one short
    g = torch.Generator().manual_seed(3)
    own, other = (torch.randn(*rows, 31, generator=g, dtype=dtype) for _ in range(2))
    for mix in (0.5, 0.3):
        want = own + adpsgd.exchange_delta(own, other, mix)
        target = own.clone()
        adpsgd.add_exchange_delta(target, own, other, mix)
        assert torch.equal(target, want)
        aliased = own.clone()
        adpsgd.add_exchange_delta(aliased, aliased, other, mix)  # a merge: own is the target
        assert torch.equal(aliased, want)


@pytest.mark.parametrize("name", ["adpsgd", "pairwise_averaging"])
def test_a_snapshot_reply_is_the_cloned_one_without_the_clone(name: str) -> None:
    """`respond(..., snapshot=f)`: the reply is what ``f`` returned (a node's frame views), and the
    state after the exchange is bit-for-bit the one the algorithm's own clone gives."""
    g = torch.Generator().manual_seed(5)
    params, incoming = (torch.randn(2, 9, generator=g, dtype=torch.float64) for _ in range(2))
    algo = get_algorithm(name)
    plain = {"params": params.clone()}
    algo.init_state(plain)
    want = algo.respond(plain, {"params": incoming})
    copies: list[torch.Tensor] = []

    def into_frame(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        copies.append(tensors["params"].clone())  # stands in for the frame a node encodes
        return {"params": copies[-1]}

    snap = {"params": params.clone()}
    algo.init_state(snap)
    got = algo.respond(snap, {"params": incoming}, snapshot=into_frame)
    assert got["params"] is copies[0]
    assert torch.equal(got["params"], want["params"])
    assert torch.equal(got["params"], params)  # the reply: the model from before the exchange
    assert torch.equal(snap["params"], plain["params"])
