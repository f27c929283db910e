"""Decoder: shapes, exact parameter counts (and the published model totals), block maths, gradients."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avs.models.decoder import (
    Decoder,
    FeatureFusionBlock,
    FPNDecoder,
    ResidualBlock,
    ResidualConvUnit,
    SimpleDecoder,
    build_decoder,
    nearest_up2_conv3x3,
    upsample_nearest2x,
)
from avs.models.neck import build_neck

KINDS = ["fpn", "simple"]
PVT_B5_PARAMS = 81_443_008  # checked in test_backbones.py
R50_PARAMS = 23_508_032  # checked in test_backbones.py
TPAVI_256_PARAMS = 165_760  # one AVSBench TPAVI block at 256 channels


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _feats(size: int, c: int, n: int = 2, sizes: list[int] | None = None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sizes = sizes or [size // s for s in (4, 8, 16, 32)]
    return [torch.randn(n, c, h, h, generator=g) for h in sizes]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [64, 96])
def test_shapes(kind, size):
    dec = build_decoder(16, kind)
    assert tuple(dec(_feats(size, 16), (size, size)).shape) == (2, 1, size, size)


@pytest.mark.parametrize("kind", KINDS)
def test_non_multiple_of_32_and_num_classes(kind):
    # a 100 px PVT input gives maps of 25, 13, 7, 4 px
    dec = build_decoder(8, kind, num_classes=3)
    out = dec(_feats(0, 8, sizes=[25, 13, 7, 4]), (100, 100))
    assert tuple(out.shape) == (2, 3, 100, 100)
    assert torch.isfinite(out).all()


def test_param_counts_and_published_totals():
    fpn = build_decoder(256, "fpn")
    assert _n_params(fpn.output_conv) == 331_969
    assert _n_params(fpn) - 331_969 == 8_261_120  # 7 ResidualConvUnits x 1,180,160
    assert _n_params(fpn) == 8_593_089
    simple = build_decoder(128, "simple")
    assert _n_params(simple.output_conv) == 92_289
    assert _n_params(simple) == 2_455_681 - 295_424 == 2_160_257  # spec total minus the unused resConfUnit1
    # AVSBench TPAVI model totals: PVT-v2-b5 100.14 M, ResNet-50 68.16 M
    heads = 4 * TPAVI_256_PARAMS + 8_593_089
    pvt_total = PVT_B5_PARAMS + _n_params(build_neck([64, 128, 320, 512], 256, "aspp")) + heads
    r50_total = R50_PARAMS + _n_params(build_neck([256, 512, 1024, 2048], 256, "aspp")) + heads
    assert pvt_total == 100_140_417 and abs(pvt_total / 1e6 - 100.14) < 0.05
    assert r50_total == 68_157_697 and abs(r50_total / 1e6 - 68.16) < 0.05


def test_no_unused_modules():
    for kind in KINDS:
        dec = build_decoder(8, kind)
        assert dec.path4.resConfUnit1 is None and dec.path3.resConfUnit1 is not None


@pytest.mark.parametrize("kind", KINDS)
def test_every_param_gets_gradient_and_inputs_untouched(kind):
    dec = build_decoder(8, kind).train()
    feats = [f.requires_grad_() for f in _feats(64, 8)]
    copies = [f.detach().clone() for f in feats]
    versions = [f._version for f in feats]
    dec(feats, (64, 64)).square().mean().backward()
    assert not [n for n, p in dec.named_parameters() if p.grad is None]
    assert all(f.grad is not None for f in feats)
    assert all(torch.equal(f.detach(), c) for f, c in zip(feats, copies))
    assert [f._version for f in feats] == versions


class _ReferenceRCU(nn.Module):
    """The AVSBench ResidualConvUnit as published: in-place ReLU on the input tensor."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(x)
        out = self.conv1(out)
        out = self.relu(out)
        out = self.conv2(out)
        return out + x


