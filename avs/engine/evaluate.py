"""Checkpoint evaluation used by scripts/eval.py (model and data config come from the checkpoint).

Runs under torchrun too: each rank scores a shard, the statistics are gathered (Trainer.evaluate)
and rank 0 writes the tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from avs.engine.checkpoint import CheckpointError, load_checkpoint
from avs.engine.outputs import check_output_path
from avs.engine.report import write_tables
from avs.engine.trainer import Trainer, git_commit


def config_from_checkpoint(state: dict[str, Any], path: str | Path, weight_files: bool = False) -> DictConfig:
    """The resolved training config stored in an avs checkpoint.

    Unless `weight_files`, every weight-file load (ImageNet backbone, VGGish) is switched off: the
    checkpoint holds all weights, so evaluating it must not need those files.
    """
    if "config" not in state:
        raise CheckpointError(f"{path} has no stored config: evaluate avs checkpoints (checkpoints/*.ckpt of a run)")
    cfg = OmegaConf.create(state["config"])
    if not weight_files:
        with open_dict(cfg):
            if cfg.get("backbone") is not None and "pretrained" in cfg.backbone:
                cfg.backbone.pretrained = None
            # the stored config is resolved, so model.audio_encoder is a copy of `audio`, not a reference
            for node in (cfg.get("audio"), cfg.model.get("audio_encoder")):
                if node is not None and "pretrained" in node:
                    node.pretrained = False
    return cfg


def evaluate_checkpoint(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Load `cfg.checkpoint`, evaluate `cfg.split` under `cfg.eval.protocols`, write tables to `out_dir`."""
    state = load_checkpoint(cfg.checkpoint)
    run_cfg = config_from_checkpoint(state, cfg.checkpoint)
    with open_dict(run_cfg):
        if cfg.get("data") is not None:
            run_cfg.data = cfg.data
        run_cfg.eval = cfg.eval
        run_cfg.model.eval_num_samples = int(cfg.eval.num_samples)
        run_cfg.model.init_from = None
        run_cfg.trainer.device = cfg.device
        run_cfg.trainer.resume = None
        run_cfg.trainer.tensorboard = False
        if cfg.get("batch_size"):
            run_cfg.data.eval_batch_size = int(cfg.batch_size)
        if cfg.split == "test":  # evaluating a finished checkpoint on test is not selection
            run_cfg.trainer.select_split = "val"
    masks_dir = Path(out_dir) / "pred_masks" if cfg.get("save_masks") else None
    inputs = [run_cfg.data.root, cfg.checkpoint]
    check_output_path(out_dir, inputs, what="output_dir")  # before any model or data is built
    if masks_dir is not None:
        check_output_path(masks_dir, inputs, what="save_masks")
    trainer = Trainer(run_cfg, out_dir)
    trainer.model.load_state_dict(state["model"])
    metrics = trainer.evaluate(str(cfg.split), save_masks_dir=masks_dir)
    meta = {
        "checkpoint": str(cfg.checkpoint),
        "split": str(cfg.split),
        "method": run_cfg.model.get("name"),
        "backbone": run_cfg.backbone.get("name"),
        "data": {"name": run_cfg.data.get("name"), "subset": run_cfg.data.subset, "root": str(run_cfg.data.root)},
        "resolution": int(run_cfg.data.image_size),
        "eval_batch_size": int(run_cfg.data.eval_batch_size),
        "legacy_batch_size": int(run_cfg.eval.legacy_batch_size),
        "num_samples": int(run_cfg.eval.num_samples),
        "seed": int(run_cfg.seed),
        "git_commit": git_commit(),
        "train_config": OmegaConf.to_container(run_cfg, resolve=True),
    }
    meta["world_size"] = trainer.dist.world_size
    paths = write_tables(out_dir, f"metrics_{cfg.split}", metrics, meta, title=f"{cfg.split}") if trainer.is_main else {}
    if masks_dir is not None:
        paths["masks"] = masks_dir
    return {"metrics": metrics, "paths": paths}
