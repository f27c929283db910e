"""The AVSS A-V mapping loss's mask (model.avm_loss.avss_mask, docs/avss.md): soft (the predicted foreground
probability), hard (1[argmax != 0]) and hard_release (1[argmax != C-1], the released loss's background index),
checked against hand computations on a tiny tensor; the hard forms pass no gradient into the logits."""

from __future__ import annotations

import math

import pytest
import torch

from avs.models.build import build_model
from tests.conftest import compose_cfg

# 3 frames, 3 classes, 2x2 pixels. Predicted classes (argmax):
#   frame 0: [[0, 1], [2, 0]] -> 2 of 4 pixels not class 0, 3 of 4 not class 2
#   frame 1: [[1, 1], [1, 2]] -> 4 not class 0, 3 not class 2
#   frame 2: [[0, 0], [0, 0]] -> 0 not class 0, 4 not class 2 (left out: valid False)
CLASSES = torch.tensor([[[0, 1], [2, 0]], [[1, 1], [1, 2]], [[0, 0], [0, 0]]])
VALID = torch.tensor([True, True, False])
VMAP = torch.tensor([[[[1.0]], [[-2.0]]], [[[0.5]], [[3.0]]], [[[2.0]], [[1.0]]]])  # [3,2,1,1]
AUDIO = torch.tensor([[0.3, -0.1], [1.0, 0.2], [0.0, 0.5]])  # [3,2]


def _logits() -> torch.Tensor:
    """Class logits [3,3,2,2] whose argmax is CLASSES (margin 2 over the other classes, varied values)."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(3, 3, 2, 2, generator=g)
    return base + 2.0 * torch.nn.functional.one_hot(CLASSES, 3).permute(0, 3, 1, 2).float()


def _model(tmp_path, mask: str):
    cfg = compose_cfg(
        "train",
        [
            "data=synth_avss",
            f"paths.data_dir={tmp_path}",
            "data.image_size=64",
            "backbone=pvt_v2_b0",
            "audio=tiny",
            "model=tpavi",
            "data.num_classes=3",
            f"model.avm_loss.avss_mask={mask}",
        ],
    )
    model = build_model(cfg)
    model.avm_loss = {**model.avm_loss, "stages": [0]}  # one stage: the tiny tensors below
    return model


def _hand(fraction: list[float]) -> float:
    """The loss with m = the pooled 0/1 mask (no sigmoid): mean over the valid frames of KL(softmax(a)||softmax(v))."""
    total = 0.0
    for n in (0, 1):  # the valid frames
        v = [float(VMAP[n, c, 0, 0]) * fraction[n] for c in range(2)]
        a = [float(AUDIO[n, c]) for c in range(2)]
        pa = [math.exp(x) / sum(math.exp(y) for y in a) for x in a]
        pv = [math.exp(x) / sum(math.exp(y) for y in v) for x in v]
        total += sum(pa[c] * math.log(pa[c] / pv[c]) for c in range(2))
    return total / 2


@pytest.mark.parametrize(("mask", "fraction"), [("hard", [0.5, 1.0, 0.0]), ("hard_release", [0.75, 0.75, 1.0])])
def test_hard_mask_equals_the_hand_computation_and_passes_no_gradient(tmp_path, mask, fraction):
    model = _model(tmp_path, mask)
    logits = _logits().requires_grad_(True)
    vmap = VMAP.clone().requires_grad_(True)
    out = {"logits": logits, "fused": [vmap], "audio_feats": [AUDIO]}
    loss = model._avm(out, VALID)
    assert loss.item() == pytest.approx(_hand(fraction), rel=1e-6)
    g_logits, g_vmap = torch.autograd.grad(loss, [logits, vmap], allow_unused=True)
    assert g_logits is None  # the mask is hard: nothing reaches the logits
    assert g_vmap is not None and g_vmap[:2].abs().sum() > 0 and g_vmap[2].abs().sum() == 0  # frame 2 left out
    # the mask is the predicted class's, however confident: scaling the logits changes nothing
    same = model._avm({**out, "logits": 10.0 * logits.detach()}, VALID)
    assert same.item() == pytest.approx(loss.item(), rel=1e-6)


def test_soft_mask_is_the_foreground_probability_with_a_gradient(tmp_path):
    model = _model(tmp_path, "soft")
    logits = _logits().requires_grad_(True)
    loss = model._avm({"logits": logits, "fused": [VMAP], "audio_feats": [AUDIO]}, VALID)
    fg = torch.logsumexp(logits.detach()[:, 1:], 1) - logits.detach()[:, 0]  # foreground logit [3,2,2]
    m = torch.sigmoid(fg.mean(dim=(1, 2)))  # pooled to 1x1, then the sigmoid
    want = 0.0
    for n in (0, 1):
        pa = torch.softmax(AUDIO[n], 0)
        want += float((pa * (pa.log() - torch.log_softmax(VMAP[n, :, 0, 0] * m[n], 0))).sum())
    assert loss.item() == pytest.approx(want / 2, rel=1e-6)
    (g_logits,) = torch.autograd.grad(loss, [logits])
    assert g_logits.abs().sum() > 0


def test_avss_mask_values_are_checked(tmp_path):
    with pytest.raises(ValueError, match="model.avm_loss.avss_mask must be one of"):
        _model(tmp_path, "sharp")
    s4 = ["data=s4", "backbone=pvt_v2_b0", "audio=tiny", "model=tpavi", f"paths.data_dir={tmp_path}"]
    with pytest.raises(ValueError, match="avss_mask=hard applies to AVSS"):
        build_model(compose_cfg("train", [*s4, "model.avm_loss.avss_mask=hard"]))
    assert build_model(compose_cfg("train", s4)).avm_loss["avss_mask"] == "soft"


def test_config_check_names_the_key(tmp_path):
    from avs.config_checks import ConfigError, check_config

    avss = ["data=synth_avss", f"paths.data_dir={tmp_path}", "model=tpavi"]
    with pytest.raises(ConfigError, match="avss_mask must be one of soft, hard, hard_release"):
        check_config(compose_cfg("train", [*avss, "model.avm_loss.avss_mask=sharp"]))
    with pytest.raises(ConfigError, match="avss_mask=hard_release pools the predicted AVSS classes"):
        check_config(compose_cfg("train", ["data=s4", "model=tpavi", "model.avm_loss.avss_mask=hard_release"]))
    for mask in ("soft", "hard", "hard_release"):
        check_config(compose_cfg("train", [*avss, f"model.avm_loss.avss_mask={mask}"]))
