"""VGGish: upstream key layout, strict load, forward maths, PCA post-processing, frozen by default."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avs.models.vggish import VGGish

# The public vggish-10086976.pth layout, written out by hand (not derived from the module).
UPSTREAM_SHAPES = OrderedDict(
    [
        ("features.0.weight", (64, 1, 3, 3)), ("features.0.bias", (64,)),
        ("features.3.weight", (128, 64, 3, 3)), ("features.3.bias", (128,)),
        ("features.6.weight", (256, 128, 3, 3)), ("features.6.bias", (256,)),
        ("features.8.weight", (256, 256, 3, 3)), ("features.8.bias", (256,)),
        ("features.11.weight", (512, 256, 3, 3)), ("features.11.bias", (512,)),
        ("features.13.weight", (512, 512, 3, 3)), ("features.13.bias", (512,)),
        ("embeddings.0.weight", (4096, 12288)), ("embeddings.0.bias", (4096,)),
        ("embeddings.2.weight", (4096, 4096)), ("embeddings.2.bias", (4096,)),
        ("embeddings.4.weight", (128, 4096)), ("embeddings.4.bias", (128,)),
    ]
)  # fmt: skip


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """Random state dict in the upstream layout, saved with torch.save -> (path, state)."""
    g = torch.Generator().manual_seed(0)
    state = OrderedDict()
    for k, shape in UPSTREAM_SHAPES.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        state[k] = torch.randn(shape, generator=g) * (1.0 / fan_in) ** 0.5 + (0.02 if k.endswith("bias") else 0.0)
    path = tmp_path_factory.mktemp("w") / "vggish-10086976.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def model(upstream):
    return VGGish(upstream[0])


def _reference_forward(state, x):
    """Functional VGGish with the file's tensors: conv/ReLU/pool, NHWC flatten, 3 x (Linear+ReLU)."""
    h = x
    for idx, pool_after in ((0, True), (3, True), (6, False), (8, True), (11, False), (13, True)):
        h = F.relu(F.conv2d(h, state[f"features.{idx}.weight"], state[f"features.{idx}.bias"], padding=1))
        if pool_after:
            h = F.max_pool2d(h, 2)
    h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)  # TF ordering
    for idx in (0, 2, 4):
        h = F.relu(F.linear(h, state[f"embeddings.{idx}.weight"], state[f"embeddings.{idx}.bias"]))
    return h


def test_parameter_names_and_count(model):
    names = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert names == dict(UPSTREAM_SHAPES)
    assert sum(p.numel() for p in model.parameters()) == 72_141_184


def test_strict_load_and_forward(model, upstream):
    _, state = upstream
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v)
    x = torch.randn(3, 1, 96, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
        ref = _reference_forward(state, x)
    assert out.shape == (3, 128)
    assert (out >= 0).all() and out.abs().sum() > 0
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_frozen_and_stays_eval(model):
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training and model.trainable is False


def test_trainable_mode():
    m = VGGish(None, pretrained=False, trainable=True)
    assert all(p.requires_grad for p in m.parameters())
    m.train()
    assert m.training
    m.eval()
    assert not m.training


def test_missing_or_bad_keys_rejected(upstream, tmp_path):
    _, state = upstream
    bad = OrderedDict(state)
    bad.pop("features.13.bias")
    bad["features.14.weight"] = torch.zeros(1)
    p = tmp_path / "bad.pth"
    torch.save(bad, p)
    with pytest.raises(ValueError) as err:
        VGGish(p)
    msg = str(err.value)
    assert "features.13.bias" in msg and "features.14.weight" in msg and str(p) in msg
    wrong = OrderedDict(state)
    wrong["embeddings.4.weight"] = torch.zeros(64, 4096)
    torch.save(wrong, p)
    with pytest.raises(ValueError, match="embeddings.4.weight"):
        VGGish(p)


def test_missing_file_message(tmp_path):
    p = tmp_path / "weights" / "vggish-10086976.pth"
    with pytest.raises(FileNotFoundError) as err:
        VGGish(p)
    msg = str(err.value)
    assert "vggish-10086976.pth" in msg and str(p.parent) in msg and "pretrained=false" in msg
    with pytest.raises(FileNotFoundError, match="pretrained=false"):
        VGGish(None)


@pytest.mark.parametrize("as_numpy", [False, True])
def test_pca_postprocess_matches_numpy(model, upstream, tmp_path, as_numpy):
    path, _ = upstream
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.standard_normal((128, 128)))
    eig = (q * 0.5).astype(np.float32)  # scaled so that some values clip and some do not
    means = rng.uniform(0, 0.5, size=128).astype(np.float32)
    pca_p = tmp_path / "vggish_pca_params-970ea276.pth"
    if as_numpy:  # the published file may hold NumPy arrays
        torch.save({"pca_eigen_vectors": eig, "pca_means": means}, pca_p)
    else:
        torch.save({"pca_eigen_vectors": torch.from_numpy(eig), "pca_means": torch.from_numpy(means)}, pca_p)
    plain = model
    post = VGGish(path, pca_path=pca_p, postprocess=True)
    x = torch.randn(4, 1, 96, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        emb = plain(x).numpy().astype(np.float64)
        got = post(x).numpy()
    pca = (eig.astype(np.float64) @ (emb.T - means.astype(np.float64)[:, None])).T
    ref = np.round((np.clip(pca, -2.0, 2.0) + 2.0) * 255.0 / 4.0)
    assert got.shape == (4, 128)
    assert np.abs(got - ref).max() <= 1.0  # float32 vs float64 may flip a .5 rounding
    assert np.mean(got == ref) > 0.99
    assert got.min() >= 0 and got.max() <= 255 and (got == 0).any() | (got == 255).any()


def test_bad_input_shape(model):
    with pytest.raises(ValueError, match=r"\[N,1,96,64\]"):
        model(torch.zeros(2, 96, 64))
