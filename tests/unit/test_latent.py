"""Tests for avs.models.latent: ECMVAE encoders, fused codes, injection, L_diff, L_sic, parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from avs.models.divergences import js_divergence, kl_normal, moe_kl, poe
from avs.models.latent import (
    DIVERGENCES,
    PAPER_LOSS_WEIGHTS,
    RELEASED_LOSS_WEIGHTS,
    VARIANTS,
    BarberAgakovMI,
    GaussianLatentEncoder,
    LatentState,
    build_latent,
    diff_loss,
    hybrid_loss_weights,
)

PX = 64
N = 2


def _inputs(n: int = N, px: int = PX, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(n, 3, px, px, generator=g)
    audio = torch.rand(n, 128, generator=g)  # VGGish embeddings are non-negative
    masks = (torch.rand(n, 1, px, px, generator=g) > 0.5).float()
    return frames, audio, masks


def _nparams(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- parameter counts (no forward)
def test_parameter_count_matches_released_mm_vae_model():
    m16 = build_latent(latent_dim=16, image_size=224)
    total = _nparams(m16)
    assert total == 2_158_804
    assert abs(total - 2.159e6) / 2.159e6 < 1e-3
    # released-model breakdown (M params, 3 decimals)
    parts = {name: _nparams(mod) / 1e6 for name, mod in m16.named_children()}
    for name, ref in [
        ("enc_vs", 0.637),
        ("enc_vs_y", 0.637),
        ("enc_as", 0.004),
        ("enc_vac", 0.279),
        ("enc_as_y", 0.279),
        ("enc_vac_y", 0.279),
    ]:
        assert round(parts[name], 3) == ref, (name, parts[name])
    sc = sum(parts[k] for k in ("sc1_prior", "sc2_prior", "sc1_posterior", "sc2_posterior"))
    assert round(sc, 3) == 0.002
    assert round(parts["noise_model_prior"] + parts["noise_model_post"], 3) == 0.041
    assert round(parts["ba_prior"] + parts["ba_post"], 4) == 0.0006
    m48 = build_latent(latent_dim=48, image_size=224)
    assert _nparams(m48) == 3_034_964
    assert abs(_nparams(m48) - 3.035e6) / 3.035e6 < 1e-3
    assert 0 < m16.inference_parameters() < total


# ---------------------------------------------------------------- every variant x divergence
EXPECTED_KEYS = {
    "factorised": {"kl", "diff", "sic"},
    "no_factor": {"kl"},
    "visual_only": {"kl"},
    "ae": {"diff", "sic"},
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_variant_shapes_losses_and_gradients(variant, divergence):
    torch.manual_seed(0)
    m = build_latent(image_size=PX, variant=variant, divergence=divergence)
    frames, audio, masks = _inputs()
    state = m.encode(frames, None if variant == "visual_only" else audio, masks)
    assert isinstance(state, LatentState)
    L = m.latent_dim
    for dists in (state.prior, state.posterior):
        for g in dists.values():
            assert g.mu.shape == (N, L)
            assert (g.logvar is None) == (variant == "ae")
    codes = {b: m.sample(state, b) for b in ("prior", "posterior")}
    code_dim = 2 * L if variant in ("factorised", "ae") else L
    assert m.code_dim == code_dim
    feat = torch.randn(N, 128, 2, 2)
    outs = [m.inject(feat, codes[b], b) for b in ("prior", "posterior")]
    for out in outs:
        assert out.shape == feat.shape
    terms = m.losses(state, codes)
    assert set(terms) == EXPECTED_KEYS[variant]
    for name, value in terms.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    total = sum(terms.values()) + sum(o.pow(2).mean() for o in outs)
    total.backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert no_grad == []  # every module the variant builds is used and trained
    exported = m.export_codes(state)
    assert set(exported) == set(state.prior)
    assert all(t.shape == (N, L) and not t.requires_grad for t in exported.values())


def test_variant_modules_and_audio_requirements():
    vis = build_latent(image_size=PX, variant="visual_only")
    assert not hasattr(vis, "enc_as") and not hasattr(vis, "enc_vac")
    frames, audio, masks = _inputs()
    assert set(vis.encode(frames, None, masks).prior) == {"s_v"}
    nf = build_latent(image_size=PX, variant="no_factor")
    assert not hasattr(nf, "enc_vac") and not hasattr(nf, "ba_prior")
    assert set(nf.encode(frames, audio).prior) == {"s_v", "s_a"}
    fac = build_latent(image_size=PX)
    with pytest.raises(ValueError, match="needs audio"):
        fac.encode(frames, None, masks)
    with pytest.raises(ValueError, match="audio must be"):
        fac.encode(frames, audio[:, :64], masks)
    with pytest.raises(ValueError, match="masks must be"):
        fac.encode(frames, audio, masks[:, :, :32])
    with pytest.raises(ValueError, match="frames must be"):
        fac.encode(frames[:, :1], audio)
    with pytest.raises(ValueError, match="model.latent.variant"):
        build_latent(variant="cvae")
    with pytest.raises(ValueError, match="model.latent.divergence"):
        build_latent(divergence="wasserstein")
    # poe / moe replace the Linear fusion; non-factorised variants ignore the divergence
    assert not hasattr(build_latent(image_size=PX, divergence="poe"), "sc1_prior")
    assert _nparams(build_latent(image_size=PX, variant="no_factor", divergence="moe")) == _nparams(nf)


def test_posterior_audio_encoder_sees_mask_not_image():
    torch.manual_seed(0)
    m = build_latent(image_size=PX).eval()
    frames, audio, masks = _inputs()
    a = m.encode(frames, audio, masks).posterior
    b = m.encode(frames + 5.0, audio, masks).posterior
    torch.testing.assert_close(a["s_a"].mu, b["s_a"].mu)
    assert not torch.allclose(a["s_v"].mu, b["s_v"].mu)
    assert not torch.allclose(a["c"].mu, b["c"].mu)
    c = m.encode(frames, audio, 1.0 - masks).posterior
    assert not torch.allclose(a["s_a"].mu, c["s_a"].mu)


def test_other_input_size_is_pooled_to_the_configured_grid():
    m = build_latent(image_size=PX).eval()
    frames, audio, masks = _inputs(px=96)
    state = m.encode(frames, audio, masks)
    assert state.posterior["c"].mu.shape == (N, 16)
    with pytest.raises(ValueError, match="image_size must be >= 32"):
        build_latent(image_size=16)


# ---------------------------------------------------------------- sampling
def test_sampling_generator_mean_and_ae_determinism():
    m = build_latent(image_size=PX).eval()
    frames, audio, masks = _inputs()
    with torch.no_grad():
        state = m.encode(frames, audio, masks)
        z1 = m.sample(state, "prior", generator=torch.Generator().manual_seed(3))
        z2 = m.sample(state, "prior", generator=torch.Generator().manual_seed(3))
        z3 = m.sample(state, "prior", generator=torch.Generator().manual_seed(4))
        zm = m.sample(state, "prior", use_mean=True)
    torch.testing.assert_close(z1, z2)
    assert not torch.allclose(z1, z3)
    p = state.prior
    sc_v = m.sc1_prior(torch.cat([p["s_v"].mu, p["c"].mu], 1))
    sc_a = m.sc2_prior(torch.cat([p["s_a"].mu, p["c"].mu], 1))
    torch.testing.assert_close(zm, torch.cat([sc_v, sc_a], 1))
    assert set(state.draws["prior"]) == {"s_v", "s_a", "c", "sc_v", "sc_a", "code"}
    ae = build_latent(image_size=PX, variant="ae").eval()
    with torch.no_grad():
        st = ae.encode(frames, audio, masks)
        torch.testing.assert_close(ae.sample(st, "posterior"), ae.sample(st, "posterior"))
    with pytest.raises(ValueError, match="no posterior"):
        m.sample(m.encode(frames, audio), "posterior")
    with pytest.raises(ValueError, match="branch"):
        m.sample(state, "joint")


def test_moe_and_poe_sampling():
    m = build_latent(image_size=PX, divergence="moe").eval()
    frames, audio, masks = _inputs(n=8)
    with torch.no_grad():
        state = m.encode(frames, audio, masks)
        m.sample(state, "posterior", generator=torch.Generator().manual_seed(0))
    d = state.draws["posterior"]
    # each mixture draw is one of its two component draws, row by row
    for sc, s in (("sc_v", "s_v"), ("sc_a", "s_a")):
        rows = [torch.equal(d[sc][i], d[s][i]) or torch.equal(d[sc][i], d["c"][i]) for i in range(8)]
        assert all(rows)
    mean = m.sample(state, "posterior", use_mean=True)
    q = state.posterior
    torch.testing.assert_close(mean[:, :16], 0.5 * (q["s_v"].mu + q["c"].mu))
    pm = build_latent(image_size=PX, divergence="poe").eval()
    with torch.no_grad():
        st = pm.encode(frames, audio, masks)
        code = pm.sample(st, "prior", use_mean=True)
    g_v, g_c = st.prior["s_v"], st.prior["c"]
    prec = 1 + torch.exp(-g_v.logvar) + torch.exp(-g_c.logvar)
    ref = (g_v.mu * torch.exp(-g_v.logvar) + g_c.mu * torch.exp(-g_c.logvar)) / prec
    torch.testing.assert_close(code[:, :16], ref)


# ---------------------------------------------------------------- injection
def test_inject_noise_2d_and_errors():
    torch.manual_seed(0)
    m = build_latent(image_size=PX, noise_2d=True)
    feat = torch.randn(N, 128, 3, 3)
    code = torch.randn(N, m.code_dim)
    m.train()
    a = m.inject(feat, code, "prior", generator=torch.Generator().manual_seed(1))
    b = m.inject(feat, code, "prior", generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(a, b)  # per-position noise in training
    m.eval()
    torch.testing.assert_close(m.inject(feat, code, "prior"), m.inject(feat, code, "prior"))
    # without noise the code is tiled: every spatial position sees the same code
    plain = build_latent(image_size=PX).eval()
    flat = torch.zeros(N, 128, 3, 3)
    out = plain.inject(flat, code, "posterior")
    assert torch.allclose(out, out[:, :, :1, :1].expand_as(out))
    assert not torch.allclose(out, plain.inject(flat, code, "prior"))  # separate prior/post convs
    with pytest.raises(ValueError, match="code must be"):
        plain.inject(feat, code[:, :3], "prior")
    with pytest.raises(ValueError, match="feat must be"):
        plain.inject(feat[:, :64], code, "prior")


# ---------------------------------------------------------------- losses composition
def test_kl_term_composition_per_divergence():
    frames, audio, masks = _inputs()
    for divergence in ("kl", "js", "poe"):
        torch.manual_seed(0)
        m = build_latent(image_size=PX, divergence=divergence).eval()
        with torch.no_grad():
            st = m.encode(frames, audio, masks)
            kl = m.losses(st, {})["kl"]
        q, p = st.posterior, st.prior
        spec = sum(kl_normal(q[k].mu, q[k].logvar, p[k].mu, p[k].logvar).mean() for k in ("s_v", "s_a"))
        if divergence == "kl":
            ref = spec + kl_normal(q["c"].mu, q["c"].logvar, p["c"].mu, p["c"].logvar).mean()
        elif divergence == "js":
            ref = (
                spec
                + js_divergence(torch.stack([q["c"].mu, p["c"].mu]), torch.stack([q["c"].logvar, p["c"].logvar])).mean()
            )
        else:

            def joint(d, k):  # PoE of N(0,I), the specific and the shared expert
                return poe(torch.stack([d[k].mu, d["c"].mu]), torch.stack([d[k].logvar, d["c"].logvar]))

            ref = sum(kl_normal(*joint(q, k), *joint(p, k)).mean() for k in ("s_v", "s_a"))
        torch.testing.assert_close(kl, ref)
    # moe: stochastic estimate close to a many-sample estimate
    torch.manual_seed(0)
    m = build_latent(image_size=PX, divergence="moe").eval()
    with torch.no_grad():
        st = m.encode(frames, audio, masks)
        q, p = st.posterior, st.prior
        ref = sum(
            moe_kl(
                torch.stack([q[k].mu, q["c"].mu]),
                torch.stack([q[k].logvar, q["c"].logvar]),
                torch.stack([p[k].mu, p["c"].mu]),
                torch.stack([p[k].logvar, p["c"].logvar]),
                num_samples=20_000,
            ).mean()
            for k in ("s_v", "s_a")
        )
        est = torch.stack([m.losses(st, {})["kl"] for _ in range(200)]).mean()
    torch.testing.assert_close(est, ref, rtol=0.05, atol=0.1)


def test_legacy_sigma_changes_kl_to_released_scale():
    frames, audio, masks = _inputs()
    torch.manual_seed(0)
    m = build_latent(image_size=PX, variant="visual_only", legacy_sigma=True).eval()
    with torch.no_grad():
        st = m.encode(frames, None, masks)
        kl = m.losses(st, {})["kl"]
    q, p = st.posterior["s_v"], st.prior["s_v"]
    ref = kl_divergence(Normal(q.mu, torch.exp(q.logvar)), Normal(p.mu, torch.exp(p.logvar))).sum(-1).mean()
    torch.testing.assert_close(kl, ref)


def test_losses_need_posterior_and_samples():
    m = build_latent(image_size=PX)
    frames, audio, masks = _inputs()
    with pytest.raises(ValueError, match="no posterior"):
        m.losses(m.encode(frames, audio), {})
    st = m.encode(frames, audio, masks)
    code = torch.zeros(N, m.code_dim)
    with pytest.raises(ValueError, match="call sample"):
        m.losses(st, {"prior": code})
    with pytest.raises(ValueError, match="codes keys"):
        m.losses(st, {"joint": code})
    # diff sums the branches, sic averages them (alpha_2 = 0.5)
    codes = {b: m.sample(st, b) for b in ("prior", "posterior")}
    both = m.losses(st, codes)
    one = {b: m.losses(st, {b: codes[b]}) for b in codes}
    torch.testing.assert_close(both["diff"], one["prior"]["diff"] + one["posterior"]["diff"])
    torch.testing.assert_close(both["sic"], 0.5 * (one["prior"]["sic"] + one["posterior"]["sic"]))


# ---------------------------------------------------------------- L_diff
def test_diff_loss_zero_for_orthogonal_positive_otherwise():
    u = torch.tensor([1.0, 1.0, -1.0, -1.0])  # zero-mean, orthogonal batch patterns
    v = torch.tensor([1.0, -1.0, 1.0, -1.0])
    p, q = torch.randn(5), torch.randn(7)
    x1, x2 = u[:, None] * p, v[:, None] * q  # [4,5], [4,7]
    assert float(diff_loss(x1, x2)) == pytest.approx(0.0, abs=1e-10)
    disjoint = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [0.0, 0.0], [0.0, 0.0]])
    other = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 1.0], [-3.0, -1.0]])
    assert float(diff_loss(disjoint, other)) == pytest.approx(0.0, abs=1e-10)
    same = diff_loss(x1, x1 + 0.1 * torch.randn(4, 5))
    assert float(same) > 0.01
    # centring: adding a constant offset to every row changes nothing
    torch.testing.assert_close(diff_loss(x1 + 3.0, x2 - 2.0), diff_loss(x1, x2))
    with pytest.raises(ValueError, match="diff_loss"):
        diff_loss(x1, x2[:3])


# ---------------------------------------------------------------- L_sic
def test_sic_matches_gaussian_nll_and_legacy_form():
    torch.manual_seed(0)
    heads = BarberAgakovMI(16, 6)
    sc_v, sc_a = torch.randn(5, 16), torch.randn(5, 16)
    mu = torch.tanh(heads.mu(sc_v))
    lv = torch.tanh(heads.logvar(sc_v))
    t = torch.tanh(heads.target(sc_a))
    ref = -Normal(mu, torch.exp(0.5 * lv)).log_prob(t).sum(1).mean()
    torch.testing.assert_close(heads(sc_v, sc_a), ref)
    heads.legacy_lld = True
    torch.testing.assert_close(heads(sc_v, sc_a), (0.5 * (t - mu) ** 2 / torch.exp(lv)).sum(1).mean())


def _fit_sic(sc_v: torch.Tensor, sc_a: torch.Tensor, steps: int = 60) -> float:
    torch.manual_seed(1)
    heads = BarberAgakovMI(16, 6)
    heads.target.requires_grad_(False)  # fixed target statistic; fit q(t | sc_v)
    opt = torch.optim.Adam([*heads.mu.parameters(), *heads.logvar.parameters()], lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        loss = heads(sc_v, sc_a)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(heads(sc_v, sc_a))


def test_sic_bound_improves_when_sc_a_depends_on_sc_v():
    g = torch.Generator().manual_seed(0)
    sc_v = torch.randn(256, 16, generator=g)
    dependent = sc_v @ torch.randn(16, 16, generator=g) / 4.0  # sc_a a function of sc_v
    independent = torch.randn(256, 16, generator=g) * dependent.std()
    loss_dep = _fit_sic(sc_v, dependent)
    loss_ind = _fit_sic(sc_v, independent)
    # fitted heads: lower negative bound (higher MI lower bound) when sc_a is predictable
    assert loss_dep < loss_ind - 0.5, (loss_dep, loss_ind)


# ---------------------------------------------------------------- weights and encoder
def test_loss_weight_constants_and_hybrid_mapping():
    assert PAPER_LOSS_WEIGHTS == {"beta": 0.1, "diff": 0.001, "sic": 0.01, "alpha2": 0.5}
    assert RELEASED_LOSS_WEIGHTS == {"mi": 0.001, "diff": 0.001, "kl": 0.01, "sim": 0.5}
    w = hybrid_loss_weights(0.4)
    assert w == pytest.approx({"seg_post": 0.4, "kl": 0.04, "seg_prior": 0.6, "diff": 0.001, "sic": 0.01})
    with pytest.raises(ValueError, match="alpha1"):
        hybrid_loss_weights(1.5)


def test_gaussian_latent_encoder_grid_and_inputs():
    enc = GaussianLatentEncoder(
        8, spatial_channels=1, widths=(4, 4, 4, 4, 4), image_size=100, spatial_embed=5, audio_dim=3
    )
    assert enc.grid == 3  # 100 -> 50 -> 25 -> 12 -> 6 -> 3
    g = enc(torch.randn(2, 1, 100, 100), torch.randn(2, 3))
    assert g.mu.shape == (2, 8) and g.logvar.shape == (2, 8)
    assert enc.fc1.in_features == 3 + 5
    with pytest.raises(ValueError, match="audio input"):
        enc(torch.randn(2, 1, 100, 100), None)
    det = GaussianLatentEncoder(8, audio_dim=3, deterministic=True)
    assert det(audio=torch.randn(2, 3)).logvar is None
    assert math.isclose(_nparams(det), 3 * 8 + 8)
