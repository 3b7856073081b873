"""The vectorised engine's asynchronous schedule: events on a simulated clock.

Events come from `gossipfl.emulation` (per-node speeds, stragglers, per-link latency, jitter,
loss, bandwidth, churn). At its start a step merges every message that has arrived; at its end, a
gossip step's message goes out once the node's previous send is done (one message batch at a
time, as the node service does; that send went on while the step computed), and the next step
starts then: a step lasts the longer of its compute and the node's slowest link. Events are
processed in batches: all steps that start within one time slice (``emulation.time_slice``,
default the fastest node's step time, so no node steps twice in a slice) run as one vectorised
batch. Messages sent within a batch are merged in a later one; everything else keeps its order.
With an ideal emulation this reproduces ``sync``. As in the local cluster, a node that has done
its ``steps`` lingers (merges and gossips at its own pace, no training) until the last node is
done; with a ``duration`` all stop together.

What a message carries goes into a `SnapshotRing` (one tensor per channel); in-flight messages
are index rows (`Messages`). Round algorithms keep neighbour-local rounds instead (`run_rounds`):
their numbers are the sync schedule's and only the clock follows the emulation. Pairwise
exchanges follow the node's protocol (`gossipfl.sim._pairwise`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from gossipfl.sim._record import log, record
from gossipfl.sim.events import Messages, SnapshotRing, latest_positions

if TYPE_CHECKING:
    from gossipfl.sim.vectorized import VectorizedSim

__all__ = ["run_async"]

MAX_RING = 64  # deepest snapshot ring (a sender's messages that messages in flight may refer to)
RING_BYTES = 2**30  # memory the snapshot ring may take beyond two models per node


def exponential(sim: VectorizedSim, k: int, mean: float) -> torch.Tensor:
    return torch.empty(k, dtype=torch.float64, device=sim.device).exponential_(generator=sim.gen) * mean


def delay(sim: VectorizedSim, src: torch.Tensor, dst: torch.Tensor, nbytes: torch.Tensor | int,
          latency: torch.Tensor | None = None) -> torch.Tensor:
    """One message's delay on each link src -> dst: latency, jitter, transfer of ``nbytes``.

    ``latency``: the links' base latencies if already known (`gossipfl.sim._links.Links.latency`)."""
    emu = sim.emulation
    d = emu.link_latency(src, dst, seed=sim.cfg.seed) if latency is None else latency
    if emu.jitter:  # uniform in +-jitter, never negative
        u = torch.rand(src.shape[0], dtype=torch.float64, generator=sim.gen, device=src.device)
        d = (d + (2 * u - 1) * emu.jitter).clamp_min(0.0)
    return d + emu.transfer_seconds(nbytes)


