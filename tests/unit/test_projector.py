"""Tests for avs.models.projector: VisualToAudioProjector and consistency_loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from avs.models.projector import VisualToAudioProjector, consistency_loss


def _manual(proj: VisualToAudioProjector, feat: torch.Tensor, mask7: torch.Tensor) -> torch.Tensor:
    """Spec section 8 written out with the module's own weights: [N,C,h,w], [N,1,h,w] -> [N,C]."""
    x = feat * mask7
    for conv in proj.mask_encoder:
        x = F.conv2d(x, conv.weight, padding=conv.padding)
    return (x.flatten(2) @ proj.spatial_pool.weight.t()).squeeze(-1) + proj.spatial_pool.bias


def test_parameter_count_and_layers() -> None:
    proj = VisualToAudioProjector()
    assert sum(p.numel() for p in proj.mask_encoder.parameters()) == 53_248
    assert sum(p.numel() for p in proj.spatial_pool.parameters()) == 50
    assert sum(p.numel() for p in proj.parameters()) == 53_298
    assert all(conv.bias is None for conv in proj.mask_encoder)
    assert [c.kernel_size for c in proj.mask_encoder] == [(1, 1), (3, 3), (1, 1)]


def test_output_shape_and_gradients_reach_mask_encoder() -> None:
    torch.manual_seed(0)
    proj = VisualToAudioProjector(channels=16, audio_dim=16, feature_size=(4, 4), hidden=8)
    feat = torch.randn(6, 16, 4, 4, requires_grad=True)
    mask = torch.randn(6, 1, 64, 64, requires_grad=True)
    out = proj(feat, mask, mask_is_logits=True)
    assert out.shape == (6, 16)
    consistency_loss(torch.rand(6, 16), out).backward()
    for p in proj.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert feat.grad.abs().sum() > 0 and mask.grad.abs().sum() > 0  # logits path is not detached


def test_sigmoid_after_pooling_and_gt_mask_as_is() -> None:
    torch.manual_seed(1)
    proj = VisualToAudioProjector(channels=8, audio_dim=8, feature_size=(2, 2), hidden=4)
    feat = torch.randn(2, 8, 2, 2, dtype=torch.float64)
    proj = proj.double()
    # each 2x2 block of the 4x4 mask holds +10 and -2: pool->sigmoid = sigmoid(4), sigmoid->pool = 0.56
    mask = torch.tensor([[10.0, -2.0], [-2.0, 10.0]], dtype=torch.float64).repeat(2, 2).expand(2, 1, 4, 4)
    expected = _manual(proj, feat, torch.sigmoid(torch.tensor(4.0, dtype=torch.float64)).expand(2, 1, 2, 2))
    torch.testing.assert_close(proj(feat, mask, mask_is_logits=True), expected, rtol=0, atol=1e-12)
    gt = (torch.rand(2, 1, 4, 4) > 0.5).double()
    torch.testing.assert_close(
        proj(feat, gt, mask_is_logits=False), _manual(proj, feat, F.avg_pool2d(gt, 2)), rtol=0, atol=1e-12
    )


def test_large_negative_logits_sigmoid_vs_legacy() -> None:
    torch.manual_seed(2)
    proj = VisualToAudioProjector(channels=8, audio_dim=8, feature_size=(4, 4), hidden=4).double()
    legacy = VisualToAudioProjector(channels=8, audio_dim=8, feature_size=(4, 4), hidden=4, legacy_raw_logits=True)
    legacy = legacy.double()
    legacy.load_state_dict(proj.state_dict())
    feat = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    logits = torch.full((3, 1, 16, 16), -50.0, dtype=torch.float64)
    bias = proj.spatial_pool.bias.expand(3, 8)
    # sigmoid path: the pooled mask is ~0, so only the Linear bias remains
    torch.testing.assert_close(proj(feat, logits, mask_is_logits=True), bias, rtol=0, atol=1e-15)
    # legacy: the pooled mask is -50 and the linear encoder scales with it
    ones = torch.ones(3, 1, 16, 16, dtype=torch.float64)
    unit = proj(feat, ones, mask_is_logits=False) - bias
    legacy_out = legacy(feat, logits, mask_is_logits=True)
    torch.testing.assert_close(legacy_out - bias, -50.0 * unit, rtol=1e-10, atol=1e-10)
    assert (legacy_out - bias).abs().max() > 1.0
    # legacy only concerns logits: a GT mask is used as is in both
    torch.testing.assert_close(legacy(feat, ones, mask_is_logits=False), proj(feat, ones, mask_is_logits=False))


def test_audio_dim_mismatch_and_bad_inputs() -> None:
    with pytest.raises(ValueError, match="projector.audio_dim"):
        VisualToAudioProjector(channels=64, audio_dim=128)
    proj = VisualToAudioProjector(channels=16, audio_dim=32, feature_size=(3, 3), hidden=8, output_projection=True)
    assert proj(torch.randn(2, 16, 3, 3), torch.rand(2, 1, 9, 9), mask_is_logits=False).shape == (2, 32)
    with pytest.raises(ValueError, match="projector.feature_size"):
        proj(torch.randn(2, 16, 4, 4), torch.rand(2, 1, 9, 9), mask_is_logits=False)
    with pytest.raises(ValueError, match="mask"):
        proj(torch.randn(2, 16, 3, 3), torch.rand(2, 9, 9), mask_is_logits=False)


def test_consistency_loss_floor_and_values() -> None:
    torch.manual_seed(3)
    audio = torch.rand(5, 64, dtype=torch.float64) + 0.01
    # audio_hat = the (normalised, rescaled) audio itself: only the 1e-6 pairwise_distance eps remains
    loss = consistency_loss(audio, 3.0 * F.normalize(audio, dim=-1))
    assert loss < 1e-5
    assert loss.item() == pytest.approx(1e-6 * 64**0.5, rel=1e-6)
    # opposite direction: distance 2 (the loss lies in [0, 2])
    assert consistency_loss(audio, -audio).item() == pytest.approx(2.0, abs=1e-5)
    audio_hat = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    manual = (F.normalize(audio, dim=-1) - F.normalize(audio_hat, dim=-1) + 1e-6).norm(dim=-1)
    torch.testing.assert_close(consistency_loss(audio, audio_hat), manual.mean())
    valid = torch.tensor([True, False, True, False, False])
    torch.testing.assert_close(consistency_loss(audio, audio_hat, valid), manual[valid].mean())
    none_valid = consistency_loss(audio, audio_hat, torch.zeros(5, dtype=torch.bool))
    assert none_valid.item() == 0.0 and none_valid.requires_grad


def test_consistency_loss_detaches_audio_and_checks_shapes() -> None:
    audio = torch.rand(4, 8, requires_grad=True)
    audio_hat = torch.randn(4, 8, requires_grad=True)
    consistency_loss(audio, audio_hat).backward()
    assert audio.grad is None and audio_hat.grad is not None
    with pytest.raises(ValueError, match="same shape"):
        consistency_loss(torch.rand(4, 8), torch.rand(4, 7))
    with pytest.raises(ValueError, match="valid"):
        consistency_loss(torch.rand(4, 8), torch.rand(4, 8), torch.ones(4))
