"""Convergence plots of run folders, for a paper: one curve per configuration (seeds averaged,
their min-max as a band), against local steps, time or bytes sent, and the consensus distance on
a log scale beside the rho^2-per-round line that the mixing matrix predicts (pure averaging)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from gossipfl.errors import ConfigError

__all__ = ["X_AXES", "plot_runs"]

X_AXES = {
    "steps": ("mean_step", "local steps per node (mean over nodes)", 1.0),
    "time": ("t", "time (s; simulated seconds in the vectorised engine)", 1.0),
    "bytes": ("bytes", "MB sent by all nodes", 1e-6),
}
_PANELS = [("mean_accuracy", "mean node accuracy", "accuracy"),
           ("avg_model_accuracy", "accuracy of the averaged model", "accuracy"),
           ("consensus_distance", "consensus distance (log scale)", "mean |x_i - mean x|^2")]
_STYLES = ["-", "--", ":", "-."]


def _series(run: Any, xkey: str, key: str, scale: float) -> tuple[np.ndarray, np.ndarray]:
    pts = [(float(r[xkey]) * scale, float(r[key])) for r in run.rows if r.get("node") is None
           and isinstance(r.get(xkey), int | float) and isinstance(r.get(key), int | float)]
    pts.sort()
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


BANDS = {"minmax": "min to max", "sd": "mean ± 1 sd", "ci95": "95 % confidence interval of the mean", "none": ""}
"""What the band around a configuration's mean curve spans, over its seeds."""


def _band(runs: list[Any], xkey: str, key: str, scale: float,
          band: str = "minmax") -> tuple[np.ndarray, ...] | None:
    """The seeds' mean and the band's two edges (`BANDS`) on the first seed's x points (the others
    interpolated). ci95: mean ± t(0.975, n-1) sd / sqrt(n), Student's t for a few seeds."""
    series = [s for s in (_series(r, xkey, key, scale) for r in runs) if len(s[0])]
    if not series:
        return None
    xs = series[0][0]
    xs = xs[xs <= min(s[0][-1] for s in series)]  # where every seed has data
    ys = np.stack([np.interp(xs, sx, sy) for sx, sy in series])
    mean = ys.mean(0)
    if band in ("sd", "ci95") and len(ys) > 1:
        half = ys.std(0, ddof=1)
        if band == "ci95":
            from scipy.stats import t

            half = half * float(t.ppf(0.975, len(ys) - 1)) / math.sqrt(len(ys))
        return xs, mean, mean - half, mean + half
    return xs, mean, ys.min(0), ys.max(0)


_MARKERS = [None, "o", "^", "s", "D"]


def _short(label: str) -> str:
    """``nodes=64, partition=iid, topology=ring`` -> ``ring, 64 nodes, iid``: values only, the
    usual keys in a reader's order, the others as key=value."""
    parts = dict(p.split("=", 1) for p in label.split(", ") if "=" in p)
    if not parts:
        return label
    out = [parts.pop("topology")] if "topology" in parts else []
    out += [f"{parts.pop('algorithm')}"] if "algorithm" in parts else []
    out += [f"{parts.pop('nodes')} nodes"] if "nodes" in parts else []
    out += [parts.pop("partition")] if "partition" in parts else []
    return ", ".join(out + [f"{k}={v}" for k, v in parts.items()])


def _encodings(varying: list[str], groups: dict[str, list[Any]]) -> dict[str, tuple[int, str, str | None]]:
    """Colour, line style and marker per configuration, each from one setting: colour from the one
    with the most values (up to 10), then line style, then marker; so a reader sees the structure
    (e.g. colour = topology, dashes = data split). Empty when that does not tell them apart."""
    values: dict[str, list[str]] = {}
    for label in groups:
        for part in label.split(", "):
            k, _, v = part.partition("=")
            values.setdefault(k, [])
            if v not in values[k]:
                values[k].append(v)
    keys = sorted((k for k in varying if k in values), key=lambda k: -len(values[k]))
    limits = [10, len(_STYLES), len(_MARKERS)]
    if len(keys) > 3 or any(len(values[k]) > lim for k, lim in zip(keys, limits, strict=False)):
        return {}
    out = {}
    for label in groups:
        got = dict(part.split("=", 1) for part in label.split(", ") if "=" in part)
        idx = [values[k].index(got[k]) for k in keys] + [0, 0, 0]
        out[label] = (idx[0], _STYLES[idx[1]], _MARKERS[idx[2]])
    return out


