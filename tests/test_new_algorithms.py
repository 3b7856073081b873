"""Exact diffusion (D²) and Quasi-Global Momentum against closed forms, and through the local cluster.

The fidelity tests drive the algorithms directly with a tiny synchronous engine (all N nodes as one
``[N, D]`` state, a dense mixing matrix W, the order of ``gossipfl.algorithms.base``: merge the
round r-1 inbox, local step, message) on deterministic quadratics ``f_i(x) = 1/2 |x - b_i|^2``
with exact gradients, in float64, and compare with hand-written recursions.
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import pytest
import torch

from gossipfl.algorithms import ALGORITHMS, Draws, Inbox, Message, Send, State, get_algorithm
from gossipfl.algorithms.dpsgd import DPSGD
from gossipfl.algorithms.exact_diffusion import ExactDiffusion
from gossipfl.algorithms.inbox import combine
from gossipfl.algorithms.optim import sgd_update
from gossipfl.algorithms.qgm import QuasiGlobalMomentum
from gossipfl.errors import ConfigError
from gossipfl.topology import complete, local_weights, ring

DT = torch.float64

# --------------------------------------------------------------------------- the reference engine


class Quadratic:
    """The `Learner` of f_i(x) = 1/2 |x - b_i|^2 for the rows of ``b`` (exact gradients)."""

    def __init__(self, b: torch.Tensor, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.b = b
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.velocity = torch.zeros_like(b) if momentum else None
        self.calls = {"grad": 0, "sgd_step": 0, "apply": 0}

    def grad(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls["grad"] += 1
        d = params - self.b
        return 0.5 * (d * d).sum(1), d.clone()

    def sgd_step(self, params: torch.Tensor) -> torch.Tensor:
        self.calls["sgd_step"] += 1
        loss, g = self.grad(params)
        sgd_update(params, self.velocity, g, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return loss

    def apply(self, params: torch.Tensor, grad: torch.Tensor, where: torch.Tensor | None = None) -> None:
        self.calls["apply"] += 1
        sgd_update(params, self.velocity, grad, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


def mixing_matrix(graph: nx.Graph, kind: str = "metropolis") -> torch.Tensor:
    """The dense W of ``graph`` as nodes compute it (`local_weights`)."""
    n = graph.number_of_nodes()
    w = torch.zeros(n, n, dtype=DT)
    for i in range(n):
        own, peers = local_weights(graph, i, kind)
        w[i, i] = own
        for j, v in peers.items():
            w[i, j] = v
    return w


def dense_inbox(algo: Any, state: State, msgs: dict[str, torch.Tensor], w: torch.Tensor) -> Inbox:
    """What every receiver's engine hands ``merge`` when all neighbours' messages arrived, for the
    off-diagonal part of ``w`` (``mix``: ``(1 - sum_j w_ij) s_i + sum_j w_ij m_j``)."""
    off = w.clone()
    off.fill_diagonal_(0.0)
    wsum = off.sum(1)
    count = (off != 0).sum(1)
    values = {}
    for c in algo.channels:
        m = msgs[c.key]
        if c.combine == "mix":
            values[c.key] = (1.0 - wsum).unsqueeze(1) * state[c.key] + off @ m
        elif c.combine == "weighted":
            values[c.key] = off @ m
        else:
            raise AssertionError(f"the reference engine has no {c.combine!r}")
    keys = [c.key for c in algo.channels]
    return Inbox(values=values, count=dict.fromkeys(keys, count), weight=dict.fromkeys(keys, wsum),
                 neighbour_weight=wsum)


def send_for(w: torch.Tensor, step: int) -> Send:
    off = w.clone()
    off.fill_diagonal_(0.0)
    n = w.shape[0]
    return Send(targets=(off != 0).sum(1), step=torch.full((n,), step, dtype=torch.int64),
                rng=Draws(torch.Generator().manual_seed(0)))


def run_sync(algo: Any, x0: torch.Tensor, learner: Quadratic, w: torch.Tensor, rounds: int) -> list[torch.Tensor]:
    """``rounds`` lock-step rounds; returns the models after each round's merge (``[0]``: x0, the
    last: after merging the last round's messages), i.e. the start points of successive steps."""
    state: State = {"params": x0.clone()}
    algo.init_state(state)
    has_neighbours = bool((w - torch.diag(torch.diagonal(w))).abs().sum() > 0)
    msgs: dict[str, torch.Tensor] | None = None
    starts = []
    for k in range(rounds + 1):
        if msgs is not None and has_neighbours:
            algo.merge(state, dense_inbox(algo, state, msgs, w))
        starts.append(state["params"].clone())
        if k == rounds:
            break
        algo.local_step(state, learner)
        msgs = {key: t.clone() for key, t in algo.message(state, send_for(w, k + 1)).items()}
    return starts


