"""The picture of a method comparison (``comparison.png``): test scores, gains over the students trained alone and
validation curves, drawn so that differences read honestly.

- One colour per method in every panel and in every comparison (:func:`method_colors`: fixed by the preset
  registry, the students trained alone in grey, the teacher black), networks told apart by position and marker.
- Scores as points (mean over seeds, whiskers ± s.d., each seed a small dot), never bars cut off above 0: the score
  axis is zoomed to the data and the cut is marked on the axis and in its label; the gain axis always holds 0.
- Validation curves as the mean over seeds with a band from the lowest to the highest seed, one panel per network,
  integer epochs.
- One legend for the whole figure, below the panels, so it hides no data.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medkd.knowledge.routes import PRESETS
from medkd.tools.gains import Gain
from medkd.training.evaluators import METRICS, split_metric_name

__all__ = ["method_colors", "mean_band", "comparison_figure", "plot_comparison"]

ALONE = "student"  # the preset of the students trained alone: grey in every picture
ALONE_COLOR = "#7f7f7f"
TEACHER_COLOR = "black"
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
_LIGHT = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5")
_MARKERS = ("o", "s", "D", "^", "v", "P")  # one per network


def method_colors(methods: Sequence[str]) -> dict[str, str]:
    """A colour per method, the same in every panel and every comparison: the registry's presets each keep theirs
    (whatever subset is compared, in whatever order), ``student`` is grey, other names take the colours left over."""
    known = [p for p in PRESETS if p != ALONE]
    colors = {p: _PALETTE[i % len(_PALETTE)] for i, p in enumerate(known)}
    spare = [c for c in (*_PALETTE, *_LIGHT) if c not in colors.values()]
    result, extra = {}, 0
    for method in methods:
        if method == ALONE:
            result[method] = ALONE_COLOR
        elif method in colors:
            result[method] = colors[method]
        else:
            result[method] = spare[extra % len(spare)]
            extra += 1
    return result


def mean_band(runs: Sequence[Mapping[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Epochs, mean, lowest and highest value over the ``runs`` (each ``{epoch: value}``) at each epoch that any run
    validated (the mean of the runs that have it)."""
    epochs = sorted({e for run in runs for e in run})
    values = [[run[e] for run in runs if e in run] for e in epochs]
    return epochs, [statistics.mean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def _offsets(count: int, width: float = 0.8) -> list[float]:
    """x offsets of ``count`` methods side by side inside one network's slot."""
    step = width / max(count, 1)
    return [(i - (count - 1) / 2) * step for i in range(count)]


def _mark_cut(ax: Any) -> None:
    """Mark a score axis that does not start at 0: a break symbol at its foot."""
    kwargs = {"transform": ax.transAxes, "color": "black", "clip_on": False, "linewidth": 1}
    for dy in (-0.012, 0.012):
        ax.plot([-0.02, 0.02], [0.01 + dy - 0.01, 0.01 + dy + 0.01], **kwargs)


def _plot_scores(ax: Any, rows: Sequence[Mapping], metric: str, networks: list[str], methods: list[str]) -> None:
    """Per network and method: the mean test score over seeds (whiskers ± s.d.; each seed a dot); the teacher a line."""
    colors, offsets = method_colors(methods), _offsets(len(methods))
    for i, network in enumerate(networks):
        for method, dx in zip(methods, offsets, strict=True):
            values = [float(r[metric]) for r in rows if (r["preset"], r["network"]) == (method, network)]
            if not values:
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            ax.errorbar(i + dx, statistics.mean(values), yerr=spread or None, fmt=_MARKERS[i % len(_MARKERS)],
                        color=colors[method], markersize=7, capsize=3)  # fmt: skip
            ax.plot([i + dx] * len(values), values, ".", color=colors[method], markersize=3, alpha=0.5)
    for r in rows:
        if r["preset"] == "-":
            ax.axhline(float(r[metric]), color=TEACHER_COLOR, linestyle="--", linewidth=1)
            ax.annotate(f"teacher {float(r[metric]):.3f}", (1, float(r[metric])), xycoords=("axes fraction", "data"),
                        xytext=(-4, 3), textcoords="offset points", ha="right", fontsize=8)  # fmt: skip
    scores = [float(r[metric]) for r in rows if r.get(metric) not in (None, "")]
    margin = max(0.1 * (max(scores) - min(scores)), 0.005)
    low = max(0.0, min(scores) - margin)
    ax.set_ylim(low, max(scores) + margin)
    ax.set_ylabel(f"test {metric}" + (f" (axis cut: starts at {low:.2f})" if low > 0 else ""))
    if low > 0:
        _mark_cut(ax)
    ax.set_xticks(range(len(networks)), networks)
    ax.set_xlim(-0.5, len(networks) - 0.5)
    ax.set_title("test score: mean ± s.d. over seeds (dots: each seed)")


def _plot_gains(ax: Any, gains: Sequence[Gain], networks: list[str], methods: list[str]) -> None:
    """Per network and method: the mean gain over the student trained alone with its 95 % bootstrap interval; a
    hollow marker where the interval contains 0 (not shown)."""
    methods = [m for m in methods if m != ALONE]
    colors, offsets = method_colors(methods), _offsets(len(methods))
    for i, network in enumerate(networks):
        for method, dx in zip(methods, offsets, strict=True):
            gain = next((g for g in gains if (g.method, g.network) == (method, network)), None)
            if gain is None:
                continue
            low, high = gain.interval or (gain.mean, gain.mean)
            shown = gain.shown is True
            ax.errorbar(i + dx, gain.mean, yerr=[[gain.mean - low], [high - gain.mean]], fmt=_MARKERS[i % 6],
                        color=colors[method], markerfacecolor=colors[method] if shown else "white", markersize=7,
                        capsize=3)  # fmt: skip
    ax.axhline(0.0, color="black", linewidth=0.8)
    bottom, top = ax.get_ylim()
    ax.set_ylim(min(bottom, 0.0), max(top, 0.0))
    ax.set_xticks(range(len(networks)), networks)
    ax.set_xlim(-0.5, len(networks) - 0.5)
    ax.set_ylabel(f"gain in test {gains[0].metric}")
    ax.set_title("gain over the student alone, 95% CI (hollow: CI contains 0)")


def _histories(curves: Mapping[tuple[str, int], Path], network: str) -> dict[str, list[dict[int, float]]]:
    """Per method, each seed's validation curve of ``network`` (``{epoch: value}``)."""
    runs: dict[str, list[dict[int, float]]] = {}
    for (method, _seed), csv_path in sorted(curves.items()):
        with csv_path.open(newline="", encoding="utf-8") as f:
            history = list(csv.DictReader(f))
        names = history[0] if history else {}
        key = next((k for k in names if (split_metric_name(k) or ("", ""))[1] == network), None)
        if key:
            runs.setdefault(method, []).append({int(h["epoch"]): float(h[key]) for h in history if h[key] != ""})
    return runs


def _plot_curves(ax: Any, histories: Mapping[str, list[dict[int, float]]], network: str, methods: list[str]) -> None:
    """``network``'s validation curves (``histories``: per method, each seed's ``{epoch: value}``): per method the mean
    over seeds, a band from the lowest to the highest seed."""
    from matplotlib.ticker import MaxNLocator

    colors = method_colors(methods)
    for method, runs in histories.items():
        epochs, mean, low, high = mean_band(runs)
        color = colors.get(method, ALONE_COLOR)
        ax.plot(epochs, mean, color=color, linewidth=1.5, marker="o" if len(epochs) < 8 else None, markersize=3)
        if len(runs) > 1:
            ax.fill_between(epochs, low, high, color=color, alpha=0.2, linewidth=0)
    validated = sorted({e for runs in histories.values() for run in runs for e in run})
    if len(validated) <= 12:
        ax.set_xticks(validated)  # the epochs that were validated, and only those
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_title(f"validation, {network}: mean over seeds (band: lowest–highest)")


def _legend(fig: Any, methods: list[str], networks: list[str], teacher: bool) -> None:
    """One legend below the panels: a colour per method, a marker per network, the teacher's line."""
    from matplotlib.lines import Line2D

    colors = method_colors(methods)
    handles = [Line2D([], [], color=colors[m], marker="s", linestyle="-", label=m) for m in methods]
    for i, network in enumerate(networks):
        handles.append(Line2D([], [], color="black", marker=_MARKERS[i % 6], linestyle="", label=network))
    if teacher:
        handles.append(Line2D([], [], color=TEACHER_COLOR, linestyle="--", label="teacher"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 10), frameon=False, fontsize=9)


def comparison_figure(
    rows: Sequence[Mapping], curves: Mapping[tuple[str, int], Path], gains: Sequence[Gain] = ()
) -> Any:
    """The matplotlib figure of :func:`plot_comparison`: axes in the order scores, gains (where there are any),
    one validation panel per network that has curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next(m for m in METRICS if any(m in r for r in rows))
    networks = list(dict.fromkeys(str(r["network"]) for r in rows if r["preset"] != "-"))
    methods = list(dict.fromkeys(str(r["preset"]) for r in rows if r["preset"] != "-"))
    gains = [g for g in gains if g.metric == metric]
    histories = {n: _histories(curves, n) for n in networks}  # each history CSV read once per network
    curve_networks = [n for n in networks if any(histories[n].values())]
    top = 2 if gains else 1
    columns = max(top, len(curve_networks), 1)
    fig = plt.figure(figsize=(6.2 * columns, 9.4 if curve_networks else 5.0))
    grid = fig.add_gridspec(2 if curve_networks else 1, columns * top, left=0.06, right=0.98, top=0.94,
                            bottom=0.12 if curve_networks else 0.2, hspace=0.35, wspace=0.6)  # fmt: skip
    _plot_scores(fig.add_subplot(grid[0, :columns] if gains else grid[0, :]), rows, metric, networks, methods)
    if gains:
        _plot_gains(fig.add_subplot(grid[0, columns:]), gains, networks, methods)
    for i, network in enumerate(curve_networks):
        ax = fig.add_subplot(grid[1, i * top : (i + 1) * top])
        _plot_curves(ax, histories[network], network, methods)
        ax.set_ylabel(f"validation {metric}")
    _legend(fig, methods, networks, any(r["preset"] == "-" for r in rows))
    return fig


def plot_comparison(
    rows: Sequence[Mapping], curves: Mapping[tuple[str, int], Path], path: Path, gains: Sequence[Gain] = ()
) -> None:
    """Write ``path``: the test scores of every (method, network) over seeds, the ``gains`` over the students trained
    alone in the key metric (where there are any) and each network's validation ``curves`` (``{(preset, seed): its
    history CSV}``)."""
    import matplotlib.pyplot as plt

    fig = comparison_figure(rows, curves, gains)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
