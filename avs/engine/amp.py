"""Mixed-precision helpers of the trainer: native bf16 detection (trainer.amp=auto) and the GradScaler state."""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def native_bf16(device: torch.device) -> bool:
    """True when `device` computes bfloat16 in hardware (CUDA compute capability >= 8.0, or ROCm).

    `torch.cuda.is_bf16_supported()` also answers True for GPUs that only emulate bf16 (V100, T4)
    unless asked with including_emulation=False.
    """
    if device.type != "cuda":
        return False
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def load_scaler_state(
    scaler: torch.amp.GradScaler, state: dict[str, Any] | None, source: Any = "the checkpoint"
) -> bool:
    """Restore a GradScaler; a checkpoint of a run without fp16 AMP holds an empty state: start fresh.

    Returns True when a state was loaded. (torch raises "The source state dict is empty" when an
    enabled scaler is given the state of a disabled one, e.g. resuming a bf16 / off / CPU run with
    trainer.amp=fp16.)
    """
    if not scaler.is_enabled():
        return False
    if not state:
        log.info(
            "%s holds no GradScaler state (written without fp16 AMP): the fp16 loss scale starts fresh at %.0f",
            source,
            scaler.get_scale(),
        )
        return False
    scaler.load_state_dict(state)
    return True
