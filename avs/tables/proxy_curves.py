"""Curves over training of the proxy benchmark's runs: val mIoU and the latent KL of each code on val.

Read from a benchmark dir (metrics.json's `history`, latent_kl.jsonl) or from the `curves` the runner
writes into each results line (avs/proxy/results.py), so the curve plots can be drawn from the tracked
results file alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from avs.tables.proxy import (
    LATENT_KL_FILE,
    METRIC_PROTOCOL,
    KLCurves,
    Results,
    _read_json,
    code_totals,
    read_jsonl,
    read_latent_kl,
)

VAL_CURVE = "val mIoU"  # the one curve of load_curves(kind="val")


def kl_curve(path: Path) -> dict[str, list[tuple[int, float]]]:
    """code -> [(optimizer step, KL of the code on val)] in step order, from every line that has a step."""
    curve: dict[str, list[tuple[int, float]]] = {}
    for record in read_latent_kl(path):
        codes = code_totals(record, path)
        if record.get("step") is None or codes is None:
            continue
        for code, value in codes.items():
            curve.setdefault(code, []).append((int(record["step"]), value))
    return {code: sorted(points) for code, points in curve.items()}


def val_curve(record: dict[str, Any]) -> list[tuple[int, float]]:
    """[(optimizer step, val mIoU %, per_frame)] of every validation in a metrics.json's `history`."""
    points = []
    for entry in record.get("history") or []:
        miou = (((entry.get("val") or {}).get(METRIC_PROTOCOL) or {}) if isinstance(entry, dict) else {}).get("miou")
        if entry.get("step") is not None and miou is not None:
            points.append((int(entry["step"]), 100.0 * float(miou)))
    return sorted(points)


def _run_curves(run_dir: Path, kind: str) -> dict[str, list[tuple[int, float]]]:
    if kind == "kl":
        return kl_curve(run_dir / LATENT_KL_FILE)
    path = run_dir / "metrics.json"
    points = val_curve(_read_json(path)) if path.is_file() else []
    return {VAL_CURVE: points} if points else {}


def _line_curves(path: Path, results: Results, version: Any, kind: str) -> KLCurves:
    """The same from the `curves` of a results file's lines of protocol `version` (avs/proxy/results.py)."""
    curves: KLCurves = {}
    for _, row in read_jsonl(path):
        key = (row.get("subset"), row.get("cell"))
        if row.get("protocol_version") != version or int(row.get("seed", -1)) not in results.get(key, {}):
            continue
        node = row.get("curves") or {}
        named = node.get("kl") or {} if kind == "kl" else {VAL_CURVE: node["val_miou"]} if node.get("val_miou") else {}
        curve = {code: sorted((int(s), float(v)) for s, v in points) for code, points in named.items()}
        if curve:
            curves.setdefault(key, {})[int(row["seed"])] = curve
    return curves


def load_curves(source: str | Path, results: Results, kind: str, version: Any = None) -> KLCurves:
    """(subset, cell) -> {seed: {name: [(step, value)]}} of the finished runs in `results`: `kind` "kl" the
    KL of each latent code on val (latent_kl.jsonl), "val" the val mIoU (metrics.json's history). From a
    proxy benchmark dir, or from the `curves` of a results file's lines of protocol `version`."""
    if kind not in ("kl", "val"):
        raise ValueError(f"curve kind {kind!r}: expected 'kl' or 'val'")
    if Path(source).is_file():
        return _line_curves(Path(source), results, version, kind)
    curves: KLCurves = {}
    for (subset, cell), runs in results.items():
        for seed in sorted(runs):
            curve = _run_curves(Path(source) / subset / cell / f"seed{seed}", kind)
            if curve:
                curves.setdefault((subset, cell), {})[seed] = curve
    return curves


def load_kl_curves(out_dir: str | Path, results: Results, version: Any = None) -> KLCurves:
    """(subset, cell) -> {seed: kl_curve} for the finished runs in `results` that have KL curves."""
    return load_curves(out_dir, results, "kl", version)
