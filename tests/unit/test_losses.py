"""Tests for avs.losses: BCE, F3Net structure loss (+ legacy flag), A-V mapping KL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avs.losses import av_mapping_loss, bce_loss, box_mean, structure_loss


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_bce_logits(x, y):
    # stable: max(x,0) - x*y + log(1+exp(-|x|))
    return np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))


def _np_weights(mask, k):
    """1 + 5|avgpool_k(mask) - mask| with zero padding counted (count_include_pad=True)."""
    p = k // 2
    padded = np.pad(mask, ((0, 0), (p, p), (p, p)))
    win = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(1, 2))
    return 1.0 + 5.0 * np.abs(win.sum(axis=(-1, -2)) / (k * k) - mask)


def _np_structure(logits, masks, k, smoothing, legacy):
    x, g = logits[:, 0], masks[:, 0]  # [N,H,W]
    w = _np_weights(g, k)
    y = (1 - smoothing) * g + smoothing / 2
    bce = _np_bce_logits(x, y)
    wbce = np.full(len(x), bce.mean()) if legacy else (w * bce).sum((1, 2)) / w.sum((1, 2))
    p = _np_sigmoid(x)
    inter = (p * g * w).sum((1, 2))
    union = ((p + g) * w).sum((1, 2))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return float((wbce + wiou).mean())


def _square_case():
    mask = torch.zeros(1, 1, 64, 64, dtype=torch.float64)
    mask[..., 12:52, 12:52] = 1.0
    logits = (mask * 2 - 1) * 8.0  # confident and correct everywhere
    return mask, logits


# ---------------------------------------------------------------------------------- BCE


def test_bce_loss_valid_frames_only():
    torch.manual_seed(0)
    logits = torch.randn(4, 1, 8, 8, requires_grad=True)
    masks = (torch.rand(4, 1, 8, 8) > 0.5).float()
    valid = torch.tensor([True, False, False, True])
    loss = bce_loss(logits, masks, valid)
    expected = F.binary_cross_entropy(torch.sigmoid(logits[[0, 3]]), masks[[0, 3]])
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    loss.backward()
    assert logits.grad[[1, 2]].abs().sum() == 0
    assert logits.grad[[0, 3]].abs().sum() > 0
    # no valid frame: exact 0 with a graph
    logits.grad = None
    zero = bce_loss(logits, masks, torch.zeros(4, dtype=torch.bool))
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()
    assert logits.grad.abs().sum() == 0


def test_bce_loss_shape_errors():
    with pytest.raises(ValueError, match="masks must match"):
        bce_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match="valid"):
        bce_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), torch.ones(3, dtype=torch.bool))


# ------------------------------------------------------------------------ structure loss


def test_structure_loss_boundary_errors_cost_more():
    mask, good = _square_case()
    interior, boundary = good.clone(), good.clone()
    interior[..., 31:33, 31:33] = -8.0  # 4 wrong pixels deep inside the square
    boundary[..., 12:14, 31:33] = -8.0  # 4 wrong pixels on the square's edge
    li = structure_loss(interior, mask)
    lb = structure_loss(boundary, mask)
    base = structure_loss(good, mask)
    assert base < li < lb
    assert (lb - base) > 2.0 * (li - base)  # edge weight ~3.5x vs 1 inside
    # legacy: the BCE term is the same for both (weights void), only the IoU part differs
    bce_i = F.binary_cross_entropy_with_logits(interior, mask)
    bce_b = F.binary_cross_entropy_with_logits(boundary, mask)
    torch.testing.assert_close(bce_i, bce_b)
    assert structure_loss(boundary, mask, legacy_mean_bce=True) > structure_loss(interior, mask, legacy_mean_bce=True)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("smoothing,kernel", [(0.0, 31), (0.001, 31), (0.001, 5)])
def test_structure_loss_matches_numpy(legacy, smoothing, kernel):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 1, 20, 24)) * 3
    masks = np.zeros((3, 1, 20, 24))
    masks[0, 0, 4:12, 5:15] = 1
    masks[1, 0, 10:, :] = 1
    # frame 2 empty
    got = structure_loss(
        torch.from_numpy(logits),
        torch.from_numpy(masks),
        legacy_mean_bce=legacy,
        smoothing=smoothing,
        kernel=kernel,
    )
    expected = _np_structure(logits, masks, kernel, smoothing, legacy)
    assert math.isclose(got.item(), expected, rel_tol=1e-9, abs_tol=1e-12)


def test_structure_loss_legacy_is_mean_bce_plus_weighted_iou():
    torch.manual_seed(1)
    logits = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    masks = torch.zeros(2, 1, 16, 16, dtype=torch.float64)
    masks[:, :, 3:9, 4:12] = 1
    s = 0.001
    plain_bce = F.binary_cross_entropy_with_logits(logits, masks * (1 - s) + s / 2)
    w = 1 + 5 * (F.avg_pool2d(masks, 31, 1, 15) - masks).abs()
    p = torch.sigmoid(logits)
    inter = (p * masks * w).sum((2, 3))
    union = ((p + masks) * w).sum((2, 3))
    wiou = (1 - (inter + 1) / (union - inter + 1)).mean()
    got = structure_loss(logits, masks, legacy_mean_bce=True, smoothing=s)
    torch.testing.assert_close(got, plain_bce + wiou)
    assert not torch.isclose(got, structure_loss(logits, masks, smoothing=s))


def test_structure_loss_ignores_unlabelled_frames():
    """S4 training: only frame 0 of each clip is labelled; other frames' logits are irrelevant."""
    torch.manual_seed(0)
    t = 3
    logits = torch.randn(2 * t, 1, 16, 16)
    masks = torch.zeros(2 * t, 1, 16, 16)
    masks[0, :, 2:9, 2:9] = 1
    masks[t, :, 5:14, 1:7] = 1
    valid = torch.zeros(2 * t, dtype=torch.bool)
    valid[::t] = True
    a = structure_loss(logits, masks, valid)
    changed = logits.clone()
    changed[~valid] = torch.randn(int((~valid).sum()), 1, 16, 16) * 10
    b = structure_loss(changed, masks, valid)
    assert a.item() == b.item()
    only = structure_loss(logits[valid], masks[valid])
    torch.testing.assert_close(a, only)
    # nothing labelled: exact zero with a graph, not NaN
    x = logits.clone().requires_grad_(True)
    z = structure_loss(x, masks, torch.zeros(2 * t, dtype=torch.bool))
    assert z.item() == 0.0
    z.backward()
    assert x.grad.abs().sum() == 0


