"""Per-run results of the proxy benchmark, one JSON line per run, and the recorded-vs-now comparison.

Every finished run becomes one line of `proxy_runs.jsonl` (in the out dir, and in the tracked
docs/results/proxy_runs.jsonl): protocol version, subset, cell, seed, method label, test and val
mIoU and F (%, per_frame protocol), the listening readings (avs/proxy/listening.py: val-chosen
threshold, shuffled-audio test), the stand-ins' SHA-256, the commit, threads and machine kind, and
the curves over training (`curves`: val mIoU and each latent code's KL on val at every validation),
so every table and plot can be rebuilt from the tracked file alone. A line is keyed by
(protocol_version, subset, cell, seed): a rerun replaces it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from avs.proxy.protocol import PROTOCOL_KEYS
from avs.utils.io import atomic_write_text

RESULTS_FILE = "proxy_runs.jsonl"
KEY = ("protocol_version", "subset", "cell", "seed")


def _split_metrics(record: Mapping[str, Any], split: str) -> dict[str, float | None]:
    node = record.get(split) or {}
    node = node.get("per_frame", node) if isinstance(node, Mapping) else {}
    out: dict[str, float | None] = {}
    for key in ("miou", "fscore", "miou_se"):
        value = node.get(key)
        out[key] = None if value is None else round(100.0 * float(value), 4)
    return out


def run_row(run_dir: Path, head: Mapping[str, Any], listening: Path | None) -> dict[str, Any]:
    """The results line of one finished run dir; `head` gives the key, label, stand-ins and machine."""
    record = json.loads((run_dir / "metrics.json").read_text())
    row = dict(head)
    row["test"] = _split_metrics(record, "test")
    row["val"] = _split_metrics(record, "val")
    row["listening"] = None
    if listening is not None and listening.is_file():
        data = json.loads(listening.read_text())
        row["listening"] = {k: v for k, v in data.items() if k != "checkpoint"}
    row["commit"] = record.get("git_commit")
    from avs.tables.proxy import _latent_values  # the same final KL and AUROCs the tables read

    row["latent"] = _latent_values(run_dir)
    row["curves"] = run_curves(run_dir, record)
    return row


def run_curves(run_dir: Path, record: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The curves over training of one run dir: `{"val_miou": [[step, %], ...], "kl": {code: [[step, nats],
    ...]}}`, val mIoU (per_frame) from metrics.json's `history`, each code's KL on val from latent_kl.jsonl
    (`kl` is empty for a model without a latent). Lists, as a JSON line reads back, so a line made now
    compares equal to the same line read from the file."""
    from avs.tables.proxy import LATENT_KL_FILE
    from avs.tables.proxy_curves import kl_curve, val_curve

    if record is None:
        record = json.loads((run_dir / "metrics.json").read_text())
    val = [[step, round(v, 4)] for step, v in val_curve(dict(record))]
    kl = kl_curve(run_dir / LATENT_KL_FILE)
    return {"val_miou": val, "kl": {code: [[step, round(v, 6)] for step, v in points] for code, points in kl.items()}}


# keys of a protocol whose recorded snapshot a later sitting must not change under the same version: every
# key but the version itself, the cells (a new cell may be added: compared one by one) and what only reports
SNAPSHOT_FIXED = tuple(k for k in PROTOCOL_KEYS if k not in ("version", "cells", "methods", "claims", "targets"))


