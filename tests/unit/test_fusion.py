"""Tests for avs.models.fusion: TPAVI (factorised == dense == literal reference), AVCorr, stage wrapper."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from avs.models.fusion import EinsumFusion, MultiStageFusion, TPAVIFusion

FLAVOURS = {
    # name: (channels, audio_dim, kwargs)
    "avsbench": (12, 8, dict(align_audio=True, normalize=False)),
    "ecmvae": (12, 12, dict(align_audio=False, normalize=True)),
}


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _pair(flavour: str, mode: str, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """A factorised and a dense TPAVI with identical, non-trivial weights (BN not zero)."""
    c, a, kw = FLAVOURS[flavour]
    torch.manual_seed(seed)
    fac = TPAVIFusion(c, a, mode=mode, impl="factorised", **kw)
    # zero-initialised BN would hide the attention branch from outputs and gradients
    torch.nn.init.normal_(fac.W_z[1].weight)
    torch.nn.init.normal_(fac.W_z[1].bias)
    dense = TPAVIFusion(c, a, mode=mode, impl="dense", **kw)
    dense.load_state_dict(fac.state_dict())
    return fac.to(device, dtype), dense.to(device, dtype), c, a


def _run_and_grad(module, x, audio):
    x = x.clone().requires_grad_(True)
    audio = audio.clone().requires_grad_(True)
    z, a_fea = module(x, audio)
    # a random projection so every output element matters for the gradient
    w = torch.linspace(-1.0, 1.0, z.numel(), dtype=z.dtype, device=z.device).reshape(z.shape)
    loss = (z * w).sum() + (0.0 if a_fea is None else (a_fea**2).sum())
    loss.backward()
    gx = x.grad
    ga = audio.grad if audio.grad is not None else torch.zeros_like(audio)
    return z.detach(), gx, ga


def _compare(flavour, mode, t, hw, dtype, tol, device="cpu"):
    fac, dense, c, a = _pair(flavour, mode, dtype, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, c, t, *hw, generator=gen).to(device, dtype)
    audio = torch.randn(2, t, a, generator=gen).abs().to(device, dtype)  # VGGish is post-ReLU
    z1, gx1, ga1 = _run_and_grad(fac, x, audio)
    z2, gx2, ga2 = _run_and_grad(dense, x, audio)
    assert z1.shape == (2, c, t, *hw)
    torch.testing.assert_close(z1, z2, atol=tol, rtol=tol)
    torch.testing.assert_close(gx1, gx2, atol=tol, rtol=tol)
    torch.testing.assert_close(ga1, ga2, atol=tol, rtol=tol)
    assert gx1.abs().sum() > 0
    if mode != "vv":
        assert ga1.abs().sum() > 0
    # parameter gradients agree too
    for (name, p1), (_, p2) in zip(fac.named_parameters(), dense.named_parameters()):
        if p1.grad is None:
            assert p2.grad is None, name
            continue
        torch.testing.assert_close(p1.grad, p2.grad, atol=tol * 10, rtol=tol * 10, msg=name)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("mode", ["va", "vv", "both"])
@pytest.mark.parametrize("t", [1, 3, 5])
@pytest.mark.parametrize("hw", [(4, 4), (3, 5)])
def test_factorised_equals_dense_float64(flavour, mode, t, hw):
    _compare(flavour, mode, t, hw, torch.float64, 1e-5)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("mode", ["va", "vv", "both"])
def test_factorised_equals_dense_float32(flavour, mode):
    _compare(flavour, mode, 3, (6, 5), torch.float32, 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("mode", ["va", "vv", "both"])
@pytest.mark.parametrize("t", [1, 3, 5])
def test_factorised_equals_dense_cuda(flavour, mode, t):
    _compare(flavour, mode, t, (4, 5), torch.float64, 1e-5, device="cuda")
    _compare(flavour, mode, t, (4, 5), torch.float32, 1e-4, device="cuda")


def _literal_reference(m: TPAVIFusion, x: torch.Tensor, audio: torch.Tensor | None) -> torch.Tensor:
    """Straight transcription of the spec's TPAVI forward (broadcast audio, THW x THW matrix)."""
    b, c, t, h, w = x.shape
    if m.normalize:
        x = x / torch.sqrt((x**2).sum(1, keepdim=True) + 1e-6)
    if audio is None:
        key_src = x
    else:
        if m.normalize:
            audio = audio / torch.sqrt((audio**2).sum(-1, keepdim=True) + 1e-6)
        if m.align_channel is not None:
            audio = m.align_channel(audio)
        key_src = audio.permute(0, 2, 1)[..., None, None].repeat(1, 1, 1, h, w)  # [B,C,T,H,W]
    g_x = m.g(x).reshape(b, m.inter_channels, -1).permute(0, 2, 1)  # [B,N,C']
    theta_x = m.theta(x).reshape(b, m.inter_channels, -1).permute(0, 2, 1)  # [B,N,C']
    phi_x = m.phi(key_src).reshape(b, m.inter_channels, -1)  # [B,C',N]
    f = torch.matmul(theta_x, phi_x)
    f_div_c = f / f.shape[-1]
    y = torch.matmul(f_div_c, g_x).permute(0, 2, 1).reshape(b, m.inter_channels, t, h, w)
    z = m.W_z(y) + x
    return m.norm_layer(z.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("mode", ["va", "vv", "both"])
def test_matches_literal_reference(flavour, mode):
    fac, _, c, a = _pair(flavour, mode, torch.float64)
    x = torch.randn(2, c, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    audio = torch.rand(2, 3, a, dtype=torch.float64, requires_grad=True)
    z, a_fea = fac(x, audio)
    if mode == "va":
        ref = _literal_reference(fac, x, audio)
    elif mode == "vv":
        ref = _literal_reference(fac, x, None)
    else:
        ref = 0.5 * (_literal_reference(fac, x, audio) + _literal_reference(fac, x, None))
    torch.testing.assert_close(z, ref, atol=1e-10, rtol=1e-10)
    assert (a_fea is None) == (mode == "vv")
    # input gradients agree with the literal transcription as well
    w = torch.randn_like(z)
    got = torch.autograd.grad((z * w).sum(), (x, audio), allow_unused=True)
    exp = torch.autograd.grad((ref * w).sum(), (x, audio), allow_unused=True)
    for g1, g2 in zip(got, exp):
        if g2 is None:
            assert g1 is None
        else:
            torch.testing.assert_close(g1, g2, atol=1e-10, rtol=1e-10)


def test_dense_chunking_matches_unchunked():
    fac, dense, c, a = _pair("avsbench", "both", torch.float64)
    chunked = TPAVIFusion(c, a, mode="both", impl="dense", chunk_size=7).double()
    chunked.load_state_dict(dense.state_dict())
    x = torch.randn(1, c, 2, 5, 4, dtype=torch.float64)  # N = 40, 7 does not divide it
    audio = torch.rand(1, 2, a, dtype=torch.float64)
    torch.testing.assert_close(chunked(x, audio)[0], dense(x, audio)[0], atol=1e-12, rtol=1e-12)


def test_param_counts():
    assert _n_params(TPAVIFusion(256)) == 165_760
    assert _n_params(TPAVIFusion(128, 128, align_audio=False, normalize=True)) == 33_600
    assert _n_params(EinsumFusion(128)) == 54_304
    # ECMVAE's av_corr alternative (3x3, C attention channels)
    assert _n_params(EinsumFusion(128, kernel_size=3, attention_channels=128)) == 17_408


def test_init_state_is_layernorm_of_input():
    """BN gamma = beta = 0 at init: AVSBench block starts as LN(X), ECMVAE as LN(L2n(X))."""
    torch.manual_seed(0)
    m = TPAVIFusion(16, 8).eval()
    x = torch.randn(2, 16, 3, 4, 4)
    z, a_fea = m(x, torch.rand(2, 3, 8))
    ln = F.layer_norm(x.permute(0, 2, 3, 4, 1), (16,)).permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(z, ln, atol=1e-5, rtol=1e-5)
    assert a_fea.shape == (2, 3, 16)

    e = TPAVIFusion(16, 16, align_audio=False, normalize=True).eval()
    audio = torch.rand(2, 3, 16) * 5
    z, a_fea = e(x, audio)
    xn = x / torch.sqrt((x**2).sum(1, keepdim=True) + 1e-6)
    ln = F.layer_norm(xn.permute(0, 2, 3, 4, 1), (16,)).permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(z, ln, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a_fea.norm(dim=-1), torch.ones(2, 3), atol=1e-5, rtol=1e-5)


def test_vv_ignores_audio_and_none_audio_is_vv():
    fac, _, c, a = _pair("avsbench", "vv", torch.float64)
    x = torch.randn(1, c, 2, 3, 3, dtype=torch.float64)
    z1, a1 = fac(x, torch.rand(1, 2, a, dtype=torch.float64))
    z2, a2 = fac(x, None)
    assert a1 is None and a2 is None
    torch.testing.assert_close(z1, z2)
    va, _, _, _ = _pair("avsbench", "va", torch.float64)
    z3, a3 = va(x, None)  # reference: calling without audio is the vv computation
    assert a3 is None
    torch.testing.assert_close(z3, z2)
    z4, _ = va(x, torch.rand(1, 2, a, dtype=torch.float64))
    assert not torch.allclose(z4, z2)


def test_tpavi_bad_inputs():
    with pytest.raises(ValueError, match="audio_dim"):
        TPAVIFusion(64, 128, align_audio=False, normalize=True)
    with pytest.raises(ValueError, match="impl"):
        TPAVIFusion(16, impl="sparse")
    with pytest.raises(ValueError, match="mode"):
        TPAVIFusion(16, mode="av")
    m = TPAVIFusion(16, 8)
    with pytest.raises(ValueError, match=r"\[B,16,T,H,W\]"):
        m(torch.randn(2, 8, 3, 4, 4), torch.rand(2, 3, 8))
    with pytest.raises(ValueError, match="audio"):
        m(torch.randn(2, 16, 3, 4, 4), torch.rand(2, 4, 8))


# ----------------------------------------------------------------------------------- AVCorr


def test_einsum_fusion_matches_hand_computation():
    torch.manual_seed(0)
    m = EinsumFusion(16, 16)
    b, t, h, w = 2, 3, 5, 4
    x = torch.randn(b, 16, t, h, w)
    audio = torch.rand(b, t, 16)
    out, a_fea = m(x, audio)
    for bi in range(b):
        for ti in range(t):
            v = x[bi, :, ti]  # [C,H,W]
            v = v / torch.sqrt((v**2).sum(0, keepdim=True) + 1e-6)
            a = audio[bi, ti] / torch.sqrt((audio[bi, ti] ** 2).sum() + 1e-6)
            corr = (v * a[:, None, None])[None]
            att = torch.sigmoid(
                F.conv2d(F.conv2d(F.conv2d(corr, m.conv1.weight), m.conv2.weight, padding=3), m.conv3.weight)
            )[0]
            torch.testing.assert_close(out[bi, :, ti], v * (1 + att), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a_fea[bi, ti], a, atol=1e-6, rtol=1e-6)
    norms = out.norm(dim=1)
    assert bool((norms > 0.99).all()) and bool((norms < 2.0).all())
    assert m.conv2.weight.shape == (4, 4, 7, 7)
    assert m.conv1.bias is None and m.conv2.bias is None and m.conv3.bias is None


def test_einsum_fusion_without_audio_and_errors():
    m = EinsumFusion(8, 8)
    x = torch.randn(1, 8, 2, 3, 3)
    out, a_fea = m(x, None)
    assert out is x and a_fea is None
    out, a_fea = EinsumFusion(8, 8, without_audio="normalize")(x, None)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(1, 2, 3, 3), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="audio_dim must equal channels"):
        EinsumFusion(16, 128)
    with pytest.raises(ValueError, match="kernel_size"):
        EinsumFusion(8, 8, kernel_size=4)


# ------------------------------------------------------------------------- MultiStageFusion


def _stage_maps(bt: int, c: int, sizes=(16, 8, 4, 2)):
    return [torch.randn(bt, c, s, s) for s in sizes]


def test_multistage_shapes_and_untouched_stages():
    torch.manual_seed(0)
    ms = MultiStageFusion(8, 6, stages=[1, 3], block=functools.partial(TPAVIFusion, mode="va"))
    assert len(ms.blocks) == 2
    feats = _stage_maps(6, 8)
    audio = torch.rand(6, 6)
    out, a_list = ms(feats, audio, num_frames=3)
    assert [o.shape for o in out] == [f.shape for f in feats]
    assert out[0] is feats[0] and out[2] is feats[2]
    assert a_list[0] is None and a_list[2] is None
    assert a_list[1].shape == (6, 8) and a_list[3].shape == (6, 8)
    assert not torch.allclose(out[1], feats[1])
    # input list not mutated
    assert len(feats) == 4 and out is not feats


def test_multistage_reshape_keeps_frame_order():
    """Per-frame AVCorr through the wrapper == AVCorr applied frame by frame."""
    torch.manual_seed(0)
    ms = MultiStageFusion(8, 8, stages=[0], block=EinsumFusion)
    feats = _stage_maps(6, 8)
    audio = torch.rand(6, 8)
    out, a_list = ms(feats, audio, num_frames=3)
    blk = ms.blocks[0]
    for i in range(6):
        zi, ai = blk(feats[0][i : i + 1, :, None], audio[i : i + 1, None])
        torch.testing.assert_close(out[0][i], zi[0, :, 0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(a_list[0][i], ai[0, 0], atol=1e-6, rtol=1e-6)


def test_multistage_tpavi_matches_manual_clip_reshape():
    torch.manual_seed(0)
    ms = MultiStageFusion(8, 6, stages=[2])
    torch.nn.init.normal_(ms.blocks[0].W_z[1].weight)
    ms.eval()
    feats = _stage_maps(4, 8)
    audio = torch.rand(4, 6)
    out, a_list = ms(feats, audio, num_frames=2)
    x5 = feats[2].reshape(2, 2, 8, 4, 4).permute(0, 2, 1, 3, 4)
    z, a = ms.blocks[0](x5, audio.reshape(2, 2, 6))
    torch.testing.assert_close(out[2], z.permute(0, 2, 1, 3, 4).reshape(4, 8, 4, 4))
    torch.testing.assert_close(a_list[2], a.reshape(4, 8))


def test_multistage_errors_and_hydra_partial():
    from hydra.utils import instantiate

    ms = MultiStageFusion(8, 6, stages=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="not divisible by num_frames=4"):
        ms(_stage_maps(6, 8), torch.rand(6, 6), num_frames=4)
    with pytest.raises(ValueError, match="fusion.stages"):
        MultiStageFusion(8, stages=[0, 4])
    with pytest.raises(ValueError, match="duplicates"):
        MultiStageFusion(8, stages=[1, 1])
    cfg = {
        "_target_": "avs.models.fusion.MultiStageFusion",
        "channels": 8,
        "audio_dim": 8,
        "stages": [0, 2],
        "block": {"_target_": "avs.models.fusion.EinsumFusion", "_partial_": True, "kernel_size": 3},
    }
    built = instantiate(cfg)
    assert all(isinstance(b, EinsumFusion) for b in built.blocks)
    assert built.blocks[0].conv2.kernel_size == (3, 3)
    out, a_list = built(_stage_maps(2, 8), None, num_frames=2)  # w/o audio: identity
    assert all(a is None for a in a_list)


def test_blocks_built_without_audio_have_no_audio_weights():
    """audio_dim=None (model.use_audio=false): no weight that only the audio path would train."""
    x = torch.randn(1, 8, 2, 4, 4)
    einsum = EinsumFusion(8, audio_dim=None)
    assert not list(einsum.parameters())
    out, a_fea = einsum(x, None)
    assert a_fea is None and torch.equal(out, x)
    with pytest.raises(ValueError):
        einsum(x, torch.randn(1, 2, 8))
    tpavi = TPAVIFusion(8, audio_dim=None, align_audio=True)
    assert tpavi.align_channel is None
    names = {n for n, _ in tpavi.named_parameters()}
    assert names == {
        n
        for n, _ in TPAVIFusion(8, audio_dim=16, align_audio=True).named_parameters()
        if not n.startswith("align_channel.")
    }
    z, a_fea = tpavi(x, None)  # the visual-visual path
    assert a_fea is None and z.shape == x.shape


@pytest.mark.parametrize("similarity", ["dot", "concatenate"])
def test_tpavi_half_model_at_352px_stays_finite_and_matches_fp32(similarity):
    """A `.half()` TPAVI block (no autocast) at stage 1 of a 352 px input (T x 88 x 88 positions): the
    audio-key frame sum is scaled before it is taken, so it stays far below the fp16 maximum."""
    torch.manual_seed(0)
    c = 8
    m = TPAVIFusion(c, audio_dim=c, mode="va", similarity=similarity).eval()
    with torch.no_grad():  # g ~ 10 at every position: an unscaled sum over 88 x 88 is 77,440 > 65,504
        m.g.weight.fill_(10.0 / c)
        m.g.bias.zero_()
        m.W_z[1].weight.fill_(1.0)  # let y reach the output (W_z's BatchNorm starts at zero)
    x = 1 + 0.1 * torch.randn(1, c, 5, 88, 88)
    audio = torch.randn(1, 5, c)
    with torch.no_grad():
        ref, _ = m(x, audio)
        got, _ = m.half()(x.half(), audio.half())
    assert got.dtype == torch.float16
    assert torch.isfinite(got).all()
    assert float((got.float() - ref).abs().max()) < 1e-2 * float(ref.abs().max())


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_factorised_audio_path_on_frames_view_matches_dense_with_running_stats(flavour):
    """The factorised audio path reads the stage wrapper's transposed frame view [B,C,T,H,W] (no copy):
    outputs, input gradients and W_z's BatchNorm running statistics equal the dense block's."""
    fac, dense, c, a = _pair(flavour, "va", torch.float64)
    gen = torch.Generator().manual_seed(3)
    frames = torch.randn(2 * 3, c, 4, 5, generator=gen, dtype=torch.float64)  # [B*T,C,H,W]
    audio = torch.randn(2, 3, a, generator=gen, dtype=torch.float64).abs()
    x = frames.view(2, 3, c, 4, 5).transpose(1, 2)  # [B,C,T,H,W] view, as MultiStageFusion passes it
    assert not x.is_contiguous()
    z1, gx1, ga1 = _run_and_grad(fac, x, audio)
    z2, gx2, ga2 = _run_and_grad(dense, x.contiguous(), audio)
    torch.testing.assert_close(z1, z2, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gx1, gx2, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ga1, ga2, atol=1e-10, rtol=1e-10)
    for b1, b2 in zip(fac.buffers(), dense.buffers()):
        torch.testing.assert_close(b1, b2, atol=1e-12, rtol=1e-12)