def problem(n: int = 8, d: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, d, generator=g, dtype=DT) * 2.0
    x0 = torch.randn(n, d, generator=g, dtype=DT)
    return b, x0


# --------------------------------------------------------------------------- exact diffusion


def test_exact_diffusion_reaches_the_exact_minimiser_where_dpsgd_is_biased() -> None:
    n, lr = 8, 0.5
    b, x0 = problem(n)
    w = mixing_matrix(ring(n))
    target = b.mean(0, keepdim=True).expand(n, -1)  # argmin sum_i f_i

    ed = run_sync(ExactDiffusion(), x0, Quadratic(b, lr=lr), w, 600)[-1]
    assert (ed - target).abs().max() < 1e-10

    # D-PSGD (merge, then an SGD step): x <- (1 - lr) W x + lr b, fixed point lr (I - (1 - lr) W)^-1 b
    dp = run_sync(DPSGD(order="cta"), x0, Quadratic(b, lr=lr), w, 600)[-1]
    fixed = torch.linalg.solve(torch.eye(n, dtype=DT) - (1 - lr) * w, lr * b)
    fixed = w @ fixed  # the recorded model is after the last merge
    assert (dp - fixed).abs().max() < 1e-10
    assert (dp - target).abs().max() > 1e-4  # the heterogeneity bias
    assert (dp.mean(0) - target[0]).abs().max() < 1e-10  # (on average it is right)


def test_exact_diffusion_is_d2_with_the_combination_matrix_i_plus_w_over_2() -> None:
    """x^0 = A (x^{-1} - lr g(x^{-1})), x^k = A (2 x^{k-1} - x^{k-2} - lr (g(x^{k-1}) - g(x^{k-2})))."""
    n, lr, rounds = 8, 0.3, 40
    b, x0 = problem(n, seed=1)
    w = mixing_matrix(ring(n))
    a = 0.5 * (torch.eye(n, dtype=DT) + w)
    wd = 0.05
    learner = Quadratic(b, lr=lr, weight_decay=wd)

    def g(x: torch.Tensor) -> torch.Tensor:
        return x - b + wd * x

    ref = [x0, a @ (x0 - lr * g(x0))]
    for _ in range(rounds - 1):
        x1, x2 = ref[-1], ref[-2]
        ref.append(a @ (2 * x1 - x2 - lr * (g(x1) - g(x2))))
    got = run_sync(ExactDiffusion(), x0, learner, w, rounds)
    assert len(got) == len(ref)
    for k, (x, r) in enumerate(zip(got, ref, strict=True)):
        assert (x - r).abs().max() < 1e-12, k
    assert learner.calls["sgd_step"] == learner.calls["apply"] == 0  # plain steps via grad only


def test_exact_diffusion_ignores_the_learners_momentum() -> None:
    b, x0 = problem(6, seed=2)
    w = mixing_matrix(ring(6))
    plain = run_sync(ExactDiffusion(), x0, Quadratic(b, lr=0.2), w, 20)
    heavy = run_sync(ExactDiffusion(), x0, Quadratic(b, lr=0.2, momentum=0.9), w, 20)
    for x, y in zip(plain, heavy, strict=True):
        assert torch.equal(x, y)


