"""The benchmark's targets (read from `targets` in configs/benchmark.yaml) and its plain-text report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from avs.errors import ConfigError

__all__ = ["check_targets", "format_report"]


def _lookup(res: Mapping[str, Any], path: Sequence[str]) -> Any:
    node: Any = res
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _bound(spec: Mapping[str, Any], model: str) -> float | None:
    """A number, or a per-model table (a model missing from it has no such target)."""
    bound = spec.get("bound")
    if isinstance(bound, Mapping):
        bound = bound.get(model)
    return None if bound is None else float(bound)


def check_targets(res: dict[str, Any], targets: Mapping[str, Any]) -> dict[str, Any]:
    """Each target of `targets` (name -> {value: path into `res`, op: <= | >=, bound}): value, bound, met."""
    out: dict[str, Any] = {}
    model = res["config"]["model"]
    for name, spec in (targets or {}).items():
        op = str(spec.get("op"))
        if op not in ("<=", ">="):
            raise ConfigError(f"targets.{name}.op must be '<=' or '>=', got {op!r}")
        value, bound = _lookup(res, [str(k) for k in spec["value"]]), _bound(spec, model)
        if value is None or bound is None:
            continue
        met = value <= bound if op == "<=" else value >= bound
        out[name] = {
            "value": value,
            "bound": bound,
            "op": op,
            "met": bool(met),
            "margin": (bound - value) if op == "<=" else (value - bound),
        }
    return out


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_report(res: dict[str, Any]) -> str:
    """Plain-text table of a run_benchmark result."""
    c = res["config"]
    L = [
        f"model={c['model']} backbone={c['backbone']} size={c['image_size']} T={c['num_frames']} "
        f"B={c['batch_size']} repeats={c['repeats']} device={res['hardware']['device']} "
        f"threads={res['hardware']['threads']}",
        f"{'measurement':<34}{'seconds':>10}{'peak MB':>10}{'ratio':>8}",
        f"{'backbone forward (B=1)':<34}{_f(res['backbone']['fwd_s']):>10}{'-':>10}{'':>8}",
        f"{'backbone forward+backward':<34}{_f(res['backbone']['fwdbwd_s']):>10}"
        f"{_f(res['backbone']['fwdbwd_peak_mb'], '{:.0f}'):>10}{'':>8}",
        f"{'train step (fwd+bwd+Adam)':<34}{_f(res['train']['step_s']):>10}{_f(res['train']['peak_mb'], '{:.0f}'):>10}"
        f"{_f(res['ratios']['train_step/backbone_fwdbwd'], '{:.2f}'):>8}",
        f"{'inference per clip (B=1)':<34}{_f(res['inference']['clip_s']):>10}"
        f"{_f(res['inference']['peak_mb'], '{:.0f}'):>10}"
        f"{_f(res['ratios']['infer_clip/backbone_fwd'], '{:.2f}'):>8}",
        f"{'inference per frame':<34}{_f(res['inference']['frame_s']):>10}",
        "",
        f"{'pair (a vs b)':<40}{'train a/b s':>16}{'infer a/b s':>16}{'mem b/a':>9}{'max|diff|':>11}",
    ]
    for name, e in res["comparisons"].items():
        label = f"{name}: {e['a']} vs {e['b']}"
        if "skipped" in e:
            L.append(f"{label:<40}skipped ({e['skipped'][:80]})")
            continue
        tr = e.get("train_step")
        inf = e.get("infer_clip")
        trs = f"{tr['a_s']:.3f}/{tr['b_s']:.3f}" if tr else "-"
        ins = f"{inf['a_s']:.3f}/{inf['b_s']:.3f}" if inf else "-"
        L.append(
            f"{label:<40}{trs:>16}{ins:>16}{_f(e.get('memory_ratio_b_over_a'), '{:.2f}'):>9}"
            f"{_f(e.get('max_abs_diff'), '{:.1e}'):>11}"
        )
    hs = res.get("host_syncs")
    if hs:
        L.append("")
        L.append(f"host syncs per training step: {hs['per_step']} {hs['kinds'] or ''}".rstrip())
    gb = res.get("graph_breaks")
    if gb:
        L.append(
            f"torch.compile training forward: {gb['error']}"
            if "error" in gb
            else f"torch.compile training forward: {gb['graphs']} graph(s), {gb['breaks']} graph break(s)"
        )
    dl = res["data_loader"]
    L.append("")
    L.append(
        f"data loader ({dl['clips']} clips, {dl['image_size']} px, num_workers=0 in-process): "
        + ", ".join(f"{s} {dl[s]['clips_per_s']:.1f} clips/s" for s in ("logmel", "wav", "embedding") if s in dl)
    )
    m = res["metrics"]
    L.append(f"metrics: {m['frames']} frames of {m['size']}x{m['size']} -> {m['frames_per_s']:.0f} frames/s")
    if res.get("targets"):
        L.append("")
        for k, t in res["targets"].items():
            L.append(f"target {k}: {t['value']:.3f} {t['op']} {t['bound']} -> {'met' if t['met'] else 'MISSED'}")
    return "\n".join(L)
