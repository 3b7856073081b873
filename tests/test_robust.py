"""Robust aggregation rules (gossipfl.algorithms.robust) against their definitions, in float64:
each batched rule equals a per-node reference written from the paper's formula, and keeps the
properties it is used for (bounded influence, an outlier ignored, the average kept)."""

from __future__ import annotations

import itertools

import pytest
import torch

from gossipfl.algorithms.robust import (
    AGGREGATORS,
    balance,
    clipped_gossip,
    clipped_gossip_edges,
    krum,
    mean,
    median,
    trimmed_mean,
)

F64 = torch.float64


def _batch(seed: int, n: int = 6, k: int = 5, d: int = 7) -> tuple[torch.Tensor, ...]:
    """Receivers with 2..k arrivals each (masked slots hold garbage that must not matter)."""
    g = torch.Generator().manual_seed(seed)
    own = torch.randn(n, d, generator=g, dtype=torch.float64)
    others = torch.randn(n, k, d, generator=g, dtype=torch.float64) * 3
    counts = torch.randint(2, k + 1, (n,), generator=g)
    mask = torch.arange(k).unsqueeze(0) < counts.unsqueeze(1)
    others = torch.where(mask.unsqueeze(2), others, torch.full_like(others, 1e6))  # garbage in masked slots
    weights = torch.rand(n, k, generator=g, dtype=torch.float64) / k * mask
    return own, others, mask, weights


