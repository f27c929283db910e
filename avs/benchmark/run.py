"""Every measurement of scripts/benchmark.py in one run -> a JSON-ready dict."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from avs.benchmark.models import bench_model_config, build_bench_model, make_batch, perturb_zero_init
from avs.benchmark.pairs import compare_pairs
from avs.benchmark.probes import (
    data_loader_throughput,
    graph_breaks,
    hardware_info,
    metrics_throughput,
    train_step_syncs,
)
from avs.benchmark.report import check_targets
from avs.benchmark.timing import measure

log = logging.getLogger(__name__)


# what quick=true sets itself: a command line that also sets one of them is refused (check_quick_overrides)
QUICK_KEYS: tuple[str, ...] = ("backbone", "image_size", "repeats", "data_clips", "metrics_frames", "metrics_size")


def check_quick_overrides(overrides: list[str]) -> None:
    """With quick=true, refuse an override of a key that quick=true sets itself (it would be dropped)."""
    from avs.errors import ConfigError

    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    clash = sorted({k for k in keys if k.split(".")[0] in QUICK_KEYS})
    if clash:
        raise ConfigError(
            f"quick=true sets {', '.join(QUICK_KEYS)} itself, so {', '.join(clash)} on the command line would be "
            "ignored: drop quick=true (and set them all), or drop those overrides"
        )


def apply_quick(cfg: DictConfig) -> DictConfig:
    """`quick=true`: pvt_v2_b0, 64 px, 1 repeat, few clips and frames of data / metrics (used by the tests)."""
    from avs.config import CONFIG_DIR

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.backbone = OmegaConf.load(Path(CONFIG_DIR) / "backbone" / "pvt_v2_b0.yaml")
        cfg.image_size = 64
        cfg.repeats = 1
        cfg.data_clips = 2
        cfg.metrics_frames = 5 * int(cfg.num_frames)
        cfg.metrics_size = 64
    return cfg


def _run_config(cfg: DictConfig, memory: bool) -> dict[str, Any]:
    return {
        "model": str(cfg.model.name),
        "backbone": str(cfg.backbone.name),
        "audio": str(cfg.audio._target_),
        "image_size": int(cfg.image_size),
        "num_frames": int(cfg.num_frames),
        "batch_size": int(cfg.batch_size),
        "repeats": int(cfg.repeats),
        "warmup": int(cfg.warmup),
        "quick": bool(cfg.quick),
        "memory": memory,
        "model_cfg": OmegaConf.to_container(cfg.model, resolve=True),
    }


def _core_timings(res: dict[str, Any], spec0: dict[str, Any], cfg: DictConfig, memory: bool) -> dict[str, Any]:
    """Backbone, training-step and inference timings and memory into `res` -> the inference measurement."""
    log.info("backbone forward")
    fwd = measure({**spec0, "kinds": ["backbone_fwd"]}, memory=False)
    log.info("backbone forward+backward")
    fb = measure({**spec0, "kinds": ["backbone_fwdbwd"]}, memory=memory)
    log.info("train step")
    tr = measure({**spec0, "kinds": ["train_step"]}, memory=memory)
    log.info("inference")
    inf = measure({**spec0, "kinds": ["infer_clip"]}, memory=memory)
    T = int(cfg.num_frames)
    for r in (fwd, fb, tr, inf):
        if "error" in r:
            raise RuntimeError(f"benchmark measurement failed: {r['error']}")
    res["backbone"] = {
        "fwd_s": fwd["backbone_fwd"]["seconds"],
        "fwd_batch": 1,
        "fwdbwd_s": fb["backbone_fwdbwd"]["seconds"],
        "fwdbwd_batch": int(cfg.batch_size),
        "fwdbwd_peak_mb": fb.get("peak_mb"),
    }
    res["train"] = {
        "step_s": tr["train_step"]["seconds"],
        "batch_size": int(cfg.batch_size),
        "peak_mb": tr.get("peak_mb"),
        "note": "forward + backward + optimizer step (the trainer's Adam); loss = unweighted sum of the loss terms",
    }
    clip_s = inf["infer_clip"]["seconds"]
    res["inference"] = {
        "clip_s": clip_s,
        "frame_s": clip_s / T,
        "frames_per_s": T / clip_s,
        "batch_size": 1,
        "peak_mb": inf.get("peak_mb"),
    }
    res["memory"] = {
        "source": tr.get("memory_source", "not measured"),
        "backbone_train_mb": fb.get("peak_mb"),
        "train_step_mb": tr.get("peak_mb"),
        "inference_mb": inf.get("peak_mb"),
    }
    res["ratios"] = {
        "train_step/backbone_fwdbwd": res["train"]["step_s"] / res["backbone"]["fwdbwd_s"],
        "infer_clip/backbone_fwd": clip_s / res["backbone"]["fwd_s"],
    }
    return inf["infer_clip"]


def run_benchmark(cfg: DictConfig) -> dict[str, Any]:
    """Every measurement of scripts/benchmark.py in one run -> a JSON-ready dict."""
    from avs.engine.params import parameter_report

    device = torch.device(str(cfg.device))
    memory = bool(cfg.memory)
    base = OmegaConf.to_container(cfg, resolve=False)  # keeps model.audio_encoder -> ${audio} linked
    base.pop("hydra", None)
    spec0 = {"cfg": base, "device": str(device), "threads": torch.get_num_threads()}
    res: dict[str, Any] = {"hardware": hardware_info(device), "config": _run_config(cfg, memory)}
    res["params"] = parameter_report(bench_model_config(cfg))
    inference = _core_timings(res, spec0, cfg, memory)
    res["comparisons"] = compare_pairs(cfg, spec0, inference, memory)
    log.info("host syncs and graph breaks of a training step")
    T = int(cfg.num_frames)
    sync_model = perturb_zero_init(build_bench_model(bench_model_config(cfg), device))
    sync_batch = make_batch(
        int(cfg.batch_size), T, int(cfg.image_size), "logmel", device, int(cfg.model.get("audio_dim", 128))
    )
    res["host_syncs"] = train_step_syncs(sync_model, sync_batch)
    if bool(cfg.get("graph_breaks", True)):
        res["graph_breaks"] = graph_breaks(sync_model, sync_batch)
    del sync_model
    res["data_loader"] = data_loader_throughput(cfg, int(cfg.data_clips), max(1, int(cfg.repeats)))
    res["metrics"] = metrics_throughput(
        num_frames=int(cfg.metrics_frames), size=int(cfg.metrics_size), clip_len=T, device=str(device)
    )
    res["targets"] = check_targets(res, cfg.get("targets") or {})
    return res
