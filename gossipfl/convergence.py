"""How fast the models agree: the consensus-rate measurement every engine reports, written once.

A run of pure averaging (``averaging``, push-sum without training, ...) contracts the consensus
distance d(t) = (1/N) sum_i |x_i(t) - x_bar|^2 by rho^2 per mixing round asymptotically, rho =
|W - J|_2 (the second largest singular value of the mixing matrix; ``predicted_rate`` = rho^2).
Early on, faster modes still contribute (the transient); late, the float rounding of the models
sets a floor of about (eps |x|)^2. So the measured ``consensus_rate`` fits log d(t) against t
only over the asymptotic window:

- the floor is ``d(0) * (FLOOR_ULPS * eps)^2`` for the models' dtype (float32: 5.8e-11 of the
  start); points within a factor ``FLOOR_MARGIN`` of it are left out;
- of the points above that, the later half (in t) is kept: past the transient of modes faster
  than rho (the measurement needs them gone: on a 64-node ring that takes some 200 rounds);
- ``consensus_rate_fit`` is exp(slope) of the least-squares line through log d over the window;
- ``consensus_rate`` removes what is left of the transient: the per-round ratios
  r_t = d(t+1) / d(t) tend to rho^2 as rho^2 + c q^t (q: the next mode's share), and Aitken's
  delta-squared extrapolation of the last three, r - (dr)^2 / d2r, cancels that term. Where the
  ratios are already constant (no transient left), or the points are not evenly spaced, or the
  extrapolation leaves [0, 1], it is the fit. Measured on pure averaging in float32 after 60
  rounds: within 0.2 % of rho^2 on rings, tori, hypercubes and exponential graphs of 16 and 64
  nodes, where the plain fit is 1-3 % off on the 64-node ring and the exponential graphs (their
  second and third modes are close, and the float floor comes first).

The lock-step engines record d(t) after every mixing round (t counts merges: in the lock-step
schedule round 1 has nothing to merge, so K steps make K - 1 mixings), so the figure does not
depend on ``steps`` or ``eval_every``; the asynchronous schedule fits over its metric points
against the mean step. Also reported: ``consensus_rounds_to_1e-3`` and ``_1e-6`` (the first t with
d(t) <= 1e-3 d(0), resp. 1e-6 d(0)); ``consensus_floor_after`` (the first t at the floor); and
``consensus_exact_after`` = k when the distance reached the floor before any rate could be
measured (two points above the floor): exact averaging after k rounds, as on the complete graph
with uniform weights (rate 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["FLOOR_MARGIN", "FLOOR_ULPS", "consensus_summary", "floor_of"]

FLOOR_ULPS = 64.0  # the floor: d(0) (FLOOR_ULPS eps)^2
FLOOR_MARGIN = 100.0  # fitted points lie at least this factor above the floor


def floor_of(d0: float, eps: float) -> float:
    """The consensus distance below which a run of models with machine epsilon ``eps`` reads as agreed."""
    return d0 * (FLOOR_ULPS * eps) ** 2


def _t(t: float) -> float | int:
    return int(t) if float(t).is_integer() else t


def _fit(points: Sequence[tuple[float, float]]) -> float:
    xs = [t for t, _ in points]
    ys = [math.log(d) for _, d in points]
    xm, ym = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - xm) ** 2 for x in xs)
    return math.exp(sum((x - xm) * (y - ym) for x, y in zip(xs, ys, strict=True)) / sxx)


def _extrapolated(points: Sequence[tuple[float, float]]) -> float | None:
    """Aitken's delta-squared limit of the last three per-unit-t ratios (None: not applicable)."""
    last = points[-4:]
    if len(last) < 4:
        return None
    gaps = [b[0] - a[0] for a, b in zip(last, last[1:], strict=False)]
    if max(gaps) - min(gaps) > 1e-9 * max(gaps) or gaps[0] <= 0:
        return None
    r = [(b[1] / a[1]) ** (1.0 / gaps[0]) for a, b in zip(last, last[1:], strict=False)]
    d1, d2 = r[2] - r[1], r[2] - 2.0 * r[1] + r[0]
    if abs(d2) <= 1e-6 * r[2]:  # constant ratios: nothing left to extrapolate
        return None
    limit = r[2] - d1 * d1 / d2
    return limit if 0.0 <= limit <= 1.0 else None


def consensus_summary(points: Sequence[tuple[float, float]], *, eps: float,
                      predicted: float | None = None) -> dict[str, Any]:
    """The consensus-rate figures of a run from its (t, d(t)) points, t ascending from the start
    (module docstring); ``eps``: the models' machine epsilon; ``predicted``: rho^2, if known."""
    out: dict[str, Any] = {}
    if predicted is not None:
        out["predicted_rate"] = predicted
    pts: list[tuple[float, float]] = []
    for t, d in points:
        if d is None or not math.isfinite(d):
            continue
        if pts and float(t) <= pts[-1][0]:  # a repeated time (e.g. the last metric point twice): the newest
            pts.pop()
        pts.append((float(t), float(d)))
    if len(pts) < 2 or pts[0][1] <= 0:
        return out
    t0, d0 = pts[0]
    floor = floor_of(d0, eps)
    for share in (1e-3, 1e-6):
        hit = next((t for t, d in pts if d <= share * d0), None)
        out[f"consensus_rounds_to_{share:.0e}".replace("e-0", "e-")] = None if hit is None else _t(hit - t0)
    at_floor = next((t for t, d in pts if d <= floor), None)
    out["consensus_floor_after"] = None if at_floor is None else _t(at_floor - t0)
    above = [(t, d) for t, d in pts if d > FLOOR_MARGIN * floor]
    above = above[:next((k for k, (t, _) in enumerate(above) if at_floor is not None and t > at_floor), len(above))]
    if len(above) < 3 and at_floor is not None:  # agreed before a rate could be seen: exact averaging
        out["consensus_rate"] = 0.0
        out["consensus_exact_after"] = _t(at_floor - t0)
        return out
    if len(above) < 2:
        return out
    half = above[0][0] + (above[-1][0] - above[0][0]) / 2
    window = [p for p in above if p[0] >= half]
    if len(window) < 2:
        window = above[-2:]
    fit = _fit(window)
    out["consensus_rate"] = _extrapolated(above) or fit
    out["consensus_rate_fit"] = fit
    out["consensus_rate_window"] = [_t(window[0][0] - t0), _t(window[-1][0] - t0)]
    out["consensus_exact_after"] = None
    return out
