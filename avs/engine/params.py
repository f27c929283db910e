"""Parameter accounting for the benchmark script and docs."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, open_dict

from avs.models.build import build_model
from avs.models.segmentor import count_parameters, inference_parameters, parameter_groups


def random_init_config(cfg: DictConfig) -> DictConfig:
    """A copy of `cfg` whose backbone and audio encoder need no weight files."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.backbone.pretrained = None
        if "pretrained" in cfg.audio:
            cfg.audio.pretrained = False
    return cfg


def parameter_report(cfg: DictConfig) -> dict[str, Any]:
    """Trainable parameters by part (audio backbone reported separately, excluded from the total)."""
    model = build_model(random_init_config(cfg))
    groups = parameter_groups(model)
    audio_total = sum(p.numel() for p in model.audio_encoder.parameters()) if model.audio_encoder is not None else 0
    total = sum(v for k, v in groups.items() if k != "audio_backbone")
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.numel() == 0]
    return {
        "groups": groups,
        "audio_backbone_all": audio_total,
        "total_trainable_excl_audio": total,
        "inference_excl_audio": inference_parameters(model) - groups["audio_backbone"],
        "all_parameters": count_parameters(model, trainable_only=False),
        "empty": unused,
    }


def format_parameter_report(report: dict[str, Any], title: str) -> str:
    """Millions with two decimals, one line per part."""
    lines = [f"{title}", f"{'part':<18}{'params (M)':>12}"]
    for k, v in report["groups"].items():
        lines.append(f"{k:<18}{v / 1e6:>12.2f}")
    lines.append(f"{'total (excl. audio)':<18}{report['total_trainable_excl_audio'] / 1e6:>12.2f}")
    lines.append(f"{'inference path':<18}{report['inference_excl_audio'] / 1e6:>12.2f}")
    lines.append(f"{'audio (all)':<18}{report['audio_backbone_all'] / 1e6:>12.2f}")
    return "\n".join(lines)