def test_residual_conv_unit_legacy_flag():
    torch.manual_seed(0)
    ref = _ReferenceRCU(4)
    legacy = ResidualConvUnit(4, legacy_inplace_relu_skip=True)
    clean = ResidualConvUnit(4)
    legacy.load_state_dict(ref.state_dict())
    clean.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 5, 5)
    x_ref = x.clone()
    y_ref = ref(x_ref)
    assert torch.equal(x_ref, F.relu(x))  # the reference overwrote its input
    assert torch.allclose(legacy(x), y_ref, atol=1e-6)
    y_clean = clean(x)
    # clean version: the skip adds x itself; the difference is exactly relu(x) - x
    assert torch.allclose(y_ref - y_clean, F.relu(x) - x, atol=1e-6)
    assert not torch.equal(x, F.relu(x))  # x (with negatives) was left untouched by both units


def _zero_convs(block: nn.Module) -> None:
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.zeros_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def test_fusion_block_upsampling_modes():
    # with zero convs each residual unit is the identity, so a block is up(x + skip)
    x, skip = torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5)
    fpn = FeatureFusionBlock(lambda: ResidualConvUnit(3), "bilinear", with_skip=True).eval()
    simple = FeatureFusionBlock(lambda: ResidualBlock(3), "nearest", with_skip=True).eval()
    _zero_convs(fpn)
    _zero_convs(simple)
    expect_bilinear = F.interpolate(x + skip, scale_factor=2, mode="bilinear", align_corners=True)
    expect_nearest = F.interpolate(x + skip, scale_factor=2, mode="nearest")
    assert torch.allclose(fpn(x, skip), expect_bilinear, atol=1e-6)
    assert torch.allclose(simple(x, skip), expect_nearest, atol=1e-6)
    assert tuple(fpn(x, skip, out_size=(7, 9)).shape) == (1, 3, 7, 9)


def test_upsample_nearest2x_matches_interpolate():
    x = torch.randn(2, 3, 4, 6)
    assert torch.equal(upsample_nearest2x(x), F.interpolate(x, scale_factor=2, mode="nearest"))


def test_head_structure():
    fpn, simple = build_decoder(16, "fpn", num_classes=2), build_decoder(16, "simple")

    def convs(d: Decoder) -> list[tuple[int, int, int]]:
        return [(m.in_channels, m.out_channels, m.kernel_size[0]) for m in d.output_conv if isinstance(m, nn.Conv2d)]

    assert convs(fpn) == [(16, 8, 3), (8, 32, 3), (32, 2, 1)]
    assert convs(simple) == [(16, 64, 3), (64, 32, 3), (32, 1, 1)]
    assert any(isinstance(m, nn.BatchNorm2d) for m in simple.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fpn.modules())


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"decoder.kind must be one of \['fpn', 'simple'\]"):
        build_decoder(16, "unet")
    with pytest.raises(ValueError, match="decoder.channels"):
        build_decoder(15, "fpn")
    with pytest.raises(ValueError, match="legacy_inplace_relu_skip"):
        build_decoder(16, "simple", legacy_inplace_relu_skip=True)
    dec = build_decoder(8, "fpn")
    with pytest.raises(ValueError, match="4 feature maps"):
        dec(_feats(64, 8)[:3], (64, 64))
    with pytest.raises(ValueError, match=r"\[N,8,h,w\]"):
        dec(_feats(64, 4), (64, 64))


def test_factory_builds_one_class_per_kind():
    assert type(build_decoder(8, "fpn")) is FPNDecoder
    assert type(build_decoder(8, "simple")) is SimpleDecoder
    assert build_decoder(8, "fpn", legacy_inplace_relu_skip=True).path3.resConfUnit2.legacy_inplace_relu_skip


