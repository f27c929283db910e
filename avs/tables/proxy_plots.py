"""The proxy benchmark's plots (PNG, matplotlib's Agg canvas): methods per subset, the claims' paired
differences, latent KL over training."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from avs.errors import AVSError, ExitCode
from avs.tables.proxy import (
    LATENT_KL_FILE,
    METRIC_PROTOCOL,
    SPLIT,
    KLCurves,
    Results,
    Stats,
    cell_stats,
    cell_subsets,
    claim_differences,
)
from avs.tables.proxy_curves import VAL_CURVE
from avs.tables.proxy_report import cell_label, split_ceiling, table_cells
from avs.tables.render import METRIC_LABELS
from avs.tables.runs import TableError

KL_FLOOR = 1e-3  # nats: the linear range of the symlog axis never starts below this (smaller KL is collapsed)
DECADES = 2  # a KL axis whose values span this many decades above the floor is drawn symlog
SUBSET_STYLES = ("-", "--", ":", "-.")
MAX_COLUMNS = 3
VERDICT_COLOURS = {"holds": "tab:green", "reversed": "tab:red", "unresolved": "tab:gray"}


class PlotUnavailable(AVSError, ImportError, code=ExitCode.CONFIG):
    """matplotlib is not installed, so no plot can be drawn."""


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotUnavailable("plotting needs matplotlib: pip install -e .[plot]") from exc
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=150)
    return path


def _ci_span(s: Stats) -> list[list[float]]:
    """A Stats' 95% interval as matplotlib's asymmetric error-bar lengths around the mean."""
    return [[s.mean - s.lo], [s.hi - s.mean]]


# ----------------------------------------------------------------------------- methods
def _panel(ax: Any, protocol: DictConfig, results: Results, subset: str) -> None:
    """One subset: bars of the mean, 95% CI error bars, one dot per seed, the ceiling as a dashed line."""
    metric = str(protocol.metric)
    cells = [m for m in protocol.methods if subset in cell_subsets(protocol, m)]
    for x, cell in enumerate(cells):
        s = cell_stats(results, subset, cell, metric)
        if s.mean is None:
            continue
        ax.bar(x, s.mean, width=0.6, color=f"C{x}", alpha=0.6)
        if s.lo is not None:
            ax.errorbar(x, s.mean, yerr=_ci_span(s), color="black", capsize=4, lw=1)
        seeds = sorted(results.get((subset, cell), {}).items())
        offsets = [0.4 * (i / max(len(seeds) - 1, 1) - 0.5) for i in range(len(seeds))]
        ax.scatter([x + o for o in offsets], [v[metric] for _, v in seeds], s=12, color="black", zorder=3)
    ceiling = split_ceiling(protocol, subset)
    if ceiling is not None:
        ax.axhline(ceiling, ls="--", color="gray", lw=1, label=f"visual-only ceiling {ceiling:.1f}")
        ax.legend(loc="lower right", fontsize=7)
    ax.set_xticks(range(len(cells)), [cell_label(protocol, c) for c in cells], rotation=20, ha="right", fontsize=8)
    ax.set_title(subset.upper())


def plot_methods(results: Results, protocol: DictConfig, path: str | Path) -> Path:
    """PNG of the methods' mean test metric per subset (one panel each) with 95% CIs, seeds and the ceiling."""
    subsets = list(protocol.subsets)
    fig = _figure(3.2 + 2.4 * len(subsets), 3.6)
    axes = fig.subplots(1, len(subsets), sharey=True, squeeze=False)[0]
    for ax, subset in zip(axes, subsets):
        _panel(ax, protocol, results, subset)
    label = METRIC_LABELS.get(str(protocol.metric), str(protocol.metric))
    axes[0].set_ylabel(f"{SPLIT} {label} (%), {METRIC_PROTOCOL}")
    return _save(fig, path)


