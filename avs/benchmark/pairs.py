"""Comparison pairs: two variants of the configured model (a config override or a way of running
it) timed side by side, whose outputs must agree. Which pairs exist, what each variant changes
and when a pair applies are read from `pairs` in configs/benchmark.yaml."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from avs.benchmark.models import (
    _autocast,
    _prepare,
    bench_model_config,
    build_bench_model,
    make_batch,
    perturb_zero_init,
)
from avs.benchmark.timing import measure
from avs.errors import ConfigError

log = logging.getLogger(__name__)


def _pairs(cfg: DictConfig) -> Mapping[str, Any]:
    pairs = cfg.get("pairs")
    if not pairs:
        raise ConfigError("pairs: the benchmark config defines no comparison pairs (configs/benchmark.yaml)")
    return pairs


def _overrides(items: Any, where: str) -> dict[str, Any]:
    """["model.x.y=value", ...] -> {"model.x.y": value} (values parsed as YAML, as Hydra does)."""
    out = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise ConfigError(f"{where}: expected key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def pair_spec(cfg: DictConfig, name: str) -> dict[str, Any]:
    """One pair from the config: labels, overrides and runtime options of a and b, applicability."""
    pairs = _pairs(cfg)
    if name not in pairs:
        raise ConfigError(f"compare: unknown pair {name!r}; expected some of {sorted(pairs)}")
    p = pairs[name]
    spec: dict[str, Any] = {
        "inference_only": bool(p.get("inference_only", False)),
        "timeout_s": p.get("timeout_s"),
        "what": str(p.get("what", name)),
    }
    for side in ("a", "b"):
        v = p[side]
        spec[side] = {
            "label": str(v.label),
            "overrides": _overrides(v.get("overrides"), f"pairs.{name}.{side}.overrides"),
            "runtime": OmegaConf.to_container(v.runtime) if v.get("runtime") is not None else {},
        }
    spec["requires"] = list(p.get("requires") or [])
    spec["skip_reason"] = str(p.get("skip_reason", f"model lacks {spec['requires']}"))
    return spec


def pair_applicable(cfg: DictConfig, name: str) -> str | None:
    """None when pair `name` applies to the configured model (every `requires` key is set), else the reason."""
    spec = pair_spec(cfg, name)
    if any(OmegaConf.select(cfg, key) is None for key in spec["requires"]):
        return spec["skip_reason"]
    return None


def output_diff(cfg: DictConfig, name: str, device: torch.device) -> float:
    """Max |logits_a - logits_b| of the two variants of a pair (same weights, same B=1 clip)."""
    spec = pair_spec(cfg, name)
    outs = []
    for side in (spec["a"], spec["b"]):
        c = bench_model_config(cfg, side["overrides"])
        model = perturb_zero_init(build_bench_model(c, device)).eval()
        batch = make_batch(1, int(c.num_frames), int(c.image_size), "logmel", device)
        model, batch = _prepare(model, batch, side["runtime"])
        with torch.no_grad(), _autocast(device, bool(side["runtime"].get("amp"))):
            outs.append(model(batch)["logits"].float())
    return float((outs[0] - outs[1]).abs().max())


def _measure_pair(
    cfg: DictConfig, name: str, spec: dict[str, Any], spec0: dict[str, Any], inference: dict[str, Any], memory: bool
) -> dict[str, Any]:
    a, b = spec["a"], spec["b"]
    entry: dict[str, Any] = {"a": a["label"], "b": b["label"]}
    if spec["inference_only"]:  # variant a is the plain model: its inference timing is reused
        kinds = ["infer_clip"]
        ra = {"infer_clip": inference}
        rb = measure(
            {**spec0, "kinds": kinds, "overrides": b["overrides"], "runtime": b["runtime"]},
            memory=False,
            timeout=spec["timeout_s"],
        )
        if "error" in rb:
            return {**entry, "skipped": f"{spec['what']}: {rb['error']}"}
        entry["max_abs_diff"] = rb.get("max_abs_diff")
    else:
        kinds = ["train_step", "infer_clip"]
        ra = measure({**spec0, "kinds": kinds, "overrides": a["overrides"], "runtime": a["runtime"]}, memory=memory)
        rb = measure({**spec0, "kinds": kinds, "overrides": b["overrides"], "runtime": b["runtime"]}, memory=memory)
        bad = [r["error"] for r in (ra, rb) if "error" in r]
        if bad:
            return {**entry, "skipped": "; ".join(bad)}
        entry["max_abs_diff"] = output_diff(cfg, name, torch.device(spec0["device"]))
    for k in kinds:
        entry[k] = {"a_s": ra[k]["seconds"], "b_s": rb[k]["seconds"], "speedup_b": ra[k]["seconds"] / rb[k]["seconds"]}
    if ra.get("peak_mb") and rb.get("peak_mb"):
        entry["peak_mb"] = {"a": ra["peak_mb"], "b": rb["peak_mb"]}
        entry["memory_ratio_b_over_a"] = rb["peak_mb"] / ra["peak_mb"]
    return entry


def compare_pairs(cfg: DictConfig, spec0: dict[str, Any], inference: dict[str, Any], memory: bool) -> dict[str, Any]:
    """Every pair of `cfg.compare`: timings of a and b, memory ratio, max output difference (or why skipped)."""
    comps: dict[str, Any] = {}
    for name in list(cfg.compare):
        spec = pair_spec(cfg, name)
        why = pair_applicable(cfg, name)
        if why:
            comps[name] = {"a": spec["a"]["label"], "b": spec["b"]["label"], "skipped": why}
            continue
        log.info("comparison %s: %s vs %s", name, spec["a"]["label"], spec["b"]["label"])
        comps[name] = _measure_pair(cfg, name, spec, spec0, inference, memory)
    return comps
