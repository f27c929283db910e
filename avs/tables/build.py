"""Group runs into table rows (the config keys that vary) and reduce each metric to mean +- std."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avs.config_keys import matches
from avs.tables.class_columns import check_avss_only, class_columns, class_index, class_value
from avs.tables.keys import IGNORED_KEYS, ROW_LABEL_KEY, SUBSET_ORDER, TEST_AT_END_KEY
from avs.tables.runs import RunResult, TableError

NOT_IN_SOURCES = "n/a"

log = logging.getLogger(__name__)


@dataclass
class Cell:
    """Mean and sample std (None for n = 1) of one metric over the runs of a row, in %."""

    mean: float
    std: float | None
    n: int
    values: list[float] = field(default_factory=list)  # the runs' values (one per seed), for plots


@dataclass
class TableRow:
    """One row: the varied key values, our cells and the published numbers, keyed by (subset, metric)."""

    values: dict[str, Any]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    published: dict[tuple[str, str], float | None] = field(default_factory=dict)
    runs: list[Path] = field(default_factory=list)


@dataclass
class ResultTable:
    """A built table; render with `to_markdown` / `to_csv`."""

    title: str
    keys: list[str]
    subsets: list[str]
    metrics: list[str]
    rows: list[TableRow]
    caption: str
    show_published: bool
    class_names: dict[str, str] = field(default_factory=dict)  # class column key -> class name (--per-class)


def _ignored(key: str, extra: Sequence[str]) -> bool:
    return key != ROW_LABEL_KEY and matches(key, (*IGNORED_KEYS, *extra))


def _h(v: Any) -> Any:
    """Hashable, type-aware identity of a config value (1 and True differ; 1 and 1.0 do not)."""
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, (int, float)):
        return ("num", float(v))
    if v is None:
        return ("none",)
    return ("str", str(v))


def _by_subset(runs: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    groups: dict[str, list[RunResult]] = {}
    for r in runs:
        groups.setdefault(r.subset, []).append(r)
    return groups


def _determined(groups: dict[str, list[RunResult]], key: str, by: list[str]) -> bool:
    """True when, within every subset, `key` is a function of the values of the `by` keys."""
    for runs in groups.values():
        seen: dict[tuple, Any] = {}
        for r in runs:
            ident = tuple(_h(r.flat.get(k)) for k in by)
            value = _h(r.flat.get(key))
            if seen.setdefault(ident, value) != value:
                return False
    return True


def varied_keys(runs: Sequence[RunResult], ignore: Sequence[str] = ()) -> list[str]:
    """The config keys that define rows: vary within a subset, not ignored, not implied by a kept key.

    Preference when keys co-vary: `published.row`, then keys named `name`, then shallower keys, then
    config order; a key is kept only if the keys kept before it do not already determine it.
    A run whose config lacks a key (written before the key existed, or a part its model does not
    have) does not make that key vary: only the values of the runs that have it are compared.
    """
    groups = _by_subset(runs)
    order: dict[str, int] = {}
    for r in runs:
        for k in r.flat:
            order.setdefault(k, len(order))
    candidates = [
        k
        for k in order
        if not _ignored(k, ignore)
        and any(len({_h(r.flat[k]) for r in grp if k in r.flat}) > 1 for grp in groups.values())
    ]
    candidates.sort(key=lambda k: (k != ROW_LABEL_KEY, k.rsplit(".", 1)[-1] != "name", k.count("."), order[k]))
    kept: list[str] = []
    for k in candidates:
        if not _determined(groups, k, kept):
            kept.append(k)
    return kept


def metric_value(record: dict[str, Any], split: str, protocol: str, metric: str, source: Path) -> float | None:
    """One metric of a metrics.json record in % (split test or val, a metric protocol); None without that split.

    A class column key (``iou_per_class.<i>``) gives that class's IoU, None where the run has none defined."""
    block = record.get(split)
    if not isinstance(block, dict):
        return None
    if protocol not in block:
        raise TableError(f"{source}/metrics.json: protocol {protocol!r} not in {split} metrics (has {sorted(block)})")
    index = class_index(metric)
    if index is not None:
        return class_value(block[protocol], index)
    value = block[protocol].get(metric)
    if value is None:
        raise TableError(
            f"{source}/metrics.json: metric {metric!r} not in {split}/{protocol} (has {sorted(block[protocol])})"
        )
    return 100.0 * float(value)


def default_protocol(runs: Sequence[RunResult]) -> str:
    """The protocol a table uses when none is asked for: `per_class` for AVSS runs only, else `per_frame`."""
    return "per_class" if runs and all(r.subset == "avss" for r in runs) else "per_frame"


# ----------------------------------------------------------------------------- building
def _fill_row(
    row: TableRow, members: list[RunResult], subsets: Sequence[str], metrics: Sequence[str], split: str, protocol: str
) -> None:
    """Our cells (mean +- std over the row's runs) and the published numbers of one row."""
    for subset in subsets:
        group = [r for r in members if r.subset == subset]
        for m in metrics:
            vals = [v for r in group if (v := metric_value(r.record, split, protocol, m, r.path)) is not None]
            if vals:
                std = statistics.stdev(vals) if len(vals) > 1 else None
                row.cells[(subset, m)] = Cell(statistics.fmean(vals), std, len(vals), list(vals))
            pub = None
            for r in members:  # any run of the row names the paper's numbers for every subset
                if r.published is not None and r.published["numbers"].get(subset, {}).get(m) is not None:
                    pub = r.published["numbers"][subset][m]
                    break
            row.published[(subset, m)] = pub