def test_exact_diffusion_merged_in_two_parts_equals_one_merge() -> None:
    """A round's messages split over two merges (a late one) give the same combine."""
    n = 8
    b, x0 = problem(n, seed=3)
    w = mixing_matrix(ring(n))
    algo = ExactDiffusion()
    learner = Quadratic(b, lr=0.3)
    state: State = {"params": x0.clone()}
    algo.init_state(state)
    msgs: dict[str, torch.Tensor] = {}
    for k in range(3):
        if k:
            algo.merge(state, dense_inbox(algo, state, msgs, w))
        algo.local_step(state, learner)
        msgs = {key: t.clone() for key, t in algo.message(state, send_for(w, k + 1)).items()}
    whole = {key: t.clone() for key, t in state.items()}
    algo.merge(whole, dense_inbox(algo, whole, msgs, w))

    left = torch.diag(torch.diagonal(w)).clone()
    right = left.clone()
    for i in range(n):  # senders i-1 in the first merge, i+1 in the second
        left[i, (i - 1) % n] = w[i, (i - 1) % n]
        right[i, (i + 1) % n] = w[i, (i + 1) % n]
    algo.merge(state, dense_inbox(algo, state, msgs, left))
    algo.merge(state, dense_inbox(algo, state, msgs, right))
    assert (state["params"] - whole["params"]).abs().max() < 1e-14


def test_exact_diffusion_skips_the_combine_in_a_round_without_messages() -> None:
    """No merge (no gossip point): the next step starts from phi, i.e. the combine is the identity."""
    b, x0 = problem(1, seed=4)
    lr = 0.25
    got = run_sync(ExactDiffusion(), x0, Quadratic(b, lr=lr), torch.eye(1, dtype=DT), 5)
    # alone, exact diffusion is x^k = 2 x^{k-1} - x^{k-2} - lr (x^{k-1} - x^{k-2}), x^0 = x - lr g: plain GD
    x = x0.clone()
    for k in range(6):
        assert (got[k] - x).abs().max() < 1e-14, k
        x = x - lr * (x - b)


def test_exact_diffusion_merge_before_the_first_step_combines_the_model() -> None:
    """A neighbour's phi merged before a node's own first step combines with the node's model
    (its own phi does not exist yet): x <- x + w (phi_j - x) / 2."""
    algo = ExactDiffusion()
    x = torch.tensor([[1.0, 2.0]], dtype=DT)
    state: State = {"params": x.clone()}
    algo.init_state(state)
    phi_j = torch.tensor([[3.0, -2.0]], dtype=DT)
    w = 0.4
    ones = torch.ones(1, dtype=DT)
    mixed = (1 - w) * state["phi"] + w * phi_j  # the engine's mix with the (unset) own phi
    algo.merge(state, Inbox(values={"phi": mixed}, count={"phi": ones.long()}, weight={"phi": w * ones},
                            neighbour_weight=w * ones))
    assert (state["params"] - (x + 0.5 * w * (phi_j - x))).abs().max() < 1e-15


# --------------------------------------------------------------------------- quasi-global momentum


def qgm_reference(x0: torch.Tensor, b: torch.Tensor, w: torch.Tensor, *, lr: float, beta: float, wd: float,
                  rounds: int) -> list[torch.Tensor]:
    """Algorithm 1 in matrix form: X^{t+1/2} = X^t - lr (G + beta M), X^{t+1} = W X^{t+1/2},
    M <- beta M + (1 - beta) (X^t - X^{t+1}) / lr."""
    x, m = x0.clone(), torch.zeros_like(x0)
    out = [x]
    for _ in range(rounds):
        g = x - b + wd * x
        nxt = w @ (x - lr * (g + beta * m))
        m = beta * m + (1 - beta) * (x - nxt) / lr
        x = nxt
        out.append(x)
    return out


