"""The proxy benchmark report: markdown tables (methods, claims, latent, targets, and the cost when runs.jsonl
is given) and their csv files."""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from avs.tables.proxy import (
    ACTIVE_KL,
    KL_CODE,
    METRIC_PROTOCOL,
    SPLIT,
    Results,
    RunCosts,
    Stats,
    cell_seeds,
    cell_stats,
    cell_subsets,
    check_targets,
    claim_differences,
    cost_estimate,
    latent_codes,
    missing_runs,
)
from avs.tables.proxy_listening import listening_markdown, listening_rows
from avs.tables.render import METRIC_LABELS
from avs.utils.io import atomic_write_text

CEILING_ROW = "visual-only ceiling"
SE_LABEL = "SE (one run)"
DASH = "–"
LATENT_KEYS = ["kl", "active_dims", "auroc", "auroc_entropy"]
REPORT_FILES = {
    "md": "proxy_report.md",
    "methods": "proxy_methods.csv",
    "claims": "proxy_claims.csv",
    "latent": "proxy_latent.csv",
    "targets": "proxy_targets.csv",
    "costs": "proxy_costs.csv",
    "listening": "proxy_listening.csv",
}
LISTEN_HEAD = ["cell", "subset", "reading", "n", "with_audio_mean"]
LISTEN_HEAD += [f"minus_{w}_{k}" for w in ("shuffled", "no_audio") for k in ("mean", "ci_lo", "ci_hi", "verdict")]


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


def cell_label(protocol: DictConfig, cell: str) -> str:
    """The cell's `label` in the protocol, else its name."""
    return str(protocol.cells[cell].get("label") or cell)


def table_cells(protocol: DictConfig) -> list[str]:
    """Rows of the methods table: the methods first, then every other cell in protocol order."""
    methods = [str(m) for m in protocol.methods]
    return methods + [str(c) for c in protocol.cells if c not in methods]


def _metrics(protocol: DictConfig) -> tuple[str, str]:
    """(primary metric, the second metric shown): mIoU and F, or the other way round."""
    primary = str(protocol.metric)
    return primary, "fscore" if primary != "fscore" else "miou"


def split_ceiling(protocol: DictConfig, subset: str, split: str = SPLIT) -> float | None:
    """The visual-only ceiling (%) of `subset` on `split` (the test split unless named), None when
    ceilings.json has none."""
    value = (protocol.ceilings.get(subset) or {}).get(split)
    return None if value is None else float(value)


# ----------------------------------------------------------------------------- methods table
def methods_rows(protocol: DictConfig, results: Results) -> list[list[Any]]:
    """Long-format rows [cell, label, subset, n, n_expected, mean, std, lo, hi, min, second mean, mIoU SE mean,
    missing seeds]; the SE (one run's clip-level standard error of its mIoU, %) is averaged over the seeds."""
    primary, second = _metrics(protocol)
    rows = []
    for cell in table_cells(protocol):
        for subset in cell_subsets(protocol, cell):
            s = cell_stats(results, subset, cell, primary)
            f = cell_stats(results, subset, cell, second)
            seeds = cell_seeds(protocol, cell)
            missing = [k for k in seeds if k not in results.get((subset, cell), {})]
            row = [cell, cell_label(protocol, cell), subset, s.n, len(seeds), s.mean, s.std, s.lo, s.hi, s.min]
            se = cell_stats(results, subset, cell, "miou_se").mean
            rows.append(row + [f.mean, se, " ".join(map(str, missing))])
    for subset in protocol.subsets:
        rows.append([CEILING_ROW, CEILING_ROW, subset, None, None, split_ceiling(protocol, subset)] + [None] * 7)
    return rows


