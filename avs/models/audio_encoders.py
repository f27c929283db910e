"""Small trainable log-mel encoders for when the VGGish weight file is not available."""

from __future__ import annotations

import torch
from torch import nn


class TinyAudioEncoder(nn.Module):
    """Four conv blocks over a VGGish log-mel example, [N,1,96,64] -> [N,embed_dim] (non-negative).

    Not part of any published method: it stands in for VGGish on the synthetic data and in
    quick experiments where `vggish-10086976.pth` is not at hand. Trained with the model.
    """

    def __init__(self, embed_dim: int = 128, width: int = 32) -> None:
        super().__init__()
        chans = [1, width, width * 2, width * 4, width * 4]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(chans[-1], embed_dim), nn.ReLU(inplace=True))
        self.embed_dim = embed_dim
        self.trainable = True

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        """[N,1,96,64] log-mel -> [N,embed_dim]."""
        x = self.features(logmel)  # [N,C,6,4]
        return self.head(x.mean(dim=(2, 3)))