@pytest.mark.parametrize("graph", ["ring", "complete", "alone"])
def test_qgm_follows_algorithm_1(graph: str) -> None:
    n, lr, beta, wd, rounds = 8, 0.1, 0.9, 0.01, 60
    b, x0 = problem(n, seed=5)
    w = {"ring": lambda: mixing_matrix(ring(n)), "complete": lambda: mixing_matrix(complete(n), "uniform"),
         "alone": lambda: torch.eye(n, dtype=DT)}[graph]()
    learner = Quadratic(b, lr=lr, weight_decay=wd)
    got = run_sync(QuasiGlobalMomentum(beta=beta), x0, learner, w, rounds)
    ref = qgm_reference(x0, b, w, lr=lr, beta=beta, wd=wd, rounds=rounds)
    for k, (x, r) in enumerate(zip(got, ref, strict=True)):
        assert (x - r).abs().max() < 1e-12, (graph, k)
    assert learner.calls["sgd_step"] == learner.calls["apply"] == 0


def test_qgm_on_a_complete_graph_is_centralized_qgm_on_the_average_objective() -> None:
    """Identical starts, uniform weights 1/N: every node runs the centralized recursion on
    (1/N) sum_i f_i: x <- x - lr (g(x) + beta m), m <- beta m + (1 - beta) (g(x) + beta m)."""
    n, lr, beta, wd, rounds = 8, 0.1, 0.9, 0.02, 400
    b, _ = problem(n, seed=6)
    start = torch.randn(1, 3, generator=torch.Generator().manual_seed(7), dtype=DT)
    got = run_sync(QuasiGlobalMomentum(beta=beta), start.expand(n, -1), Quadratic(b, lr=lr, weight_decay=wd),
                   mixing_matrix(complete(n), "uniform"), rounds)
    x, m, bbar = start[0].clone(), torch.zeros(3, dtype=DT), b.mean(0)
    for k in range(rounds + 1):
        assert (got[k] - x).abs().max() < 1e-12, k
        step = (x - bbar + wd * x) + beta * m
        x = x - lr * step
        m = beta * m + (1 - beta) * step
    # and it converges to the minimiser of the average objective
    assert (got[-1] - bbar / (1 + wd)).abs().max() < 1e-8


def test_qgm_with_beta_0_is_dpsgd_and_ignores_the_learners_momentum() -> None:
    n = 8
    b, x0 = problem(n, seed=8)
    w = mixing_matrix(ring(n))
    q0 = run_sync(QuasiGlobalMomentum(beta=0.0), x0, Quadratic(b, lr=0.2, momentum=0.9), w, 30)
    dp = run_sync(DPSGD(order="cta"), x0, Quadratic(b, lr=0.2), w, 30)  # QGM steps from the mixed point
    for x, y in zip(q0, dp, strict=True):
        assert (x - y).abs().max() < 1e-14
    q = run_sync(QuasiGlobalMomentum(), x0, Quadratic(b, lr=0.2), w, 30)
    qm = run_sync(QuasiGlobalMomentum(), x0, Quadratic(b, lr=0.2, momentum=0.9), w, 30)
    for x, y in zip(q, qm, strict=True):
        assert torch.equal(x, y)


def test_qgm_measures_the_displacement_between_step_starts_whatever_merged_in_between() -> None:
    """Asynchronously: two merges before a step, or none, enter m as the total move since the
    previous step's start."""
    b, x0 = problem(1, seed=9)
    lr, beta = 0.1, 0.5
    algo = QuasiGlobalMomentum(beta=beta)
    state: State = {"params": x0.clone()}
    algo.init_state(state)
    learner = Quadratic(b, lr=lr)
    algo.local_step(state, learner)  # m stays 0: x1 = x0 - lr g(x0)
    x1 = x0 - lr * (x0 - b)
    assert (state["params"] - x1).abs().max() < 1e-15
    ones = torch.ones(1, dtype=DT)
    for target in (x1 + 1.0, x1 + 3.0):  # two merges (a neighbour's model, weight 1/2, twice)
        inbox = Inbox(values={"params": 0.5 * state["params"] + 0.5 * target}, count={"params": ones.long()},
                      weight={"params": 0.5 * ones}, neighbour_weight=0.5 * ones)
        algo.merge(state, inbox)
    x_now = state["params"].clone()
    algo.local_step(state, learner)
    m = (1 - beta) * (x0 - x_now) / lr
    assert (state["m_hat"] - m).abs().max() < 1e-13
    assert (state["params"] - (x_now - lr * ((x_now - b) + beta * m))).abs().max() < 1e-13
    x_prev, m_prev = x_now, m
    algo.local_step(state, learner)  # no merge: the move was the node's own step alone
    m = beta * m_prev + (1 - beta) * ((x_prev - b) + beta * m_prev)
    assert (state["m_hat"] - m).abs().max() < 1e-13