def _methods_markdown(protocol: DictConfig, results: Results) -> list[str]:
    primary, second = _metrics(protocol)
    p_label, s_label = METRIC_LABELS.get(primary, primary), METRIC_LABELS.get(second, second)
    header = ["cell"]
    for subset in protocol.subsets:
        up = subset.upper()
        names = [p_label, "95% CI", SE_LABEL, s_label, "n", "min seed"]
        header += [f"{up} {name}" for name in names]
    rows = []
    for cell in table_cells(protocol):
        row = [cell_label(protocol, cell)]
        for subset in protocol.subsets:
            if subset not in cell_subsets(protocol, cell):
                row += [DASH] * 6
                continue
            s = cell_stats(results, subset, cell, primary)
            expected = len(cell_seeds(protocol, cell))
            n = str(s.n) if s.n == expected else f"{s.n}/{expected}"
            se = _f(cell_stats(results, subset, cell, "miou_se").mean)
            row += [_pm(s), _ci(s), se, _f(cell_stats(results, subset, cell, second).mean), n, _f(s.min)]
        rows.append(row)
    ceiling = [f"{CEILING_ROW} ({SPLIT})"]
    for subset in protocol.subsets:
        ceiling += [_f(split_ceiling(protocol, subset))] + [""] * 5
    lines = [f"### Methods: {SPLIT} {p_label} ({METRIC_PROTOCOL}, %), mean ± sample std over seeds", ""]
    lines += _md(header, rows + [ceiling])
    lines += ["", f"{SE_LABEL}: the clip-level standard error of one run's {SPLIT} mIoU (%), mean over the seeds."]
    gone = missing_runs(protocol, results)
    if gone:
        where = _missing_text(gone)
        runs = "run" if len(gone) == 1 else "runs"
        lines += ["", f"Missing ({len(gone)} {runs} without {SPLIT} metrics, not finished or not tested): {where}."]
    return lines


