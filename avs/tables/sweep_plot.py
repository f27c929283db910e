"""The plot of any sweep (`scripts/tables.py <dirs> --plot out.png`): a metric against the swept key(s),
one panel per subset, one dot per run (seed), the mean and its 95% t-interval (as the proxy plots)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from avs.tables.build import ResultTable, TableRow
from avs.tables.proxy import describe
from avs.tables.proxy_plots import _ci_span, _figure, _save
from avs.tables.render import METRIC_LABELS
from avs.tables.runs import TableError


def _numeric_axis(table: ResultTable) -> bool:
    """One swept key whose values are all numbers: the x axis is that number, else one slot per row."""
    if len(table.keys) != 1:
        return False
    vals = [row.values.get(table.keys[0]) for row in table.rows]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)


def _label(row: TableRow, keys: list[str]) -> str:
    return ", ".join(str(row.values.get(k)) for k in keys)


def _panel(ax: Any, table: ResultTable, subset: str, metric: str, numeric: bool) -> None:
    """One subset: per row, its runs as dots, the mean as a bar marker with the 95% interval."""
    xs = [float(row.values[table.keys[0]]) if numeric else float(i) for i, row in enumerate(table.rows)]
    spread = (max(xs) - min(xs)) / max(len(xs) - 1, 1) if len(xs) > 1 else 1.0
    for x, row in zip(xs, table.rows):
        cell = row.cells.get((subset, metric))
        if cell is None:
            continue
        n = len(cell.values)
        jitter = [0.15 * spread * (i / max(n - 1, 1) - 0.5) for i in range(n)]
        ax.scatter([x + j for j in jitter], cell.values, s=14, color="C0", alpha=0.7, zorder=3)
        stats = describe(cell.values)
        ax.plot([x], [stats.mean], marker="_", markersize=16, color="black", zorder=4)
        if stats.lo is not None:
            ax.errorbar(x, stats.mean, yerr=_ci_span(stats), color="black", capsize=4, lw=1, zorder=4)
    if numeric:
        ax.set_xticks(xs)
    else:
        ax.set_xticks(xs, [_label(row, table.keys) for row in table.rows], rotation=30, ha="right")
    ax.set_title(subset.upper())
    ax.set_xlabel(" / ".join(table.keys))
    ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (%)")
    ax.grid(axis="y", alpha=0.3)


def plot_sweep(table: ResultTable, path: str | Path, metric: str | None = None) -> Path:
    """PNG of `metric` (default the table's first) against the table's row keys, one panel per subset."""
    metric = metric or table.metrics[0]
    if metric not in table.metrics:
        raise TableError(f"--plot: metric {metric!r} is not in the table (has {table.metrics})")
    if not table.rows:
        raise TableError("--plot: the table has no rows")
    numeric = _numeric_axis(table)
    width = max(4.0, 0.8 * len(table.rows) + 2.0)
    fig = _figure(width * len(table.subsets), 3.6)
    axes = fig.subplots(1, len(table.subsets), squeeze=False)[0]
    for ax, subset in zip(axes, table.subsets):
        _panel(ax, table, subset, metric, numeric)
    fig.suptitle(f"{table.title}: dots = runs, bar = mean with 95% interval", fontsize=9)
    return _save(fig, path)