def test_structure_loss_bad_args():
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="kernel"):
        structure_loss(x, x, kernel=30)
    with pytest.raises(ValueError, match="smoothing"):
        structure_loss(x, x, smoothing=1.5)
    with pytest.raises(ValueError, match=r"\[N,1,H,W\]"):
        structure_loss(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8))


# -------------------------------------------------------------------------- A-V mapping


def test_av_mapping_hand_value():
    """V = 0 -> softmax(v) uniform over 2 channels; a = [ln 3, 0] -> p_a = [3/4, 1/4].

    KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120...
    """
    logits = torch.randn(1, 1, 4, 4)
    v = torch.zeros(1, 2, 2, 2)
    a = torch.tensor([[math.log(3.0), 0.0]])
    got = av_mapping_loss(logits, [v], [a])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert abs(expected - 0.1308120) < 1e-6
    assert math.isclose(got.item(), expected, rel_tol=1e-6)


def _np_avm_stage(logits, vmap, audio, normalize):
    n, _, hh, ww = logits.shape
    _, c, h, w = vmap.shape
    pooled = logits[:, 0].reshape(n, h, hh // h, w, ww // w).mean(axis=(2, 4))  # exact blocks
    m = _np_sigmoid(pooled)[:, None]
    v = (vmap * m).mean(axis=(2, 3))
    a = audio
    if normalize:
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    pa = np.exp(a) / np.exp(a).sum(1, keepdims=True)
    pv = np.exp(v) / np.exp(v).sum(1, keepdims=True)
    return (pa * (np.log(pa) - np.log(pv))).sum(1)  # [N]


@pytest.mark.parametrize("normalize", [False, True])
def test_av_mapping_golden_numpy(normalize):
    rng = np.random.default_rng(3)
    n, c = 4, 5
    logits = rng.normal(size=(n, 1, 8, 8))
    vmaps = [rng.normal(size=(n, c, 4, 4)), rng.normal(size=(n, c, 2, 2))]
    audio = [rng.random((n, c)) * 3, rng.random((n, c)) * 3]
    per_stage = [_np_avm_stage(logits, vm, au, normalize) for vm, au in zip(vmaps, audio)]
    t = lambda arr: torch.from_numpy(arr)  # noqa: E731
    got = av_mapping_loss(t(logits), [t(v) for v in vmaps], [t(a) for a in audio], normalize=normalize)
    expected = np.mean([s.mean() for s in per_stage])
    assert math.isclose(got.item(), float(expected), rel_tol=1e-9)
    got_sum = av_mapping_loss(
        t(logits), [t(v) for v in vmaps], [t(a) for a in audio], normalize=normalize, legacy_sum=True
    )
    assert math.isclose(got_sum.item(), n * got.item(), rel_tol=1e-9)
    # single stage selection
    got0 = av_mapping_loss(t(logits), [t(v) for v in vmaps], [t(a) for a in audio], stages=[1], normalize=normalize)
    assert math.isclose(got0.item(), float(per_stage[1].mean()), rel_tol=1e-9)


def test_av_mapping_valid_grads_and_none_stages():
    torch.manual_seed(0)
    n, c = 6, 4
    logits = torch.randn(n, 1, 8, 8, requires_grad=True)
    vmaps = [torch.randn(n, c, 4, 4, requires_grad=True), torch.randn(n, c, 2, 2)]
    audio = [torch.rand(n, c, requires_grad=True), None]
    loss = av_mapping_loss(logits, vmaps, audio)  # stage 1 (no audio) skipped
    loss.backward()
    assert logits.grad.abs().sum() > 0  # mask is not detached
    assert audio[0].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="stage 1 has no audio"):
        av_mapping_loss(logits, vmaps, audio, stages=[0, 1])
    valid = torch.tensor([True, False, True, False, False, True])
    base = av_mapping_loss(logits, vmaps, audio, valid=valid)
    vm2 = vmaps[0].detach().clone()
    vm2[~valid] = torch.randn(3, c, 4, 4) * 5
    other = av_mapping_loss(logits, [vm2, vmaps[1]], audio, valid=valid)
    assert base.item() == other.item()
    z = av_mapping_loss(logits, vmaps, audio, valid=torch.zeros(n, dtype=torch.bool))
    assert z.item() == 0.0 and z.requires_grad
    z0 = av_mapping_loss(logits, vmaps, [None, None])
    assert z0.item() == 0.0 and not torch.isnan(z0)


