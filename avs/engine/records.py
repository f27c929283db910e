"""The run's records on disk: run_report.json (status and faults) and metrics.json (results and provenance)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from avs.data.layout import labelled_frames_name
from avs.engine.state import RunState
from avs.utils.allocator import state as allocator_state
from avs.utils.io import atomic_write_text


def git_commit() -> str | None:
    """The checkout's HEAD commit, if this is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_report(
    run_dir: str | Path, state: RunState, world_size: int, status: str, message: str | None = None
) -> Path:
    """run_report.json: status (finished | interrupted | failed), steps and every fault met."""
    report = {
        "status": status,
        "message": message,
        "step": state.step,
        "epoch": state.epoch,
        "world_size": world_size,
        "last_checkpoint_step": state.last_saved.get("last"),
        "num_nonfinite_steps": len(state.bad_steps()),
        "num_skipped_clips": len(set(state.skipped)),
        **state.faults,
    }
    path = Path(run_dir) / "run_report.json"
    atomic_write_text(path, json.dumps(report, indent=2, default=str))
    return path


def data_release(data: DictConfig) -> str | None:
    """What the data are: "synthetic" for generated data (a `data.synthetic` node), else the data config's
    `release` (configs/data/s4.yaml, ms3.yaml: avsbench-object; avss.yaml: avsbench-semantic); None when a
    data config names none (a user's own, or one stored before the key existed)."""
    if data.get("synthetic"):
        return "synthetic"
    release = data.get("release")
    return None if release is None else str(release)


def _data_record(cfg: DictConfig) -> dict[str, Any]:
    return {
        "name": cfg.data.get("name"),
        "subset": cfg.data.subset,
        "release": data_release(cfg.data),
        "root": str(cfg.data.root),
    }


def _faults_record(state: RunState) -> dict[str, Any]:
    steps = state.faults["nonfinite_steps"]
    return {
        "nonfinite_steps": [f["step"] for f in steps if f["kind"] != "amp_overflow"],
        "amp_overflow_steps": [f["step"] for f in steps if f["kind"] == "amp_overflow"],
        "interruptions": state.faults["interruptions"],
        "resumed_from": state.faults["resumed_from"],
    }


def metrics_record(
    cfg: DictConfig, state: RunState, result: dict[str, Any], world_size: int, loss_weights: dict[str, float]
) -> dict[str, Any]:
    """The metrics.json record of a finished run (its keys are the schema tables and tests read)."""
    tcfg = cfg.trainer
    return {
        "method": cfg.model.get("name"),
        "backbone": cfg.backbone.get("name"),
        "data": _data_record(cfg),
        "resolution": int(cfg.data.image_size),
        "num_frames": int(cfg.data.num_frames),
        "metric_protocols": list(cfg.eval.protocols),
        "selection": {
            "split": str(tcfg.select_split),
            "protocol": str(cfg.eval.protocol),
            "metric": str(tcfg.select_metric),
        },
        "eval_batch_size": int(cfg.data.eval_batch_size),
        "legacy_batch_size": int(cfg.eval.legacy_batch_size),
        "init_from": cfg.model.get("init_from"),
        "supervised_frames": labelled_frames_name(cfg.data.subset, "train"),
        "seed": int(cfg.seed),
        "world_size": world_size,
        "global_batch_size": int(cfg.data.batch_size) * world_size * max(1, int(tcfg.grad_accum)),
        "git_commit": git_commit(),
        "allocator": allocator_state(),  # runtime.allocator: what this process's allocator ran with
        "loss_weights": loss_weights,
        "skipped_clips": sorted(set(state.skipped)),
        "faults": _faults_record(state),
        "val": state.best.get("val"),
        "test": result.get("test"),
        "best_epoch": state.best.get("epoch"),
        "best_step": state.best.get("step"),
        "steps": result["steps"],
        "train_time_s": result["train_time_s"],
        "history": state.history,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def write_metrics(run_dir: str | Path, record: dict[str, Any]) -> Path:
    path = Path(run_dir) / "metrics.json"
    atomic_write_text(path, json.dumps(record, indent=2, default=str))
    return path
