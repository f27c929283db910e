"""The proxy benchmark report: four markdown tables (methods, claims, latent, targets), their csv files, a plot."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from avs.errors import AVSError, ExitCode
from avs.tables.proxy import (
    METRIC_PROTOCOL,
    SPLIT,
    Results,
    Stats,
    cell_stats,
    cell_subsets,
    check_targets,
    claim_differences,
    missing_runs,
)
from avs.tables.render import METRIC_LABELS
from avs.utils.io import atomic_write_text

CEILING_ROW = "visual-only ceiling"
DASH = "–"
REPORT_FILES = {
    "md": "proxy_report.md",
    "methods": "proxy_methods.csv",
    "claims": "proxy_claims.csv",
    "latent": "proxy_latent.csv",
    "targets": "proxy_targets.csv",
}


class PlotUnavailable(AVSError, ImportError, code=ExitCode.CONFIG):
    """matplotlib is not installed, so no plot can be drawn."""


def _f(v: float | None, fmt: str = ".2f") -> str:
    if v is None:
        return DASH
    text = format(v, fmt)
    return format(0.0, fmt) if float(text) == 0 else text  # no "-0.00" for a difference that rounds to 0


def _pm(s: Stats, fmt: str = ".2f") -> str:
    if s.mean is None:
        return DASH
    return _f(s.mean, fmt) if s.std is None else f"{_f(s.mean, fmt)} ± {_f(s.std, fmt)}"


def _ci(s: Stats, fmt: str = ".2f") -> str:
    return DASH if s.lo is None else f"[{_f(s.lo, fmt)}, {_f(s.hi, fmt)}]"


def _md(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if v is None else (round(v, 4) if isinstance(v, float) else v) for v in row])
    return buf.getvalue()


def _label(protocol: DictConfig, cell: str) -> str:
    return str(protocol.cells[cell].get("label") or cell)


def table_cells(protocol: DictConfig) -> list[str]:
    """Rows of the methods table: the methods first, then every other cell in protocol order."""
    methods = [str(m) for m in protocol.methods]
    return methods + [str(c) for c in protocol.cells if c not in methods]


def _metrics(protocol: DictConfig) -> tuple[str, str]:
    """(primary metric, the second metric shown): mIoU and F, or the other way round."""
    primary = str(protocol.metric)
    return primary, "fscore" if primary != "fscore" else "miou"


def _ceiling(protocol: DictConfig, subset: str) -> float | None:
    value = (protocol.ceilings.get(subset) or {}).get(SPLIT)
    return None if value is None else float(value)


# ----------------------------------------------------------------------------- methods table
def methods_rows(protocol: DictConfig, results: Results) -> list[list[Any]]:
    """Long-format rows [cell, label, subset, n, n_expected, mean, std, lo, hi, min, second mean, missing seeds]."""
    primary, second = _metrics(protocol)
    rows = []
    for cell in table_cells(protocol):
        for subset in cell_subsets(protocol, cell):
            s = cell_stats(results, subset, cell, primary)
            f = cell_stats(results, subset, cell, second)
            missing = [k for k in protocol.seeds if k not in results.get((subset, cell), {})]
            row = [cell, _label(protocol, cell), subset, s.n, len(protocol.seeds), s.mean, s.std, s.lo, s.hi, s.min]
            rows.append(row + [f.mean, " ".join(map(str, missing))])
    for subset in protocol.subsets:
        rows.append([CEILING_ROW, CEILING_ROW, subset, None, None, _ceiling(protocol, subset)] + [None] * 6)
    return rows


def _methods_markdown(protocol: DictConfig, results: Results) -> list[str]:
    primary, second = _metrics(protocol)
    p_label, s_label = METRIC_LABELS.get(primary, primary), METRIC_LABELS.get(second, second)
    header = ["cell"]
    for subset in protocol.subsets:
        up = subset.upper()
        header += [f"{up} {p_label}", f"{up} 95% CI", f"{up} {s_label}", f"{up} n", f"{up} min seed"]
    rows = []
    for cell in table_cells(protocol):
        row = [_label(protocol, cell)]
        for subset in protocol.subsets:
            if subset not in cell_subsets(protocol, cell):
                row += [DASH] * 5
                continue
            s = cell_stats(results, subset, cell, primary)
            n = str(s.n) if s.n == len(protocol.seeds) else f"{s.n}/{len(protocol.seeds)}"
            row += [_pm(s), _ci(s), _f(cell_stats(results, subset, cell, second).mean), n, _f(s.min)]
        rows.append(row)
    ceiling = [f"{CEILING_ROW} ({SPLIT})"]
    for subset in protocol.subsets:
        ceiling += [_f(_ceiling(protocol, subset))] + [""] * 4
    lines = [f"### Methods: {SPLIT} {p_label} ({METRIC_PROTOCOL}, %), mean ± sample std over seeds", ""]
    lines += _md(header, rows + [ceiling])
    gone = missing_runs(protocol, results)
    if gone:
        where = "; ".join(f"{s}/{c} seed {k}" for s, c, k in gone)
        runs = "run" if len(gone) == 1 else "runs"
        lines += ["", f"Missing ({len(gone)} {runs} without {SPLIT} metrics, not finished or not tested): {where}."]
    return lines


# ----------------------------------------------------------------------------- claims, latent, targets
def claims_rows(protocol: DictConfig, results: Results) -> list[list[Any]]:
    """[claim, a, b, subset, n, mean, std, lo, hi, verdict] per claim and subset."""
    return [
        [c.name, c.a, c.b, c.subset, c.stats.n, c.stats.mean, c.stats.std, c.stats.lo, c.stats.hi, c.verdict]
        for c in claim_differences(protocol, results)
    ]


def latent_rows(protocol: DictConfig, results: Results) -> list[list[Any]]:
    """[cell, subset, n_kl, kl mean, kl std, n_auroc, auroc mean, auroc std] for cells that have KL or AUROC."""
    rows = []
    for cell in table_cells(protocol):
        for subset in cell_subsets(protocol, cell):
            kl, auroc = cell_stats(results, subset, cell, "kl"), cell_stats(results, subset, cell, "auroc")
            if kl.n or auroc.n:
                rows.append([cell, subset, kl.n, kl.mean, kl.std, auroc.n, auroc.mean, auroc.std])
    return rows


def to_markdown(protocol: DictConfig, results: Results) -> str:
    """The four tables (methods, claims, latent, targets) as one markdown text."""
    lines = _methods_markdown(protocol, results)
    p_label = METRIC_LABELS.get(str(protocol.metric), str(protocol.metric))
    claims = [
        [name, subset.upper(), f"{_f(mean, '+.2f')} {_ci(Stats(n, mean, std, lo, hi), '+.2f')}", n, word]
        for name, _, _, subset, n, mean, std, lo, hi, word in claims_rows(protocol, results)
    ]
    lines += ["", f"### Claims: paired difference a − b in {SPLIT} {p_label} points, 95% t-interval", ""]
    lines += _md(["claim", "subset", "a − b [95% CI]", "n", "verdict"], claims)
    latent = [
        [_label(protocol, c), s.upper(), _pm(Stats(nk, km, ks), ".3f"), nk, _pm(Stats(na, am, ast), ".3f"), na]
        for c, s, nk, km, ks, na, am, ast in latent_rows(protocol, results)
    ]
    lines += ["", "### Latent cells: final total KL on val (nats) and uncertainty AUROC, mean ± std", ""]
    lines += _md(["cell", "subset", "total KL", "n", "AUROC", "n"], latent)
    marks = {True: "✓", False: "✗", None: "?"}
    targets = [[t.target, t.where, t.measured, marks[t.ok]] for t in check_targets(protocol, results)]
    lines += ["", "### Targets (? = cannot be checked yet)", ""]
    lines += _md(["target", "cell / subset", "measured", "ok"], targets)
    return "\n".join(lines) + "\n"


def to_csvs(protocol: DictConfig, results: Results) -> dict[str, str]:
    """The same four tables as csv texts (raw numbers), keyed methods / claims / latent / targets."""
    primary, second = _metrics(protocol)
    head = ["cell", "label", "subset", "n", "n_expected"]
    head += [f"{primary}_{k}" for k in ("mean", "std", "ci_lo", "ci_hi", "min")] + [f"{second}_mean", "missing_seeds"]
    claims = ["claim", "a", "b", "subset", "n", "diff_mean", "diff_std", "ci_lo", "ci_hi", "verdict"]
    latent = ["cell", "subset", "kl_n", "kl_mean", "kl_std", "auroc_n", "auroc_mean", "auroc_std"]
    checks = [[t.target, t.where, t.measured, "" if t.ok is None else t.ok] for t in check_targets(protocol, results)]
    return {
        "methods": _csv(head, methods_rows(protocol, results)),
        "claims": _csv(claims, claims_rows(protocol, results)),
        "latent": _csv(latent, latent_rows(protocol, results)),
        "targets": _csv(["target", "where", "measured", "ok"], checks),
    }


def write_report(protocol: DictConfig, results: Results, out_dir: str | Path) -> dict[str, Path]:
    """Write proxy_report.md and the four proxy_*.csv files atomically under out_dir; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {key: out / name for key, name in REPORT_FILES.items()}
    atomic_write_text(paths["md"], to_markdown(protocol, results))
    for key, text in to_csvs(protocol, results).items():
        atomic_write_text(paths[key], text)
    return paths


