"""Does each method listen? Paired per seed: with audio vs the same checkpoint with the test audio
shuffled across clips, and vs the cell `<method>_no_audio`, on three readings (mIoU at p > 0.5,
mIoU at the val-chosen threshold, max F), so that a calibration effect is not read as listening.

The readings come from each run's listening.json (avs/proxy/listening.py) or its results line.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from avs.tables.proxy import Results, TargetCheck, cell_stats, cell_subsets, describe, verdict

READINGS = {"miou_05": "mIoU@0.5", "miou_val_threshold": "mIoU@val thr", "fscore": "F"}
PARTS = {"listen": "test", "shuffled": "test_shuffled_audio"}
LISTEN_FILE = "listening.json"


def listening_values(record: dict[str, Any] | None) -> dict[str, float | None]:
    """`listen:<reading>` (test) and `shuffled:<reading>` (test, shuffled audio) of one run's record."""
    record = record or {}
    out: dict[str, float | None] = {}
    for prefix, part in PARTS.items():
        node = record.get(part) or {}
        for key in READINGS:
            value = node.get(key)
            out[f"{prefix}:{key}"] = None if value is None else float(value)
    return out


def _differences(a: dict[int, dict], b: dict[int, dict], key_a: str, key_b: str) -> dict[int, float]:
    """{seed: a[seed][key_a] - b[seed][key_b]} over the seeds both have with both readings, in seed order."""
    return {
        k: a[k][key_a] - b[k][key_b]
        for k in sorted(set(a) & set(b))
        if a[k].get(key_a) is not None and b[k].get(key_b) is not None
    }


def _paired(a: dict[int, dict], b: dict[int, dict], key_a: str, key_b: str):
    return describe(list(_differences(a, b, key_a, key_b).values()))


def listening_rows(protocol: DictConfig, results: Results) -> list[list[Any]]:
    """[cell, subset, reading, n, with-audio mean, with − shuffled (mean, lo, hi, verdict),
    with − no-audio cell (mean, lo, hi, verdict)] for every method, subset and reading."""
    rows = []
    for cell in protocol.methods:
        for subset in cell_subsets(protocol, cell):
            runs = results.get((subset, cell), {})
            other = f"{cell}_no_audio"
            plain = results.get((subset, other), {}) if other in protocol.cells else {}
            for key in READINGS:
                s = cell_stats(results, subset, cell, f"listen:{key}") if runs else describe([])
                shuf = _paired(runs, runs, f"listen:{key}", f"shuffled:{key}")
                none = _paired(runs, plain, f"listen:{key}", f"listen:{key}")
                row = [cell, subset, READINGS[key], s.n, s.mean]
                row += [shuf.mean, shuf.lo, shuf.hi, verdict(shuf) if shuf.n else None]
                row += [none.mean, none.lo, none.hi, verdict(none) if none.n else None]
                rows.append(row)
    return rows


def _diff(mean: float | None, lo: float | None, hi: float | None, word: str | None) -> str:
    if mean is None:
        return "–"
    if lo is None:
        return f"{mean:+.2f}"
    return f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}] {word}"


def listening_markdown(protocol: DictConfig, results: Results) -> list[str]:
    """The listening table as markdown lines (empty when no run has listening readings)."""
    rows = listening_rows(protocol, results)
    if not any(r[3] for r in rows):
        return []
    lines = [
        "### Listening: with audio − shuffled audio (same checkpoint) and − the no-audio cell, per seed, 95% CI",
        "",
        "| method | subset | reading | n | with audio | − shuffled audio | − no-audio cell |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell, subset, reading, n, mean, *rest in rows:
        mean_text = "–" if mean is None else f"{mean:.2f}"
        lines.append(
            f"| {cell} | {subset.upper()} | {reading} | {n} | {mean_text} | {_diff(*rest[:4])} | {_diff(*rest[4:])} |"
        )
    return lines


def _worst(runs: dict[int, dict], other: dict[int, dict], prefix: str) -> tuple[float, int, str] | None:
    """The smallest `listen:<reading>` − `<prefix>:<reading>` over the seeds and readings (None: no pair)."""
    pairs = [
        (d, k, label)
        for key, label in READINGS.items()
        for k, d in _differences(runs, other, f"listen:{key}", f"{prefix}:{key}").items()
    ]
    return min(pairs, key=lambda p: p[0]) if pairs else None  # ties: the first reading, then the first seed


def every_seed_checks(protocol: DictConfig, results: Results) -> list[TargetCheck]:
    """Per method and subset: in every seed the run with audio beats the same checkpoint with shuffled
    test audio and its own `<method>_no_audio` run, on every reading. Measured: the smallest margins."""
    checks = []
    name = "every seed: with audio > shuffled audio and > no-audio run (all readings)"
    for cell in protocol.methods:
        other = f"{cell}_no_audio"
        for subset in cell_subsets(protocol, cell):
            runs = results.get((subset, cell), {})
            plain = results.get((subset, other), {}) if other in protocol.cells else {}
            shuf, none = _worst(runs, runs, "shuffled"), _worst(runs, plain, "listen")
            parts, margins = [], []
            for label, worst, seeds in (("shuffled", shuf, set(runs)), ("no-audio", none, set(runs) & set(plain))):
                if worst is None:
                    parts.append(f"− {label}: no paired seeds")
                    continue
                value, seed, reading = worst
                margins.append(value)
                parts.append(f"min − {label} {value:+.2f} (seed {seed}, {reading}; {len(seeds)} seeds)")
            ok = False if any(m <= 0 for m in margins) else (True if len(margins) == 2 else None)
            checks.append(TargetCheck(name, f"{cell} / {subset}", "; ".join(parts), ok))
    return checks