def _up_then_conv(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    return conv(upsample_nearest2x(x))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("hw", [(5, 7), (4, 6), (1, 1), (3, 8)])
def test_phase_form_equals_upsample_then_conv_float64(hw, bias):
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(6, 5, 3, padding=1, bias=bias).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
    x = torch.randn(2, 6, *hw, generator=g, dtype=torch.float64)
    grad_out = torch.randn(2, 5, 2 * hw[0], 2 * hw[1], generator=g, dtype=torch.float64)
    results = []
    for fn in (nearest_up2_conv3x3, _up_then_conv):
        xi = x.clone().requires_grad_(True)
        conv.zero_grad()
        out = fn(xi, conv)
        out.backward(grad_out)
        grads = [xi.grad, conv.weight.grad] + ([conv.bias.grad] if bias else [])
        results.append([out.detach()] + [t.clone() for t in grads])
    assert results[0][0].shape == (2, 5, 2 * hw[0], 2 * hw[1])
    for new, old in zip(*results):
        assert (new - old).abs().max().item() <= 1e-12 * max(1.0, old.abs().max().item())


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 3, 1),
        nn.Conv2d(4, 3, 3, padding=1, stride=2),
        nn.Conv2d(4, 3, 3, padding=2, dilation=2),
        nn.Conv2d(4, 4, 3, padding=1, groups=2),
        nn.Conv2d(4, 3, 3, padding=0),
        nn.Conv2d(4, 3, 3, padding="same"),
        nn.Conv2d(4, 3, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 3, 5, padding=2),
    ],
)
def test_phase_form_falls_back_for_other_convs(conv):
    x = torch.randn(1, 4, 5, 6)
    assert torch.equal(nearest_up2_conv3x3(x, conv), _up_then_conv(x, conv))


def test_phase_form_low_precision():
    """Same dtype as the upsample-then-conv form under CPU bf16 autocast and with fp16 / bf16 tensors."""
    g = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(8, 6, 3, padding=1)
    x = torch.randn(2, 8, 6, 5, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        new, old = nearest_up2_conv3x3(x, conv), _up_then_conv(x, conv)
    ref = _up_then_conv(x, conv)
    assert new.dtype == old.dtype == torch.bfloat16
    assert (new.float() - ref).abs().max() <= (old.float() - ref).abs().max() * 2 + 1e-2
    for dtype, tol in ((torch.float16, 4e-3), (torch.bfloat16, 3e-2)):
        c, xl = copy.deepcopy(conv).to(dtype), x.to(dtype)
        new, old = nearest_up2_conv3x3(xl, c), _up_then_conv(xl, c)
        assert new.dtype == old.dtype == dtype
        assert torch.allclose(new.float(), old.float(), atol=tol, rtol=tol)


def test_simple_decoder_head_matches_the_upsample_then_conv_path():
    """Whole SimpleDecoder forward + backward in float64 vs a copy forced onto conv(upsample(x)); same keys."""
    torch.manual_seed(3)
    dec = SimpleDecoder(8, num_classes=2).double()
    ref = copy.deepcopy(dec)
    feats = [f.double() for f in _feats(64, 8)]
    g = torch.Generator().manual_seed(4)
    grad_out = torch.randn(2, 2, 64, 64, generator=g, dtype=torch.float64)

    def run(model: Decoder) -> list[torch.Tensor]:
        inputs = [f.clone().requires_grad_(True) for f in feats]
        out = model(inputs, (64, 64))
        out.backward(grad_out)
        return [out.detach()] + [f.grad for f in inputs] + [p.grad for p in model.parameters()]

    new = run(dec)
    with mock.patch("avs.models.decoder.nearest_up2_conv3x3", _up_then_conv):
        old = run(ref)
    assert len(new) == len(old)
    for a, b in zip(new, old):
        assert (a - b).abs().max().item() <= 1e-10 * max(1.0, b.abs().max().item())
    head_keys = [k for k in dec.state_dict() if k.startswith("output_conv.")]
    assert head_keys == [f"output_conv.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    assert list(dec.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():  # BN running statistics moved alike
        assert torch.allclose(dec.state_dict()[k], v, rtol=0, atol=1e-12)


def test_fpn_head_is_the_sequential():
    """The bilinear head keeps conv(upsample(x)): the decoder's head is exactly `output_conv`."""
    fpn = build_decoder(8, "fpn").eval()
    x = torch.randn(1, 8, 6, 7)
    assert torch.equal(fpn._head(x), fpn.output_conv(x))