# --------------------------------------------------------------------------- through the node's combine


def _messages(algo: Any, tensors: dict[str, torch.Tensor], i: int, step: int) -> Message:
    return Message(sender=f"n{i}", tensors={k: v[0].clone() for k, v in tensors.items()}, step=step, round=step)


@pytest.mark.parametrize("algo_name", ["exact_diffusion", "qgm"])
def test_per_node_inbox_combine_equals_the_batched_engine(algo_name: str) -> None:
    """N = 1 states combined by `inbox.combine` (the node's way: `Message` objects, per-sender
    weights) step for step like the batched reference engine."""
    n, rounds, lr = 6, 15, 0.2
    b, x0 = problem(n, seed=10)
    graph = ring(n)
    w = mixing_matrix(graph)
    algo = get_algorithm(algo_name)
    ref = run_sync(get_algorithm(algo_name), x0, Quadratic(b, lr=lr), w, rounds)

    specs = algo.tensor_specs(x0.shape[1], DT)
    states: list[State] = []
    learners = []
    for i in range(n):
        s: State = {"params": x0[i : i + 1].clone()}
        algo.init_state(s)
        states.append(s)
        learners.append(Quadratic(b[i : i + 1], lr=lr))
    sent: list[Message] = []
    for k in range(rounds + 1):
        for i in range(n):
            _, peers = local_weights(graph, i, "metropolis")
            weights = {f"n{j}": v for j, v in peers.items()}
            mine = [m for m in sent if int(m.sender[1:]) in peers]
            for inbox in combine(algo.channels, states[i], mine, weights, sum(weights.values()),
                                 lambda t: algo.decode(t, x0.shape[1], DT)):
                algo.merge(states[i], inbox)
            assert (states[i]["params"][0] - ref[k][i]).abs().max() < 1e-13, (k, i)
        if k == rounds:
            break
        sent = []
        for i in range(n):
            algo.local_step(states[i], learners[i])
            send = Send(targets=torch.tensor([len(list(graph.neighbors(i)))]), step=torch.tensor([k + 1]),
                        rng=Draws([torch.Generator().manual_seed(i)]))
            out = algo.message(states[i], send)
            for key, t in out.items():
                assert (tuple(t.shape[1:]), t.dtype) == (specs[key][0], specs[key][1]), key
            sent.append(_messages(algo, out, i, k + 1))


# --------------------------------------------------------------------------- registry


def test_registered_with_their_hyperparameters() -> None:
    assert ALGORITHMS["exact_diffusion"] is ExactDiffusion
    assert ALGORITHMS["qgm"] is QuasiGlobalMomentum
    for params, beta in (({"beta": 0.5}, 0.5), ({}, 0.9)):
        q = get_algorithm("qgm", **params)
        assert isinstance(q, QuasiGlobalMomentum)
        assert q.beta == beta
    for bad in (1.0, -0.1, True, "0.9"):
        with pytest.raises(ConfigError, match="beta"):
            get_algorithm("qgm", beta=bad)
    with pytest.raises(ConfigError, match="no hyperparameters"):
        get_algorithm("exact_diffusion", lr=0.1)
    req = ExactDiffusion.requirements
    assert (req.rounds, req.lossless, req.weights, req.undirected) == (True, True, "symmetric", True)
    assert not QuasiGlobalMomentum.requirements.rounds


# --------------------------------------------------------------------------- end to end