def _sets(own: torch.Tensor, others: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    return [torch.cat([own[i:i + 1], others[i][mask[i]]]) for i in range(own.shape[0])]


@pytest.mark.parametrize("seed", range(3))
def test_mean_and_clipped_gossip_without_clipping_are_dpsgds_mix(seed: int) -> None:
    own, others, mask, w = _batch(seed)
    ref = torch.stack([own[i] + sum(w[i, j] * (others[i, j] - own[i]) for j in range(others.shape[1]) if mask[i, j])
                       for i in range(own.shape[0])])
    assert torch.allclose(mean(own, others, mask, w), ref, rtol=0, atol=1e-12)
    assert torch.allclose(clipped_gossip(own, others, mask, w, tau=float("inf")), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_median_and_trimmed_mean_equal_their_per_coordinate_definitions(seed: int) -> None:
    own, others, mask, w = _batch(seed)
    med, tm0, tm1 = median(own, others, mask, w), trimmed_mean(own, others, mask, w, b=0), \
        trimmed_mean(own, others, mask, w, b=1)
    for i, s in enumerate(_sets(own, others, mask)):
        assert torch.equal(med[i], s.sort(0).values[(s.shape[0] - 1) // 2])  # the lower median
        assert torch.allclose(tm0[i], s.mean(0), rtol=0, atol=1e-12)
        kept = s.sort(0).values[1:-1]  # b = 1 off each end, per coordinate
        assert torch.allclose(tm1[i], kept.mean(0), rtol=0, atol=1e-12)


def test_trimmed_mean_keeps_the_own_model_when_too_few_values_remain() -> None:
    own = torch.zeros(1, 3, dtype=F64)
    others = torch.ones(1, 2, 3, dtype=F64)
    mask = torch.tensor([[True, False]])  # 2 values, b = 1 trims both
    assert torch.equal(trimmed_mean(own, others, mask, torch.zeros(1, 2, dtype=F64), b=1), own)


def _krum_reference(s: torch.Tensor, f: int, m: int) -> torch.Tensor:
    c = s.shape[0]
    near = c - f - 2
    scores = []
    for a in range(c):
        d = sorted(float(((s[a] - s[b]) ** 2).sum()) for b in range(c) if b != a)
        scores.append(sum(d[:near]))
    best = sorted(range(c), key=lambda a: (scores[a], a))[:m]
    return s[best].mean(0)


@pytest.mark.parametrize(("seed", "f", "m"), list(itertools.product(range(3), (0, 1), (1, 2))))
def test_krum_equals_its_definition(seed: int, f: int, m: int) -> None:
    own, others, mask, w = _batch(seed, k=6)
    mask[:, :4] = True  # at least 5 candidates: c - f - 2 >= 2
    others = torch.where(mask.unsqueeze(2), others, torch.full_like(others, 1e6))
    out = krum(own, others, mask, w, f=f, m=m)
    for i, s in enumerate(_sets(own, others, mask)):
        assert torch.allclose(out[i], _krum_reference(s, f, m), rtol=0, atol=1e-12)


def test_robust_rules_ignore_one_huge_outlier_that_moves_the_mean() -> None:
    """Five honest models near 0 and one neighbour at 1e3 (a scaled or sign-flipped model)."""
    g = torch.Generator().manual_seed(0)
    own = torch.randn(1, 4, generator=g, dtype=F64) * 0.1
    honest = torch.randn(1, 4, 4, generator=g, dtype=F64) * 0.1
    others = torch.cat([honest, torch.full((1, 1, 4), 1e3, dtype=F64)], 1)
    mask = torch.ones(1, 5, dtype=torch.bool)
    w = torch.full((1, 5), 1 / 6, dtype=F64)
    assert float(mean(own, others, mask, w).abs().max()) > 100  # no defence: dragged away
    assert float(median(own, others, mask, w).abs().max()) < 0.5
    assert float(trimmed_mean(own, others, mask, w, b=1).abs().max()) < 0.5
    assert float(krum(own, others, mask, w, f=1).abs().max()) < 0.5
    moved = clipped_gossip(own, others, mask, w, tau=0.3) - own
    assert float(moved.norm()) <= 5 / 6 * 0.3 + 1e-12  # each neighbour moves it by at most w_ij tau


def test_clipped_gossip_keeps_the_average_on_symmetric_weights() -> None:
    """clip is odd, so with W symmetric the clipped corrections cancel in the sum over nodes:
    the average is kept exactly whatever tau (here on a ring of 8 with weights 1/3)."""
    g = torch.Generator().manual_seed(1)
    n, d = 8, 5
    x = torch.randn(n, d, generator=g, dtype=F64) * 10
    nbrs = torch.tensor([[(i - 1) % n, (i + 1) % n] for i in range(n)])
    mask = torch.ones(n, 2, dtype=torch.bool)
    w = torch.full((n, 2), 1 / 3, dtype=F64)
    for tau in (0.1, 1.0, 5.0):
        y = x.clone()
        for _ in range(20):
            y = clipped_gossip(y, y[nbrs], mask, w, tau=tau)
        assert torch.allclose(y.mean(0), x.mean(0), rtol=0, atol=1e-12)
    spread = (y - y.mean(0)).norm()
    assert float(spread) < float((x - x.mean(0)).norm())  # and it still mixes


def test_every_rule_is_registered_and_checks_shapes() -> None:
    assert set(AGGREGATORS) == {"mean", "median", "trimmed_mean", "krum", "clipped_gossip", "balance"}
    for rule in AGGREGATORS.values():
        with pytest.raises(ValueError, match="expected own"):
            rule(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="tau"):
        clipped_gossip(torch.zeros(1, 2), torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.bool),
                       torch.zeros(1, 1), tau=0.0)


def test_the_vectorised_gather_equals_the_nodes_loop() -> None:
    """``gather`` channels: the engine's batched slots (sim._combine) hold what the node's loop
    (algorithms.inbox, used by exact sampling) puts there, sender by sender, weights included."""
    from gossipfl.algorithms.base import Channel
    from gossipfl.sim._combine import Arrivals, combine_inbox, exact_inbox

    g = torch.Generator().manual_seed(4)
    rows, n, d = 5, 12, 3
    r = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4, 4, 4])
    send = torch.tensor([7, 1, 11, 3, 9, 0, 2, 10, 5, 8])
    col = torch.arange(r.shape[0])
    w = torch.rand(r.shape[0], generator=g, dtype=F64)
    values = {"params": torch.randn(r.shape[0], d, generator=g, dtype=F64)}
    own = {"params": torch.randn(rows, d, generator=g, dtype=F64)}
    channels = [Channel("params", "gather")]
    arrivals = {"params": Arrivals(r, col, w, send)}
    nw = torch.rand(rows, generator=g, dtype=F64)
    fast = combine_inbox(channels, own, arrivals, values, nw, n)
    exact = exact_inbox(channels, own, arrivals, values, nw)
    assert fast["params"].shape == (rows, 4, d)
    assert torch.equal(fast.count["params"], torch.tensor([2, 1, 2, 1, 4]))
    assert torch.equal(fast["params"], exact["params"])
    assert torch.equal(fast.weight["params"], exact.weight["params"])
    # receiver 0 got senders 7 and 1: slot 0 is sender 1's model (message 1), slot 1 sender 7's
    assert torch.equal(fast["params"][0, 0], values["params"][1])
    assert float(fast.weight["params"][0, 1]) == float(w[0])


@pytest.mark.slow
def test_dpsgd_learns_with_each_robust_aggregator_in_the_vectorised_engine() -> None:
    """From one shared initial model (coordinate-wise rules on independently initialised networks
    mix unrelated hidden units: median then stays at chance, 0.10). Measured: median 0.936,
    trimmed mean 0.945, clipped gossip 0.946 (as the plain mix), Krum 0.852 (it keeps one
    candidate, so it averages little: close to local training)."""
    from gossipfl.config import RunConfig
    from gossipfl.sim.vectorized import run_vectorized

    base = RunConfig(nodes=16, topology="random_regular", algorithm="dpsgd", engine="vectorized", schedule="sync",
                     steps=200, eval_every=100, same_init=True)
    for params, least in (({"aggregator": "median"}, 0.9), ({"aggregator": "trimmed_mean", "b": 1}, 0.9),
                          ({"aggregator": "krum", "f": 1}, 0.8), ({"aggregator": "clipped_gossip", "tau": 1.0}, 0.9)):
        s = run_vectorized(base.replace(algorithm_params=params), None, progress=None)
        assert s["mean_accuracy"] >= least, (params, s["mean_accuracy"])


# ---------------------------------------------------------------- BALANCE, the adaptive radius, the counters

@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("progress", [0.0, 0.7])
def test_balance_equals_its_definition(seed: int, progress: float) -> None:
    """Fang et al. 2024: accept x_j when |x_j - x_i| <= gamma exp(-kappa t/T) |x_i|; then
    x_i <- alpha x_i + (1 - alpha) mean(accepted), or x_i kept when none is."""
    own, others, mask, weights = _batch(seed)
    own = own * 4
    others[:, 0] = own * 1.05  # one close neighbour each (accepted), the others drawn far and wide
    gamma, kappa, alpha = 1.2, 1.5, 0.3
    stats: dict[str, torch.Tensor] = {}
    got = balance(own, others, mask, weights, gamma=gamma, kappa=kappa, alpha=alpha, progress=progress, stats=stats)
    accepted_any = False
    for i in range(own.shape[0]):
        x = own[i]
        bound = gamma * torch.exp(torch.tensor(-kappa * progress, dtype=F64)) * x.norm()
        ok = [others[i, j] for j in range(others.shape[1]) if mask[i, j] and (others[i, j] - x).norm() <= bound]
        want = alpha * x + (1 - alpha) * torch.stack(ok).mean(0) if ok else x
        accepted_any |= bool(ok)
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-12)
        assert int(stats["discarded"][i]) == int(mask[i].sum()) - len(ok)
    assert accepted_any
    assert int(stats["discarded"].sum()) > 0