def plot_runs(runs: list[Any], path: str | Path, *, x: str = "steps", band: str = "minmax") -> None:
    """Three panels (mean accuracy, averaged-model accuracy, consensus distance) against ``x``:
    ``steps``, ``time`` or ``bytes``; up to 40 configurations tell apart (10 colours x 4 line
    styles); the legend, below the panels, names only the settings that differ."""
    from matplotlib.figure import Figure

    from gossipfl.report import _groups, check_plot_path

    if x not in X_AXES:
        raise ConfigError(f"x: expected one of {', '.join(X_AXES)}, got {x!r}")
    if band not in BANDS:
        raise ConfigError(f"band: expected one of {', '.join(BANDS)}, got {band!r}")
    check_plot_path(path)
    xkey, xlabel, scale = X_AXES[x]
    varying, groups = _groups(runs)
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    styles = _encodings(varying, groups)
    seeds = sorted({len(got) for got in groups.values()})
    theory_drawn = False
    for gi, (label, got) in enumerate(groups.items()):
        colour, style, marker = styles.get(label, (gi % 10, _STYLES[(gi // 10) % len(_STYLES)], None))
        colour = palette(colour)
        for ax, (key, _, _) in zip(axes, _PANELS, strict=True):
            curve = _band(got, xkey, key, scale, band)
            if curve is None:
                continue
            xs, mean, lo, hi = curve
            ax.plot(xs, mean, color=colour, linestyle=style, linewidth=1.6, label=_short(label), marker=marker,
                    markevery=max(1, len(xs) // 8), markersize=4)
            if len(got) > 1 and band != "none":
                if key == "consensus_distance":  # a log axis: a lower edge at or below 0 is off the chart
                    lo = np.where(lo > 0, lo, np.nan)
                ax.fill_between(xs, lo, hi, color=colour, alpha=0.15, linewidth=0)
            rate = got[0].summary.get("predicted_rate")
            if key == "consensus_distance" and x == "steps" and isinstance(rate, float) and 0 < rate < 1 \
                    and len(xs) > 1 and mean.min() > 0:
                # through the measured curve past the transient and above the float floor (its
                # slope is what theory predicts, not its height), drawn over the measured range
                above = np.nonzero(mean > 1e4 * mean.min())[0]
                at = int(above[-1]) if len(above) and above[-1] > 0 else len(xs) // 2
                theory = mean[at] * rate ** (xs - xs[at])
                keep = (theory >= mean.min() / 10) & (theory <= mean.max() * 10)
                ax.plot(xs[keep], theory[keep], color=colour, linestyle=(0, (1, 2)), linewidth=1.2,
                        label=None if theory_drawn else "theory: slope rho^2 per round (dotted)")
                theory_drawn = True
    for ax, (key, title, ylabel) in zip(axes, _PANELS, strict=True):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if key == "consensus_distance":
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1)
    handles, labels = [], []
    for ax in axes:  # every curve once (the theory line is in the consensus panel only)
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        ncols = min(4, len(handles))
        what = f", band: {BANDS[band]}" if band != "none" else ""
        title = (f"mean of {seeds[0]} seeds{what}" if seeds == [max(seeds)] and seeds[0] > 1
                 else f"mean over seeds{what}" if max(seeds) > 1 else None)
        fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=9, frameon=False,
                   title=title, title_fontsize=9)
        fig.set_figheight(4.6 + 0.22 * math.ceil(len(handles) / ncols) + (0.25 if title else 0))
    fig.savefig(path, dpi=130)
