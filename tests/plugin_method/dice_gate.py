"""A method of a researcher's own, outside avs/: the worked example of docs/adding_a_method.md.

DiceGate: the audio embedding gates the channels of the deepest neck map (`AudioChannelGate`, a part
of its own), then the shared fusion/motion/decoder pass runs; it trains the segmentation loss plus a
soft Dice loss of its own (`soft_dice_loss`) and logs the predicted foreground fraction without
training on it. The acceptance test (tests/integration/test_plugin_method.py) drives it through the
scripts with `PYTHONPATH` pointing at this folder and `hydra.searchpath` at ./configs.
"""

from __future__ import annotations

import torch
from torch import nn

from avs.models.segmentor import Segmentor


class AudioChannelGate(nn.Module):
    """audio [N,D] -> a sigmoid gate per channel; (map [N,C,h,w], audio [N,D]) -> gated map [N,C,h,w]."""

    def __init__(self, channels: int, audio_dim: int, hidden: int = 16) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(audio_dim, hidden), nn.ReLU(), nn.Linear(hidden, channels))

    def forward(self, feat: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.mlp(audio))  # [N,C]
        return feat * gate[:, :, None, None]


def soft_dice_loss(logits: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the labelled frames. logits, masks [N,1,H,W]; valid [N] bool -> scalar."""
    p = torch.sigmoid(logits).flatten(1) * valid[:, None]
    m = masks.flatten(1) * valid[:, None]
    dice = (2 * (p * m).sum(1) + eps) / (p.sum(1) + m.sum(1) + eps)  # [N]
    return (1 - dice).sum() / valid.sum().clamp(min=1)


class DiceGateSegmentor(Segmentor):
    """Terms: `seg` (the configured segmentation loss), `dice` (ours); `fg_fraction` is logged only."""

    LOSS_TERMS = ("seg", "dice")
    LOG_ONLY_TERMS = ("fg_fraction",)

    def __init__(self, gate_hidden: int = 16, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gate = AudioChannelGate(self.channels, self.audio_dim, gate_hidden) if self.use_audio else None

    def _pass(self, feats, audio, T, size) -> dict:
        inject = (lambda deepest: self.gate(deepest, audio)) if self.gate is not None else None
        return self._branch(feats, audio, T, size, self.neck, self.decoder, inject)

    def train_terms(self, x, feats, audio, batch, T, size) -> dict[str, torch.Tensor]:
        masks = batch["masks"].flatten(0, 1)  # [B,T,1,H,W] -> [B*T,1,H,W]
        valid = batch["mask_valid"].flatten(0, 1)  # [B,T] -> [B*T]
        logits = self._pass(feats, audio, T, size)["logits"]
        return {
            "seg": self._seg(logits, masks, valid),
            "dice": soft_dice_loss(logits, masks, valid),
            "fg_fraction": torch.sigmoid(logits).mean().detach(),
        }

    def predict(self, x, feats, audio, B, T, size) -> dict[str, torch.Tensor]:
        logits = self._pass(feats, audio, T, size)["logits"]
        return {"logits": logits.view(B, T, 1, *size)}
