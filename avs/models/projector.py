"""AVS-BG visual-to-audio projector (bidirectional generation) and its consistency loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["VisualToAudioProjector", "consistency_loss"]


class VisualToAudioProjector(nn.Module):
    """Masked deepest-scale feature -> generated audio embedding: [N,C,h,w], [N,1,H,W] -> [N,audio_dim].

    Spec section 8: ``mask7 = adaptive_avg_pool(mask, (h,w))`` (then ``sigmoid`` when the mask is
    logits, unless ``legacy_raw_logits``, which feeds the raw pooled logits as the released S4 code
    does), ``masked = feat * mask7``, a linear mask encoder of three bias-free convs
    (1x1 C->hidden, 3x3 hidden->hidden, 1x1 hidden->C; no norm, no activation), then a learned
    spatial pooling Linear(h*w -> 1) with bias shared over channels, giving [N,C]. The released
    design needs C == audio_dim; ``output_projection=True`` adds an explicit Linear(C -> audio_dim)
    (off by default). Parameters at C=128, hidden=64, 7x7: 53,248 + 50.
    """

    def __init__(
        self,
        channels: int = 128,
        audio_dim: int = 128,
        feature_size: Sequence[int] = (7, 7),
        hidden: int = 64,
        legacy_raw_logits: bool = False,
        output_projection: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("channels", channels), ("audio_dim", audio_dim), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"projector.{name} must be a positive int, got {value!r}")
        size = tuple(int(v) for v in feature_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"projector.feature_size must be two positive ints (h, w), got {feature_size!r}")
        if audio_dim != channels and not output_projection:
            raise ValueError(
                f"projector.audio_dim ({audio_dim}) must equal projector.channels ({channels}) as in the "
                f"released AVS-BG design, or set projector.output_projection=true to add a Linear(C -> audio_dim)"
            )
        self.channels = channels
        self.audio_dim = audio_dim
        self.feature_size = size
        self.legacy_raw_logits = legacy_raw_logits
        self.mask_encoder = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1, bias=False),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, bias=False),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=False),
        )
        self.spatial_pool = nn.Linear(size[0] * size[1], 1)
        self.output_proj = nn.Linear(channels, audio_dim) if output_projection else None

    def extra_repr(self) -> str:
        return f"feature_size={self.feature_size}, legacy_raw_logits={self.legacy_raw_logits}"

    def forward(self, feat: Tensor, mask: Tensor, mask_is_logits: bool) -> Tensor:
        """Generate audio from the mask-weighted feature: feat [N,C,h,w], mask [N,1,H,W] -> [N,audio_dim]."""
        if feat.dim() != 4 or feat.shape[1] != self.channels or tuple(feat.shape[2:]) != self.feature_size:
            raise ValueError(
                f"VisualToAudioProjector expects feat [N,{self.channels},{self.feature_size[0]},"
                f"{self.feature_size[1]}] (projector.channels / projector.feature_size), got {tuple(feat.shape)}"
            )
        self._check_mask(feat, mask)
        return self._generate(feat, self._pool(feat, mask, mask_is_logits))

    def forward_either(self, feat: Tensor, gt_mask: Tensor, logits: Tensor, use_gt: Tensor) -> Tensor:
        """`forward` with the ground-truth mask where the 0-d bool tensor `use_gt` is true, else the logits.

        Both masks are pooled (cheap at h x w) and one is selected on the device, so the choice
        (projector_mask=auto: GT when every frame is labelled) needs no host sync.
        """
        self._check_mask(feat, gt_mask)
        self._check_mask(feat, logits)
        pooled = torch.where(use_gt, self._pool(feat, gt_mask, False), self._pool(feat, logits, True))
        return self._generate(feat, pooled)

    def _check_mask(self, feat: Tensor, mask: Tensor) -> None:
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != feat.shape[0]:
            raise ValueError(f"VisualToAudioProjector expects mask [{feat.shape[0]},1,H,W], got {tuple(mask.shape)}")

    def _pool(self, feat: Tensor, mask: Tensor, mask_is_logits: bool) -> Tensor:
        pooled = F.adaptive_avg_pool2d(mask.to(feat.dtype), self.feature_size)  # [N,1,H,W] -> [N,1,h,w]
        if mask_is_logits and not self.legacy_raw_logits:
            pooled = torch.sigmoid(pooled)  # pool first, then sigmoid
        return pooled

    def _generate(self, feat: Tensor, pooled: Tensor) -> Tensor:
        encoded = self.mask_encoder(feat * pooled)  # [N,C,h,w]
        generated = self.spatial_pool(encoded.flatten(2)).squeeze(-1)  # [N,C,h*w] -> [N,C]
        if self.output_proj is not None:
            generated = self.output_proj(generated)  # [N,C] -> [N,audio_dim]
        return generated


def consistency_loss(audio: Tensor, audio_hat: Tensor, valid: Tensor | None = None) -> Tensor:
    """mean_n ||norm(audio_n) - norm(audio_hat_n) + 1e-6||_2 over valid rows: [N,A], [N,A], [N] -> scalar."""
    if audio.dim() != 2 or audio.shape != audio_hat.shape:
        raise ValueError(
            f"consistency_loss expects audio and audio_hat of the same shape [N,A], "
            f"got {tuple(audio.shape)} and {tuple(audio_hat.shape)}"
        )
    target = F.normalize(audio.detach().to(audio_hat.dtype), dim=-1)  # the audio side is a constant
    dist = F.pairwise_distance(target, F.normalize(audio_hat, dim=-1), p=2.0, eps=1e-6)  # [N]
    if valid is None:
        return dist.mean()
    if valid.dtype != torch.bool or valid.shape != dist.shape:
        raise ValueError(
            f"consistency_loss expects valid as a bool tensor [{dist.shape[0]}], got {valid.dtype} {tuple(valid.shape)}"
        )
    # no valid row -> 0 (graph kept, no host sync)
    return (dist * valid.to(dist.dtype)).sum() / valid.sum().clamp(min=1).to(dist.dtype)
