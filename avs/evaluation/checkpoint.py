"""Checkpoint evaluation used by scripts/eval.py (model and data config come from the checkpoint).

Runs under torchrun too: each rank scores a shard, the statistics are gathered
(avs.evaluation.evaluator.evaluate_split) and rank 0 writes the tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from avs.config_upgrade import upgrade_config
from avs.engine.checkpoint import CheckpointError, load_checkpoint
from avs.errors import ConfigError
from avs.evaluation.evaluator import build_evaluators, evaluate_split
from avs.evaluation.evaluators import mask_writer
from avs.evaluation.outputs import check_output_path
from avs.evaluation.report import write_tables
from avs.models.build import without_weight_files


def config_from_checkpoint(state: dict[str, Any], path: str | Path, weight_files: bool = False) -> DictConfig:
    """The resolved training config stored in an avs checkpoint.

    Unless `weight_files`, every weight-file load (ImageNet backbone, VGGish) is switched off: the
    checkpoint holds all weights, so evaluating it must not need those files.
    """
    if "config" not in state:
        raise CheckpointError(f"{path} has no stored config: evaluate avs checkpoints (checkpoints/*.ckpt of a run)")
    stored = state["config"]
    stored = OmegaConf.to_container(OmegaConf.create(stored) if isinstance(stored, str) else OmegaConf.create(stored))
    cfg = OmegaConf.create(upgrade_config(stored))  # a config of an earlier version, in today's spelling
    return cfg if weight_files else without_weight_files(cfg)


SHAPE_KEYS = ("image_size", "num_frames")  # data keys the trained model was built for


def data_overrides(argv: list[str]) -> list[str]:
    """Command line of scripts/eval.py: without a `data=<group>`, `data.<key>=v` becomes `+data.<key>=v`.

    The eval config has no data node of its own (it comes from the checkpoint), so `data.root=...`
    alone is a change of the checkpoint's data config, applied by `eval_data_config`.
    """
    if any(a.startswith("data=") for a in argv):
        return list(argv)
    return [f"+{a}" if a.startswith("data.") and "=" in a else a for a in argv]


def _explicit_data_keys() -> set[str]:
    """The `data.<key>` names given on the command line of the current Hydra job (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    keys = set()
    for o in HydraConfig.get().overrides.task:
        key = o.split("=", 1)[0].lstrip("+~")
        if key.startswith("data."):
            keys.add(key.split(".")[1])
    return keys


def eval_data_config(cfg: DictConfig, run_data: DictConfig, explicit: set[str] | None = None) -> DictConfig:
    """The data config of an evaluation: the checkpoint's `run_data`, changed by the eval config's `data`.

    A whole data group (`data=ms3`) replaces it, except `data.image_size` / `data.num_frames`, which stay
    the checkpoint's unless given explicitly (`explicit`: keys given on the command line); a partial
    node (`data.root=...` alone) changes only the keys it names. Interpolations resolve in the eval config.
    """
    given = cfg.get("data")
    if given is None:
        return run_data
    explicit = _explicit_data_keys() if explicit is None else explicit
    view = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(view):
        if "name" in given and "subset" in given:  # a data group
            for key in SHAPE_KEYS:
                if key not in explicit and key in run_data:
                    view.data[key] = run_data[key]
            return OmegaConf.create(OmegaConf.to_container(view.data, resolve=True))
        return OmegaConf.merge(run_data, OmegaConf.to_container(view.data, resolve=True))


def _run_config(cfg: DictConfig, state: dict[str, Any]) -> DictConfig:
    """The checkpoint's training config, changed for this evaluation (data, eval, device; no resume, no init)."""
    run_cfg = config_from_checkpoint(state, cfg.checkpoint)
    with open_dict(run_cfg):
        run_cfg.data = eval_data_config(cfg, run_cfg.data)
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
    return run_cfg


def _load_weights(model: torch.nn.Module, state: dict[str, Any], checkpoint: Any, run_cfg: DictConfig) -> None:
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:  # e.g. a size mismatch from a data.image_size the model was not built for
        trained = OmegaConf.create(state["config"])
        diff = [
            f"data.{k}: {trained.data.get(k)} in the checkpoint, {run_cfg.data.get(k)} now"
            for k in SHAPE_KEYS
            if trained.data.get(k) != run_cfg.data.get(k)
        ]
        raise CheckpointError(
            f"{checkpoint} does not fit the model built for this evaluation"
            + (
                f" ({'; '.join(diff)}): evaluate with the checkpoint's values (drop those overrides)"
                if diff
                else f" ({str(exc).splitlines()[0][:200]})"
            )
        ) from None


def _meta(cfg: DictConfig, run_cfg: DictConfig, world_size: int) -> dict[str, Any]:
    from avs.engine.records import git_commit
    from avs.utils.allocator import state as allocator_state

    return {
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
        "audio_input": _audio_input(cfg),
        "git_commit": git_commit(),
        "allocator": allocator_state(),
        "train_config": OmegaConf.to_container(run_cfg, resolve=True),
        "world_size": world_size,
    }


def _audio_input(cfg: DictConfig) -> str:
    """The audio the clips were scored with: real | zero | shuffled (seed <n>)."""
    return f"shuffled (seed {int(cfg.audio_seed)})" if cfg.audio_input == "shuffled" else str(cfg.audio_input)


def eval_title(cfg: DictConfig) -> str:
    """The split, and the audio probe when the audio is not the clips' own."""
    return str(cfg.split) if cfg.audio_input == "real" else f"{cfg.split}, audio {cfg.audio_input}"


def _check_save_masks(run_cfg: DictConfig) -> None:
    """AVSS masks are 8-bit palette PNGs: at most 256 classes."""
    if str(run_cfg.data.subset) == "avss" and int(run_cfg.data.num_classes) > 256:
        raise ConfigError(
            f"save_masks=true: data.num_classes={run_cfg.data.num_classes}, but a palette PNG holds at most 256 "
            "classes; drop save_masks"
        )


def write_class_tables(out_dir: str | Path, split: str, metrics: dict[str, Any], dataset: Any) -> dict[str, Path]:
    """AVSS: one csv per protocol, one row per class (avs.metrics_avss.write_class_table):
    <out_dir>/classes_<split>_<protocol>.csv -> {"classes_<protocol>": path}."""
    from avs.metrics_avss import write_class_table

    names = list(getattr(dataset, "class_names", []))
    out = {}
    for protocol, result in metrics.items():
        path = Path(out_dir) / f"classes_{split}_{protocol}.csv"
        out[f"classes_{protocol}"] = write_class_table(path, result, names)
    return out


def evaluate_checkpoint(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Load `cfg.checkpoint`, evaluate `cfg.split` under `cfg.eval.protocols`, write tables to `out_dir`."""
    from avs.config_checks import check_config, check_files
    from avs.data.loaders import RunData
    from avs.engine import distributed as D
    from avs.engine.build import amp_dtype, autocast_for, build_run_model
    from avs.engine.state import RunState
    from avs.utils.device import select_device

    state = load_checkpoint(cfg.checkpoint)
    run_cfg = _run_config(cfg, state)
    masks_dir = Path(out_dir) / "pred_masks" if cfg.get("save_masks") else None
    inputs = [run_cfg.data.root, cfg.checkpoint]
    check_output_path(out_dir, inputs, what="output_dir")  # before any model or data is built
    if masks_dir is not None:
        _check_save_masks(run_cfg)
        check_output_path(masks_dir, inputs, what="save_masks")
    check_config(run_cfg)
    check_files(run_cfg)
    dist = D.init_from_env()
    device = select_device(run_cfg.trainer.device, dist.local_rank, dist.world_size, "trainer.device")
    model = build_run_model(run_cfg, device, dist)  # seeds as training did: latent samples draw the same numbers
    _load_weights(model, state, cfg.checkpoint, run_cfg)
    data = RunData(run_cfg, is_main=dist.is_main, cuda=device.type == "cuda", barrier=D.barrier, generate=False)
    data.probe_audio(str(cfg.split), str(cfg.audio_input), int(cfg.audio_seed))
    evaluators = build_evaluators(run_cfg.eval.get("evaluators"))
    if masks_dir is not None:
        evaluators.append(mask_writer(run_cfg, masks_dir, data.dataset(str(cfg.split))))
    autocast = autocast_for(amp_dtype(run_cfg.trainer.get("amp", "auto"), device), device)
    show = bool(run_cfg.trainer.get("progress", True)) and dist.is_main
    results = evaluate_split(
        model,
        data,
        str(cfg.split),
        run_cfg,
        device=device,
        dist=dist,
        autocast=autocast,
        state=RunState(),
        evaluators=evaluators,
        progress=show,
    )
    metrics = results.pop("metrics")
    meta = _meta(cfg, run_cfg, dist.world_size)
    extra = {k: v for k, v in results.items() if k != "masks"}
    if extra:  # the summaries of the eval.evaluators of the user's
        meta["evaluators"] = extra
    paths = write_tables(out_dir, f"metrics_{cfg.split}", metrics, meta, title=eval_title(cfg)) if dist.is_main else {}
    if dist.is_main and str(run_cfg.data.subset) == "avss":
        paths.update(write_class_tables(out_dir, str(cfg.split), metrics, data.dataset(str(cfg.split))))
    if masks_dir is not None:
        paths["masks"] = masks_dir
    return {"metrics": metrics, "paths": paths}
