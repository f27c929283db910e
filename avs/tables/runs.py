"""Read run directories: every metrics.json below them, its flattened config and published numbers."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avs.errors import AVSError, ExitCode
from avs.tables.keys import INIT_FROM_KEY, ROW_LABEL_KEY, SUBSET_ORDER


class TableError(AVSError, ValueError, code=ExitCode.DATA):
    """A run dir or metrics.json cannot make a table (the message names the file and what is missing)."""


class RunDirNotFound(TableError, FileNotFoundError):
    """A run dir given to the table builder does not exist or holds no metrics.json."""


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
    """Nested config dict -> {"a.b.c": leaf}.

    A `_target_` node also maps its own key to the class name; lists become JSON.
    """
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
    if flat.get(INIT_FROM_KEY) not in (None, ""):
        flat[INIT_FROM_KEY] = "checkpoint"
    elif INIT_FROM_KEY in flat:
        flat[INIT_FROM_KEY] = None
    return flat


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _published(node: Any, flat: dict[str, Any], source: Path, subset: str) -> dict[str, Any] | None:
    """The run's published entry: the `published` node, with its `by_subset.<subset>` entry (the paper, table
    and source of that subset's numbers, e.g. AVSS numbers from another paper) and then a matching `rows`
    entry taking precedence."""
    if not isinstance(node, dict):
        return None
    entry = {k: v for k, v in node.items() if k != "by_subset"}
    own = (node.get("by_subset") or {}).get(subset)
    if isinstance(own, dict):
        entry.update(own)
    for row in node.get("rows") or []:
        match = row.get("match") or {}
        if not isinstance(match, dict) or not match:
            raise TableError(f"{source}: published.rows entries need a non-empty `match` mapping of config keys")
        if all(_same(flat.get(k), v) for k, v in match.items()):
            entry.update({k: v for k, v in row.items() if k != "match"})
            break
    numbers: dict[str, dict[str, float | None]] = {}
    for name in SUBSET_ORDER:
        vals = entry.get(name)
        if not isinstance(vals, dict):
            vals = {}
        numbers[name] = {k: (None if v is None else float(v)) for k, v in vals.items()}
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
        published = _published(cfg.get("published"), flat, mpath, str(subset))
        if published is not None and published.get("row") is not None:
            flat[ROW_LABEL_KEY] = str(published["row"])
        data = cfg.get("data") or {}
        synthetic = bool(data.get("synthetic")) or (record.get("data") or {}).get("release") == "synthetic"
        if synthetic:
            published = None  # the row label stays; AVSBench numbers are not comparable
        seed = record.get("seed", cfg.get("seed"))
        runs.append(RunResult(mpath.parent, str(subset), seed, flat, record, published, synthetic))
    return runs
