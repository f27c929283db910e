"""Release-reproduction flags and options: the A-V loss on ReLU'd maps, the S4 cosine and closer A-V
losses, the TPAVI non-local modes, ECMVAE's sampled JS surrogate, legacy_lld / legacy_test_sample,
and the `model.preset=paper|release` switch. Hand-made cases with answers computed here."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from avs import losses as L
from avs.models.divergences import sampled_js_surrogate
from avs.models.fusion import TPAVIFusion
from avs.models.segmentor import AVSegmentor
from tests.conftest import compose_cfg, tiny_overrides


# ----------------------------------------------------------------------------- A-V loss on ReLU'd maps
def _avm(opts: dict, out: dict) -> torch.Tensor:
    ns = SimpleNamespace(avm_loss={"avss_mask": "soft", "variant": "kl"} | opts, num_classes=1)
    ns.binary_logits = lambda logits: AVSegmentor.binary_logits(ns, logits)
    return AVSegmentor._avm(ns, out)


def test_avm_relu_maps_flag_uses_relu_of_the_fused_maps():
    # every fused value negative: relu -> 0 -> v = 0 -> softmax(v) uniform over C
    c = 4
    fused = [-torch.rand(2, c, 2, 2) - 0.1]
    audio = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.5, 0.5, 0.5, 0.5]])
    out = {"logits": torch.randn(2, 1, 8, 8), "fused": fused, "audio_feats": [audio]}
    base = {"stages": [0], "normalize": False, "legacy_sum": False}
    relu = _avm(base | {"legacy_relu_maps": True}, out)
    pa = F.softmax(audio, dim=-1)
    expected = (pa * (pa.log() - math.log(1.0 / c))).sum(-1).mean()  # KL(p_a || uniform)
    assert relu.item() == pytest.approx(expected.item(), abs=1e-6)
    plain = _avm(base | {"legacy_relu_maps": False}, out)
    assert plain.item() != pytest.approx(expected.item(), abs=1e-4)
    assert plain.item() == pytest.approx(L.av_mapping_loss(out["logits"], fused, [audio], stages=[0]).item())


# ----------------------------------------------------------------------------- S4 cosine A-V loss
def test_s4_cosine_loss_hard_mask_and_minus_log_relu_cos():
    # left half of the image is foreground (logit +10), right half background
    logits = torch.full((2, 1, 8, 8), -10.0)
    logits[..., :4] = 10.0
    vmap = torch.zeros(2, 2, 4, 4)
    vmap[:, 0, :, :2] = 3.0  # foreground pixels carry [3, 0]
    vmap[:, 1, :, 2:] = 5.0  # background pixels carry [0, 5] (masked out)
    audio = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    loss = L.av_cosine_loss(logits, [vmap], [audio])
    # frame 0: v = [3,0], cos = 1/sqrt2; frame 1: cos = -1 -> relu 0 -> -log(1e-6)
    expected = 0.5 * (-math.log(1 / math.sqrt(2) + 1e-6) - math.log(1e-6))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    via_model = _avm({"variant": "s4_cos", "stages": [0]}, {"logits": logits, "fused": [vmap], "audio_feats": [audio]})
    assert via_model.item() == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- closer loss
def _closer_case():
    logits = torch.full((3, 1, 4, 4), 30.0)  # sigmoid = 1: v = the spatial mean of each map
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    vmap = v[:, :, None, None].expand(3, 2, 2, 2).clone()
    audio = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0]])  # nearest audio: 0<->1, 2->1
    return logits, vmap, audio, v


def test_closer_loss_pairs_each_frame_with_its_nearest_audio_euclidean():
    logits, vmap, audio, _ = _closer_case()
    loss = L.av_closer_loss(logits, [vmap], [audio], distance="euclidean")
    assert loss.item() == pytest.approx((2 * math.sqrt(2) + 1) / 3, rel=1e-6)


def test_closer_loss_kl_mean_and_legacy_sum():
    logits, vmap, audio, v = _closer_case()
    partner = torch.tensor([1, 0, 1])
    p_t, log_p_v = F.softmax(v[partner], -1), F.log_softmax(v, -1)
    per_frame = (p_t * (p_t.log() - log_p_v)).sum(-1)
    mean = L.av_closer_loss(logits, [vmap], [audio], distance="kl")
    total = L.av_closer_loss(logits, [vmap], [audio], distance="kl", legacy_sum=True)
    assert mean.item() == pytest.approx(per_frame.mean().item(), rel=1e-6)
    assert total.item() == pytest.approx(per_frame.sum().item(), rel=1e-6)
    via_model = _avm(
        {"variant": "closer_kl", "stages": [0], "normalize": False, "legacy_sum": True},
        {"logits": logits, "fused": [vmap], "audio_feats": [audio]},
    )
    assert via_model.item() == pytest.approx(per_frame.sum().item(), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 frames"):
        L.av_closer_loss(logits[:1], [vmap[:1]], [audio[:1]])


def test_unknown_avm_variant_is_refused():
    with pytest.raises(ValueError, match="avm_loss.variant"):
        from avs.models.build import build_model

        overrides = ["model=tpavi", "model.avm_loss.variant=cosine"]
        cfg = compose_cfg("train", tiny_overrides(Path("/tmp/unused")) + overrides)
        build_model(cfg)


# ----------------------------------------------------------------------------- TPAVI modes
def _reference_tpavi(m: TPAVIFusion, x: torch.Tensor, audio: torch.Tensor | None) -> torch.Tensor:
    """The released TPAVIModule forward, written out with the literal [THW, THW] matrix."""
    b, c, t, h, w = x.shape
    key_src = x
    if audio is not None:
        a = m.align_channel(audio) if m.align_channel is not None else audio  # [B,T,C]
        key_src = a.permute(0, 2, 1)[..., None, None].repeat(1, 1, 1, h, w)  # [B,C,T,H,W]
    g = m.g(x).view(b, m.inter_channels, -1).permute(0, 2, 1)  # [B,N,C']
    if m.similarity == "gaussian":
        f = x.view(b, c, -1).permute(0, 2, 1) @ key_src.reshape(b, c, -1)
    elif m.similarity == "embedded":
        f = m.theta(x).view(b, m.inter_channels, -1).permute(0, 2, 1) @ m.phi(key_src).view(b, m.inter_channels, -1)
    else:  # concatenate
        th = m.theta(x).view(b, m.inter_channels, -1, 1)
        ph = m.phi(key_src).view(b, m.inter_channels, 1, -1)
        n = th.shape[2]
        cat = torch.cat([th.repeat(1, 1, 1, n), ph.repeat(1, 1, n, 1)], dim=1)
        f = F.relu(m.W_f(cat)).view(b, n, n)
    f = F.softmax(f, dim=-1) if m.similarity in ("gaussian", "embedded") else f / f.shape[-1]
    y = (f @ g).permute(0, 2, 1).reshape(b, m.inter_channels, t, h, w)
    z = m.W_z(y) + x
    return m.norm_layer(z.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


@pytest.mark.parametrize("similarity", ["embedded", "gaussian", "concatenate"])
@pytest.mark.parametrize("with_audio", [True, False])
def test_tpavi_nonlocal_modes_match_the_reference_formula(similarity, with_audio):
    torch.manual_seed(0)
    m = TPAVIFusion(8, audio_dim=6, similarity=similarity, mode="va" if with_audio else "vv").double().eval()
    with torch.no_grad():
        m.W_z[1].weight.normal_()
        m.W_z[1].bias.normal_()
    x = torch.randn(2, 8, 3, 4, 5, dtype=torch.float64)
    audio = torch.randn(2, 3, 6, dtype=torch.float64)
    z, _ = m(x, audio)
    ref = _reference_tpavi(m, x, audio if with_audio else None)
    torch.testing.assert_close(z, ref, rtol=1e-10, atol=1e-10)
    assert (m.theta is None) == (similarity == "gaussian")
    assert hasattr(m, "W_f") == (similarity == "concatenate")


def test_tpavi_gaussian_softmax_with_one_frame_averages_g():
    # T = 1 and an audio key: every key position is the same -> softmax is uniform -> y = mean(g)
    torch.manual_seed(1)
    m = TPAVIFusion(4, audio_dim=4, similarity="gaussian").double().eval()
    with torch.no_grad():
        m.W_z[0].weight.copy_(torch.eye(4, 2, dtype=torch.float64)[:, :, None, None, None])
        m.W_z[0].bias.zero_()
        m.W_z[1].weight.fill_(1.0)
        m.W_z[1].bias.zero_()
        m.W_z[1].running_mean.zero_()
        m.W_z[1].running_var.fill_(1.0 - m.W_z[1].eps)
    x = torch.randn(1, 4, 1, 3, 3, dtype=torch.float64)
    z, _ = m(x, torch.randn(1, 1, 4, dtype=torch.float64))
    gbar = m.g(x).mean(dim=(2, 3, 4))  # [1,2]
    expected = x + torch.cat([gbar, torch.zeros(1, 2, dtype=torch.float64)], 1)[:, :, None, None, None]
    expected = F.layer_norm(expected.permute(0, 2, 3, 4, 1), (4,), m.norm_layer.weight, m.norm_layer.bias)
    expected = expected.permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(z, expected)


def test_tpavi_similarity_rejects_unknown_mode():
    with pytest.raises(ValueError, match="similarity"):
        TPAVIFusion(8, similarity="cosine")


# ----------------------------------------------------------------------------- sampled JS (ECMVAE release)
def test_sampled_js_surrogate_known_values():
    mu = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    lv_s = torch.tensor([[0.0, -1.0], [0.5, 0.2]])
    lv_t = torch.tensor([[1.0, 0.3], [-0.5, 0.0]])
    gen = torch.Generator().manual_seed(7)
    got = sampled_js_surrogate(mu, lv_s, mu + 0.5, lv_t, generator=gen)
    gen = torch.Generator().manual_seed(7)
    eps_s, eps_t = torch.randn(2, 2, generator=gen), torch.randn(2, 2, generator=gen)
    # density value at mu + sigma*eps: exp(-eps^2/2) / (sigma sqrt(2 pi)), sigma = exp(logvar/2)
    p_s = torch.exp(-0.5 * eps_s**2) / (torch.exp(0.5 * lv_s) * math.sqrt(2 * math.pi))
    p_t = torch.exp(-0.5 * eps_t**2) / (torch.exp(0.5 * lv_t) * math.sqrt(2 * math.pi))
    m = 0.5 * (p_s + p_t)
    expected = 0.5 * ((p_s * (p_s / m).log()).sum() + (p_t * (p_t / m).log()).sum()) / 2
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # equal density values everywhere (p_s = p_t) give exactly 0
    tiny = torch.full((2, 2), -40.0)  # sigma ~ 2e-9: p = exp(-eps^2/2)/(sigma sqrt(2pi)) differs per draw
    assert sampled_js_surrogate(mu, lv_s, mu, lv_s, generator=torch.Generator().manual_seed(3)).item() >= 0.0
    assert torch.isfinite(sampled_js_surrogate(mu, tiny, mu, tiny))
    # gradients reach mu and logvar (through the density), not through the draw
    mu_r = mu.clone().requires_grad_(True)
    sampled_js_surrogate(mu_r, lv_s, mu + 1.0, lv_t).backward()
    assert mu_r.grad is not None and torch.isfinite(mu_r.grad).all()


# ----------------------------------------------------------------------------- presets
PAPER_FALSE = {
    "tpavi": ["model.avm_loss.legacy_sum", "model.avm_loss.legacy_relu_maps", "model.decoder.legacy_inplace_relu_skip"],
    "ecmvae": [
        "model.seg_loss.legacy_mean_bce",
        "model.avm_loss.legacy_sum",
        "model.latent.legacy_sigma",
        "model.latent.legacy_lld",
        "model.latent.legacy_test_sample",
    ],
    "avsbg": ["model.seg_loss.legacy_mean_bce", "model.avm_loss.legacy_sum", "model.projector.legacy_raw_logits"],
}


@pytest.mark.parametrize("model", list(PAPER_FALSE))
def test_preset_switches_every_legacy_flag(model, tmp_path):
    paper = compose_cfg("train", tiny_overrides(tmp_path, "s4") + [f"model={model}"])
    release = compose_cfg("train", tiny_overrides(tmp_path, "s4") + [f"model={model}", "model.preset=release"])
    assert paper.model.preset == "paper"
    for key in PAPER_FALSE[model]:
        assert OmegaConf.select(paper, key) is False, key
        assert OmegaConf.select(release, key) is True, key
    if model == "ecmvae":
        assert paper.model.latent.divergence == "js" and release.model.latent.divergence == "js_sampled"
        assert (paper.model.loss_weights.kl, release.model.loss_weights.kl) == (0.05, 0.01)
        assert (paper.model.loss_weights.sic, release.model.loss_weights.sic) == (0.01, 0.002)
    if model == "avsbg":  # the raw-logits mask is an S4-only release behaviour
        ms3 = compose_cfg("train", tiny_overrides(tmp_path, "ms3") + ["model=avsbg", "model.preset=release"])
        assert ms3.model.projector.legacy_raw_logits is False


def test_unknown_preset_is_an_error(tmp_path):
    cfg = compose_cfg("train", tiny_overrides(tmp_path) + ["model=tpavi", "model.preset=relase"])
    with pytest.raises(Exception, match="model.preset"):
        OmegaConf.to_container(cfg, resolve=True)


def test_release_preset_trains_one_step_per_method(synth_data_dir, tmp_path):
    from avs.engine.trainer import Trainer

    for model in ("tpavi", "ecmvae", "avsbg"):
        extra = [
            f"model={model}",
            "model.preset=release",
            "model.channels=32" if model == "tpavi" else "seed=1",
            "trainer.max_steps=1",
            "trainer.test_at_end=false",
        ]
        cfg = compose_cfg("train", tiny_overrides(synth_data_dir) + extra)
        result = Trainer(cfg, tmp_path / model).fit()
        assert result["steps"] == 1


# ----------------------------------------------------------------------------- legacy_lld, legacy_test_sample
def test_legacy_lld_and_test_sample_reach_the_model(tmp_path):
    from avs.models.build import build_model

    overrides = tiny_overrides(tmp_path) + ["model=ecmvae"]
    default = build_model(compose_cfg("train", overrides))
    assert default.latent.ba_prior.legacy_lld is False and default.latent.legacy_test_sample is False
    flagged = build_model(
        compose_cfg("train", overrides + ["model.latent.legacy_lld=true", "model.latent.legacy_test_sample=true"])
    )
    assert flagged.latent.ba_prior.legacy_lld and flagged.latent.ba_post.legacy_lld
    flagged.load_state_dict(default.state_dict())
    default.eval()
    flagged.eval()
    batch = {"frames": torch.randn(1, 3, 3, 64, 64), "audio": torch.randn(1, 3, 1, 96, 64)}
    torch.manual_seed(0)
    d1 = default(batch)["logits"]
    torch.manual_seed(1)
    d2 = default(batch)["logits"]
    assert torch.equal(d1, d2)  # prior mean: deterministic
    torch.manual_seed(0)
    s1 = flagged(batch)["logits"]
    torch.manual_seed(1)
    s2 = flagged(batch)["logits"]
    torch.manual_seed(0)
    s3 = flagged(batch)["logits"]
    assert not torch.equal(s1, s2) and torch.equal(s1, s3)  # one random prior code per call (release test path)


def test_js_sampled_divergence_is_the_shared_code_term_of_the_kl(tmp_path):
    from avs.models.divergences import kl_normal
    from avs.models.latent import FactorisedLatent, Gaussian

    lat = FactorisedLatent(channels=16, latent_dim=3, mi_dim=2, image_size=64, divergence="js_sampled")
    gen = torch.Generator().manual_seed(0)

    def g():
        return Gaussian(torch.randn(4, 3, generator=gen), 0.3 * torch.randn(4, 3, generator=gen))

    q = {"s_v": g(), "s_a": g(), "c": g()}
    p = {"s_v": g(), "s_a": g(), "c": g()}
    torch.manual_seed(11)
    got = lat.kl_term(q, p)
    specific = sum(kl_normal(q[k].mu, q[k].logvar, p[k].mu, p[k].logvar).mean() for k in ("s_v", "s_a"))
    torch.manual_seed(11)
    shared = sampled_js_surrogate(p["c"].mu, p["c"].logvar, q["c"].mu, q["c"].logvar)  # prior = source
    assert got.item() == pytest.approx((specific + shared).item(), rel=1e-6)
