"""Clip-consistent transforms: every frame and mask of a clip gets the same resize / flip."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "as_size",
    "resize_frames",
    "resize_masks",
    "hflip_clip",
    "normalize_frames",
    "ClipTransform",
]


def as_size(size: int | Sequence[int] | None, key: str = "image_size") -> tuple[int, int] | None:
    """int or (H, W) -> (H, W); None stays None. `key` names the config key in errors."""
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        hw = (size, size)
    else:
        try:
            hw = tuple(int(s) for s in size)  # type: ignore[union-attr]
        except TypeError:
            raise ValueError(f"{key} must be an int or [H, W], got {size!r}") from None
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"{key} must be a positive int or [H, W], got {size!r}")
    return hw  # type: ignore[return-value]


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased) resize of float frames [T,3,h,w] -> [T,3,H,W]; no-op when sizes match."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of masks [T,1,h,w] -> [T,1,H,W] keeping the values; no-op when sizes match.

    Uses 'nearest-exact' (pixel-centre sampling, like PIL/OpenCV NEAREST_EXACT), which also
    commutes with a horizontal flip.
    """
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    out = F.interpolate(masks.float(), size=size, mode="nearest-exact")
    return out.to(masks.dtype)


def hflip_clip(
    frames: torch.Tensor,
    masks: torch.Tensor | None,
    p: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """With probability p flip ALL frames [T,C,H,W] and masks [T,1,H,W] horizontally -> (frames, masks, flipped)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"flip probability must be in [0, 1], got {p}")
    if p == 0.0:
        return frames, masks, False
    draw = torch.rand((), generator=generator).item()
    if draw >= p:
        return frames, masks, False
    frames = frames.flip(-1)
    masks = masks.flip(-1) if masks is not None else None
    return frames, masks, True


def normalize_frames(
    frames: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """(frames [T,3,H,W] in [0,1] - mean) / std per channel -> [T,3,H,W]."""
    m = torch.as_tensor(mean, dtype=frames.dtype, device=frames.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=frames.dtype, device=frames.device).view(1, -1, 1, 1)
    return (frames - m) / s


class ClipTransform:
    """Resize to `image_size` (when given and different), optional clip-level flip, ImageNet normalisation."""

    def __init__(self, image_size: int | Sequence[int] | None, flip_prob: float = 0.0) -> None:
        self.size = as_size(image_size)
        if not 0.0 <= float(flip_prob) <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.flip_prob = float(flip_prob)

    def __call__(
        self,
        frames: torch.Tensor,
        masks: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """frames float [T,3,h,w] in [0,1], masks [T,1,h',w'] -> normalised [T,3,H,W], masks [T,1,H,W]."""
        size = self.size or tuple(frames.shape[-2:])
        frames = resize_frames(frames, size)
        masks = resize_masks(masks, size)
        frames, masks, _ = hflip_clip(frames, masks, self.flip_prob, generator)
        return normalize_frames(frames), masks
