"""Mask overlays for TensorBoard and reports: frame | ground truth | prediction, per frame."""

from __future__ import annotations

import torch

from avs.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def denormalize(frames: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised [...,3,H,W] -> RGB in [0,1]."""
    mean = frames.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = frames.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (frames * std + mean).clamp(0, 1)


def tint(rgb: torch.Tensor, mask: torch.Tensor, color: tuple[float, float, float], alpha: float = 0.5) -> torch.Tensor:
    """Blend `color` into [3,H,W] `rgb` where [1,H,W] `mask` (0..1) is on."""
    c = rgb.new_tensor(color).view(3, 1, 1)
    return rgb * (1 - alpha * mask) + c * (alpha * mask)


def overlay_grid(frames: torch.Tensor, masks: torch.Tensor, logits: torch.Tensor, max_clips: int = 2) -> torch.Tensor:
    """[B,T,3,H,W] frames, [B,T,1,H,W] masks and logits -> [3, rows*H, 3*W] image in [0,1].

    One row per frame of the first `max_clips` clips: the frame, the ground truth (green) and the
    prediction sigmoid > 0.5 (red) tinted over the frame.
    """
    b = min(max_clips, frames.shape[0])
    rgb = denormalize(frames[:b].float().cpu()).flatten(0, 1)  # [b*T,3,H,W]
    gt = masks[:b].float().cpu().flatten(0, 1)  # [b*T,1,H,W]
    pred = (torch.sigmoid(logits[:b].float().cpu()) > 0.5).float().flatten(0, 1)
    rows = [
        torch.cat([img, tint(img, g, (0.0, 1.0, 0.0)), tint(img, p, (1.0, 0.0, 0.0))], dim=-1)
        for img, g, p in zip(rgb, gt, pred)
    ]
    return torch.cat(rows, dim=-2)
