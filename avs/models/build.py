"""Build the segmentor that `model._target_` names from the composed Hydra config."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from avs.errors import ConfigError
from avs.models.segmentor import Capabilities, Segmentor


def segmentor_class(model_cfg: Any) -> type[Segmentor]:
    """The class `model._target_` names; ConfigError when it is missing, does not import or is no Segmentor."""
    target = model_cfg.get("_target_") if model_cfg is not None else None
    if not target:
        raise ConfigError(
            "model._target_ is not set: it names the segmentor class, e.g. "
            "avs.models.methods.avsbench.AVSBenchSegmentor (configs/model/*.yaml; docs/adding_a_method.md)"
        )
    try:
        cls = get_object(str(target))
    except Exception as exc:  # noqa: BLE001  (import errors of any kind)
        raise ConfigError(f"model._target_={target}: cannot be imported ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, Segmentor)):
        raise ConfigError(
            f"model._target_={target}: not a subclass of avs.models.segmentor.Segmentor (docs/adding_a_method.md)"
        )
    return cls


def model_capabilities(model_cfg: Any) -> Capabilities:
    """What the class `model._target_` names declares it does with this model config."""
    return segmentor_class(model_cfg).capabilities(model_cfg)


def check_loss_terms(model_cfg: Any, caps: Capabilities | None = None) -> None:
    """Every loss term the model returns is weighted (model.loss_weights) or declared log-only by its class."""
    caps = caps if caps is not None else model_capabilities(model_cfg)
    weights = model_cfg.get("loss_weights") or {}
    for term in sorted(caps.loss_terms):
        if term not in weights:
            raise ConfigError(f"model returns loss term '{term}' with no weight: set model.loss_weights.{term}")
    for term in sorted(caps.log_only_terms & set(weights)):
        raise ConfigError(
            f"model.loss_weights.{term}: {model_cfg._target_} returns '{term}' for the logs only (LOG_ONLY_TERMS), "
            "a weight would not train it: remove it"
        )


def build_model(cfg: DictConfig) -> Segmentor:
    """Instantiate `cfg.backbone` and the `model._target_` class with every part of `cfg.model` (null
    parts are disabled; `data.num_classes` > 1 (AVSS) is passed as `num_classes`; with
    `model.use_audio=false` the class's audio-only parts are not built, so no weight file of theirs is read).
    Keys of the class's `CONFIG_KEYS` (loss weights, name, ...) are left out."""
    mcfg = cfg.model
    cls = segmentor_class(mcfg)
    backbone = instantiate(cfg.backbone)
    skipped = () if mcfg.get("use_audio", True) else cls.AUDIO_ONLY_PARTS
    node = {}
    for key in mcfg:  # in the config's order: the parts draw their random init in this order
        if key in cls.CONFIG_KEYS:
            continue
        value = None if key in skipped else mcfg[key]
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        node[key] = value
    extra = {}
    num_classes = cfg.data.get("num_classes")
    if num_classes is not None and int(num_classes) != 1:  # AVSS: data.num_classes output maps (docs/avss.md)
        extra["num_classes"] = int(num_classes)
    try:
        return instantiate(node, backbone=backbone, image_size=int(cfg.data.image_size), **extra)
    except InstantiationException as exc:  # a constructor's own error (e.g. a refused option) as it was raised
        if isinstance(exc.__cause__, Exception):
            raise exc.__cause__ from None
        raise


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
