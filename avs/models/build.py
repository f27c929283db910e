"""Build an AVSegmentor from the composed Hydra config."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from avs.models.segmentor import AVSegmentor

PART_KEYS = ("audio_encoder", "neck", "fusion", "motion", "latent", "projector", "decoder")
SCALAR_KEYS = (
    "channels",
    "audio_dim",
    "use_audio",
    "order",
    "seg_loss",
    "seg_loss_options",
    "avm_loss",
    "projector_mask",
    "eval_num_samples",
)


def build_model(cfg: DictConfig) -> AVSegmentor:
    """Instantiate `cfg.backbone` and every part of `cfg.model` (null parts are disabled)."""
    mcfg = cfg.model
    backbone = instantiate(cfg.backbone)
    parts = {k: (instantiate(mcfg[k]) if mcfg.get(k) is not None else None) for k in PART_KEYS}
    scalars = {}
    for k in SCALAR_KEYS:
        if k in mcfg:
            v = mcfg[k]
            scalars[k] = OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v
    return AVSegmentor(backbone=backbone, image_size=int(cfg.data.image_size), **parts, **scalars)
