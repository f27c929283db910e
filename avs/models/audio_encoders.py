"""Small trainable log-mel encoders for when the VGGish weight file is not available."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


class TinyAudioEncoder(nn.Module):
    """Four conv blocks over a VGGish log-mel example, [N,1,96,64] -> [N,embed_dim] (non-negative).

    Not part of any published method: it stands in for VGGish on the synthetic data and in
    quick experiments where `vggish-10086976.pth` is not at hand. Trained with the model.

    Args:
        embed_dim: output size.
        width: channels of the first conv block (then 2x, 4x, 4x).
        pretrained: null/false = random init (the default); true/"file" = strictly load
            `weights_path`, a state dict of this module (e.g. the stand-in written by
            scripts/pretrain.py, docs/synthetic.md "Pretrained stand-ins").
        weights_path: the weight file read when `pretrained` is set.
    """

    def __init__(
        self,
        embed_dim: int = 128,
        width: int = 32,
        pretrained: bool | str | None = None,
        weights_path: str | None = None,
    ) -> None:
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
        if _wants_file(pretrained):
            if not weights_path:
                raise ValueError("audio.weights_path must be set when audio.pretrained is true/'file'")
            self.load_weights(weights_path)
        elif weights_path:
            log.info("audio.weights_path=%s is not read because audio.pretrained=%r", weights_path, pretrained)

    def load_weights(self, path: str | os.PathLike) -> None:
        """Strictly load a state dict of this module (same embed_dim / width) from `path`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"audio.weights_path: no such file {path} (make it with scripts/pretrain.py, or train "
                "from random init with audio.pretrained=null)"
            )
        sd = torch.load(path, map_location="cpu", weights_only=True)
        try:
            self.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            hint = "check audio.embed_dim / audio.width"
            raise ValueError(f"{path} does not match TinyAudioEncoder ({hint}): {exc}") from exc
        log.info("tiny audio encoder: loaded %d tensors from %s", len(sd), path)

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        """[N,1,96,64] log-mel -> [N,embed_dim]."""
        x = self.features(logmel)  # [N,C,6,4]
        return self.head(x.mean(dim=(2, 3)))


def _wants_file(pretrained: bool | str | None) -> bool:
    if pretrained is None or pretrained is False:
        return False
    if pretrained is True:
        return True
    p = str(pretrained).lower()
    if p in ("none", "false", ""):
        return False
    if p in ("file", "true"):
        return True
    raise ValueError(f"audio.pretrained must be null/false or true/'file', got {pretrained!r}")
