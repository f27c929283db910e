"""Per-class IoU columns of AVSS tables (scripts/tables.py --per-class).

Every AVSS metrics record carries ``iou_per_class`` (one value per class, background = class 0) under
each semantic protocol. A class column's key is ``iou_per_class.<index>``; its cells are the mean +-
std over the row's runs of that class's IoU in %, like every other cell, over the runs where the IoU
is defined (a class neither labelled nor predicted in a run has no IoU there). Columns are the
foreground classes 1..C-1 in index order, then ``background`` (class 0), as the `per_class` protocol
reports the background apart from the foreground mean. Names come from the run's data root
``label2idx.json``; without it a class is called ``class_<index>``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from avs.data.avss_layout import LABELS_NAME, read_label2idx
from avs.data.layout import AVSDataError
from avs.tables.runs import RunResult, TableError

CLASS_LIST = "iou_per_class"
PER_CLASS_FLAG = "--per-class"


def class_key(index: int) -> str:
    """The metric key of one class's IoU column."""
    return f"{CLASS_LIST}.{index}"


def class_index(metric: str) -> int | None:
    """The class index of a class column's key, None for any other metric."""
    head, _, tail = metric.partition(".")
    return int(tail) if head == CLASS_LIST and tail.isdigit() else None


def class_value(block: dict[str, Any], index: int) -> float | None:
    """One class's IoU in % from a protocol's metrics; None when the run has no defined IoU for it."""
    values = block.get(CLASS_LIST)
    if not isinstance(values, list) or index >= len(values) or values[index] is None:
        return None
    value = float(values[index])
    return None if math.isnan(value) else 100.0 * value


def _class_count(run: RunResult, split: str, protocol: str) -> int:
    values = ((run.record.get(split) or {}).get(protocol) or {}).get(CLASS_LIST)
    if not isinstance(values, list) or not values:
        raise TableError(f"{run.path}/metrics.json: no {CLASS_LIST!r} list in {split}/{protocol} for {PER_CLASS_FLAG}")
    return len(values)


def _run_names(run: RunResult, count: int) -> list[str] | None:
    """Class names from the run's data root label2idx.json, None when the root has none."""
    root = (run.record.get("data") or {}).get("root") or run.flat.get("data.root")
    if not root or not (Path(str(root)) / LABELS_NAME).is_file():
        return None
    try:
        return read_label2idx(Path(str(root)) / LABELS_NAME, count)
    except AVSDataError as exc:
        raise TableError(f"{run.path}: class names for {PER_CLASS_FLAG}: {exc}") from exc


def check_avss_only(runs: Sequence[RunResult]) -> None:
    """TableError naming the flag unless every run is AVSS (checked before any metric is read)."""
    others = sorted({r.subset for r in runs if r.subset != "avss"})
    if others:
        raise TableError(f"{PER_CLASS_FLAG} needs AVSS runs only; these runs include {', '.join(others)} runs")


def class_columns(runs: Sequence[RunResult], split: str, protocol: str) -> dict[str, str]:
    """{class column key: class name}, foreground classes in index order then the background (class 0).

    TableError when a run lacks the per-class list or runs disagree on the classes."""
    count, names, source = None, None, None
    for r in runs:
        n = _class_count(r, split, protocol)
        if count is not None and n != count:
            raise TableError(f"{PER_CLASS_FLAG}: {r.path} has {n} classes, {runs[0].path} has {count}")
        count = n
        found = _run_names(r, n)
        if found is not None and names is not None and found != names:
            raise TableError(f"{PER_CLASS_FLAG}: class names of {r.path} differ from those of {source}")
        if found is not None and names is None:
            names, source = found, r.path
    assert count is not None
    names = names or [f"class_{i}" for i in range(count)]
    order = [*range(1, count), 0]
    return {class_key(i): ("background" if i == 0 else names[i]) for i in order}