def test_clipped_gossip_auto_radius_clips_the_farthest_delta_share_of_weight() -> None:
    own = torch.zeros(1, 2, dtype=F64)
    dist = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0], dtype=F64)
    others = torch.stack([dist, torch.zeros(5, dtype=F64)], 1).unsqueeze(0)  # |x_j - x_i| = dist
    mask = torch.ones(1, 5, dtype=torch.bool)
    weights = torch.full((1, 5), 0.1, dtype=F64)
    stats: dict[str, torch.Tensor] = {}
    # delta = 0.2: the farthest neighbour holds 0.2 of the weight -> radius = the 4th distance, 4
    got = clipped_gossip(own, others, mask, weights, tau="auto", delta=0.2, stats=stats)
    torch.testing.assert_close(got, clipped_gossip(own, others, mask, weights, tau=4.0), rtol=0, atol=0)
    assert int(stats["clipped"][0]) == 1
    clipped_gossip(own, others, mask, weights, tau="auto", delta=0.45, stats=stats)  # radius 3: two clipped
    assert int(stats["clipped"][0]) == 2


@pytest.mark.parametrize("seed", range(3))
def test_rules_count_what_they_clip_and_discard(seed: int) -> None:
    own, others, mask, weights = _batch(seed)
    stats: dict[str, torch.Tensor] = {}
    clipped_gossip(own, others, mask, weights, tau=2.0, stats=stats)
    far = ((others - own.unsqueeze(1)).norm(dim=2) > 2.0) & mask
    assert torch.equal(stats["clipped"], far.sum(1))
    assert int(stats["discarded"].sum()) == 0
    krum(own, others, mask, weights, f=1, m=2, stats=stats)
    for i in range(own.shape[0]):  # neighbours among the candidates left out of the m chosen
        c = int(mask[i].sum()) + 1
        if c - 1 - 2 >= 1:
            cands = _sets(own, others, mask)[i]
            d2 = torch.cdist(cands, cands).square()
            scores = [float(torch.sort(torch.cat([d2[a, :a], d2[a, a + 1:]])).values[: c - 3].sum()) for a in range(c)]
            chosen = set(sorted(range(c), key=lambda a: scores[a])[:2])
            assert int(stats["discarded"][i]) == len(set(range(1, c)) - chosen)
    trimmed_mean(own, others, mask, weights, b=1, stats=stats)
    for i, vals in enumerate(_sets(own, others, mask)):
        order = vals.argsort(0)  # [c, D]: by rank, which candidate
        c = vals.shape[0]
        kept = torch.zeros(c, vals.shape[1])
        for r in range(1, c - 1):
            kept[order[r], torch.arange(vals.shape[1])] = 1
        assert int(stats["discarded"][i]) == int((kept[1:].mean(1) < 0.5).sum())
    mean(own, others, mask, weights, stats=stats)
    assert int(stats["clipped"].sum()) == int(stats["discarded"].sum()) == 0