def _ring(sim: VectorizedSim, dur_h: torch.Tensor, width: float) -> SnapshotRing:
    """A ring deep enough for the messages the delays keep in flight (within a memory cap)."""
    alg, emu, n = sim.algorithm, sim.emulation, sim.n
    specs = alg.tensor_specs(sim.layout.numel, sim.layout.dtype)
    zeros = {k: torch.zeros(1, *shape, dtype=dt) for k, (shape, dt) in specs.items()}
    values = alg.decode(zeros, sim.layout.numel, sim.layout.dtype)
    channel_specs = {c.key: (tuple(values[c.key].shape[1:]), values[c.key].dtype) for c in alg.channels}
    # How many of a sender's recent messages one in flight may still need: those it sends during the
    # longest delay plus one time slice (a `latest` channel merges only the newest that arrived);
    # channels that count every message also need those sent while a slow receiver finishes its step.
    fastest, slowest = float(dur_h.min()), float(dur_h.max())
    every = any(not c.latest or c.combine == "each" for c in alg.channels)
    span = emu.max_latency + emu.jitter + emu.transfer_seconds(sim.msg_bytes) + width + (slowest if every else 0.0)
    depth = 1 if emu.ideal else 2 + math.ceil(span / fastest)
    row_bytes = sum(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in channel_specs.values())
    cap = max(2, min(MAX_RING, RING_BYTES // max(1, n * row_bytes)))
    if depth > cap:
        log.warning("the snapshot ring keeps the last %d messages per node, not the %d these delays "
                    "need (memory limit); messages that refer to older ones count as expired", cap, depth)
        depth = cap
    return SnapshotRing(depth, n, channel_specs, device=sim.device)


def run_async(sim: VectorizedSim, writer: Callable[[dict[str, Any]], None]) -> None:
    """The whole asynchronous run, metric rows every ``eval_every * step_time`` simulated seconds."""
    req = sim.algorithm.requirements
    if req.rounds:
        run_rounds(sim, writer)
        return
    cfg, emu, n, dev = sim.cfg, sim.emulation, sim.n, sim.device
    dur_h = emu.step_seconds(n, seed=cfg.seed)
    dur = dur_h.to(dev)
    width = emu.slice_width(dur_h)
    pair = sim.pairwise
    ring = None if pair is not None else _ring(sim, dur_h, width)
    inflight = Messages.empty(dev)
    t_next = torch.zeros(n, dtype=torch.float64, device=dev)
    up = torch.ones(n, dtype=torch.bool, device=dev)
    mean_up, mean_down = emu.churn_means()
    t_toggle = exponential(sim, n, mean_up) if emu.churn > 0 else None
    eval_dt = cfg.eval_every * emu.step_time
    next_eval = eval_dt
    record(sim, writer, 0.0, node_rows=True)
    inf = torch.tensor(math.inf, dtype=torch.float64, device=dev)
    # a sender's next step starts once its message went out (after its previous send)
    sim.send_done = torch.full((n,), -math.inf, dtype=torch.float64, device=dev)
    sim.next_start = torch.full((n,), -math.inf, dtype=torch.float64, device=dev)
    linger = cfg.duration is None
    while True:
        training = (t_next < cfg.duration) if cfg.duration is not None else (sim.step < cfg.steps)
        active = torch.ones_like(training) if linger else training
        nxt = torch.stack([torch.where(up & active, t_next, inf).min(),
                           torch.where(up & training, t_next, inf).min()])
        if t_toggle is not None:
            nxt = torch.minimum(nxt, torch.stack([torch.where(active, t_toggle, inf).min(),
                                                  torch.where(training, t_toggle, inf).min()]))
        if pair is not None:
            nxt = pair.next_events(nxt)
        t0, t_train = nxt.tolist()  # the next event times: one read per time slice
        if math.isinf(t_train):  # nobody trains any more: the run is over
            break
        if math.isinf(t0):  # cannot happen: someone trains, so someone has a next event
            raise RuntimeError("vectorised engine: no next event while nodes still train (a bug)")
        while t0 >= next_eval:  # nothing has happened between next_eval and t0
            sim.sim_time = next_eval
            sim.metric_point(writer, next_eval)
            next_eval += eval_dt
        if t_toggle is not None:
            flip = (t_toggle <= t0) & active
            coming = flip & ~up
            t_next = torch.where(coming, torch.maximum(t_next, t_toggle), t_next)
            up = up ^ flip
            mean = torch.where(up, mean_up, mean_down).to(torch.float64)
            t_toggle = torch.where(flip, t_toggle + exponential(sim, n, 1.0) * mean, t_toggle)
        t_end = t0 + width
        sim.sim_time = t0
        if pair is not None:  # exchanges happen at the responder's step start, before the batch
            # a node waiting for its reply or retrying (t_next = inf) has not finished, whatever
            # `training` says
            t_next = pair.deliver(t_next, t_end, up, ~active & ~pair.exchanging)
        stepping = up & active & (t_next < t_end)
        inflight = _batch(sim, stepping, training, t_next, t_end, dur, up, ~active, ring, inflight)
        tick = torch.where(training, dur, dur * cfg.gossip_every)  # a lingering node's gossip period
        t_next = torch.where(stepping, torch.maximum(t_next + tick, sim.next_start), t_next)
        if pair is not None:  # an initiator waits for its reply (inf until the responder answers)
            t_next = pair.hold(t_next, inf)
        sim.tick()
    sim.sim_time = float(t_next.max()) if cfg.duration is None else cfg.duration
    if pair is not None:
        pair.finish()
    while next_eval < sim.sim_time:
        sim.metric_point(writer, next_eval)
        next_eval += eval_dt
    sim.metric_point(writer, sim.sim_time)


def _deliver(sim: VectorizedSim, rows: torch.Tensor, t_next: torch.Tensor, t_end: float, stepping: torch.Tensor,
             up: torch.Tensor, closed: torch.Tensor, ring: SnapshotRing, inflight: Messages) -> Messages:
    """Merge the messages that arrived by their receivers' step start; returns those still in flight."""
    m = inflight
    deliver = stepping[m.recv] & (m.arrive <= t_next[m.recv])
    dropped = ~up[m.recv] & (m.arrive < t_end)  # the receiver is offline: lost
    sim.lost += dropped.sum()
    done = closed[m.recv]  # the receiver has stopped (it would refuse the message)
    rest = m.select(~(deliver | dropped | done))
    got = m.select(deliver)
    if not len(got):
        return rest
    sim.msgs_in.index_add_(0, got.recv, torch.ones_like(got.recv))
    sim.bytes_in.index_add_(0, got.recv, got.nbytes)
    sim.tally.add(got.recv, sim.step.index_select(0, got.recv) - got.step)  # every one delivered
    ok = ring.valid(got)
    sim.expired += (~ok).sum()
    got = got.select(ok)
    if not len(got):
        return rest
    receivers = torch.unique(got.recv)
    r = torch.searchsorted(receivers, got.recv)
    carried = {k: ring.carries(got, k) for k in ring.tensors}

    def fresh(mask: torch.Tensor) -> torch.Tensor:
        return latest_positions(got, sim.n, mask.nonzero().squeeze(1))

    values = {k: ring.flat(k) for k in ring.tensors}
    # the receivers' weight sums over all their in-neighbours (round algorithms, which use them, are static)
    sim.merge_arrivals(receivers, r, got.send, got.weight, values, ring.rows(got), carried,
                       order=(got.arrive, got.send), fresh=fresh, links=sim.links_at.at(0),
                       full=receivers.shape[0] == sim.n)
    return rest


def _batch(sim: VectorizedSim, stepping: torch.Tensor, training: torch.Tensor, t_next: torch.Tensor, t_end: float,
           dur: torch.Tensor, up: torch.Tensor, closed: torch.Tensor, ring: SnapshotRing | None,
           inflight: Messages) -> Messages:
    """All steps that start in one time slice: deliver, merge, step, send.

    ``training`` marks nodes with steps left (the others linger: merge and send, no step);
    ``closed`` marks nodes that have stopped and refuse messages.
    """
    cfg, emu, n, dev = sim.cfg, sim.emulation, sim.n, sim.device
    rows = stepping.nonzero().squeeze(1)  # host sync: the batch size
    count = rows.shape[0]
    if not count:
        return inflight
    pair = sim.pairwise
    if pair is not None:  # replies that came in: their delta, before the step (as the node)
        pair.apply_replies(rows)
    tr = training.index_select(0, rows)
    everyone_trains = bool(tr.all())  # host sync; False only near the end of a run
    sim.node_steps += int(tr.sum()) if not everyone_trains else count
    if ring is not None and len(inflight):
        inflight = _deliver(sim, rows, t_next, t_end, stepping, up, closed, ring, inflight)
    if sim.trains:
        stepped = rows if everyone_trains else rows[tr]
        if stepped.numel():
            sim.local_step(None if stepped.shape[0] == n else stepped)
    step = sim.step.index_select(0, rows) + tr.long()
    sim.step.index_copy_(0, rows, step)
    # sends, at the end of each step (a lingering node sends at every tick)
    gossip = (step % cfg.gossip_every == 0) | ~tr
    which = gossip.nonzero().squeeze(1)
    senders = rows.index_select(0, which)
    if not senders.numel():
        return inflight
    if pair is not None:  # only training nodes initiate (a lingering one still answers)
        keep = tr.index_select(0, which)
        pair.request(senders[keep], (t_next + dur).index_select(0, senders[keep]))
        return inflight
    assert ring is not None
    # After the step (a lingering node computes nothing), once the node's previous send is done
    # (`Node._send_idle`: one send buffer); the next step starts then, a linger tick later.
    sent_at = t_next + torch.where(training, dur, 0.0)
    out_at = torch.maximum(sent_at.index_select(0, senders), sim.send_done.index_select(0, senders))
    sent_at = sent_at.index_copy(0, senders, out_at)
    linger_tick = torch.where(training[senders], 0.0, dur[senders] * cfg.gossip_every)
    sim.next_start.index_copy_(0, senders, out_at + linger_tick)
    out = sim.send_on(_round_groups(sim, senders))  # each sender on its own step's graph
    if out is None:
        return inflight
    msg_senders = torch.unique(out.send)
    slot, seq = ring.record(msg_senders, out.values, out.carried or None)
    nbytes = sim.message_bytes(out.carried, out.which, out.senders)
    arrive = sent_at[out.send] + delay(sim, out.send, out.recv, nbytes, out.latency)
    sim.send_done.scatter_reduce_(0, out.send, arrive, reduce="amax")  # all targets at once, lost ones too
    refused = closed[out.recv]  # the receiver has stopped: refused, as a node's 503, so not sent
    sim.msgs_out.index_add_(0, out.send, -refused.long())
    sim.bytes_out.index_add_(0, out.send, -(nbytes * refused.long()))
    keep = ~refused
    lingering = (~training.index_select(0, out.send)) & keep  # sent after the sender's last step
    sim.linger_msgs += lingering.sum()
    sim.linger_bytes += (nbytes * lingering.long()).sum()
    if emu.loss:  # a lost message was sent (it counts), and is counted lost too
        lost = torch.rand(out.send.shape[0], generator=sim.gen, device=dev) < emu.loss
        sim.lost += (lost & keep).sum()
        keep &= ~lost
    new = Messages(out.recv, out.send, slot[out.which], seq[out.which], arrive, out.weight,
                   sim.step.index_select(0, out.send), nbytes).select(keep)
    return inflight.extend(new)


def _round_groups(sim: VectorizedSim, senders: torch.Tensor) -> list[tuple[Any, torch.Tensor]]:
    """(links, senders) per graph the senders send on: one group for a static topology; for a
    time-varying one a group per graph, since a node sends round s's message on graph s."""
    if not sim.time_varying:
        return [(sim.links_at.at(0), senders)]
    rounds = sim.step.index_select(0, senders)
    period = sim.schedule.period
    if period:  # rounds r and r + period share a graph: one group each (not one per round)
        rounds = rounds % period
    return [(sim.links_at.at(r), senders[rounds == r]) for r in torch.unique(rounds).tolist()]


def run_rounds(sim: VectorizedSim, writer: Callable[[dict[str, Any]], None]) -> None:
    """Round algorithms on the event clock: neighbour-local rounds.

    A node starts step s + 1 when its step s is done and, after a gossip round, when every
    in-neighbour's round-s message has arrived (the local cluster's ``_wait_for_round``); a
    gossip step's message goes out once the node's own previous send is done (one send at a
    time), and the next step starts after that. Delivery is lossless and every node merges
    exactly its in-neighbours' round-s messages, so the numbers are those of the sync schedule
    whatever the speeds and delays; only the clock differs: with ``out_i(s) = max(end_i(s),
    send_done_i(s-1))`` the moment node i's round-s message leaves,
    ``start_i(s+1) = max(out_i(s), max_j out_j(s) + delay_ji)``. Nodes are therefore advanced round
    by round, and a metric row after round r carries the time the last node finished it. (The
    cluster's bounded wait, ``timeout``, is not modelled: a neighbour is always waited for.)
    """
    cfg, emu, n, dev = sim.cfg, sim.emulation, sim.n, sim.device
    dur = emu.step_seconds(n, seed=cfg.seed).to(dev)
    start = torch.zeros(n, dtype=torch.float64, device=dev)
    send_done = torch.full((n,), -math.inf, dtype=torch.float64, device=dev)
    record(sim, writer, 0.0, node_rows=True)  # as the other async runs: the initial models too
    for r in range(1, cfg.steps + 1):
        sim.rounds(1)  # round r's messages went out on round r's links
        end = start + dur
        start = end
        links = sim.links_at.at(r)
        if r % cfg.gossip_every == 0 and links.send_col.numel():
            src, dst = links.send_src, links.send_col
            out = torch.maximum(end, send_done)  # the message waits for the previous send
            arrive = out[src] + delay(sim, src, dst, sim.msg_bytes, links.latency(emu, cfg.seed))
            start = out.scatter_reduce(0, dst, arrive, reduce="amax")  # the in-neighbours' messages
            send_done = out.scatter_reduce(0, src, arrive, reduce="amax")  # its own sends
        sim.sim_time = float(end.max())
        if r % cfg.eval_every == 0 or r == cfg.steps:
            sim.metric_point(writer, sim.sim_time)
        else:
            sim.tick()