def _usable(runs: Sequence[RunResult], split: str, protocol: str, metric: str) -> list[RunResult]:
    """The runs that have `split` metrics (a warning for each other run); TableError when none has."""
    usable = []
    for r in runs:
        if metric_value(r.record, split, protocol, metric, r.path) is None:
            log.warning("%s: no %s metrics (%s=false or an interrupted run); skipped", r.path, split, TEST_AT_END_KEY)
            continue
        usable.append(r)
    if not usable:
        raise TableError(
            f"none of the {len(runs)} runs has {split} metrics (were they trained with {TEST_AT_END_KEY}=true?)"
        )
    return usable


def build_table(
    runs: Sequence[RunResult],
    *,
    split: str = "test",
    protocol: str | None = None,
    metrics: Sequence[str] = ("miou", "fscore"),
    keys: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    title: str = "results",
    per_class: bool = False,
) -> ResultTable:
    """Group runs into rows (by `keys`, default `varied_keys`) and reduce each metric to mean +- std over runs.

    `protocol` None: `per_class` when every run is AVSS (its own protocol, docs/avss.md), else `per_frame`.
    `per_class` True (AVSS runs only): one more column per class, its IoU (avs.tables.class_columns)."""
    if per_class:
        check_avss_only(runs)
    if protocol is None:
        protocol = default_protocol(runs)
    if split not in ("test", "val"):
        raise TableError(f"split must be 'test' or 'val' (val = the best val metrics), got {split!r}")
    if not metrics:
        raise TableError("metrics must name at least one metric key (e.g. miou fscore)")
    usable = _usable(runs, split, protocol, metrics[0])
    if keys is None:
        keys = varied_keys(usable, ignore)
        if not keys:
            keys = [ROW_LABEL_KEY] if all(ROW_LABEL_KEY in r.flat for r in usable) else ["model.name", "backbone.name"]
    keys = list(keys)
    for k in keys:
        if not any(k in r.flat for r in usable):
            raise TableError(f"row key {k!r} is not in any run's config")
    names = class_columns(usable, split, protocol) if per_class else {}
    subsets = sorted({r.subset for r in usable}, key=lambda s: (SUBSET_ORDER.index(s) if s in SUBSET_ORDER else 99, s))
    show_published = any(r.published is not None for r in usable)

    rows: dict[tuple, TableRow] = {}
    members: dict[tuple, list[RunResult]] = {}
    for r in usable:
        ident = tuple(_h(r.flat.get(k)) for k in keys)
        if ident not in rows:
            rows[ident] = TableRow(values={k: r.flat.get(k) for k in keys})
            members[ident] = []
        members[ident].append(r)
        rows[ident].runs.append(r.path)
    columns = [*metrics, *names]
    for ident, row in rows.items():
        _fill_row(row, members[ident], subsets, columns, split, protocol)
    caption = _caption(usable, keys, split, protocol, show_published)
    if names:
        caption += " Class columns: that class's IoU in % (foreground classes, then background); n = runs with one."
    return ResultTable(title, keys, subsets, columns, list(rows.values()), caption, show_published, names)


def _legacy_batch_sizes(runs: Sequence[RunResult], split: str) -> list[int]:
    sizes = set()
    for r in runs:
        legacy = (r.record.get(split) or {}).get("avsbench_legacy") or {}
        bs = legacy.get("eval_batch_size", r.record.get("legacy_batch_size"))
        if bs is not None:
            sizes.add(int(bs))
    return sorted(sizes)


def _caption(runs: Sequence[RunResult], keys: Sequence[str], split: str, protocol: str, show_published: bool) -> str:
    best = " (best-on-val checkpoint)" if split == "val" else ""
    parts = [f"Split: {split}{best}.", f"Metric protocol: `{protocol}`"]
    if protocol == "avsbench_legacy":
        sizes = _legacy_batch_sizes(runs, split)
        parts[-1] += f" (legacy batch size: {', '.join(map(str, sizes)) or 'unknown'} clip(s) per batch)"
    parts[-1] += "."
    parts.append("Cells: mean ± sample std over runs (seeds), in %; n = number of runs.")
    parts.append(f"Row keys: {', '.join(keys)} ({len(runs)} runs).")
    if any(r.synthetic for r in runs):
        parts.append(
            "Data: Sounding Shapes (synthetic) for some or all runs; published AVSBench numbers are not shown for them."
        )
    if show_published:
        papers = []
        protocols = set()
        for r in runs:
            p = r.published
            if p is None:
                continue
            text = str(p.get("paper") or "unnamed paper")
            if p.get("table") is not None:
                table_ref = str(p["table"])
                text += f", Table {table_ref}" if table_ref.isdigit() else f", {table_ref}"
            if p.get("source"):
                text += f" [{p['source']}]"
            if text not in papers:
                papers.append(text)
            if p.get("protocol"):
                protocols.add((p.get("protocol"), p.get("legacy_batch_size")))
        parts.append(
            f"Columns marked (paper): as published, in % ({'; '.join(papers)}); {NOT_IN_SOURCES} = not in our sources."
        )
        for proto, bs in sorted(protocols, key=str):
            note = f"Published numbers were computed under `{proto}`" + (f" with {bs} clip(s) per batch" if bs else "")
            if proto != protocol:
                note += f"; ours use `{protocol}`, so compare with care"
            elif (
                proto == "avsbench_legacy"
                and bs is not None
                and _legacy_batch_sizes(runs, split) not in ([], [int(bs)])
            ):
                note += "; our legacy batch size differs, so the F-score is not directly comparable"
            parts.append(note + ".")
    return " ".join(parts)
