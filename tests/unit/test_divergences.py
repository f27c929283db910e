"""Tests for avs.models.divergences: closed forms against sampling, quadrature and hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from avs.models.divergences import (
    js_divergence,
    kl_logvar,
    kl_normal,
    log_normal,
    moe_kl,
    poe,
    reparameterize,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _params(n: int = 3, dim: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64), 0.8 * torch.randn(
        n, dim, generator=g, dtype=torch.float64
    )


def _js_mixture_quadrature(m1: float, v1: float, m2: float, v2: float) -> float:
    """Reference 1-D JS with the arithmetic mixture, by trapezoidal quadrature on a wide grid."""
    z = torch.linspace(min(m1, m2) - 30, max(m1, m2) + 30, 200001, dtype=torch.float64)
    p = torch.exp(-0.5 * (z - m1) ** 2 / v1) / math.sqrt(2 * math.pi * v1)
    q = torch.exp(-0.5 * (z - m2) ** 2 / v2) / math.sqrt(2 * math.pi * v2)
    m = 0.5 * (p + q)
    tiny = 1e-300
    f = 0.5 * p * (torch.log(p + tiny) - torch.log(m + tiny)) + 0.5 * q * (torch.log(q + tiny) - torch.log(m + tiny))
    return float(torch.trapezoid(f, z))


# ---------------------------------------------------------------- KL
def test_kl_closed_form_matches_monte_carlo_and_torch():
    mu_q, lv_q = _params(seed=1)
    mu_p, lv_p = _params(seed=2)
    kl = kl_normal(mu_q, lv_q, mu_p, lv_p)
    assert kl.shape == (3,)
    ref = kl_divergence(Normal(mu_q, torch.exp(0.5 * lv_q)), Normal(mu_p, torch.exp(0.5 * lv_p))).sum(-1)
    torch.testing.assert_close(kl, ref)
    # Monte Carlo: E_q[log q - log p] with 200k samples per row
    s = 200_000
    eps = torch.randn(s, 3, 4, generator=_gen(3), dtype=torch.float64)
    z = mu_q + torch.exp(0.5 * lv_q) * eps
    ratio = log_normal(z, mu_q, lv_q) - log_normal(z, mu_p, lv_p)  # [S,N]
    mc, se = ratio.mean(0), ratio.std(0) / math.sqrt(s)
    assert torch.all((mc - kl).abs() < 4 * se + 1e-3), (mc, kl, se)


def test_kl_zero_for_equal_and_broadcasts_to_standard_normal():
    mu, lv = _params()
    assert torch.allclose(kl_normal(mu, lv, mu, lv), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    zero = torch.zeros(())
    kl0 = kl_normal(mu, lv, zero, zero)
    ref = (0.5 * (torch.exp(lv) + mu**2 - 1 - lv)).sum(-1)
    torch.testing.assert_close(kl0, ref)
    assert torch.all(kl_normal(mu + 1.0, lv, mu, lv) > 0)


def test_legacy_sigma_reproduces_exp_logvar_scale():
    mu_q, lv_q = _params(seed=4)
    mu_p, lv_p = _params(seed=5)
    legacy = kl_normal(mu_q, kl_logvar(lv_q, True), mu_p, kl_logvar(lv_p, True))
    # released code: Normal(mu, scale=exp(logvar))
    ref = kl_divergence(Normal(mu_q, torch.exp(lv_q)), Normal(mu_p, torch.exp(lv_p))).sum(-1)
    torch.testing.assert_close(legacy, ref)
    assert not torch.allclose(legacy, kl_normal(mu_q, lv_q, mu_p, lv_p))
    assert kl_logvar(lv_q) is lv_q


def test_reparameterize_uses_half_logvar_and_generator():
    mu = torch.full((50_000, 1), 2.0)
    lv = torch.full((50_000, 1), math.log(9.0))  # var 9 -> std 3
    z1 = reparameterize(mu, lv, _gen(7))
    z2 = reparameterize(mu, lv, _gen(7))
    assert torch.equal(z1, z2)
    assert abs(float(z1.mean()) - 2.0) < 0.05
    assert abs(float(z1.std()) - 3.0) < 0.05


# ---------------------------------------------------------------- PoE
def test_poe_matches_hand_computed_product():
    # N(1, 4) x N(3, 1): precision 1/4 + 1 = 1.25 -> var 0.8, mean 0.8 * (1/4 + 3) = 2.6
    mus = torch.tensor([[[1.0]], [[3.0]]])
    lvs = torch.log(torch.tensor([[[4.0]], [[1.0]]]))
    mu, lv = poe(mus, lvs, include_prior_expert=False)
    assert mu.shape == (1, 1)
    assert float(mu) == pytest.approx(2.6, rel=1e-6)
    assert float(torch.exp(lv)) == pytest.approx(0.8, rel=1e-6)
    # with the N(0,1) expert: precision 2.25 -> var 4/9, mean (0.25 + 3) / 2.25
    mu, lv = poe(mus, lvs)
    assert float(mu) == pytest.approx(3.25 / 2.25, rel=1e-6)
    assert float(torch.exp(lv)) == pytest.approx(4.0 / 9.0, rel=1e-6)


def test_poe_density_is_normalised_product():
    mus = torch.randn(3, 2, 5, generator=_gen(8), dtype=torch.float64)
    lvs = torch.randn(3, 2, 5, generator=_gen(9), dtype=torch.float64)
    mu, lv = poe(mus, lvs, include_prior_expert=False)
    z = torch.randn(10, 2, 5, generator=_gen(10), dtype=torch.float64)
    prod = sum(log_normal(z, mus[e], lvs[e]) for e in range(3))  # [10,2]
    diff = prod - log_normal(z, mu, lv)  # log normaliser, independent of z
    assert torch.allclose(diff, diff[:1].expand_as(diff), atol=1e-9)


def test_poe_weighted_geometric_mean_of_equal_experts_is_identity():
    mu, lv = _params()
    mus, lvs = torch.stack([mu, mu]), torch.stack([lv, lv])
    m, v = poe(mus, lvs, include_prior_expert=False, weights=[0.5, 0.5])
    torch.testing.assert_close(m, mu)
    torch.testing.assert_close(v, lv)
    with pytest.raises(ValueError, match="expected 3 expert weights"):
        poe(mus, lvs, include_prior_expert=True, weights=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[K,N,L\]"):
        poe(mu, lv)


# ---------------------------------------------------------------- MoE
def test_moe_kl_single_component_matches_closed_form():
    mu_q, lv_q = _params(seed=11)
    mu_p, lv_p = _params(seed=12)
    est = moe_kl(mu_q[None], lv_q[None], mu_p, lv_p, num_samples=100_000, generator=_gen(13))
    ref = kl_normal(mu_q, lv_q, mu_p, lv_p)
    assert est.shape == (3,)
    torch.testing.assert_close(est, ref, atol=0.05, rtol=0.02)


def test_moe_kl_mixture_matches_independent_sampler_and_has_gradients():
    g = _gen(14)
    mus_q = torch.randn(2, 2, 3, generator=g, dtype=torch.float64).requires_grad_()
    lvs_q = (0.5 * torch.randn(2, 2, 3, generator=g, dtype=torch.float64)).requires_grad_()
    mu_p = torch.zeros(2, 3, dtype=torch.float64)
    lv_p = torch.zeros(2, 3, dtype=torch.float64)
    est = moe_kl(mus_q, lvs_q, mu_p, lv_p, num_samples=50_000, generator=_gen(15))
    # independent estimator: draw the component index, then the sample, and average log q_mix - log p
    s = 200_000
    with torch.no_grad():
        idx = torch.randint(0, 2, (s, 2), generator=_gen(16))
        comp_mu = mus_q.permute(1, 0, 2)[torch.arange(2), idx]  # [S,N,L]
        comp_lv = lvs_q.permute(1, 0, 2)[torch.arange(2), idx]
        z = comp_mu + torch.exp(0.5 * comp_lv) * torch.randn(s, 2, 3, generator=_gen(17), dtype=torch.float64)
        lq = torch.logsumexp(torch.stack([log_normal(z, mus_q[e], lvs_q[e]) for e in range(2)]), 0) - math.log(2)
        ref = (lq - log_normal(z, mu_p, lv_p)).mean(0)
    torch.testing.assert_close(est.detach(), ref, atol=0.05, rtol=0.02)
    est.sum().backward()
    assert mus_q.grad.abs().sum(dim=(1, 2)).min() > 0  # both components receive gradient
    assert lvs_q.grad.abs().sum(dim=(1, 2)).min() > 0


def test_moe_kl_zero_when_mixtures_equal():
    mu, lv = _params(seed=18)
    mus, lvs = torch.stack([mu, mu + 1]), torch.stack([lv, lv])
    est = moe_kl(mus, lvs, mus, lvs, num_samples=4, generator=_gen(19))
    assert torch.allclose(est, torch.zeros(3, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="num_samples"):
        moe_kl(mus, lvs, mus, lvs, num_samples=0)


# ---------------------------------------------------------------- JS
def test_js_geometric_symmetric_zero_for_equal_and_hand_value():
    mu_a, lv_a = _params(seed=20)
    mu_b, lv_b = _params(seed=21)
    ab = js_divergence(torch.stack([mu_a, mu_b]), torch.stack([lv_a, lv_b]))
    ba = js_divergence(torch.stack([mu_b, mu_a]), torch.stack([lv_b, lv_a]))
    assert ab.shape == (3,)
    torch.testing.assert_close(ab, ba)
    assert torch.all(ab > 0)
    same = js_divergence(torch.stack([mu_a, mu_a]), torch.stack([lv_a, lv_a]))
    assert torch.allclose(same, torch.zeros(3, dtype=torch.float64), atol=1e-12)
    # 1-D by hand: q1 = N(0,1), q2 = N(2,1) -> f = N(1,1); JS = 0.5*KL(q1||f) + 0.5*KL(q2||f) = 0.5
    js = js_divergence(torch.tensor([[[0.0]], [[2.0]]]), torch.zeros(2, 1, 1))
    assert float(js) == pytest.approx(0.5, rel=1e-6)


def test_js_geometric_is_not_bounded_by_log2():
    js = js_divergence(torch.tensor([[[0.0]], [[10.0]]]), torch.zeros(2, 1, 1))
    assert float(js) == pytest.approx(12.5, rel=1e-6)  # 0.5 * 5^2: grows with the separation
    assert float(js) > math.log(2)


@pytest.mark.parametrize("sep", [0.0, 1.0, 3.0, 40.0])
def test_js_mixture_estimator_bounded_by_log2_and_matches_quadrature(sep):
    mus = torch.tensor([[[0.0]], [[sep]]], dtype=torch.float64)
    lvs = torch.log(torch.tensor([[[1.0]], [[2.0]]], dtype=torch.float64))
    est = js_divergence(mus, lvs, estimator="mixture", num_samples=40_000, generator=_gen(22))
    assert float(est) <= math.log(2) + 1e-12
    ref = _js_mixture_quadrature(0.0, 1.0, sep, 2.0)
    assert float(est) == pytest.approx(ref, abs=0.01)


def test_js_mixture_zero_for_equal_and_symmetric():
    mu_a, lv_a = _params(seed=23)
    mu_b, lv_b = _params(seed=24)
    same = js_divergence(torch.stack([mu_a, mu_a]), torch.stack([lv_a, lv_a]), estimator="mixture", num_samples=8)
    assert torch.allclose(same, torch.zeros(3, dtype=torch.float64), atol=1e-9)
    kw = dict(estimator="mixture", num_samples=40_000)
    ab = js_divergence(torch.stack([mu_a, mu_b]), torch.stack([lv_a, lv_b]), generator=_gen(25), **kw)
    ba = js_divergence(torch.stack([mu_b, mu_a]), torch.stack([lv_b, lv_a]), generator=_gen(26), **kw)
    torch.testing.assert_close(ab, ba, atol=0.01, rtol=0.0)
    assert torch.all(ab <= math.log(2))


def test_js_with_prior_expert_and_errors():
    zero = torch.zeros(1, 2, 3)
    # the only other distribution is N(0,I) itself -> JS 0
    assert torch.allclose(js_divergence(zero, zero, include_prior_expert=True), torch.zeros(2))
    shifted = js_divergence(zero + 1.0, zero, include_prior_expert=True)
    # f = N(0.5, 1) per dim: 0.5*(0.125) + 0.5*(0.125) per dim, 3 dims
    torch.testing.assert_close(shifted, torch.full((2,), 0.375))
    with pytest.raises(ValueError, match="expected 2 expert weights"):
        js_divergence(zero, zero, weights=[1.0], include_prior_expert=True)
    with pytest.raises(ValueError, match="estimator"):
        js_divergence(zero, zero, estimator="bogus")
