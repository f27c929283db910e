import torch

from avs.evaluation.visuals import IMAGENET_MEAN, IMAGENET_STD, denormalize, overlay_grid


def test_overlay_grid_layout_and_colours():
    B, T, H, W = 3, 2, 8, 6
    rgb = torch.full((B, T, 3, H, W), 0.5)
    frames = (rgb - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(denormalize(frames), rgb, atol=1e-6)
    masks = torch.zeros(B, T, 1, H, W)
    masks[..., :4, :] = 1
    logits = torch.full((B, T, 1, H, W), -5.0)
    logits[..., :, :3] = 5.0
    img = overlay_grid(frames, masks, logits, max_clips=2)
    assert img.shape == (3, 2 * T * H, 3 * W)
    assert torch.allclose(img[:, :H, :W], torch.full((3, H, W), 0.5), atol=1e-6)  # plain frame
    gt_panel = img[:, :H, W : 2 * W]
    assert gt_panel[1, 0, 0] > gt_panel[0, 0, 0] and torch.allclose(gt_panel[:, -1, 0], torch.full((3,), 0.5))
    pred_panel = img[:, :H, 2 * W :]
    assert pred_panel[0, 0, 0] > pred_panel[1, 0, 0] and torch.allclose(pred_panel[:, 0, -1], torch.full((3,), 0.5))
