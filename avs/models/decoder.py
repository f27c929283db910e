"""Top-down segmentation decoders over four same-width feature maps (strides 4..32).

Kinds (one class each; `build_decoder(kind=...)` keeps the `model.decoder.kind=<name>` spelling):
- `fpn` (`FPNDecoder`): the AVSBench decoder (the paper calls it Panoptic-FPN-like; it is built from
  RefineNet/MiDaS FeatureFusionBlocks). ResidualConvUnit = ReLU -> conv3x3 -> ReLU -> conv3x3
  (+ skip, convs with bias, no BN); fusion blocks upsample bilinearly x2 with align_corners=True;
  head conv3x3 C->C/2, bilinear x2 (align_corners=False), conv3x3 C/2->32, ReLU, conv1x1 32->K.
- `simple` (`SimpleDecoder`): the ECMVAE / AVS-BG decoder. ResidualBlock = x + ReLU(BN(conv(ReLU(BN(conv(x)))))),
  convs without bias; fusion blocks upsample x2 by nearest neighbour; head conv3x3 C->64,
  nearest x2, conv3x3 64->32, ReLU, conv1x1 32->K. Both nearest x2 + conv3x3 pairs (the last fusion
  block's upsampling read by the head's first conv, and the head's own) run in phase form
  (`nearest_up2_conv3x3`): each output phase is a 2x2 conv of the low-resolution map, all four computed
  by one stride-2 transposed convolution with a folded 4x4 kernel; same maths with 4/9 of the
  multiply-adds, and the upsampled map is never built.

In both references the deepest fusion block builds a `resConfUnit1` it never uses; it is not
built here, so every parameter receives a gradient. Module names follow the AVSBench decoder
(`path4..path1`, `resConfUnit1/2`, `output_conv.{0,2,4}`) for both kinds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """Deterministic nearest x2 upsampling by expand + reshape: [N,C,h,w] -> [N,C,2h,2w]."""
    n, c, h, w = x.shape
    x = x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2)  # [N,C,h,1,w,1] -> [N,C,h,2,w,2]
    return x.reshape(n, c, 2 * h, 2 * w)


def _resize(x: torch.Tensor, size: tuple[int, int] | None, mode: str) -> torch.Tensor:
    """Upsample [N,C,h,w] to `size` (default 2h x 2w) with the block's interpolation mode."""
    h, w = x.shape[-2:]
    size = (2 * h, 2 * w) if size is None else (int(size[0]), int(size[1]))
    if mode == "nearest":
        if size == (2 * h, 2 * w):
            return upsample_nearest2x(x)
        return F.interpolate(x, size=size, mode="nearest")
    # align_corners=True: output depends only on the target size, so size=(2h,2w) equals scale 2.
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _up2_taps(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The 4 taps along `dim` of the stride-2 transposed conv equal to nearest x2 then this conv3x3 kernel.

    Output row 2i of conv3x3(nearest2x(x)) reads upsampled rows 2i-1, 2i, 2i+1, i.e. low-res rows
    (i-1, i, i): taps w0 on row i-1 and w1+w2 on row i; output row 2i+1 reads low-res rows (i, i, i+1):
    w0+w1 on row i and w2 on row i+1. conv_transpose2d(stride=2, padding=1, kernel 4) gives output row
    2i+a the taps k = 2(i-r)+1+a of low-res row r, so its kernel along `dim` is (w2, w1+w2, w0+w1, w0).
    The sums are taken in the weight's dtype.
    """
    t0, t1, t2 = w.unbind(dim)
    return torch.stack((t2, t1 + t2, t0 + t1, t0), dim)


def _phase_form_applies(conv: nn.Module) -> bool:
    """True for a plain nn.Conv2d with kernel 3, zero padding 1, stride 1, dilation 1, groups 1."""
    return (
        isinstance(conv, nn.Conv2d)
        and tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.stride) == (1, 1)
        and not isinstance(conv.padding, str)
        and tuple(conv.padding) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def nearest_up2_conv3x3(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """conv(upsample_nearest2x(x)) without building the upsampled map: [N,C,h,w] -> [N,O,2h,2w].

    Phase form: output pixel (2i+a, 2j+b) is a 2x2 conv of the zero-padded low-res map at rows i+a-1..i+a,
    cols j+b-1..j+b, with the 3x3 kernel's taps folded per phase. All four phases are one stride-2
    transposed convolution (padding 1) with the 4x4 kernel `_up2_taps` folds from the 3x3 one, which
    writes the interleaved map directly. Equal to the upsample-then-conv form up to float rounding, with
    4/9 of its multiply-adds. A conv other than 3x3 / padding 1 / stride 1 / dilation 1 / groups 1 falls
    back to conv(upsample_nearest2x(x)).
    """
    if not _phase_form_applies(conv) or x.dim() != 4:
        return conv(upsample_nearest2x(x))
    k = _up2_taps(_up2_taps(conv.weight, 2), 3)  # [O,C,3,3] -> [O,C,4,4]
    return F.conv_transpose2d(x, k.transpose(0, 1), conv.bias, stride=2, padding=1)  # weight [C,O,4,4]


class _Upsample2x(nn.Module):
    """x2 upsampling as a module (for the output head): [N,C,h,w] -> [N,C,2h,2w]."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "nearest":
            return upsample_nearest2x(x)
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


class ResidualConvUnit(nn.Module):
    """AVSBench unit: x + conv(ReLU(conv(ReLU(x)))), convs with bias. [N,C,h,w] -> [N,C,h,w].

    The reference applies `nn.ReLU(inplace=True)` to the input tensor itself, so its skip adds
    relu(x) (and the caller's tensor is overwritten with relu(x)). Here the input is never
    modified; `legacy_inplace_relu_skip=True` reproduces the reference numerics (skip = relu(x)).
    """

    def __init__(self, channels: int, legacy_inplace_relu_skip: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=True)
        self.legacy_inplace_relu_skip = legacy_inplace_relu_skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N,C,h,w] -> [N,C,h,w]."""
        rx = F.relu(x)  # out-of-place: the caller's x is left untouched
        out = self.conv2(F.relu(self.conv1(rx), inplace=True))
        return out + (rx if self.legacy_inplace_relu_skip else x)


class ResidualBlock(nn.Module):
    """ECMVAE / AVS-BG unit: x + ReLU(BN(conv(ReLU(BN(conv(x)))))), convs without bias. Shape kept."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N,C,h,w] -> [N,C,h,w]."""
        return x + self.body(x)