# (both also reach 0.90 on an 8-node ring: their cases in tests/test_algorithm_family.py)


@pytest.mark.slow
def test_on_label_skewed_shards_exact_diffusion_removes_dpsgds_bias_and_qgm_learns() -> None:
    """Two classes per node (heterogeneous data), same budget, lock-step rounds in the vectorised
    engine with ``exact`` sampling (the local cluster's numbers, as the agreement matrix checks).
    Measured (mean / worst node): exact diffusion 0.959 / 0.956 vs. momentum-free D-PSGD at the
    same lr 0.943 / 0.919 in Lian's order (the default) and 0.918 / 0.875 combine-then-adapt; QGM
    0.958. (Before the default changed, in the asynchronous cluster: 0.959, 0.862 cta, 0.943.)"""
    from gossipfl.config import RunConfig
    from gossipfl.sim.vectorized import run_vectorized

    base = RunConfig(nodes=8, topology="ring", partition="shards:2", engine="vectorized", schedule="sync",
                     batch_size=64, steps=700)

    def run(**settings: Any) -> dict[str, Any]:
        return run_vectorized(base.replace(**settings), None, progress=None, sampling="exact")

    ed = run(algorithm="exact_diffusion", lr=0.2)
    dp = run(algorithm="dpsgd", lr=0.2, momentum=0.0)
    cta = run(algorithm="dpsgd", lr=0.2, momentum=0.0, algorithm_params={"order": "cta"})
    qgm = run(algorithm="qgm", lr=0.1)
    assert ed["mean_accuracy"] >= 0.95, ed["per_node"]
    assert ed["mean_accuracy"] >= dp["mean_accuracy"] + 0.01, (ed["per_node"], dp["per_node"])
    assert ed["min_accuracy"] >= dp["min_accuracy"] + 0.03, (ed["per_node"], dp["per_node"])
    assert ed["min_accuracy"] >= cta["min_accuracy"] + 0.05, (ed["per_node"], cta["per_node"])
    assert qgm["mean_accuracy"] >= 0.94, qgm["per_node"]


@pytest.mark.parametrize("order", ["lian", "atc", "cta"])
def test_dpsgd_orders_reach_their_closed_form_fixed_points(order: str) -> None:
    """f_i = 1/2 |x - b_i|^2, ring n = 16, lr 0.1, float64: the deployed models after each round
    (``model``, read after the step) reach lian X* = lr((1+lr)I - W)^-1 B, atc (I - (1-lr)W)^-1 lr W B,
    cta (I - (1-lr)W)^-1 lr B; and the three points differ (the order matters)."""
    n, lr = 16, 0.1
    b, x0 = problem(n)
    w = mixing_matrix(ring(n))
    eye = torch.eye(n, dtype=DT)
    fixed = {"lian": torch.linalg.solve((1 + lr) * eye - w, lr * b),
             "atc": torch.linalg.solve(eye - (1 - lr) * w, lr * (w @ b)),
             "cta": torch.linalg.solve(eye - (1 - lr) * w, lr * b)}
    algo = DPSGD(order=order)
    learner = Quadratic(b, lr=lr)
    state: State = {"params": x0.clone()}
    algo.init_state(state)
    msgs = None
    for k in range(1500):
        if msgs is not None:
            algo.merge(state, dense_inbox(algo, state, msgs, w))
        algo.local_step(state, learner)
        msgs = {key: t.clone() for key, t in algo.message(state, send_for(w, k + 1)).items()}
    got = algo.model(state)
    want = fixed[order]
    assert ((got - want).norm() / want.norm()) < 1e-8
    others = [o for o in fixed if o != order]
    assert all((fixed[o] - want).norm() / want.norm() > 1e-3 for o in others)


def test_a_bad_dpsgd_order_is_refused_with_the_choices() -> None:
    from gossipfl.algorithms.dpsgd import Averaging

    for cls in (DPSGD, Averaging):
        with pytest.raises(ValueError, match="order must be one of 'lian', 'atc', 'cta'"):
            cls(order="nope")
