"""Clip-consistent transforms."""

from __future__ import annotations

import pytest
import torch

from avs.data.transforms import ClipTransform, as_size, hflip_clip, normalize_frames, resize_frames, resize_masks


def test_resize_shapes_and_values():
    frames = torch.rand(3, 3, 16, 20)
    out = resize_frames(frames, (8, 10))
    assert out.shape == (3, 3, 8, 10)
    assert out.min() >= 0 and out.max() <= 1
    assert resize_frames(frames, (16, 20)) is frames  # no-op when the size matches
    const = torch.full((2, 3, 10, 10), 0.25)
    assert torch.allclose(resize_frames(const, (7, 13)), torch.full((2, 3, 7, 13), 0.25))
    masks = (torch.rand(3, 1, 16, 20) > 0.5).float()
    m = resize_masks(masks, (32, 40))
    assert m.shape == (3, 1, 32, 40) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(m[..., ::2, ::2], masks)  # 2x nearest upscale repeats pixels


def test_hflip_whole_clip():
    frames = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    masks = torch.zeros(2, 1, 2, 4)
    masks[:, :, :, 0] = 1
    f, m, flipped = hflip_clip(frames, masks, 1.0)
    assert flipped and torch.equal(f, frames.flip(-1)) and torch.equal(m[:, :, :, 3], torch.ones(2, 1, 2))
    f, m, flipped = hflip_clip(frames, masks, 0.0)
    assert not flipped and f is frames
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert [hflip_clip(frames, masks, 0.5, g1)[2] for _ in range(20)] == [
        hflip_clip(frames, masks, 0.5, g2)[2] for _ in range(20)
    ]
    with pytest.raises(ValueError):
        hflip_clip(frames, masks, 1.5)


def test_normalise_and_clip_transform():
    frames = torch.ones(1, 3, 4, 4) * torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    assert torch.allclose(normalize_frames(frames), torch.zeros(1, 3, 4, 4), atol=1e-6)
    tf = ClipTransform(2, flip_prob=0.0)
    f, m = tf(torch.rand(2, 3, 4, 4), torch.ones(2, 1, 4, 4))
    assert f.shape == (2, 3, 2, 2) and m.shape == (2, 1, 2, 2)
    assert as_size([3, 5]) == (3, 5) and as_size(None) is None
    with pytest.raises(ValueError, match="image_size"):
        as_size([1, 2, 3])