class FeatureFusionBlock(nn.Module):
    """out = up(unit2(x + unit1(skip))) (or up(unit2(x)) without a skip): [N,C,h,w] -> [N,C,h',w']."""

    def __init__(self, unit: Callable[[], nn.Module], mode: str, with_skip: bool) -> None:
        super().__init__()
        self.mode = mode
        self.resConfUnit1 = unit() if with_skip else None
        self.resConfUnit2 = unit()

    def forward(
        self,
        x: torch.Tensor,
        skip: torch.Tensor | None = None,
        out_size: tuple[int, int] | None = None,
        upsample: bool = True,
    ) -> torch.Tensor:
        """x, skip [N,C,h,w] -> [N,C,*out_size] (default [N,C,2h,2w]); [N,C,h,w] with `upsample=False`
        (the caller's next convolution reads the upsampled map in phase form)."""
        if skip is not None:
            if self.resConfUnit1 is None:
                raise ValueError("this FeatureFusionBlock was built without a skip input")
            x = x + self.resConfUnit1(skip)  # out-of-place (the references add in place into x)
        x = self.resConfUnit2(x)
        return _resize(x, out_size, self.mode) if upsample else x


class Decoder(nn.Module):
    """Top-down decoder: 4 maps [N,C,h_i,w_i] (strides 4..32) -> logits [N,num_classes,H,W].

    Subclasses give the residual unit, the upsampling mode and the head's middle width.
    """

    kind: str = ""
    mode: str = "nearest"

    def __init__(self, channels: int, num_classes: int = 1) -> None:
        super().__init__()
        if int(channels) <= 0:
            raise ValueError(f"decoder.channels must be a positive int, got {channels!r}")
        if int(num_classes) <= 0:
            raise ValueError(f"decoder.num_classes must be a positive int, got {num_classes!r}")
        c = int(channels)
        self.channels = c
        self.num_classes = int(num_classes)
        self.path4 = FeatureFusionBlock(self.unit, self.mode, with_skip=False)
        self.path3 = FeatureFusionBlock(self.unit, self.mode, with_skip=True)
        self.path2 = FeatureFusionBlock(self.unit, self.mode, with_skip=True)
        self.path1 = FeatureFusionBlock(self.unit, self.mode, with_skip=True)
        mid = self.head_width()
        self.output_conv = nn.Sequential(
            nn.Conv2d(c, mid, 3, padding=1),
            _Upsample2x(self.mode),
            nn.Conv2d(mid, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, self.num_classes, 1),
        )

    def unit(self) -> nn.Module:
        """A new residual unit of this decoder."""
        raise NotImplementedError

    def head_width(self) -> int:
        """Width of the output head's first conv."""
        raise NotImplementedError

    def _head(self, x: torch.Tensor, upsampled: bool = True) -> torch.Tensor:
        """`output_conv` member by member: [N,C,h,w] -> [N,K,2h,2w]; nearest x2 + conv3x3 in phase form.

        With `upsampled=False` (nearest mode), x is `path1`'s map before its own nearest x2: the first
        conv reads that upsampled map in phase form too, [N,C,h,w] -> [N,K,4h,4w].
        """
        conv_in, up, conv_up, relu, conv_out = self.output_conv
        x = conv_in(x) if upsampled else nearest_up2_conv3x3(x, conv_in)
        x = nearest_up2_conv3x3(x, conv_up) if self.mode == "nearest" else conv_up(up(x))
        return conv_out(relu(x))

    def forward(self, feats: Sequence[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        """feats: 4 x [N,C,h_i,w_i] (strides 4, 8, 16, 32) -> logits [N,num_classes,*out_size]."""
        if len(feats) != 4:
            raise ValueError(f"Decoder expects 4 feature maps (strides 4..32), got {len(feats)}")
        for i, f in enumerate(feats):
            if f.dim() != 4 or f.shape[1] != self.channels:
                raise ValueError(f"Decoder feature {i} must be [N,{self.channels},h,w], got {tuple(f.shape)}")
        f1, f2, f3, f4 = feats
        # Each block upsamples to the next skip's size: x2 whenever the input is a multiple of 32.
        x = self.path4(f4, out_size=tuple(f3.shape[-2:]))  # [N,C,h4,w4] -> [N,C,h3,w3]
        x = self.path3(x, f3, out_size=tuple(f2.shape[-2:]))  # -> [N,C,h2,w2]
        x = self.path2(x, f2, out_size=tuple(f1.shape[-2:]))  # -> [N,C,h1,w1]
        if self.mode == "nearest":  # path1's nearest x2 is read by the head's first conv in phase form
            logits = self._head(self.path1(x, f1, upsample=False), upsampled=False)  # -> [N,K,4h1,4w1]
        else:
            x = self.path1(x, f1)  # -> [N,C,2h1,2w1] (stride 2)
            logits = self._head(x)  # -> [N,K,4h1,4w1] (stride 1)
        size = (int(out_size[0]), int(out_size[1]))
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


class FPNDecoder(Decoder):
    """AVSBench decoder: ResidualConvUnit (bias, no BN), bilinear upsampling, head C -> C/2 -> 32 -> K."""

    kind = "fpn"
    mode = "bilinear"

    def __init__(self, channels: int, num_classes: int = 1, legacy_inplace_relu_skip: bool = False) -> None:
        if int(channels) % 2:
            raise ValueError(f"decoder.channels must be a positive (for 'fpn': even) int, got {channels!r}")
        self.legacy_inplace_relu_skip = bool(legacy_inplace_relu_skip)
        super().__init__(channels, num_classes)

    def unit(self) -> nn.Module:
        return ResidualConvUnit(self.channels, self.legacy_inplace_relu_skip)

    def head_width(self) -> int:
        return self.channels // 2


class SimpleDecoder(Decoder):
    """ECMVAE / AVS-BG decoder: ResidualBlock (BN, no bias), nearest upsampling, head C -> 64 -> 32 -> K."""

    kind = "simple"

    def unit(self) -> nn.Module:
        return ResidualBlock(self.channels)

    def head_width(self) -> int:
        return 64


DECODERS: dict[str, type[Decoder]] = {cls.kind: cls for cls in (FPNDecoder, SimpleDecoder)}
DECODER_KINDS: tuple[str, ...] = tuple(DECODERS)


def build_decoder(channels: int, kind: str = "fpn", **options) -> Decoder:
    """The decoder class registered as `kind` (fpn | simple); `options` go to its constructor."""
    if kind not in DECODERS:
        raise ValueError(f"decoder.kind must be one of {list(DECODER_KINDS)}, got {kind!r}")
    if options.get("legacy_inplace_relu_skip") and kind != "fpn":
        raise ValueError("decoder.legacy_inplace_relu_skip applies only to kind='fpn'")
    if kind != "fpn":
        options.pop("legacy_inplace_relu_skip", None)
    return DECODERS[kind](channels=channels, **options)