def check_snapshot(results: Path, protocol: Any) -> None:
    """Refuse (ConfigError) a protocol that differs from the snapshot of its version beside the results
    file in a key of SNAPSHOT_FIXED or in a recorded cell (a new cell may be added): the lines of one version
    would otherwise be read against another protocol. Selecting runs (only, only_subsets, only_seeds) is not
    a change."""
    from omegaconf import OmegaConf

    from avs.errors import ConfigError

    path = results.parent / f"proxy_protocol_v{protocol.get('version')}.yaml"
    if not path.is_file():
        return
    old = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    new = OmegaConf.to_container(protocol, resolve=True)
    changed = [k for k in SNAPSHOT_FIXED if old.get(k) != new.get(k)]
    changed += [f"cells.{c}" for c, node in (old.get("cells") or {}).items() if (new.get("cells") or {}).get(c) != node]
    if changed:
        raise ConfigError(
            f"{', '.join(changed)}: differ from protocol version {protocol.get('version')} as recorded in {path}; "
            "select runs with only / only_subsets / only_seeds, or give the changed protocol a new `version`"
        )


def write_protocol_snapshot(results: Path, protocol: Any, ceilings: Mapping[str, Any]) -> Path:
    """`proxy_protocol_v<version>.yaml` beside the results file: the protocol and its ceilings."""
    from omegaconf import OmegaConf

    node = OmegaConf.create(OmegaConf.to_container(protocol, resolve=True))
    node.ceilings = dict(ceilings)
    path = results.parent / f"proxy_protocol_v{protocol.get('version')}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, OmegaConf.to_yaml(node))
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every line of a results file (none when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_beside(results: Path, name: str, line: Mapping[str, Any]) -> Path:
    """Append `line` (one JSON line, sorted keys) to the file `name` beside the results file -> its path."""
    path = results.parent / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(dict(line), sort_keys=True) + "\n")
    return path


def update_rows(path: Path, new: list[dict[str, Any]]) -> None:
    """Replace the lines with the same key, add the others, keep the file sorted by key."""
    rows = {tuple(r.get(k) for k in KEY): r for r in read_rows(path)}
    rows.update({tuple(r.get(k) for k in KEY): r for r in new})
    ordered = sorted(rows.values(), key=lambda r: tuple(str(r.get(k)) for k in KEY))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in ordered))


def find_row(rows: list[dict[str, Any]], subset: str, cell: str, seed: int, version: Any) -> dict[str, Any] | None:
    """The line of (subset, cell, seed) made under protocol `version`."""
    for r in rows:
        if (r.get("subset"), r.get("cell"), r.get("seed"), r.get("protocol_version")) == (subset, cell, seed, version):
            return r
    return None


def numbers(row: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """(dotted name, value) of every number a row records (test, val, listening, latent; a curve is one
    value, its list of [step, value] pairs)."""
    for part in ("test", "val", "listening", "latent", "curves"):
        node = row.get(part) or {}
        for key in sorted(node):
            value = node[key]
            if isinstance(value, Mapping):
                for sub in sorted(value):
                    yield f"{part}.{key}.{sub}", value[sub]
            else:
                yield f"{part}.{key}", value


# parts a line may lack because it was written before the runner recorded them: a rerun's value there has
# nothing to be compared with, so it is shown, not counted as a difference
LATER_PARTS = ("curves",)


def unrecorded(name: str, recorded: Mapping[str, Any]) -> bool:
    """True for a number of a part added to the lines after `recorded` was written."""
    return name.split(".")[0] in LATER_PARTS and name.split(".")[0] not in recorded


def compare(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> tuple[list[str], bool]:
    """Lines `name: recorded -> now (same / differs)` for every number, and whether all are the same."""
    old, new = dict(numbers(recorded)), dict(numbers(now))
    lines, same = [], True
    for name in list(old) + [n for n in new if n not in old]:
        a, b = old.get(name), new.get(name)
        if unrecorded(name, recorded):
            lines.append(f"{name}: not recorded (the line predates it), now {b}")
            continue
        ok = a == b
        same = same and ok
        lines.append(f"{name}: recorded {a}, now {b} ({'same' if ok else 'differs'})")
    for key in ("standins", "threads", "simd", "machine_kind", "cpu_level", "commit"):
        lines.append(f"{key}: recorded {recorded.get(key)}, now {now.get(key)}")
    return lines, same