# ----------------------------------------------------------------------------- plot
def _figure(n_panels: int) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotUnavailable("plotting needs matplotlib: pip install -e .[plot]") from exc
    fig = Figure(figsize=(3.2 + 2.4 * n_panels, 3.6), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    return fig


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
            ax.errorbar(x, s.mean, yerr=[[s.mean - s.lo], [s.hi - s.mean]], color="black", capsize=4, lw=1)
        seeds = sorted(results.get((subset, cell), {}).items())
        offsets = [0.4 * (i / max(len(seeds) - 1, 1) - 0.5) for i in range(len(seeds))]
        ax.scatter([x + o for o in offsets], [v[metric] for _, v in seeds], s=12, color="black", zorder=3)
    ceiling = _ceiling(protocol, subset)
    if ceiling is not None:
        ax.axhline(ceiling, ls="--", color="gray", lw=1, label=f"visual-only ceiling {ceiling:.1f}")
        ax.legend(loc="lower right", fontsize=7)
    ax.set_xticks(range(len(cells)), [_label(protocol, c) for c in cells], rotation=20, ha="right", fontsize=8)
    ax.set_title(subset.upper())


def plot_methods(results: Results, protocol: DictConfig, path: str | Path) -> Path:
    """PNG of the methods' mean test metric per subset (one panel each) with 95% CIs, seeds and the ceiling."""
    subsets = list(protocol.subsets)
    fig = _figure(len(subsets))
    axes = fig.subplots(1, len(subsets), sharey=True, squeeze=False)[0]
    for ax, subset in zip(axes, subsets):
        _panel(ax, protocol, results, subset)
    label = METRIC_LABELS.get(str(protocol.metric), str(protocol.metric))
    axes[0].set_ylabel(f"{SPLIT} {label} (%), {METRIC_PROTOCOL}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=150)
    return path
