"""Per-stage channel reduction between the backbone and the fusion modules.

Kinds:
- `dimreduce`: ECMVAE / AVS-BG "basic" neck. Conv1x1+BN -> Conv3x3+BN -> Conv3x3+BN, convs
  without bias and no activation anywhere (the reference neck is affine + BN).
- `conv1`: Conv1x1 (no bias) + BN, a light projection.
- `aspp`: DeepLab-v2 style sum of four parallel 3x3 convs with dilation = padding 3, 6, 12, 18,
  no BN and no activation. AVSBench uses it with bias and weights ~ N(0, 0.01); ECMVAE's `aspp`
  neck has no bias (`aspp_bias=False`, PyTorch default init).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

NECK_KINDS: tuple[str, ...] = ("dimreduce", "conv1", "aspp")


def _conv_bn(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out)]


class _ASPP(nn.Module):
    """Sum of parallel dilated 3x3 convs: [N,C_in,h,w] -> [N,C,h,w]."""

    def __init__(self, c_in: int, c_out: int, dilations: Sequence[int], bias: bool) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, padding=d, dilation=d, bias=bias) for d in dilations
        )
        if bias:  # AVSBench Classifier_Module init; the ECMVAE (bias-free) variant keeps PyTorch's.
            for conv in self.branches:
                nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N,C_in,h,w] -> [N,C,h,w]."""
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)  # out-of-place: never touches x or a view of it
        return out


class Neck(nn.Module):
    """One reduction per backbone stage: list of [N,C_i,h_i,w_i] -> list of [N,channels,h_i,w_i]."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        kind: str,
        aspp_bias: bool = True,
        aspp_dilations: Sequence[int] = (3, 6, 12, 18),
    ) -> None:
        super().__init__()
        if kind not in NECK_KINDS:
            raise ValueError(f"neck.kind must be one of {list(NECK_KINDS)}, got {kind!r}")
        if not in_channels or any(int(c) <= 0 for c in in_channels):
            raise ValueError(f"neck.in_channels must be a non-empty list of positive ints, got {in_channels!r}")
        if int(channels) <= 0:
            raise ValueError(f"neck.channels must be a positive int, got {channels!r}")
        if kind == "aspp" and not aspp_dilations:
            raise ValueError("neck.aspp_dilations must list at least one dilation")
        self.kind = kind
        self.in_channels = [int(c) for c in in_channels]
        self.channels = int(channels)
        stages: list[nn.Module] = []
        for c_in in self.in_channels:
            if kind == "dimreduce":
                stages.append(
                    nn.Sequential(
                        *_conv_bn(c_in, self.channels, 1),
                        *_conv_bn(self.channels, self.channels, 3),
                        *_conv_bn(self.channels, self.channels, 3),
                    )
                )
            elif kind == "conv1":
                stages.append(nn.Sequential(*_conv_bn(c_in, self.channels, 1)))
            else:
                stages.append(_ASPP(c_in, self.channels, [int(d) for d in aspp_dilations], bool(aspp_bias)))
        self.stages = nn.ModuleList(stages)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """List of [N,C_i,h_i,w_i] -> list of [N,channels,h_i,w_i]."""
        if len(feats) != len(self.stages):
            raise ValueError(f"Neck built for {len(self.stages)} stages got {len(feats)} feature maps")
        return [stage(f) for stage, f in zip(self.stages, feats)]
