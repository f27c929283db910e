"""Neck: shapes, exact parameter counts, maths of each kind, gradients, no in-place on inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from avs.models.neck import ASPPNeck, Conv1Neck, DimReduceNeck, build_neck

PVT = [64, 128, 320, 512]
R50 = [256, 512, 1024, 2048]
B0 = [32, 64, 160, 256]
KINDS = ["dimreduce", "conv1", "aspp"]


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _feats(size: int, widths: list[int] = B0, n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, c, size // s, size // s, generator=g) for c, s in zip(widths, [4, 8, 16, 32])]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [64, 96])
def test_shapes(kind, size):
    neck = build_neck(B0, 16, kind)
    out = neck(_feats(size))
    assert [tuple(o.shape) for o in out] == [(2, 16, size // s, size // s) for s in [4, 8, 16, 32]]


def test_param_counts():
    # ECMVAE / AVS-BG basic neck: spec 1,313,792 (303,872 / 312,064 / 336,640 / 361,216); ResNet 1,674,240
    basic = build_neck(PVT, 128, "dimreduce")
    assert _n_params(basic) == 1_313_792
    assert [_n_params(s) for s in basic.stages] == [303_872, 312_064, 336_640, 361_216]
    assert _n_params(build_neck(R50, 128, "dimreduce")) == 1_674_240
    # AVSBench ASPP (256, bias): 4 * sum(c_in) * 256 * 9 + 16 * 256
    assert _n_params(build_neck(PVT, 256, "aspp")) == 9_441_280
    assert _n_params(build_neck(R50, 256, "aspp")) == 35_393_536
    # ECMVAE / AVS-BG aspp (128, no bias): spec 4,718,592
    assert _n_params(build_neck(PVT, 128, "aspp", aspp_bias=False)) == 4_718_592
    # conv1: c_in * C weights + BN affine
    assert _n_params(build_neck(PVT, 128, "conv1")) == 1024 * 128 + 4 * 2 * 128


def test_dimreduce_is_affine_without_activation():
    neck = build_neck([8], 4, "dimreduce").eval()
    for m in neck.modules():  # non-trivial BN statistics and affine
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    x = torch.randn(1, 8, 6, 6)
    f = lambda t: neck([t])[0]  # noqa: E731
    with torch.no_grad():
        # affine map: f(a x + b y) = a f(x) + b f(y) - (a + b - 1) f(0)
        y = torch.randn_like(x)
        lhs = f(2 * x - 0.5 * y)
        rhs = 2 * f(x) - 0.5 * f(y) - 0.5 * f(torch.zeros_like(x))
    assert torch.allclose(lhs, rhs, atol=1e-4)
    convs = [m for m in neck.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (3, 3)] and all(c.bias is None for c in convs)


@pytest.mark.parametrize("bias", [True, False])
def test_aspp_is_sum_of_dilated_convs(bias):
    torch.manual_seed(0)
    neck = build_neck([6], 5, "aspp", aspp_bias=bias)
    x = torch.randn(1, 6, 20, 20)
    expected = sum(
        F.conv2d(x, c.weight, c.bias, padding=d, dilation=d) for c, d in zip(neck.stages[0].branches, [3, 6, 12, 18])
    )
    assert torch.allclose(neck([x])[0], expected, atol=1e-6)
    assert all((c.bias is not None) == bias for c in neck.stages[0].branches)


def test_aspp_avsbench_init():
    torch.manual_seed(0)
    w = torch.cat([c.weight.flatten() for c in build_neck([512], 256, "aspp").stages[0].branches])
    assert abs(w.std().item() - 0.01) < 5e-4 and abs(w.mean().item()) < 5e-4


@pytest.mark.parametrize("kind", KINDS)
def test_every_param_gets_gradient_and_inputs_untouched(kind):
    neck = build_neck(B0, 8, kind).train()
    feats = [f.requires_grad_() for f in _feats(64)]
    copies = [f.detach().clone() for f in feats]
    versions = [f._version for f in feats]
    sum(o.square().mean() for o in neck(feats)).backward()
    missing = [n for n, p in neck.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.equal(f.detach(), c) for f, c in zip(feats, copies))
    assert [f._version for f in feats] == versions


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"neck.kind must be one of \['dimreduce', 'conv1', 'aspp'\]"):
        build_neck(PVT, 128, "fpn")
    with pytest.raises(ValueError, match="neck.in_channels"):
        build_neck([], 128, "conv1")
    with pytest.raises(ValueError, match="4 stages got 3"):
        build_neck(B0, 8, "conv1")(_feats(64)[:3])


def test_factory_builds_one_class_per_kind():
    classes = {"dimreduce": DimReduceNeck, "conv1": Conv1Neck, "aspp": ASPPNeck}
    for kind, cls in classes.items():
        assert type(build_neck(B0, 8, kind)) is cls
    with pytest.raises(TypeError):  # the aspp options belong to the aspp neck only
        build_neck(B0, 8, "dimreduce", aspp_bias=False)


@pytest.mark.parametrize("hw", [(7, 7), (14, 14), (5, 20), (20, 20)])
def test_aspp_dead_taps_skipped_give_the_full_convs(hw):
    """Dilations past the map (12 and 18 on 7 x 7, 18 on 14 x 14, one axis only on 5 x 20): the output
    and every gradient equal the full dilated convs' in float64, and a dead tap's weight gradient is 0."""
    torch.manual_seed(0)
    neck = build_neck([6], 5, "aspp").double()
    x = torch.randn(2, 6, *hw, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, *hw, dtype=torch.float64)
    (neck([x])[0] * w).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in neck.parameters()]
    x.grad = None
    neck.zero_grad(set_to_none=True)
    expected = sum(
        F.conv2d(x, c.weight, c.bias, padding=d, dilation=d) for c, d in zip(neck.stages[0].branches, [3, 6, 12, 18])
    )
    (expected * w).sum().backward()
    want = [x.grad] + [p.grad for p in neck.parameters()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    last = neck.stages[0].branches[-1]  # dilation 18
    if min(hw) <= 18 and max(hw) <= 18:  # every outer tap of the dilation-18 conv reads padding only
        outer = last.weight.grad.clone()
        outer[:, :, 1, 1] = 0
        assert torch.count_nonzero(outer) == 0
    assert last.weight.grad[:, :, 1, 1].abs().sum() > 0
