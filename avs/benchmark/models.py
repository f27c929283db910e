"""The benchmarked model and batch: random-init configs, seeded builds, random batches, run options."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from avs.data.audio import LOGMEL_SHAPE
from avs.errors import ConfigError


def bench_model_config(cfg: DictConfig | dict, overrides: dict[str, Any] | None = None) -> DictConfig:
    """Random-init copy of a composed config with the top-level `image_size` / `num_frames` and `overrides` applied."""
    from avs.engine.params import random_init_config

    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg.copy()
    cfg = random_init_config(cfg)
    with open_dict(cfg):
        cfg.data.image_size = int(cfg.image_size)
        cfg.data.num_frames = int(cfg.num_frames)
        for key, value in (overrides or {}).items():
            if OmegaConf.select(cfg, key) is None and OmegaConf.select(cfg, key.rsplit(".", 1)[0]) is None:
                raise ConfigError(f"benchmark override {key}: the config has no such node")
            OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def build_bench_model(cfg: DictConfig, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """AVSegmentor with random weights (seeded, so two builds of the same architecture agree)."""
    from avs.models.build import build_model

    torch.manual_seed(seed)
    return build_model(cfg).to(device)


def make_batch(
    batch_size: int, num_frames: int, size: int, audio: str, device: torch.device, audio_dim: int = 128, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random batch: frames [B,T,3,S,S], masks [B,T,1,S,S], mask_valid [B,T], audio [B,T,1,96,64] | [B,T,D]."""
    g = torch.Generator().manual_seed(seed)
    B, T, S = batch_size, num_frames, size
    if audio == "logmel":
        a = torch.randn(B, T, *LOGMEL_SHAPE, generator=g)
    elif audio == "embedding":
        a = torch.randn(B, T, audio_dim, generator=g)
    else:
        raise ConfigError(f"benchmark audio batch must be 'logmel' or 'embedding', got {audio!r}")
    batch = {
        "frames": torch.rand(B, T, 3, S, S, generator=g),
        "masks": (torch.rand(B, T, 1, S, S, generator=g) > 0.5).float(),
        "mask_valid": torch.ones(B, T, dtype=torch.bool),
        "audio": a,
    }
    return {k: v.to(device) for k, v in batch.items()}


def perturb_zero_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill all-zero parameters (e.g. zero-init BN gammas) with small seeded noise so every path is live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not bool(p.any()):
                p.copy_(0.1 * torch.randn(p.shape, generator=g).to(p))
    return model


def _sync(device: torch.device) -> Callable[[], None] | None:
    return torch.cuda.synchronize if device.type == "cuda" else None


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _prepare(model: torch.nn.Module, batch: dict[str, torch.Tensor], runtime: dict[str, Any]):
    if runtime.get("channels_last"):
        from avs.utils.device import to_channels_last

        to_channels_last(model)  # the trainer's conversion: 4-D weights only (Conv3d weights cannot be channels_last)
        # [B,T,3,S,S] with NHWC storage, so the model's flatten(0, 1) gives channels_last frames
        f = batch["frames"].permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        batch = {**batch, "frames": f}
    if runtime.get("audio") == "embedding" and batch["audio"].dim() == 5:
        with torch.no_grad():
            emb = model.encode_audio(batch["audio"])  # [B*T,D]
        batch = {**batch, "audio": emb.view(*batch["audio"].shape[:2], -1)}  # [B*T,D] -> [B,T,D]
    return model, batch
