"""Build an AVSegmentor from the composed Hydra config."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from avs.models.segmentor import AVSegmentor

PART_KEYS = ("audio_encoder", "neck", "fusion", "motion", "latent", "projector", "decoder", "seg_loss")
# Parts that only process audio: not built with model.use_audio=false.
AUDIO_ONLY_PARTS = ("audio_encoder", "projector")
SCALAR_KEYS = (
    "channels",
    "audio_dim",
    "use_audio",
    "order",
    "avm_loss",
    "projector_mask",
    "eval_num_samples",
)


def build_model(cfg: DictConfig) -> AVSegmentor:
    """Instantiate `cfg.backbone` and every part of `cfg.model` (null parts are disabled; with
    `model.use_audio=false` the audio encoder and projector are not built, and the fusion blocks
    are built without their audio weights)."""
    mcfg = cfg.model
    backbone = instantiate(cfg.backbone)
    skipped = () if mcfg.get("use_audio", True) else AUDIO_ONLY_PARTS  # never built, so no weight file is read
    parts = {k: (instantiate(mcfg[k]) if mcfg.get(k) is not None and k not in skipped else None) for k in PART_KEYS}
    scalars = {}
    for k in SCALAR_KEYS:
        if k in mcfg:
            v = mcfg[k]
            scalars[k] = OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v
    return AVSegmentor(backbone=backbone, image_size=int(cfg.data.image_size), **parts, **scalars)


def without_weight_files(cfg: DictConfig) -> DictConfig:
    """Switch off every pretrained-weight load (ImageNet backbone, VGGish, stand-ins) in `cfg`, in place:
    for a model whose weights all come from a checkpoint. A stored config is resolved, so
    `model.audio_encoder` is a copy of `audio`, not a reference: both are switched off."""
    with open_dict(cfg):
        if cfg.get("backbone") is not None and "pretrained" in cfg.backbone:
            cfg.backbone.pretrained = None
        for node in (cfg.get("audio"), cfg.model.get("audio_encoder")):
            if node is not None and "pretrained" in node:
                node.pretrained = False
    return cfg