# ----------------------------------------------------------------------------- claims
def plot_claims(results: Results, protocol: DictConfig, path: str | Path) -> Path:
    """PNG of every claim's paired difference a - b (one row per claim and subset, in protocol order).

    A row is the mean difference with its 95% t-interval, one dot per seed's difference, and the verdict
    as its colour (holds / reversed / unresolved); 0 is the dashed line. Claims without a paired seed are
    left out; raises TableError when no claim has one.
    """
    rows = [c for c in claim_differences(protocol, results) if c.stats.mean is not None]
    if not rows:
        raise TableError("no claim has a seed finished in both of its cells: no difference to plot")
    fig = _figure(6.4, 0.9 + 0.3 * len(rows))
    ax = fig.subplots()
    for y, c in enumerate(rows):
        colour = VERDICT_COLOURS[c.verdict]
        ax.scatter(c.differences, [y] * len(c.differences), s=10, color=colour, alpha=0.5, lw=0)
        if c.stats.lo is not None:
            ax.errorbar(c.stats.mean, y, xerr=_ci_span(c.stats), color=colour, capsize=3, lw=1.2)
        ax.scatter([c.stats.mean], [y], s=28, color=colour, marker="D", zorder=3)
    ax.axvline(0.0, ls="--", color="black", lw=0.8)
    labels = [f"{c.name}, {c.subset.upper()} (n={c.stats.n})" for c in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the first claim on top
    metric = METRIC_LABELS.get(str(protocol.metric), str(protocol.metric))
    ax.set_xlabel(f"a − b, {SPLIT} {metric} points ({METRIC_PROTOCOL}); mean, 95% interval, seeds", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=col, marker="D", ls="", label=v) for v, col in VERDICT_COLOURS.items()]
    fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), fontsize=7)
    return _save(fig, path)


# ----------------------------------------------------------------------------- latent KL over training
def mean_band(runs: dict[int, dict[str, list[tuple[int, float]]]], code: str) -> list[tuple[int, float, float, float]]:
    """(step, mean, min, max) over the seeds that reached each step, for one code's KL curve."""
    by_step: dict[int, list[float]] = {}
    for curve in runs.values():
        for step, value in curve.get(code, []):
            by_step.setdefault(step, []).append(value)
    return [(s, statistics.fmean(v), min(v), max(v)) for s, v in sorted(by_step.items())]


def _kl_scale(ax: Any, values: list[float]) -> None:
    """symlog y when the positive values span DECADES decades (0 happens: a collapsed code), else linear."""
    positive = [v for v in values if v > 0]
    if not positive:
        return
    floor = max(min(positive), KL_FLOOR)
    if max(positive) / floor >= 10**DECADES:
        ax.set_yscale("symlog", linthresh=10 ** math.floor(math.log10(floor)))


def _kl_panel(ax: Any, curves: KLCurves, subsets: list[str], cell: str, codes: list[str]) -> None:
    values: list[float] = []
    for subset, style in zip(subsets, SUBSET_STYLES * len(subsets)):
        runs = curves.get((subset, cell)) or {}
        for i, code in enumerate(codes):
            band = mean_band(runs, code)
            if not band:
                continue
            steps, mean, lo, hi = (list(col) for col in zip(*band))
            ax.plot(steps, mean, color=f"C{i}", ls=style, lw=1.2)
            if len(runs) > 1:
                ax.fill_between(steps, lo, hi, color=f"C{i}", alpha=0.15, lw=0)
            values += lo + hi
    _kl_scale(ax, values)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("optimizer step", fontsize=8)
    ax.tick_params(labelsize=7)


def _kl_legend(fig: Any, subsets: list[str], codes: list[str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=f"C{i}", label=code) for i, code in enumerate(codes)]
    if len(subsets) > 1:
        styles = SUBSET_STYLES * len(subsets)
        handles += [Line2D([], [], color="black", ls=st, label=s.upper()) for s, st in zip(subsets, styles)]
    fig.legend(handles=handles, loc="outside right upper", fontsize=7)


