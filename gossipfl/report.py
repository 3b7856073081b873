"""Compare run folders: a table of their summaries and convergence plots.

Works on any run folder of the contract (`config.toml`, `metrics.jsonl`, `summary.json`),
whichever engine wrote it, so runs of the local cluster and of the vectorised simulator can be
put side by side.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gossipfl.errors import ConfigError
from gossipfl.metrics import read_metrics

__all__ = ["Run", "check_plot_path", "comparison_table", "load_run", "parse_pivot", "pivot_table", "plot_runs",
           "seed_table", "to_target"]

# summary.json figures the table and `--detail` format as numbers (null allowed)
_SUMMARY_NUMBERS = ("mean_accuracy", "min_accuracy", "max_accuracy", "avg_model_accuracy", "consensus_distance",
                    "initial_consensus_distance", "messages", "bytes", "wall_seconds", "node_steps",
                    "consensus_rate", "predicted_rate", "staleness_mean", "staleness_max",
                    "honest_mean_accuracy", "honest_min_accuracy", "honest_consensus_distance", "attackers",
                    "clipped", "discarded", "lost", "linger_messages", "messages_per_node_step")
_NODE_NUMBERS = ("steps", "accuracy", "loss", "msgs_out", "msgs_in", "bytes_out")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclass(frozen=True)
class Run:
    """One run folder, loaded."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def label(self) -> str:
        c = self.config
        return f"{c.get('algorithm', '?')}/{c.get('topology', '?')}/{c.get('nodes', '?')}n ({self.path.name})"

    def cluster_series(self, key: str) -> tuple[list[float], list[float]]:
        """(t, value) of a cluster-level metric, skipping rows where it is missing."""
        pts = [(r["t"], r[key]) for r in self.rows
               if r.get("node") is None and _is_number(r.get("t")) and _is_number(r.get(key))]
        return [p[0] for p in pts], [p[1] for p in pts]


