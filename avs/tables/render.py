"""Render a built table as markdown and csv, and the whole run dirs -> files pipeline."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from avs.tables.build import NOT_IN_SOURCES, Cell, ResultTable, build_table
from avs.tables.keys import ROW_LABEL_KEY
from avs.tables.runs import TableError, load_runs
from avs.utils.io import atomic_write_text

METRIC_LABELS = {"miou": "mIoU", "fscore": "F"}


def _fmt_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _header(key: str) -> str:
    return "row" if key == ROW_LABEL_KEY else key


def _has_paper(table: ResultTable, metric: str) -> bool:
    """Whether a metric gets a (paper) column: never a class column (no paper reports per-class numbers here)."""
    return table.show_published and metric not in table.class_names


def _columns(table: ResultTable) -> list[tuple[str, str, bool]]:
    cols = []
    for s in table.subsets:
        for m in table.metrics:
            cols.append((s, m, False))
            if _has_paper(table, m):
                cols.append((s, m, True))
    return cols


def _col_label(table: ResultTable, subset: str, metric: str, published: bool) -> str:
    name = table.class_names.get(metric) or METRIC_LABELS.get(metric, metric)
    label = f"{subset.upper()} {name}"
    return label + " (paper)" if published else label


def _fmt_cell(cell: Cell | None) -> str:
    if cell is None:
        return ""
    if cell.std is None:
        return f"{cell.mean:.2f} (n={cell.n})"
    return f"{cell.mean:.2f} ± {cell.std:.2f} (n={cell.n})"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(table: ResultTable) -> str:
    """The table as markdown: bold title, caption, then one row per group."""
    cols = _columns(table)
    header = [_header(k) for k in table.keys] + [_col_label(table, *c) for c in cols]
    lines = [f"**{table.title}**", "", table.caption, ""]
    lines.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in table.rows:
        cells = [_md_escape(_fmt_value(row.values[k])) for k in table.keys]
        for s, m, pub in cols:
            if pub:
                v = row.published.get((s, m))
                cells.append(NOT_IN_SOURCES if v is None else f"{v:g}")
            else:
                cells.append(_fmt_cell(row.cells.get((s, m))))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: ResultTable) -> str:
    """The same rows as CSV: key columns, then <subset>_<metric>_{mean,std,n[,paper]} (numbers in %).

    A class column is <subset>_iou_<class name>_{mean,std,n}."""
    fields = [_header(k) for k in table.keys]
    for s in table.subsets:
        for m in table.metrics:
            stem = f"iou_{table.class_names[m]}" if m in table.class_names else m
            fields += [f"{s}_{stem}_mean", f"{s}_{stem}_std", f"{s}_{stem}_n"]
            if _has_paper(table, m):
                fields.append(f"{s}_{m}_paper")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(fields)
    for row in table.rows:
        out: list[Any] = [_fmt_value(row.values[k]) for k in table.keys]
        for s in table.subsets:
            for m in table.metrics:
                c = row.cells.get((s, m))
                if c is None:
                    out += ["", "", ""]
                else:
                    out += [round(c.mean, 4), "" if c.std is None else round(c.std, 4), c.n]
                if _has_paper(table, m):
                    v = row.published.get((s, m))
                    out.append("" if v is None else v)
        w.writerow(out)
    return buf.getvalue()


def write_table(table: ResultTable, out_dir: str | Path, name: str) -> dict[str, Path]:
    """Write <name>.md and <name>.csv atomically under out_dir; return their paths."""
    if not name or "/" in name:
        raise TableError(f"table name must be a plain file stem, got {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{name}.md", "csv": out / f"{name}.csv"}
    atomic_write_text(paths["md"], to_markdown(table))
    atomic_write_text(paths["csv"], to_csv(table))
    return paths


def make_table(
    paths: Sequence[str | Path],
    out_dir: str | Path | None = None,
    name: str = "table",
    **kwargs: Any,
) -> tuple[ResultTable, dict[str, Path]]:
    """load_runs + build_table + write_table; out_dir defaults to the first input dir."""
    runs = load_runs(paths)
    kwargs.setdefault("title", name)
    table = build_table(runs, **kwargs)
    first = Path(paths[0])
    target = Path(out_dir) if out_dir is not None else (first if first.is_dir() else first.parent)
    return table, write_table(table, target, name)
