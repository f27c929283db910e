"""Config checks of AVSBench-semantic runs (data.subset=avss, docs/avss.md); called by avs.config_checks."""

from __future__ import annotations

from omegaconf import DictConfig

from avs.errors import ConfigError
from avs.metrics import PROTOCOLS
from avs.metrics_avss import SEMANTIC_PROTOCOLS
from avs.models.segmentor import AVSS_AVM_MASKS, Capabilities


def check_semantic(cfg: DictConfig, caps: Capabilities) -> None:
    """AVSS needs a class that declares `semantic`, >= 2 classes, no GT projector mask, and AVSS metric
    protocols; S4/MS3 need the binary protocols. Each refusal names the key."""
    data, model = cfg.data, cfg.model
    check_fusion_window(cfg)
    avss = str(data.subset) == "avss"
    check_avm_mask(cfg, avss)
    if avss:
        n = data.get("num_classes")
        if not isinstance(n, int) or isinstance(n, bool) or n < 2:
            raise ConfigError(f"data.num_classes must be an int >= 2 for data.subset=avss, got {n!r}")
        if not caps.semantic:
            raise ConfigError(
                f"model._target_={model.get('_target_')} does not declare SEMANTIC = True (class maps, "
                "class-index masks): it cannot train on data.subset=avss (docs/adding_a_method.md)"
            )
        if caps.projector and str(model.projector_mask) == "gt":
            raise ConfigError(
                "model.projector_mask=gt needs all frames labelled; AVSS trains v1s clips on frame 0 only "
                "(use auto or pred)"
            )
    ecfg = cfg.get("eval")
    if ecfg is None:
        return
    allowed = SEMANTIC_PROTOCOLS if avss else PROTOCOLS
    for p in list(ecfg.protocols or []):
        if p not in allowed:
            raise ConfigError(
                f"eval.protocols: {p!r} is no metric protocol of data.subset={data.subset} "
                f"(expected one of {', '.join(allowed)}; docs/avss.md)"
            )


def check_fusion_window(cfg: DictConfig) -> None:
    """model.fusion.legacy_window (the released AVSS TPAVI's 5-frame windows) must divide data.num_frames."""
    fusion = cfg.model.get("fusion")
    window = fusion.get("legacy_window") if isinstance(fusion, DictConfig) else None
    if window is None:
        return
    frames = cfg.data.get("num_frames")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"model.fusion.legacy_window must be null or an int >= 1, got {window!r}")
    if isinstance(frames, int) and frames % window != 0:
        raise ConfigError(
            f"model.fusion.legacy_window={window} splits each clip into {window}-frame windows: "
            f"data.num_frames={frames} is not a multiple of it"
        )


def check_avm_mask(cfg: DictConfig, avss: bool) -> None:
    """model.avm_loss.avss_mask: one of AVSS_AVM_MASKS, and a hard form on AVSS data only (docs/avss.md)."""
    avm = cfg.model.get("avm_loss")
    mask = avm.get("avss_mask") if isinstance(avm, DictConfig) else None
    if mask is None:
        return
    if mask not in AVSS_AVM_MASKS:
        raise ConfigError(f"model.avm_loss.avss_mask must be one of {', '.join(AVSS_AVM_MASKS)}, got {mask!r}")
    if mask != "soft" and not avss:
        raise ConfigError(
            f"model.avm_loss.avss_mask={mask} pools the predicted AVSS classes; data.subset={cfg.data.subset} "
            "has binary masks (use soft)"
        )