def load_run(path: str | Path) -> Run:
    """Read a run folder; a missing or corrupt file is a ConfigError naming it."""
    p = Path(path)
    try:
        summary = json.loads((p / "summary.json").read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"report: cannot read {p / 'summary.json'}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"report: {p / 'summary.json'} is not valid JSON: {exc}") from None
    _check_summary(summary, p / "summary.json")
    try:
        config = tomllib.loads((p / "config.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        config = {}  # the table still works from the summary alone
    try:
        rows = [r for r in read_metrics(p / "metrics.jsonl") if isinstance(r, dict)]
    except OSError:
        rows = []
    return Run(p, config, summary, rows)


def _check_summary(summary: Any, where: Path) -> None:
    """A summary the table can show: a JSON object whose figures are numbers or null."""
    if not isinstance(summary, dict):
        raise ConfigError(f"report: {where} is not a run summary (a JSON object), got a {type(summary).__name__}")
    rows: list[tuple[str, Any, tuple[str, ...]]] = [("", summary, _SUMMARY_NUMBERS)]
    per_node = summary.get("per_node", {})
    if not isinstance(per_node, dict) or not all(isinstance(r, dict) for r in per_node.values()):
        raise ConfigError(f"report: {where}: per_node must map node ids to objects")
    rows += [(f"per_node.{nid}.", row, _NODE_NUMBERS) for nid, row in per_node.items()]
    for prefix, row, keys in rows:
        for key in keys:
            v = row.get(key)
            if v is not None and not _is_number(v):
                raise ConfigError(f"report: {where}: {prefix}{key} is {v!r}, not a number")


def check_plot_path(path: str | Path) -> None:
    """Refuse a plot file whose suffix matplotlib cannot write (it would fail after the work is done)."""
    from matplotlib.backend_bases import FigureCanvasBase

    supported = FigureCanvasBase.get_supported_filetypes()
    if Path(path).suffix.lower().lstrip(".") not in supported:
        raise ConfigError(f"plot: cannot plot to {Path(path).name}: use one of .{', .'.join(sorted(supported))}")


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def comparison_table(runs: list[Run]) -> str:
    """One line per run: what it was, and where it ended. With attackers in any run, the honest
    nodes' mean and min accuracy and the attacker count get columns of their own."""
    attacked = any((r.summary.get("attackers") or 0) > 0 for r in runs)
    width = max([len("run"), *(len(r.label) for r in runs)]) + 2  # full names: seeds must read apart
    head = (f"{'run':<{width}}{'engine':>11}{'mean acc':>10}{'min acc':>9}"
            + (f"{'honest':>8}{'h. min':>8}{'att.':>5}" if attacked else "")
            + f"{'avg model':>10}{'consensus':>11}{'stale':>7}{'MB':>9}{'msg/step':>9}{'lost':>7}{'node-steps':>11}"
            f"{'wall s':>8}")
    lines = [head, "-" * len(head)]
    for r in runs:
        s = r.summary
        honest = (f"{_fmt(s.get('honest_mean_accuracy'), '.4f'):>8}{_fmt(s.get('honest_min_accuracy'), '.4f'):>8}"
                  f"{_fmt(s.get('attackers'), 'd'):>5}") if attacked else ""
        lines.append(
            f"{r.label:<{width}}{s.get('engine', '?'):>11}{_fmt(s.get('mean_accuracy'), '.4f'):>10}"
            f"{_fmt(s.get('min_accuracy'), '.4f'):>9}{honest}{_fmt(s.get('avg_model_accuracy'), '.4f'):>10}"
            f"{_fmt(s.get('consensus_distance'), '.2e'):>11}{_fmt(s.get('staleness_mean'), '.2f'):>7}"
            f"{_fmt((s.get('bytes') or 0) / 1e6, '.1f'):>9}{_fmt(s.get('messages_per_node_step'), '.2f'):>9}"
            f"{_fmt(s.get('lost'), '.0f'):>7}{_fmt(s.get('node_steps'), '.0f'):>11}"
            f"{_fmt(s.get('wall_seconds'), '.1f'):>8}"
        )
    return "\n".join(lines)


def parse_pivot(text: str) -> tuple[str, str]:
    """``--pivot ROW,COL``: two settings (dotted keys allowed, e.g. ``aggregator,attack.kind``)."""
    parts = [p.strip().replace("-", "_") for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"pivot: expected ROW,COL (two settings, e.g. aggregator,attack.kind), got {text!r}")
    return parts[0], parts[1]


def _setting(run: Run, key: str) -> str:
    from gossipfl.sweep import setting

    v = setting(run.config, key)
    if v is None and key == "attack.kind":
        return "none"  # no [attack] table
    if v is None and key == "aggregator":
        return str((run.config.get("algorithm_params") or {}).get("aggregator", "mean"))
    return "-" if v is None else str(v)


def pivot_table(runs: list[Run], rows: str, cols: str, value: str = "honest_mean_accuracy",
                low: str = "honest_min_accuracy", *, markdown: bool = False) -> str:
    """A ROW x COL table of ``value`` (and ``low`` in parentheses), each cell the mean over the
    runs (seeds) that share the two settings; the README's robustness table. ``markdown``: as a
    Markdown table, for a paper's draft or a README."""
    cells: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        cells.setdefault((_setting(r, rows), _setting(r, cols)), []).append(r)
    row_names = list(dict.fromkeys(k[0] for k in cells))
    col_names = list(dict.fromkeys(k[1] for k in cells))
    width = max(15, *(len(c) + 2 for c in col_names))
    first = max(len(rows), *(len(n) for n in row_names)) + 2
    seeds = max(len(v) for v in cells.values())

    def cell(key: tuple[str, str]) -> str:
        got = cells.get(key, [])
        vals = [r.summary.get(value) for r in got if _is_number(r.summary.get(value))]
        lows = [r.summary.get(low) for r in got if _is_number(r.summary.get(low))]
        if not vals:
            return "-"
        text = f"{sum(vals) / len(vals):.3f}"
        return text + (f" ({sum(lows) / len(lows):.3f})" if lows else "")

    title = f"{value} ({low}){f', mean of up to {seeds} runs per cell' if seeds > 1 else ''}: {rows} x {cols}"
    if markdown:
        lines = [f"| {rows} | " + " | ".join(col_names) + " |", "|---" * (len(col_names) + 1) + "|"]
        lines += [f"| `{n}` | " + " | ".join(cell((n, c)) for c in col_names) + " |" for n in row_names]
        return "\n".join(lines)
    head = f"{rows:<{first}}" + "".join(f"{c:>{width}}" for c in col_names)
    lines = [title, head, "-" * len(head)]
    lines += [f"{n:<{first}}" + "".join(f"{cell((n, c)):>{width}}" for c in col_names) for n in row_names]
    return "\n".join(lines)


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _groups(runs: list[Run]) -> tuple[list[str], dict[str, list[Run]]]:
    """Runs by configuration, seeds (and run folders) aside; the keys whose values differ between
    the configurations (what a label needs to tell them apart), and each group by its label."""
    flat = [{k: v for k, v in _flat(r.config).items() if k not in ("seed", "out")} for r in runs]
    keys = sorted({k for f in flat for k in f})
    varying = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    groups: dict[str, list[Run]] = {}
    for r, f in zip(runs, flat, strict=True):
        label = ", ".join(f"{k}={f.get(k)}" for k in varying) or "all runs"
        groups.setdefault(label, []).append(r)
    return varying, groups


def to_target(run: Run, target: float) -> tuple[float, float, float | None] | None:
    """(mean step, time, bytes sent) at the first metric point where the mean accuracy reached
    ``target``; None if it never did (bytes None for runs written before rows carried them)."""
    for row in run.rows:
        acc = row.get("mean_accuracy")
        if row.get("node") is None and _is_number(acc) and acc >= target:
            b = row.get("bytes")
            return float(row.get("mean_step", 0)), float(row.get("t", 0)), float(b) if _is_number(b) else None
    return None


def _mean_sd(values: list[float], spec: str = ".3f") -> str:
    if not values:
        return "-"
    m = sum(values) / len(values)
    if len(values) == 1:
        return format(m, spec)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{format(m, spec)} ± {format(sd, spec)}"


def seed_table(runs: list[Run], *, target: float | None = None, markdown: bool = False) -> str:
    """One line per configuration, seeds aggregated: final mean and min accuracy (mean ± sd over
    seeds), consensus distance, and with ``target`` the steps, time and MB sent until the mean
    accuracy first reached it (mean over the seeds that did, and how many did); the spectral gap
    of the mixing matrix (1 - SLEM, where the graph is fixed), messages per node-step, lost
    messages and staleness. Labels name only the settings that vary."""
    _, groups = _groups(runs)
    head = ["configuration", "seeds", "mean acc", "min acc", "consensus"]
    if target is not None:
        head += [f"steps to {target:g}", f"time to {target:g} (s)", f"MB to {target:g}"]
    head += ["gap", "msg/step", "lost", "stale"]
    rows = []
    for label, got in groups.items():
        s = [r.summary for r in got]

        def nums(key: str, summaries: list[dict[str, Any]] = s) -> list[float]:
            return [float(x[key]) for x in summaries if _is_number(x.get(key))]

        cons = nums("consensus_distance")
        line = [label, str(len(got)), _mean_sd(nums("mean_accuracy")), _mean_sd(nums("min_accuracy")),
                f"{sum(cons) / len(cons):.2e}" if cons else "-"]
        if target is not None:
            hits = [h for h in (to_target(r, target) for r in got) if h is not None]
            reached = "" if len(hits) == len(got) else f" ({len(hits)}/{len(got)})"
            mbs = [h[2] / 1e6 for h in hits if h[2] is not None]
            line += [(_mean_sd([h[0] for h in hits], ".0f") + reached) if hits else f"not reached (0/{len(got)})",
                     _mean_sd([h[1] for h in hits], ".2f") if hits else "-", _mean_sd(mbs, ".2f") if mbs else "-"]
        for key, spec in (("spectral_gap", ".3g"), ("messages_per_node_step", ".2f"), ("lost", ".0f"),
                          ("staleness_mean", ".2f")):
            vals = nums(key)
            line.append(format(sum(vals) / len(vals), spec) if vals else "-")
        rows.append(line)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(head)]
    fmt = [f"{{:<{w}}}" if k == 0 else f"{{:>{w}}}" for k, w in enumerate(widths)]
    lines = ["  ".join(f.format(h) for f, h in zip(fmt, head, strict=True))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(f.format(c) for f, c in zip(fmt, r, strict=True)) for r in rows]
    return "\n".join(lines)


def plot_runs(runs: list[Run], path: str | Path, *, x: str = "steps", band: str = "minmax") -> None:
    """`gossipfl.plots.plot_runs` (kept here for callers of the report module)."""
    from gossipfl.plots import plot_runs as plot

    plot(runs, path, x=x, band=band)
