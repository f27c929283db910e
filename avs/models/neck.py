"""Per-stage channel reduction between the backbone and the fusion modules: one class per kind.

- `DimReduceNeck`: ECMVAE / AVS-BG "basic" neck. Conv1x1+BN -> Conv3x3+BN -> Conv3x3+BN, convs
  without bias and no activation anywhere (the reference neck is affine + BN).
- `Conv1Neck`: Conv1x1 (no bias) + BN, a light projection.
- `ASPPNeck`: DeepLab-v2 style sum of four parallel 3x3 convs with dilation = padding 3, 6, 12, 18,
  no BN and no activation. AVSBench uses it with bias and weights ~ N(0, 0.01); ECMVAE's `aspp`
  neck has no bias (`aspp_bias=False`, PyTorch default init).

`build_neck(kind=...)` keeps the `model.neck.kind=<name>` spelling of the ablations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def _conv_bn(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out)]


class _ASPP(nn.Module):
    """Sum of parallel dilated 3x3 convs: [N,C_in,h,w] -> [N,C,h,w]."""

    def __init__(self, c_in: int, c_out: int, dilations: Sequence[int], bias: bool) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, padding=d, dilation=d, bias=bias) for d in dilations)
        if bias:  # AVSBench Classifier_Module init; the ECMVAE (bias-free) variant keeps PyTorch's.
            for conv in self.branches:
                nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N,C_in,h,w] -> [N,C,h,w]."""
        out = _live_taps_conv(self.branches[0], x)
        for branch in self.branches[1:]:
            out = out + _live_taps_conv(branch, x)  # out-of-place: never touches x or a view of it
        return out


def _live_taps(kernel: int, dilation: int, padding: int, size: int) -> tuple[int, int]:
    """(first, last) kernel index whose taps read inside a map of `size` (stride 1): tap i reads input
    o + i*dilation - padding for outputs o in [0, size); it reads only zero padding when that offset
    is >= size or <= -size. (0, kernel - 1) when every tap is live."""
    live = [i for i in range(kernel) if -size < i * dilation - padding < size]
    return (live[0], live[-1]) if live else (0, kernel - 1)


def _live_taps_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` without the kernel taps that read only zero padding.

    A dilated 3x3 conv whose dilation reaches past the map (dilation 12 and 18 on the 7 x 7 stride-32
    map of a 224 px input, 18 on the 14 x 14 map) multiplies its outer taps by padding zeros only: the
    same conv with the live (centre) taps and the padding reduced to match gives the same output to
    float rounding (the dropped terms are exact zeros) and the same gradients (a dead tap's weight
    gradient is a sum of products with zeros: exactly 0, which the slice's backward fills in).
    """
    k_h, k_w = conv.kernel_size
    (d_h, d_w), (p_h, p_w) = conv.dilation, conv.padding
    if conv.stride != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(p_h, str):
        return conv(x)
    h0, h1 = _live_taps(k_h, d_h, p_h, x.shape[-2])
    w0, w1 = _live_taps(k_w, d_w, p_w, x.shape[-1])
    # only symmetric crops keep the output size; anything else (or nothing to crop) runs the conv as built
    if (h0, h1, w0, w1) == (0, k_h - 1, 0, k_w - 1) or h0 + h1 != k_h - 1 or w0 + w1 != k_w - 1:
        return conv(x)
    weight = conv.weight[:, :, h0 : h1 + 1, w0 : w1 + 1]
    return F.conv2d(x, weight, conv.bias, padding=(p_h - h0 * d_h, p_w - w0 * d_w), dilation=conv.dilation)


class Neck(nn.Module):
    """One reduction per backbone stage: list of [N,C_i,h_i,w_i] -> list of [N,channels,h_i,w_i].

    Subclasses say what one stage is (`stage`); the base checks the sizes and runs the stages.
    """

    kind: str = ""

    def __init__(self, in_channels: Sequence[int], channels: int) -> None:
        super().__init__()
        if not in_channels or any(int(c) <= 0 for c in in_channels):
            raise ValueError(f"neck.in_channels must be a non-empty list of positive ints, got {in_channels!r}")
        if int(channels) <= 0:
            raise ValueError(f"neck.channels must be a positive int, got {channels!r}")
        self.in_channels = [int(c) for c in in_channels]
        self.channels = int(channels)
        self.stages = nn.ModuleList(self.stage(c_in) for c_in in self.in_channels)

    def stage(self, c_in: int) -> nn.Module:
        """The reduction of one backbone stage with c_in channels."""
        raise NotImplementedError

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """List of [N,C_i,h_i,w_i] -> list of [N,channels,h_i,w_i]."""
        if len(feats) != len(self.stages):
            raise ValueError(f"Neck built for {len(self.stages)} stages got {len(feats)} feature maps")
        return [stage(f) for stage, f in zip(self.stages, feats)]


class DimReduceNeck(Neck):
    """Conv1x1+BN -> Conv3x3+BN -> Conv3x3+BN per stage (ECMVAE / AVS-BG)."""

    kind = "dimreduce"

    def stage(self, c_in: int) -> nn.Module:
        c = self.channels
        return nn.Sequential(*_conv_bn(c_in, c, 1), *_conv_bn(c, c, 3), *_conv_bn(c, c, 3))


class Conv1Neck(Neck):
    """Conv1x1 + BN per stage (the ECMVAE paper's text)."""

    kind = "conv1"

    def stage(self, c_in: int) -> nn.Module:
        return nn.Sequential(*_conv_bn(c_in, self.channels, 1))


class ASPPNeck(Neck):
    """Sum of dilated 3x3 convs per stage (AVSBench: with bias, N(0, 0.01) weights)."""

    kind = "aspp"

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        aspp_bias: bool = True,
        aspp_dilations: Sequence[int] = (3, 6, 12, 18),
    ) -> None:
        if not aspp_dilations:
            raise ValueError("neck.aspp_dilations must list at least one dilation")
        self.aspp_bias = bool(aspp_bias)
        self.aspp_dilations = [int(d) for d in aspp_dilations]
        super().__init__(in_channels, channels)

    def stage(self, c_in: int) -> nn.Module:
        return _ASPP(c_in, self.channels, self.aspp_dilations, self.aspp_bias)


NECKS: dict[str, type[Neck]] = {cls.kind: cls for cls in (DimReduceNeck, Conv1Neck, ASPPNeck)}
NECK_KINDS: tuple[str, ...] = tuple(NECKS)


def build_neck(in_channels: Sequence[int], channels: int, kind: str, **options) -> Neck:
    """The neck class registered as `kind` (dimreduce | conv1 | aspp); `options` go to its constructor."""
    if kind not in NECKS:
        raise ValueError(f"neck.kind must be one of {list(NECK_KINDS)}, got {kind!r}")
    return NECKS[kind](in_channels=in_channels, channels=channels, **options)
