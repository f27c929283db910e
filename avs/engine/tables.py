"""Paper-style result tables from run directories: rows = the config keys that vary, columns = subset x metric.

Every run dir written by the trainer holds a ``metrics.json`` whose ``config`` field is the resolved
config. ``build_table`` groups runs by the config keys that vary *within* a data subset (so that
keys tied to the subset, such as the epoch count or the data root, do not split rows), after
dropping seeds, paths, hydra and run-specific keys, and reports mean +- sample std over the runs
(seeds) of each group. The experiment overlays carry a ``published`` node (paper, table, row,
``s4``/``ms3``: ``{miou, fscore}`` in %, optional ``rows`` matched against the run's config for
swept tables); those numbers are put beside ours.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from avs.errors import AVSError, ExitCode
from avs.utils.io import atomic_write_text


class TableError(AVSError, ValueError, code=ExitCode.DATA):
    """A run dir or metrics.json cannot make a table (the message names the file and what is missing)."""


class RunDirNotFound(TableError, FileNotFoundError):
    """A run dir given to the table builder does not exist or holds no metrics.json."""


log = logging.getLogger(__name__)

__all__ = [
    "IGNORED_KEYS",
    "RunResult",
    "Cell",
    "TableRow",
    "ResultTable",
    "find_metrics_files",
    "flatten_config",
    "load_runs",
    "varied_keys",
    "build_table",
    "to_markdown",
    "to_csv",
    "write_table",
    "make_table",
]

# Config keys (and everything below them) that never define a table row.
IGNORED_KEYS: tuple[str, ...] = (
    "seed",
    "task_name",
    "paths",
    "hydra",
    "published",  # except published.row, see ROW_LABEL_KEY
    "data.root",
    "data.embedding_dir",
    "data.synthetic.name",
    "data.num_workers",
    "data.pin_memory",
    "trainer.device",
    "trainer.progress",
    "trainer.tensorboard",
    "trainer.log_every_steps",
    "trainer.resume",
    "trainer.checkpoint_every_steps",
    "trainer.interrupt_after_steps",
    "trainer.debug_nan_steps",
    "trainer.epochs_by_subset",
    "s4_checkpoint",  # the S4 -> MS3 overlays: model.init_from (normalised) says it
)
IGNORED_SUFFIXES: tuple[str, ...] = ("weights_path", "pca_path")
ROW_LABEL_KEY = "published.row"
SUBSET_ORDER = ("s4", "ms3")
METRIC_LABELS = {"miou": "mIoU", "fscore": "F"}
NOT_IN_SOURCES = "n/a"


@dataclass
class RunResult:
    """One run: where it is, its subset and seed, the flattened config and its metrics record."""

    path: Path
    subset: str
    seed: int | None
    flat: dict[str, Any]
    record: dict[str, Any]
    published: dict[str, Any] | None = None  # {"paper", "table", ..., "numbers": {subset: {metric: %}}}
    synthetic: bool = False  # Sounding Shapes data: published AVSBench numbers do not apply


@dataclass
class Cell:
    """Mean and sample std (None for n = 1) of one metric over the runs of a row, in %."""

    mean: float
    std: float | None
    n: int


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


# ----------------------------------------------------------------------------- loading
def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_metrics_files(paths: Sequence[str | Path]) -> list[Path]:
    """Every metrics.json at or below the given run / multirun dirs (or files), in natural path order."""
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_file() and p.name == "metrics.json":
            found.append(p)
        elif p.is_dir():
            found += list(p.rglob("metrics.json"))
        else:
            raise RunDirNotFound(f"run dir {p} does not exist (expected a run or multirun dir holding metrics.json)")
    unique = sorted(set(found), key=_natural_key)
    if not unique:
        raise RunDirNotFound(
            f"no metrics.json under {', '.join(str(p) for p in paths)} (runs write it when training ends)"
        )
    return unique


def flatten_config(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {"a.b.c": leaf}. A `_target_` node also maps its own key to the class name; lists become JSON."""
    out: dict[str, Any] = {}
    if isinstance(node, dict):
        if prefix and "_target_" in node:
            out[prefix] = str(node["_target_"]).rsplit(".", 1)[-1]
        elif prefix and not node:
            out[prefix] = "{}"
        for k, v in node.items():
            if k in ("_target_", "_partial_"):
                continue
            out.update(flatten_config(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(node, (list, tuple)):
        out[prefix] = json.dumps(node, sort_keys=True, default=str)
    else:
        out[prefix] = node
    return out


def _normalise(flat: dict[str, Any]) -> dict[str, Any]:
    """Replace run-specific values by what they mean: an init checkpoint path -> 'checkpoint'."""
    if flat.get("model.init_from") not in (None, ""):
        flat["model.init_from"] = "checkpoint"
    elif "model.init_from" in flat:
        flat["model.init_from"] = None
    return flat


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _published(node: Any, flat: dict[str, Any], source: Path) -> dict[str, Any] | None:
    """The run's published entry: the `published` node, with a matching `rows` entry taking precedence."""
    if not isinstance(node, dict):
        return None
    entry = dict(node)
    for row in node.get("rows") or []:
        match = row.get("match") or {}
        if not isinstance(match, dict) or not match:
            raise TableError(f"{source}: published.rows entries need a non-empty `match` mapping of config keys")
        if all(_same(flat.get(k), v) for k, v in match.items()):
            entry.update({k: v for k, v in row.items() if k != "match"})
            break
    numbers: dict[str, dict[str, float | None]] = {}
    for subset in SUBSET_ORDER:
        vals = entry.get(subset)
        numbers[subset] = {k: (None if v is None else float(v)) for k, v in vals.items()} if isinstance(vals, dict) else {}
    entry.pop("rows", None)
    entry["numbers"] = numbers
    return entry


def load_runs(paths: Sequence[str | Path]) -> list[RunResult]:
    """Read every metrics.json below `paths` into RunResults (flattened, normalised config; published entry)."""
    runs = []
    for mpath in find_metrics_files(paths):
        try:
            record = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TableError(f"{mpath}: not a readable metrics.json ({exc})") from exc
        cfg = record.get("config")
        if not isinstance(cfg, dict):
            raise TableError(f"{mpath}: no `config` mapping (written by an older trainer?)")
        flat = _normalise(flatten_config(cfg))
        subset = (record.get("data") or {}).get("subset") or flat.get("data.subset")
        if subset is None:
            raise TableError(f"{mpath}: cannot tell the data subset (data.subset missing)")
        published = _published(cfg.get("published"), flat, mpath)
        if published is not None and published.get("row") is not None:
            flat[ROW_LABEL_KEY] = str(published["row"])
        data = cfg.get("data") or {}
        synthetic = bool(data.get("synthetic")) or (record.get("data") or {}).get("release") == "synthetic"
        if synthetic:
            published = None  # the row label stays; AVSBench numbers are not comparable
        seed = record.get("seed", cfg.get("seed"))
        runs.append(RunResult(mpath.parent, str(subset), seed, flat, record, published, synthetic))
    return runs


# ----------------------------------------------------------------------------- grouping
def _ignored(key: str, extra: Sequence[str]) -> bool:
    if key == ROW_LABEL_KEY:
        return False
    for p in (*IGNORED_KEYS, *extra):
        if key == p or key.startswith(p + "."):
            return True
    return key.rsplit(".", 1)[-1] in IGNORED_SUFFIXES


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


def _fmt_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _metric_value(record: dict[str, Any], split: str, protocol: str, metric: str, source: Path) -> float | None:
    block = record.get(split)
    if not isinstance(block, dict):
        return None
    if protocol not in block:
        raise TableError(f"{source}/metrics.json: protocol {protocol!r} not in {split} metrics (has {sorted(block)})")
    value = block[protocol].get(metric)
    if value is None:
        raise TableError(f"{source}/metrics.json: metric {metric!r} not in {split}/{protocol} (has {sorted(block[protocol])})")
    return 100.0 * float(value)


# ----------------------------------------------------------------------------- building
def build_table(
    runs: Sequence[RunResult],
    *,
    split: str = "test",
    protocol: str = "per_frame",
    metrics: Sequence[str] = ("miou", "fscore"),
    keys: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    title: str = "results",
) -> ResultTable:
    """Group runs into rows (by `keys`, default `varied_keys`) and reduce each metric to mean +- std over runs."""
    if split not in ("test", "val"):
        raise TableError(f"split must be 'test' or 'val' (val = the best val metrics), got {split!r}")
    if not metrics:
        raise TableError("metrics must name at least one metric key (e.g. miou fscore)")
    usable = []
    for r in runs:
        if _metric_value(r.record, split, protocol, metrics[0], r.path) is None:
            log.warning("%s: no %s metrics (trainer.test_at_end=false or an interrupted run); skipped", r.path, split)
            continue
        usable.append(r)
    if not usable:
        raise TableError(f"none of the {len(runs)} runs has {split} metrics (were they trained with trainer.test_at_end=true?)")
    if keys is None:
        keys = varied_keys(usable, ignore)
        if not keys:
            keys = [ROW_LABEL_KEY] if all(ROW_LABEL_KEY in r.flat for r in usable) else ["model.name", "backbone.name"]
    keys = list(keys)
    for k in keys:
        if not any(k in r.flat for r in usable):
            raise TableError(f"row key {k!r} is not in any run's config")
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
    for ident, row in rows.items():
        for subset in subsets:
            group = [r for r in members[ident] if r.subset == subset]
            for m in metrics:
                vals = [_metric_value(r.record, split, protocol, m, r.path) for r in group]
                if vals:
                    std = statistics.stdev(vals) if len(vals) > 1 else None
                    row.cells[(subset, m)] = Cell(statistics.fmean(vals), std, len(vals))
                pub = None
                for r in members[ident]:  # any run of the row names the paper's numbers for every subset
                    if r.published is not None and r.published["numbers"].get(subset, {}).get(m) is not None:
                        pub = r.published["numbers"][subset][m]
                        break
                row.published[(subset, m)] = pub
    caption = _caption(usable, keys, split, protocol, show_published)
    return ResultTable(title, keys, subsets, list(metrics), list(rows.values()), caption, show_published)


def _legacy_batch_sizes(runs: Sequence[RunResult], split: str) -> list[int]:
    sizes = set()
    for r in runs:
        legacy = (r.record.get(split) or {}).get("avsbench_legacy") or {}
        bs = legacy.get("eval_batch_size", r.record.get("legacy_batch_size"))
        if bs is not None:
            sizes.add(int(bs))
    return sorted(sizes)


def _caption(runs: Sequence[RunResult], keys: Sequence[str], split: str, protocol: str, show_published: bool) -> str:
    parts = [f"Split: {split}{' (best-on-val checkpoint)' if split == 'val' else ''}.", f"Metric protocol: `{protocol}`"]
    if protocol == "avsbench_legacy":
        sizes = _legacy_batch_sizes(runs, split)
        parts[-1] += f" (legacy batch size: {', '.join(map(str, sizes)) or 'unknown'} clip(s) per batch)"
    parts[-1] += "."
    parts.append("Cells: mean ± sample std over runs (seeds), in %; n = number of runs.")
    parts.append(f"Row keys: {', '.join(keys)} ({len(runs)} runs).")
    if any(r.synthetic for r in runs):
        parts.append("Data: Sounding Shapes (synthetic) for some or all runs; published AVSBench numbers are not shown for them.")
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
        parts.append(f"Columns marked (paper): as published, in % ({'; '.join(papers)}); {NOT_IN_SOURCES} = not in our sources.")
        for proto, bs in sorted(protocols, key=str):
            note = f"Published numbers were computed under `{proto}`" + (f" with {bs} clip(s) per batch" if bs else "")
            if proto != protocol:
                note += f"; ours use `{protocol}`, so compare with care"
            elif proto == "avsbench_legacy" and bs is not None and _legacy_batch_sizes(runs, split) not in ([], [int(bs)]):
                note += "; our legacy batch size differs, so the F-score is not directly comparable"
            parts.append(note + ".")
    return " ".join(parts)


# ----------------------------------------------------------------------------- rendering
def _header(key: str) -> str:
    return "row" if key == ROW_LABEL_KEY else key


def _columns(table: ResultTable) -> list[tuple[str, str, bool]]:
    cols = []
    for s in table.subsets:
        for m in table.metrics:
            cols.append((s, m, False))
            if table.show_published:
                cols.append((s, m, True))
    return cols


def _col_label(subset: str, metric: str, published: bool) -> str:
    label = f"{subset.upper()} {METRIC_LABELS.get(metric, metric)}"
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
    header = [_header(k) for k in table.keys] + [_col_label(*c) for c in cols]
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
    """The same rows as CSV: key columns, then <subset>_<metric>_{mean,std,n[,paper]} (numbers in %)."""
    fields = [_header(k) for k in table.keys]
    for s in table.subsets:
        for m in table.metrics:
            fields += [f"{s}_{m}_mean", f"{s}_{m}_std", f"{s}_{m}_n"]
            if table.show_published:
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
                if table.show_published:
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
