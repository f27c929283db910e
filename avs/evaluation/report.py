"""Metric tables (markdown / csv / json) from per-protocol metric dicts."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from avs.utils.io import atomic_write_text


def metric_rows(metrics: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """{protocol: {name: value}} -> rows [{'protocol', name...}] with the numbers only."""
    rows = []
    for protocol, values in metrics.items():
        row: dict[str, Any] = {"protocol": protocol}
        row.update({k: v for k, v in values.items() if isinstance(v, (int, float))})
        rows.append(row)
    return rows


HEADLINE = ("miou", "fscore", "fscore_at_0.5", "num_frames")


def markdown_table(
    metrics: dict[str, dict[str, Any]],
    title: str | None = None,
    percent: bool = True,
    columns: tuple[str, ...] | None = HEADLINE,
) -> str:
    """A markdown table, one row per protocol; IoU/F values shown in % (two decimals) when `percent`.

    `columns=None` shows every numeric key; the default shows the headline ones (the json has all).
    """
    rows = metric_rows(metrics)
    for r, (protocol, values) in zip(rows, metrics.items()):
        if "eval_batch_size" in values:  # the legacy protocol depends on it: say which
            r["protocol"] = f"{protocol} (bs={values['eval_batch_size']})"
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k != "protocol" and k not in cols and (columns is None or k in columns)]
    if columns is not None:
        cols = [c for c in columns if c in cols]
    lines = []
    if title:
        lines += [f"**{title}**", ""]
    lines.append("| protocol | " + " | ".join(cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if v is None:
                cells.append("")
            elif isinstance(v, int) or c.startswith("num_"):
                cells.append(str(int(v)))
            else:
                cells.append(f"{100 * v:.2f}" if percent else f"{v:.4f}")
        lines.append(f"| {r['protocol']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(metrics: dict[str, dict[str, Any]]) -> str:
    """The same rows as CSV (raw fractions)."""
    rows = metric_rows(metrics)
    cols = ["protocol"] + sorted({k for r in rows for k in r if k != "protocol"})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def write_tables(
    out_dir: str | Path, stem: str, metrics: dict[str, dict[str, Any]], meta: dict[str, Any], title: str | None = None
) -> dict[str, Path]:
    """Write <stem>.md, <stem>.csv and <stem>.json atomically; return their paths."""
    out = Path(out_dir)
    paths = {"md": out / f"{stem}.md", "csv": out / f"{stem}.csv", "json": out / f"{stem}.json"}
    atomic_write_text(paths["md"], markdown_table(metrics, title))
    atomic_write_text(paths["csv"], csv_table(metrics))
    atomic_write_text(paths["json"], json.dumps({"metrics": metrics, **meta}, indent=2, default=str))
    return paths