def _missing_text(gone: Sequence[tuple[str, str, int]]) -> str:
    """'s4/tpavi seeds 2, 3; ms3/avsbg seed 1' (one entry per subset and cell, in table order)."""
    grouped: dict[tuple[str, str], list[int]] = {}
    for subset, cell, seed in gone:
        grouped.setdefault((subset, cell), []).append(seed)
    parts = []
    for (subset, cell), seeds in grouped.items():
        word = "seed" if len(seeds) == 1 else "seeds"
        parts.append(f"{subset}/{cell} {word} {', '.join(str(k) for k in seeds)}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- claims, latent, targets
def claims_rows(protocol: DictConfig, results: Results) -> list[list[Any]]:
    """[claim, a, b, subset, n, mean, std, lo, hi, verdict] per claim and subset."""
    return [
        [c.name, c.a, c.b, c.subset, c.stats.n, c.stats.mean, c.stats.std, c.stats.lo, c.stats.hi, c.verdict]
        for c in claim_differences(protocol, results)
    ]


def _latent_stats(protocol: DictConfig, results: Results) -> list[tuple[str, str, dict[str, Stats]]]:
    """(cell, subset, stats per results key) of the cells and subsets that have a final KL or an AUROC."""
    out = []
    for cell in table_cells(protocol):
        for subset in cell_subsets(protocol, cell):
            keys = LATENT_KEYS + [KL_CODE + code for code in latent_codes(results, subset, cell)]
            stats = {key: cell_stats(results, subset, cell, key) for key in keys}
            if stats["kl"].n or stats["auroc"].n or stats["auroc_entropy"].n:
                out.append((cell, subset, stats))
    return out


def latent_rows(protocol: DictConfig, results: Results) -> list[list[Any]]:
    """[cell, subset, n_kl, kl mean, kl std, n_auroc, auroc mean, auroc std, auroc_entropy mean, auroc_entropy std,
    active dims mean, final KL mean of each code of `latent_codes(results)`] for cells that have KL or AUROC."""
    codes = latent_codes(results)
    rows = []
    for cell, subset, st in _latent_stats(protocol, results):
        kl, auroc, ent = st["kl"], st["auroc"], st["auroc_entropy"]
        row = [cell, subset, kl.n, kl.mean, kl.std, auroc.n, auroc.mean, auroc.std, ent.mean, ent.std]
        per_code = [st[KL_CODE + c].mean if KL_CODE + c in st else None for c in codes]
        rows.append(row + [st["active_dims"].mean] + per_code)
    return rows


def _latent_markdown(protocol: DictConfig, results: Results) -> list[str]:
    rows = []
    for cell, subset, st in _latent_stats(protocol, results):
        codes = [k for k in st if k.startswith(KL_CODE) and st[k].mean is not None]
        per_code = " / ".join(f"{k[len(KL_CODE) :]} {_f(st[k].mean, '.3f')}" for k in codes) or DASH
        kl, active, auroc, ent = st["kl"], st["active_dims"], st["auroc"], st["auroc_entropy"]
        row = [cell_label(protocol, cell), subset.upper(), _pm(kl, ".3f"), per_code, _f(active.mean, ".1f"), kl.n]
        rows.append(row + [_pm(auroc, ".3f"), _pm(ent, ".3f"), auroc.n])
    lines = ["### Latent cells: final KL on val (nats) and uncertainty AUROC, mean ± std over seeds", ""]
    header = ["cell", "subset", "total KL", "KL per code (mean)", f"active dims (KL > {ACTIVE_KL:g})", "n"]
    lines += _md(header + ["AUROC (variance)", "AUROC (entropy baseline)", "n"], rows)
    return lines


def _difference(s: Stats) -> str:
    if s.mean is None:
        return DASH
    return f"{_f(s.mean, '+.2f')} {_ci(s, '+.2f')}" if s.lo is not None else _f(s.mean, "+.2f")


def cost_rows(protocol: DictConfig, costs: RunCosts) -> list[list[Any]]:
    """[cell, label, subset, timed runs, expected runs, median s, min s, max s] per cell and subset."""
    rows = []
    for cell in protocol.cells:
        for subset in cell_subsets(protocol, cell):
            timed = sorted(costs.seconds.get((subset, cell), []))
            median = statistics.median(timed) if timed else None
            low, high = (timed[0], timed[-1]) if timed else (None, None)
            expected = len(cell_seeds(protocol, cell))
            rows.append([cell, cell_label(protocol, cell), subset, len(timed), expected, median, low, high])
    return rows


def _hours(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _cost_markdown(protocol: DictConfig, costs: RunCosts) -> list[str]:
    rows = [
        [label, subset.upper(), f"{n}/{expected}", _f(median, ".0f"), DASH if low is None else f"{low:.0f}–{high:.0f}"]
        for _, label, subset, n, expected, median, low, high in cost_rows(protocol, costs)
    ]
    lines = ["### Cost: wall seconds per run (runs.jsonl or the results lines; training, test and follow-ups)", ""]
    lines += _md(["cell", "subset", "timed", "median s", "min–max s"], rows)
    w = costs.workers
    parts = []
    for name, cells in (("the methods table", list(protocol.methods)), ("the whole protocol", list(protocol.cells))):
        est = cost_estimate(protocol, costs, cells)
        if est.runs == 0:
            continue
        text = f"{name} ({est.runs} runs) {_hours(est.seconds)} one after another"
        text += f", {_hours(_side_by_side(protocol, costs, cells, w))} with {w} side by side" if w else ""
        text += f", not counting {est.untimed} runs of untimed cells" if est.untimed else ""
        parts.append(text)
    if parts:
        lines += ["", "Estimate (each run costs the fastest timed run of its cell): " + "; ".join(parts) + "."]
        lines += [
            "Side by side: the runner's start order and its waits (an MS3 run starts after its S4 run) replayed "
            "with these times (avs/proxy/schedule.py). Recorded times include whatever else the machine was doing."
        ]
    return lines + _sittings_markdown(protocol, costs)


def _sittings_markdown(protocol: DictConfig, costs: RunCosts) -> list[str]:
    """The measured sittings of this version (proxy_sittings.jsonl): when, what was asked, made, wall time."""
    if not costs.sittings:
        return []
    methods = sorted(protocol.methods)
    rows = []
    for x in costs.sittings:
        chosen = {k: v for k, v in (x.get("selection") or {}).items() if v}
        asked = " ".join(f"{k}=[{','.join(map(str, v))}]" for k, v in chosen.items()) or "every run"
        if list(chosen) == ["only"] and sorted(chosen["only"]) == methods:
            asked += " (the methods table)"
        made = f"{x.get('made')}" + (f" ({x.get('checks')} checks)" if x.get("checks") else "")
        seconds = float(x.get("seconds") or 0.0)
        wall = f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min {int(seconds % 60):02d} s"
        slots = f"{x.get('workers')} × {x.get('threads')} ({x.get('simd')})"
        rows.append([x.get("start"), str(x.get("commit") or DASH)[:7], asked, made, x.get("failed"), slots, wall])
    head = ["start (UTC)", "commit", "asked", "runs made", "failed", "workers × threads", "wall time"]
    lines = ["", "### Sittings: measured wall time of each runner invocation (proxy_sittings.jsonl)", ""]
    return lines + _md(head, rows)


def _side_by_side(protocol: DictConfig, costs: RunCosts, cells: Sequence[str], workers: int) -> float:
    """Wall seconds of the runs of `cells` in `workers` slots, each at its cell's fastest timed run (0 when
    untimed), replayed in the runner's start order."""
    from avs.proxy.protocol import expand
    from avs.proxy.schedule import longest_chains_first, replay

    fastest = {key: min(timed) for key, timed in costs.seconds.items() if timed}
    runs = longest_chains_first([r for r in expand(protocol, Path(".")) if r.cell in cells], fastest)
    return replay(runs, {r.name: fastest.get((r.subset, r.cell), 0.0) for r in runs}, workers)


def to_markdown(protocol: DictConfig, results: Results, costs: RunCosts | None = None) -> str:
    """The four tables (methods, claims, latent, targets), and the cost table when `costs` is given, as markdown."""
    lines = _methods_markdown(protocol, results)
    p_label = METRIC_LABELS.get(str(protocol.metric), str(protocol.metric))
    claims = [
        [name, subset.upper(), _difference(Stats(n, mean, std, lo, hi)), n, word]
        for name, _, _, subset, n, mean, std, lo, hi, word in claims_rows(protocol, results)
    ]
    lines += ["", f"### Claims: paired difference a − b in {SPLIT} {p_label} points, 95% t-interval", ""]
    lines += _md(["claim", "subset", "a − b [95% CI]", "n", "verdict"], claims)
    lines += ["", *_latent_markdown(protocol, results)]
    listening = listening_markdown(protocol, results)
    lines += ["", *listening] if listening else []
    marks = {True: "✓", False: "✗", None: "?"}
    targets = [[t.target, t.where, t.measured, marks[t.ok]] for t in check_targets(protocol, results)]
    lines += ["", "### Targets (? = cannot be checked yet)", ""]
    lines += _md(["target", "cell / subset", "measured", "ok"], targets)
    if costs is not None:
        lines += ["", *_cost_markdown(protocol, costs)]
    return "\n".join(lines) + "\n"


def to_csvs(protocol: DictConfig, results: Results, costs: RunCosts | None = None) -> dict[str, str]:
    """The same tables as csv texts (raw numbers), keyed methods / claims / latent / targets (/ costs)."""
    primary, second = _metrics(protocol)
    head = ["cell", "label", "subset", "n", "n_expected"]
    head += [f"{primary}_{k}" for k in ("mean", "std", "ci_lo", "ci_hi", "min")]
    head += [f"{second}_mean", "miou_se_mean", "missing_seeds"]
    claims = ["claim", "a", "b", "subset", "n", "diff_mean", "diff_std", "ci_lo", "ci_hi", "verdict"]
    latent = ["cell", "subset", "kl_n", "kl_mean", "kl_std", "auroc_n", "auroc_mean", "auroc_std"]
    latent += ["auroc_entropy_mean", "auroc_entropy_std", "active_dims_mean"]
    latent += [f"kl_{code}_mean" for code in latent_codes(results)]
    checks = [[t.target, t.where, t.measured, "" if t.ok is None else t.ok] for t in check_targets(protocol, results)]
    tables = {
        "methods": _csv(head, methods_rows(protocol, results)),
        "claims": _csv(claims, claims_rows(protocol, results)),
        "latent": _csv(latent, latent_rows(protocol, results)),
        "targets": _csv(["target", "where", "measured", "ok"], checks),
        "listening": _csv(LISTEN_HEAD, listening_rows(protocol, results)),
    }
    if costs is not None:
        header = ["cell", "label", "subset", "timed", "expected", "median_s", "min_s", "max_s"]
        tables["costs"] = _csv(header, cost_rows(protocol, costs))
    return tables


def write_report(
    protocol: DictConfig, results: Results, out_dir: str | Path, costs: RunCosts | None = None
) -> dict[str, Path]:
    """Write proxy_report.md and the proxy_*.csv files atomically under out_dir; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / REPORT_FILES["md"]}
    atomic_write_text(paths["md"], to_markdown(protocol, results, costs))
    for key, text in to_csvs(protocol, results, costs).items():
        paths[key] = out / REPORT_FILES[key]
        atomic_write_text(paths[key], text)
    return paths
