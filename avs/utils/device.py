"""Device selection shared by the trainer, the scripts and inference."""

from __future__ import annotations

import torch


def select_device(spec: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when available (cuda:local_rank under DDP), else CPU; otherwise the named device."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={spec!r} but CUDA is not available (use device=auto or cpu)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev
