"""The pieces of a run built from its config: seeds, the model on its device, AMP, compile, DDP wrapper.

`build_run_model` is shared by training and checkpoint evaluation, so both draw the same random
numbers in the same order (seed, model init, per-rank reseed) and give the same results.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from avs.config import auto_flag
from avs.engine import distributed as D
from avs.engine.amp import native_bf16
from avs.engine.checkpoint import CheckpointError, load_checkpoint, model_state_from
from avs.engine.rundir import CHECKPOINT_DIR, LAST_CKPT
from avs.errors import ConfigError
from avs.utils.device import to_channels_last

log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def resolve_loss_weights(cfg: DictConfig) -> dict[str, float]:
    """`model.loss_weights` with 'auto' entries resolved per data subset (e.g. A-V loss 0 on S4, 0.5 on MS3).

    avs.config_checks.check_config has refused an 'auto' without its `model.auto_weights` entry. Every term
    the model class declares for this config must have a weight (else ConfigError, exit 2): a term without
    one would silently not train.
    """
    from avs.models.build import check_loss_terms

    check_loss_terms(cfg.model)
    weights = OmegaConf.to_container(cfg.model.loss_weights, resolve=True)
    auto = cfg.model.auto_weights
    return {name: float(auto[name][cfg.data.subset] if w == "auto" else w) for name, w in weights.items()}


def weighted_loss(terms: dict[str, torch.Tensor], weights: dict[str, float], model: Any) -> torch.Tensor:
    """sum(weights[k] * terms[k]) over the trained terms; the model class's LOG_ONLY_TERMS are left out.

    A term the model returns without a weight, or one its class does not declare (LOSS_TERMS), is
    refused by name (ConfigError, exit 2) instead of silently not training.
    """
    log_only = getattr(model, "LOG_ONLY_TERMS", ())
    declared = getattr(model, "LOSS_TERMS", None)
    for k in terms:
        if k in log_only:
            continue
        if declared is not None and k not in declared:
            raise ConfigError(
                f"model returns loss term '{k}' that {type(model).__name__} does not declare: "
                "add it to the class's LOSS_TERMS (or LOG_ONLY_TERMS for a term that is only logged)"
            )
        if k not in weights:
            raise ConfigError(f"model returns loss term '{k}' with no weight: set model.loss_weights.{k}")
    return sum(weights[k] * v for k, v in terms.items() if k not in log_only)


def resolve_resume_path(spec: Any, ckpt_dir: str | Path) -> Path | None:
    """`trainer.resume` -> checkpoint path: auto = <ckpt_dir>/last.ckpt if present; a run dir -> its last.ckpt.

    A path that is neither was refused by avs.config_checks.check_config already.
    """
    if spec in (None, "", False) or str(spec).lower() in ("null", "none", "false"):
        return None
    if str(spec) == "auto":
        path = Path(ckpt_dir) / LAST_CKPT
        return path if path.is_file() else None
    p = Path(str(spec)).expanduser()
    if p.is_file():
        return p
    return next((c for c in (p / CHECKPOINT_DIR / LAST_CKPT, p / LAST_CKPT) if c.is_file()), p / LAST_CKPT)


def ddp_find_unused_parameters(cfg: DictConfig) -> bool:
    """`trainer.find_unused_parameters` (default false; `auto`, the earlier default, is false too).

    Every trainable parameter of the shipped variants receives a gradient each step, the no-audio
    ablations included since they build no audio parts (tests/integration/test_ddp.py); set it true
    for a model of your own that leaves parameters out of a step.
    """
    return auto_flag(cfg.trainer.get("find_unused_parameters", False), "trainer.find_unused_parameters", auto=False)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """trainer.amp (auto|off|bf16|fp16, checked by check_config) -> the autocast dtype on `device` (None = off)."""
    amp = str(amp)
    if amp in ("off", "false", "False", "none", "None"):
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if native_bf16(device) else torch.float16  # fp16 + GradScaler on V100/T4
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("trainer.amp=fp16 needs CUDA; use bf16 or off on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast_for(dtype: torch.dtype | None, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A factory of autocast contexts for `dtype` on `device` (no-op contexts without AMP)."""
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def compile_module(module: torch.nn.Module, tcfg: DictConfig) -> torch.nn.Module:
    """trainer.compile: false | true | a torch.compile mode (default, reduce-overhead, max-autotune...)."""
    spec = tcfg.compile
    if spec is False or str(spec).lower() in ("false", "off", "none"):
        return module
    mode = None if spec is True or str(spec).lower() in ("true", "default") else str(spec)
    backend = str(tcfg.get("compile_backend", "inductor"))
    log.info("torch.compile(backend=%s, mode=%s): the first steps compile (slow)", backend, mode or "default")
    return torch.compile(module, backend=backend, mode=mode)


def wrap_ddp(model: torch.nn.Module, cfg: DictConfig, device: torch.device, dist: D.DistInfo) -> torch.nn.Module:
    """The module training forwards run through: DDP around `model` under torchrun, else `model`."""
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(
        model,
        device_ids=ids,
        output_device=ids[0] if ids else None,
        find_unused_parameters=ddp_find_unused_parameters(cfg),
    )


def init_from(model: torch.nn.Module, path: str) -> None:
    """S4 -> MS3 style initialisation: load matching weights, report what was skipped."""
    state = model_state_from(load_checkpoint(path), path)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    missing = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    log.info(
        "init_from %s: loaded %d tensors, skipped %d, left %d at init", path, len(usable), len(skipped), len(missing)
    )
    if not usable:
        raise CheckpointError(f"model.init_from={path}: no tensor matches this model")


def build_run_model(
    cfg: DictConfig, device: torch.device, dist: D.DistInfo, before_build: Callable[[], Any] | None = None
) -> torch.nn.Module:
    """Seed, build the model on `device` (init_from, channels_last, cuDNN autotune, SyncBatchNorm), reseed per rank.

    `before_build` runs after seeding, before the model is built (e.g. verifying a checkpoint to resume).
    """
    from avs.models.build import build_model

    tcfg = cfg.trainer
    seed_everything(int(cfg.seed), bool(tcfg.deterministic))
    if before_build is not None:
        before_build()
    model = build_model(cfg).to(device)
    if cfg.model.get("init_from"):
        init_from(model, cfg.model.init_from)
    if tcfg.get("channels_last"):  # 4-D weights only (Conv3d weights cannot be channels_last)
        to_channels_last(model)
    if device.type == "cuda" and not bool(tcfg.deterministic):
        # fixed input shapes (data.image_size, T): cuDNN's autotuner picks the fastest kernels once
        torch.backends.cudnn.benchmark = bool(tcfg.get("cudnn_benchmark", True))
    if dist.enabled:
        if tcfg.get("sync_bn", False):
            if device.type != "cuda":
                raise ValueError(
                    "trainer.sync_bn=true needs CUDA devices (torch's SyncBatchNorm); set trainer.sync_bn=false on CPU"
                )
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        seed_everything(int(cfg.seed) + dist.rank, bool(tcfg.deterministic))  # per-rank dropout etc.
    return model