def plot_latent_kl(curves: KLCurves, protocol: DictConfig, path: str | Path) -> Path:
    """PNG of the KL on val (nats, summed over dimensions) over training, one panel per latent cell.

    `curves`: `avs.tables.proxy_curves.load_kl_curves`. One colour per code, one line style per subset; a line
    is the mean over the seeds, its band the min-max. A panel's y axis is symlog when its values span
    decades. Raises TableError when no finished run has a latent_kl.jsonl.
    """
    subsets = [str(s) for s in protocol.subsets]
    cells = [c for c in table_cells(protocol) if any((s, c) in curves for s in subsets)]
    if not cells:
        raise TableError(f"no finished run has a {LATENT_KL_FILE}: no KL curve to plot")
    codes: dict[str, None] = {}
    for runs in curves.values():
        for curve in runs.values():
            codes.update(dict.fromkeys(curve))
    cols = min(len(cells), MAX_COLUMNS)
    rows = math.ceil(len(cells) / cols)
    fig = _figure(1.2 + 3.0 * cols, 0.4 + 2.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, cell in zip(axes, cells):
        _kl_panel(ax, curves, subsets, cell, list(codes))
        ax.set_title(cell_label(protocol, cell), fontsize=9)
    for ax in axes[len(cells) :]:
        ax.set_visible(False)
    for row in range(rows):
        axes[row * cols].set_ylabel("KL on val (nats)", fontsize=8)
    _kl_legend(fig, subsets, list(codes))
    return _save(fig, path)


# ----------------------------------------------------------------------------- val curves
def plot_val_curves(curves: KLCurves, protocol: DictConfig, path: str | Path) -> Path:
    """PNG of the val mIoU over training, one panel per subset, with the subset's visual-only ceiling on val.

    `curves`: `avs.tables.proxy_curves.load_curves(..., "val")`. One colour per cell of the methods table (or
    every cell when the protocol names no methods); a method's `<method>_no_audio` cell is drawn in the
    method's colour, dashed. A line is the mean over the seeds, its band the min-max. Raises TableError
    when no finished run has a val curve.
    """
    subsets = [str(s) for s in protocol.subsets if any((str(s), c) in curves for c in protocol.cells)]
    if not subsets:
        raise TableError("no finished run has a val curve (metrics.json history, or `curves` in the results lines)")
    lines = _curve_cells(protocol)
    fig = _figure(1.6 + 3.6 * len(subsets), 3.2)
    axes = fig.subplots(1, len(subsets), squeeze=False).ravel()
    drawn: dict[str, tuple[str, str]] = {}
    for ax, subset in zip(axes, subsets):
        for cell, (colour, style) in lines.items():
            band = mean_band(curves.get((subset, cell)) or {}, VAL_CURVE)
            if not band:
                continue
            steps, mean, lo, hi = (list(col) for col in zip(*band))
            ax.plot(steps, mean, color=colour, ls=style, lw=1.2)
            if len(curves[(subset, cell)]) > 1:
                ax.fill_between(steps, lo, hi, color=colour, alpha=0.12, lw=0)
            drawn[cell] = (colour, style)
        ceiling = split_ceiling(protocol, subset, "val")  # the curves are val readings
        if ceiling is not None:
            ax.axhline(ceiling, color="black", lw=0.8, ls=":")
        ax.set_title(subset.upper(), fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("val mIoU (%), mean and min-max over seeds", fontsize=8)
    _curve_legend(fig, protocol, drawn, any(split_ceiling(protocol, s, "val") is not None for s in subsets))
    return _save(fig, path)


def _curve_cells(protocol: DictConfig) -> dict[str, tuple[str, str]]:
    """cell -> (colour, line style): the methods and their no-audio cells, else every cell."""
    methods = [str(m) for m in protocol.methods] or [str(c) for c in protocol.cells]
    out: dict[str, tuple[str, str]] = {}
    for i, method in enumerate(methods):
        out[method] = (f"C{i}", "-")
        if f"{method}_no_audio" in protocol.cells:
            out[f"{method}_no_audio"] = (f"C{i}", "--")
    return out


def _curve_legend(fig: Any, protocol: DictConfig, drawn: dict[str, tuple[str, str]], ceiling: bool) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, ls=st, label=cell_label(protocol, cell)) for cell, (c, st) in drawn.items()]
    if ceiling:
        handles.append(Line2D([], [], color="black", ls=":", lw=0.8, label="visual-only ceiling (val)"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=7)