def test_seg_loss_classes_equal_the_functions_with_their_options():
    from avs.losses import BCESegLoss, StructureLoss, make_seg_loss

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 1, 16, 16, generator=g)
    masks = (torch.rand(4, 1, 16, 16, generator=g) > 0.5).float()
    valid = torch.tensor([True, False, True, True])
    assert torch.equal(BCESegLoss()(logits, masks, valid), bce_loss(logits, masks, valid))
    opts = {"smoothing": 0.001, "legacy_mean_bce": True, "kernel": 7}
    assert torch.equal(StructureLoss(**opts)(logits, masks, valid), structure_loss(logits, masks, valid, **opts))
    assert not torch.equal(StructureLoss()(logits, masks, valid), StructureLoss(**opts)(logits, masks, valid))
    assert type(make_seg_loss("structure", {"smoothing": 0.1})) is StructureLoss
    with pytest.raises(ValueError, match="model.seg_loss"):
        make_seg_loss("dice")
    with pytest.raises(ValueError, match="kernel"):
        StructureLoss(kernel=4)


@pytest.mark.parametrize("kernel", [1, 3, 5, 31])
@pytest.mark.parametrize("hw", [(64, 64), (37, 50), (9, 12)])
def test_box_mean_equals_avg_pool(kernel, hw):
    """The separable window mean is F.avg_pool2d(k, stride 1, padding k//2): bit-identical on binary
    masks (integer sums), equal to float rounding on soft maps; bf16 in, bf16 out."""
    g = torch.Generator().manual_seed(0)
    binary = (torch.rand(3, 1, *hw, generator=g) > 0.5).float()
    pool = F.avg_pool2d(binary, kernel, stride=1, padding=kernel // 2)
    assert torch.equal(box_mean(binary, kernel), pool)
    soft = torch.rand(3, 2, *hw, generator=g)
    torch.testing.assert_close(
        box_mean(soft, kernel), F.avg_pool2d(soft, kernel, stride=1, padding=kernel // 2), atol=2e-6, rtol=1e-6
    )
    half = box_mean(binary.bfloat16(), kernel)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, F.avg_pool2d(binary.bfloat16(), kernel, stride=1, padding=kernel // 2))