def test_top_level_aggregator_joins_the_algorithms_parameters() -> None:
    from gossipfl.build import build_algorithm
    from gossipfl.config import RunConfig
    from gossipfl.errors import ConfigError

    alg = build_algorithm(RunConfig(aggregator="clipped_gossip", aggregator_params={"tau": 0.3}))
    assert (alg.aggregator, alg.rule.params) == ("clipped_gossip", {"tau": 0.3})
    assert build_algorithm(RunConfig(aggregator="balance", steps=77)).rule.params["horizon"] == 77
    epi = build_algorithm(RunConfig(algorithm="epidemic", aggregator="median"))
    assert epi.channels[0].combine == "gather"
    for cfg, match in ((RunConfig(algorithm="pushsum", aggregator="median"), "no robust merge"),
                       (RunConfig(aggregator="median", algorithm_params={"aggregator": "krum"}), "disagree"),
                       (RunConfig(algorithm="gossip", aggregator="krum"), "does not compose"),
                       (RunConfig(aggregator="krum", aggregator_params={"tau": 1}), "not a parameter")):
        with pytest.raises(ConfigError, match=match):
            build_algorithm(cfg)


@pytest.mark.slow
def test_epidemic_and_gossip_learning_take_clipped_gossip_against_sign_flippers() -> None:
    """10 % sign flippers on 32 nodes. Measured (honest mean accuracy, plain -> clipped tau 0.3):
    epidemic learning 0.572 (worst 0.100) -> 0.936 (0.906), gossip learning 0.628 (0.161) -> 0.927 (0.872)."""
    from gossipfl.config import RunConfig
    from gossipfl.sim.vectorized import run_vectorized

    base = RunConfig(nodes=32, topology="random_regular", engine="vectorized", schedule="sync", steps=200,
                     eval_every=100, same_init=True, attack={"kind": "sign_flip", "fraction": 0.1})
    for algorithm in ("epidemic", "gossip"):
        plain = run_vectorized(base.replace(algorithm=algorithm), None, progress=None)
        clipped = run_vectorized(base.replace(algorithm=algorithm, aggregator="clipped_gossip",
                                              aggregator_params={"tau": 0.3}), None, progress=None)
        assert clipped["honest_mean_accuracy"] >= 0.85, algorithm
        assert clipped["honest_mean_accuracy"] >= plain["honest_mean_accuracy"] + 0.2, algorithm
        assert clipped["clipped"] > 0


