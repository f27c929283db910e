"""Rebuild a trained model from an avs checkpoint alone (its stored config + weights) for inference."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from avs.engine.checkpoint import CheckpointError, load_checkpoint
from avs.models.segmentor import AVSegmentor

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "load_model", "inference_config"]


@dataclass
class LoadedModel:
    """A model in eval mode with what inference needs from its training config."""

    model: AVSegmentor
    cfg: DictConfig
    checkpoint: Path
    device: torch.device
    num_frames: int  # T (data.num_frames)
    image_size: tuple[int, int]  # (H, W) (data.image_size)

    @property
    def method(self) -> str:
        """The model config's name (tpavi, ecmvae, avsbg, ...)."""
        return str(self.cfg.model.get("name", "unknown"))

    @property
    def num_classes(self) -> int:
        """Output maps per frame: 1 (a binary mask, S4/MS3) or data.num_classes (AVSS class maps)."""
        return int(getattr(self.model, "num_classes", 1))

    @property
    def has_latent(self) -> bool:
        """True for latent (ECMVAE-style) models, which can draw K samples."""
        return self.model.latent is not None


def inference_config(state: dict, path: str | Path, num_samples: int = 1) -> DictConfig:
    """The checkpoint's training config with every weight-file load switched off (the checkpoint holds all weights)."""
    from avs.evaluation.checkpoint import config_from_checkpoint

    cfg = config_from_checkpoint(state, path)  # weight-file loads already switched off
    with open_dict(cfg):
        cfg.model.init_from = None
        cfg.model.eval_num_samples = int(num_samples)
    return cfg


def load_model(checkpoint: str | Path, device: str | torch.device = "auto", num_samples: int = 1) -> LoadedModel:
    """Checkpoint path -> LoadedModel in eval mode on `device` (K = `num_samples` prior samples for latent models)."""
    from avs.data.transforms import as_size
    from avs.models.build import build_model
    from avs.utils.device import select_device

    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    path = Path(checkpoint).expanduser()
    state = load_checkpoint(path)
    if "model" not in state:
        raise CheckpointError(f"{path} has no 'model' weights (expected an avs checkpoint from scripts/train.py)")
    cfg = inference_config(state, path, num_samples)
    dev = device if isinstance(device, torch.device) else select_device(str(device))
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model rebuilt from its stored config "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model = model.to(dev).eval()
    if int(num_samples) > 1 and model.latent is None:
        log.warning(
            "num_samples=%d ignored: %s has no latent part (deterministic model)", num_samples, cfg.model.get("name")
        )
    size = as_size(OmegaConf.select(cfg, "data.image_size"), "data.image_size")
    if size is None:
        raise CheckpointError(f"{path}: the stored config has no data.image_size")
    return LoadedModel(model, cfg, path, dev, int(cfg.data.num_frames), size)
