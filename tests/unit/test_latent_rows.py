"""Latent terms over a subset of rows (LatentState.rows: the real frames of AVSS clips, docs/avss.md): every
term equals the same term computed on the kept rows alone, a left-out row changes nothing and gets no
gradient, and without rows the terms are the plain means of before."""

from __future__ import annotations

import pytest
import torch

from avs.models.divergences import sampled_js_surrogate
from avs.models.latent import DIVERGENCES, VARIANTS, Gaussian, LatentState, build_latent, diff_loss
from avs.models.latent_parts import free_bits_sum, row_mean

PX = 64
ROWS = torch.tensor([True, True, False, True, False, False])  # 3 real frames, 3 padded


def _state(n: int, seed: int, latent) -> tuple[LatentState, dict]:
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(n, 3, PX, PX, generator=g)
    audio = torch.rand(n, 128, generator=g)
    masks = (torch.rand(n, 1, PX, PX, generator=g) > 0.5).float()
    state = latent.encode(frames, audio if latent.uses_audio else None, masks)
    gen = torch.Generator().manual_seed(seed + 1)
    codes = {b: latent.sample(state, b, generator=gen) for b in ("prior", "posterior")}
    return state, codes


def _kept(state: LatentState, codes: dict, rows: torch.Tensor) -> tuple[LatentState, dict]:
    """The state and codes of the kept rows only (a batch made of the real frames)."""

    def sel(d: dict) -> dict:
        return {k: Gaussian(g.mu[rows], None if g.logvar is None else g.logvar[rows]) for k, g in d.items()}

    draws = {b: {k: v[rows] for k, v in rec.items()} for b, rec in state.draws.items()}
    kept = LatentState(prior=sel(state.prior), posterior=sel(state.posterior), draws=draws)
    return kept, {b: c[rows] for b, c in codes.items()}


CASES = [(v, "js") for v in VARIANTS if v != "factorised"] + [("factorised", d) for d in DIVERGENCES]


@pytest.mark.parametrize("free_bits", [0.0, 1e-4])
@pytest.mark.parametrize(("variant", "divergence"), CASES)
def test_terms_over_rows_equal_the_terms_of_the_kept_rows(variant, divergence, free_bits):
    if free_bits and (variant == "ae" or divergence in ("js_sampled", "moe")):
        pytest.skip("free bits apply to the closed-form divergences only")
    torch.manual_seed(0)
    latent = build_latent(image_size=PX, variant=variant, divergence=divergence, free_bits=free_bits).eval()
    with torch.no_grad():
        state, codes = _state(len(ROWS), 0, latent)
    state.rows = ROWS
    torch.manual_seed(5)  # the sampled divergences draw: the same numbers for both
    got = latent.losses(state, codes)
    kept, kept_codes = _kept(state, codes, ROWS)
    if divergence in ("js_sampled", "moe") and variant == "factorised":
        # their one-sample estimates draw per row: compare with padded rows whose values are changed instead
        other = _changed_padded(state)
        torch.manual_seed(5)
        want = latent.losses(other, codes)
    else:
        want = latent.losses(kept, kept_codes)
    assert got.keys() == want.keys() and got
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    state.rows = None  # the plain means over all rows differ: the padded rows did count before
    torch.manual_seed(5)
    plain = latent.losses(state, codes)
    assert any(not torch.allclose(plain[k], got[k]) for k in got)


def _changed_padded(state: LatentState) -> LatentState:
    """The same state with other means / log-variances on the left-out rows (the kept rows untouched)."""
    pad = ~state.rows[:, None]

    def change(d: dict) -> dict:
        out = {}
        for k, g in d.items():
            mu = torch.where(pad, g.mu + 3.0, g.mu)
            lv = None if g.logvar is None else torch.where(pad, g.logvar - 1.0, g.logvar)
            out[k] = Gaussian(mu, lv)
        return out

    return LatentState(change(state.prior), change(state.posterior), state.draws, state.rows)


def test_left_out_rows_get_no_gradient_and_none_kept_is_zero():
    x = torch.randn(6, 4, requires_grad=True)
    y = torch.randn(6, 4, requires_grad=True)
    (diff_loss(x, y, ROWS) + row_mean(x.pow(2).sum(1), ROWS) + free_bits_sum(x.pow(2), 0.1, ROWS)).backward()
    assert x.grad[~ROWS].abs().sum() == 0 and y.grad[~ROWS].abs().sum() == 0
    assert x.grad[ROWS].abs().sum() > 0
    torch.testing.assert_close(diff_loss(x, y, ROWS), diff_loss(x[ROWS], y[ROWS]))
    none = torch.zeros(6, dtype=torch.bool)
    assert row_mean(x.sum(1), none).item() == 0.0
    mu, lv = torch.randn(6, 4), torch.randn(6, 4)
    g = torch.Generator().manual_seed(0)
    assert sampled_js_surrogate(mu, lv, mu + 1, lv, generator=g, rows=none).item() == 0.0


def test_without_rows_the_means_are_the_expressions_of_before():
    v = torch.randn(7, 5)
    assert torch.equal(row_mean(v[:, 0]), v[:, 0].mean()) and torch.equal(row_mean(v), v.mean(0))
    assert torch.equal(free_bits_sum(v.abs(), 0.3), v.abs().mean(0).clamp(min=0.3).sum())
    x1, x2 = v[:, :3], v[:, 2:]
    c1, c2 = x1 - x1.mean(0, keepdim=True), x2 - x2.mean(0, keepdim=True)
    c1, c2 = c1 / (c1.norm(dim=1, keepdim=True) + 1e-6), c2 / (c2.norm(dim=1, keepdim=True) + 1e-6)
    assert torch.equal(diff_loss(x1, x2), (c1.t() @ c2).pow(2).mean())