@pytest.mark.parametrize("attack", [{}, {"kind": "dissensus", "nodes": [2, 9]}, {"kind": "alie", "nodes": [2, 9]}])
def test_blocked_gather_merges_exactly_as_one_block(monkeypatch: pytest.MonkeyPatch, attack: dict) -> None:
    """The vectorised engine builds gathered stacks a cache-sized block of receivers at a time;
    forced down to blocks of 3 receivers, every state tensor (counters included) is as with one block."""
    import gossipfl.sim.vectorized as vec
    from gossipfl.config import RunConfig

    # the adaptive radius: a fixed one merges as an edge list (no stacks, no blocks)
    cfg = RunConfig(nodes=16, topology="erdos_renyi", engine="vectorized", schedule="sync", steps=6, same_init=True,
                    aggregator="clipped_gossip", aggregator_params={"tau": "auto", "delta": 0.3}, attack=attack)
    one = vec.VectorizedSim(cfg)
    assert not one.edge_rule
    one.rounds(6)
    monkeypatch.setattr(vec, "GATHER_BLOCK_FLOATS", 3 * one.layout.numel)  # K >= 1: at most 3 receivers a block
    calls = []
    merge_blocks = vec.VectorizedSim._merge_blocks
    monkeypatch.setattr(vec.VectorizedSim, "_merge_blocks",
                        lambda self, *a: calls.append(a[-1]) or merge_blocks(self, *a))
    blocked = vec.VectorizedSim(cfg)
    blocked.rounds(6)
    assert calls
    assert max(calls) <= 3
    assert set(one.state) == set(blocked.state)
    for k, v in one.state.items():
        assert torch.equal(v, blocked.state[k]), k
    assert int(one.state["clipped"].sum()) > 0


