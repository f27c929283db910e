"""Device selection shared by the trainer, the scripts and inference."""

from __future__ import annotations

import os

import torch


def select_device(
    spec: str | torch.device | None = "auto", local_rank: int = 0, world_size: int | None = None, key: str = "device"
) -> torch.device:
    """'auto' -> CUDA when available (cuda:local_rank under DDP), else CPU; otherwise the named device.

    Under torchrun (`world_size` > 1; default: the WORLD_SIZE variable) a numbered GPU (`cuda:1`) is
    refused with a ConfigError naming `key`: every rank would take that one GPU (NCCL then fails on
    the duplicate device); `cuda` or `auto` give each rank cuda:LOCAL_RANK.
    """
    from avs.errors import ConfigError

    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(spec)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if dev.type == "cuda" and dev.index is not None and world_size > 1:
        raise ConfigError(
            f"{key}={spec} under torchrun ({world_size} processes) would put every rank on that one GPU: "
            f"use {key}=cuda or auto (rank r takes cuda:LOCAL_RANK; choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={spec} but CUDA is not available (use {key}=auto or cpu)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Store every 4-D parameter and buffer of `module` in channels_last (NHWC) order, in place.

    `module.to(memory_format=torch.channels_last)` also tries the 5-D ones (TPAVI's Conv3d weights)
    and fails with "required rank 4 tensor to use channels_last format"; those, and every other
    rank, are left as they are. Values are unchanged; only the strides differ. Used by the trainer
    (`trainer.channels_last=true`) and the benchmark, so both measure the same layout.
    """
    fmt = torch.channels_last
    with torch.no_grad():
        for mod in module.modules():
            for _name, param in mod.named_parameters(recurse=False):
                if param.dim() == 4 and not param.is_contiguous(memory_format=fmt):
                    param.data = param.data.contiguous(memory_format=fmt)
            for name, buf in mod.named_buffers(recurse=False):
                if buf is not None and buf.dim() == 4 and not buf.is_contiguous(memory_format=fmt):
                    mod._buffers[name] = buf.contiguous(memory_format=fmt)
    return module