def _as_edges(others: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The padded slots as an edge list: the values, each message's receiver, row and weight."""
    r, k = mask.nonzero(as_tuple=True)
    return others[r, k], r, torch.arange(r.shape[0]), weights[r, k]


@pytest.mark.parametrize("seed", range(4))
def test_clipped_gossip_edges_equals_the_dense_rule(seed: int) -> None:
    """The engine's edge-list form (sampled distances, one sparse product) is the dense rule:
    float64 to 1e-12, the same clip counts; receivers that got nothing keep their model."""
    own, others, mask, w = _batch(seed)
    mask[0] = False  # a receiver without arrivals
    w = w * mask
    values, r, col, ew = _as_edges(others, mask, w)
    counts = []
    dist = (others - own.unsqueeze(1)).norm(dim=2)[mask]
    for tau in (float(dist.quantile(0.25)), float(dist.quantile(0.75)), 1e9):
        dense_stats, edge_stats = {}, {}
        dense = clipped_gossip(own, others, mask, w, tau=tau, stats=dense_stats)
        edge = clipped_gossip_edges(own, values, r, col, ew, tau=tau, stats=edge_stats)
        assert torch.allclose(edge, dense, rtol=0, atol=1e-12), tau
        assert torch.equal(edge_stats["clipped"], dense_stats["clipped"]), tau
        assert torch.equal(edge[0], own[0])
        counts.append(int(edge_stats["clipped"].sum()))
    assert counts[0] > counts[1] > 0  # small radii clip more
    assert counts[2] == 0  # a huge one is the mix
    with pytest.raises(ValueError, match="fixed tau"):
        clipped_gossip_edges(own, values, r, col, ew, tau="auto")


def test_clipped_gossip_edges_decides_near_the_radius_as_the_dense_rule_in_float32() -> None:
    """float32 models far from the origin, neighbours at distances within 1e-6 of tau on either side:
    the sampled product's rounding would flip decisions; the edge form measures those edges directly,
    so its clip counts equal the dense rule's and the merged models agree to float32 rounding."""
    g = torch.Generator().manual_seed(7)
    n, k, d, tau = 40, 6, 500, 0.25
    own = (torch.randn(n, d, generator=g, dtype=F64) + 30.0)
    direction = torch.randn(n, k, d, generator=g, dtype=F64)
    direction = direction / direction.norm(dim=2, keepdim=True)
    offset = tau * (1.0 + 1e-6 * torch.randn(n, k, 1, generator=g, dtype=F64))  # straddle the radius
    others = (own.unsqueeze(1) + offset * direction).float()
    own = own.float()
    mask = torch.ones(n, k, dtype=torch.bool)
    w = torch.full((n, k), 1.0 / (k + 1), dtype=F64)
    values, r, col, ew = _as_edges(others, mask, w)
    dense_stats, edge_stats = {}, {}
    dense = clipped_gossip(own, others, mask, w, tau=tau, stats=dense_stats)
    edge = clipped_gossip_edges(own, values, r, col, ew, tau=tau, stats=edge_stats)
    clipped = int(dense_stats["clipped"].sum())
    assert 0.2 * n * k < clipped < 0.8 * n * k  # the case has teeth: about half are clipped
    assert torch.equal(edge_stats["clipped"], dense_stats["clipped"])
    assert torch.allclose(edge, dense, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("algorithm", "attack"), [("dpsgd", {}), ("dpsgd", {"kind": "alie", "nodes": [2, 9]}),
                                                   ("epidemic", {"kind": "sign_flip", "nodes": [4]})])
def test_the_vectorised_engine_merges_clipped_gossip_as_edges_as_it_would_with_stacks(
        algorithm: str, attack: dict) -> None:
    """A fixed radius merges as an edge list in the vectorised engine; forced back to the padded
    stacks, the same run ends with the same models (float32 rounding) and the same clip counts."""
    from gossipfl.config import RunConfig
    from gossipfl.sim.vectorized import VectorizedSim

    cfg = RunConfig(nodes=16, topology="erdos_renyi", engine="vectorized", schedule="sync", steps=8, same_init=True,
                    algorithm=algorithm, aggregator="clipped_gossip", aggregator_params={"tau": 0.05}, attack=attack)
    edges, stacks = VectorizedSim(cfg), VectorizedSim(cfg)
    assert edges.edge_rule
    stacks.edge_rule = False
    edges.rounds(8)
    stacks.rounds(8)
    assert int(edges.state["clipped"].sum()) > 0
    assert torch.equal(edges.state["clipped"], stacks.state["clipped"])
    assert torch.allclose(edges.state["params"], stacks.state["params"], rtol=0, atol=1e-5)
