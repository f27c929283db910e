"""Divergences between diagonal Gaussians given as ``(mu, logvar)``, each ``[N,L]``.

One parameterisation everywhere: ``sigma = exp(0.5 * logvar)``, i.e. ``logvar`` is the log of the
variance, for sampling, densities, KL, PoE, MoE and JS alike. The released ECMVAE code is
inconsistent here (``Normal(mu, exp(logvar))`` in its KL
terms while it samples with ``exp(0.5*logvar)``); :func:`kl_logvar` reproduces that only when asked.

Functions that take several distributions ("experts" / "components") stack them on a leading
axis: ``mus, logvars: [K,N,L]``. Per-item results are ``[N]`` (summed over L); callers average
over N.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "reparameterize",
    "log_normal",
    "kl_normal",
    "kl_logvar",
    "poe",
    "moe_kl",
    "js_divergence",
    "sampled_js_surrogate",
]

_LOG_2PI = math.log(2.0 * math.pi)
_JS_ESTIMATORS = ("geometric", "mixture")


def _randn(shape: Sequence[int], ref: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal draws of `shape` on `ref`'s device/dtype (drawn on the generator's device)."""
    if generator is None:
        return torch.randn(*shape, device=ref.device, dtype=ref.dtype)
    eps = torch.randn(*shape, generator=generator, device=generator.device, dtype=ref.dtype)
    return eps.to(ref.device)


def reparameterize(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """z = mu + eps * exp(0.5*logvar), eps ~ N(0,I) on mu's device; [N,L] -> [N,L]."""
    return mu + _randn(mu.shape, mu, generator) * torch.exp(0.5 * logvar)


def log_normal(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dim; broadcast [...,L] -> [...]."""
    return -0.5 * (_LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def kl_normal(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """Closed-form KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)) summed over L; [N,L] -> [N].

    The p arguments broadcast against q (e.g. zeros for N(0,I)).
    """
    kl = 0.5 * (logvar_p - logvar_q + (torch.exp(logvar_q) + (mu_q - mu_p).pow(2)) * torch.exp(-logvar_p) - 1.0)
    return kl.sum(-1)


def kl_logvar(logvar: Tensor, legacy_sigma: bool = False) -> Tensor:
    """The log-variance a KL term should see: `logvar`, or 2*logvar under `legacy_sigma` (bug B2).

    The released code builds ``Normal(mu, scale=exp(logvar))`` for its KL terms, i.e. it treats
    ``logvar`` as a log-std there (variance ``exp(2*logvar)``) while sampling with std
    ``exp(0.5*logvar)``. Passing ``kl_logvar(lv, True)`` to :func:`kl_normal` reproduces those
    numbers; sampling is unaffected. [N,L] -> [N,L].
    """
    return 2.0 * logvar if legacy_sigma else logvar


def _expert_weights(weights: Sequence[float] | Tensor | None, k: int, ref: Tensor, normalise: bool) -> Tensor:
    """Validate per-expert weights -> [K] tensor on ref's device (uniform/ones when None)."""
    if weights is None:
        w = torch.ones(k, device=ref.device, dtype=ref.dtype)
        return w / k if normalise else w
    if isinstance(weights, Tensor):
        # tensor weights (e.g. js_divergence's validated ones, passed on to poe) are taken as they are:
        # checking their values would make the host wait for the device
        w = weights.to(device=ref.device, dtype=ref.dtype).flatten()
        values = None
    else:
        values = [float(x) for x in weights]
        w = torch.tensor(values, device=ref.device, dtype=ref.dtype)
    if w.numel() != k:
        raise ValueError(f"expected {k} expert weights, got {w.numel()}")
    if values is not None and (any(x < 0 for x in values) or sum(values) <= 0):
        raise ValueError(f"expert weights must be non-negative with a positive sum, got {values}")
    return w / w.sum() if normalise else w


def _check_stack(name: str, mus: Tensor, logvars: Tensor) -> None:
    """Raise ValueError unless mus/logvars are matching [K,N,L] stacks."""
    if mus.dim() != 3 or mus.shape != logvars.shape:
        raise ValueError(
            f"{name}: mus and logvars must both be [K,N,L] with equal shapes, "
            f"got {tuple(mus.shape)} and {tuple(logvars.shape)}"
        )


def _append_standard_normal(mus: Tensor, logvars: Tensor) -> tuple[Tensor, Tensor]:
    """Append the N(0,I) expert: [K,N,L] -> [K+1,N,L]."""
    zero = torch.zeros_like(mus[:1])
    return torch.cat([mus, zero]), torch.cat([logvars, zero])


def poe(
    mus: Tensor,
    logvars: Tensor,
    include_prior_expert: bool = True,
    weights: Sequence[float] | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Product of Gaussian experts (optionally with a N(0,I) expert); [E,N,L] -> ([N,L], [N,L]).

    Precision-weighted: ``1/var = sum_e w_e/var_e``, ``mu = var * sum_e w_e mu_e/var_e``. With
    ``weights=None`` all w_e = 1 (the MVAE product); normalised weights give the weighted geometric
    mean used as the dynamic prior of :func:`js_divergence`. When the prior expert is included,
    `weights` (if given) must cover E+1 experts, the prior last.
    """
    _check_stack("poe", mus, logvars)
    if include_prior_expert:
        mus, logvars = _append_standard_normal(mus, logvars)
    w = _expert_weights(weights, mus.shape[0], mus, normalise=False)
    log_prec = torch.log(w).view(-1, 1, 1) - logvars  # [E,N,L] log(w_e / var_e)
    log_total = torch.logsumexp(log_prec, dim=0)  # [N,L] log(sum_e w_e/var_e)
    mu = (torch.exp(log_prec - log_total) * mus).sum(0)  # precision-weighted mean
    return mu, -log_total


def _log_mixture(z: Tensor, mus: Tensor, logvars: Tensor, log_w: Tensor) -> Tensor:
    """log sum_j w_j N(z; mu_j, var_j): z [...,N,L], mus [J,N,L], log_w [J] -> [...,N]."""
    lp = log_normal(z.unsqueeze(-3), mus, logvars)  # [...,J,N]
    return torch.logsumexp(lp + log_w.view(-1, 1), dim=-2)


def moe_kl(
    mus_q: Tensor,
    logvars_q: Tensor,
    mus_p: Tensor,
    logvars_p: Tensor,
    weights_q: Sequence[float] | Tensor | None = None,
    weights_p: Sequence[float] | Tensor | None = None,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """KL(sum_e pi_e q_e || sum_j rho_j p_j) by stratified sampling (MMVAE); [E,N,L] -> [N].

    Estimator: ``sum_e pi_e * (1/S) sum_s [log q_mix(z_es) - log p_mix(z_es)]`` with
    ``z_es = mu_e + sigma_e * eps`` drawn from *each* component e (S = `num_samples` per
    component). Drawing from every component in proportion to its weight is importance sampling
    of the mixture with the stratified proposal; the estimate is unbiased and reparameterised, so
    gradients reach every component. The target p may be a mixture ``[J,N,L]`` or one Gaussian
    ``[N,L]``. Mixture weights default to uniform and are normalised.
    """
    _check_stack("moe_kl (q)", mus_q, logvars_q)
    if mus_p.dim() == 2:
        mus_p, logvars_p = mus_p.unsqueeze(0), logvars_p.unsqueeze(0)  # [N,L] -> [1,N,L]
    _check_stack("moe_kl (p)", mus_p, logvars_p)
    if num_samples < 1:
        raise ValueError(f"moe_kl: num_samples must be >= 1, got {num_samples}")
    e, n, dim = mus_q.shape
    wq = _expert_weights(weights_q, e, mus_q, normalise=True)
    wp = _expert_weights(weights_p, mus_p.shape[0], mus_q, normalise=True)
    eps = _randn((e, num_samples, n, dim), mus_q, generator)
    z = mus_q.unsqueeze(1) + torch.exp(0.5 * logvars_q).unsqueeze(1) * eps  # [E,S,N,L]
    log_ratio = _log_mixture(z, mus_q, logvars_q, torch.log(wq)) - _log_mixture(
        z, mus_p, logvars_p, torch.log(wp)
    )  # [E,S,N]
    return (wq.view(-1, 1) * log_ratio.mean(1)).sum(0)


def js_divergence(
    mus: Tensor,
    logvars: Tensor,
    weights: Sequence[float] | Tensor | None = None,
    include_prior_expert: bool = False,
    estimator: str = "geometric",
    num_samples: int = 16,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Multi-distribution Jensen-Shannon divergence ``sum_k pi_k KL(q_k || f)``; [K,N,L] -> [N].

    ``estimator="geometric"`` (default, closed form; Sutter et al. 2020, mmJSD): f is the dynamic
    prior, the normalised weighted geometric mean ``f ∝ prod_k q_k^{pi_k}`` -- a Gaussian with
    precision ``sum_k pi_k / var_k`` (:func:`poe` with weights pi) -- so every term is a closed-form
    Gaussian KL. It is symmetric (permutation-invariant for uniform pi), >= 0 and exactly 0 iff all
    q_k are equal, but **not bounded by log 2**: it grows with the squared mean separation.

    ``estimator="mixture"``: the classical JS with the arithmetic mixture ``m = sum_k pi_k q_k``,
    estimated by reparameterised Monte Carlo with `num_samples` draws per distribution:
    ``sum_k pi_k mean_s [log q_k(z_ks) - log m(z_ks)]``. Every sample term is <= -log pi_k, so the
    estimate is always <= H(pi) (= log 2 for two distributions with equal weights).

    With ``include_prior_expert`` the N(0,I) prior joins the set as distribution K+1 (mmJSD's
    ``JS(q_1..q_K, p(z))``); `weights` (if given) must then have K+1 entries, prior last.
    """
    _check_stack("js_divergence", mus, logvars)
    if estimator not in _JS_ESTIMATORS:
        raise ValueError(f"js_divergence: estimator must be one of {_JS_ESTIMATORS}, got {estimator!r}")
    if include_prior_expert:
        mus, logvars = _append_standard_normal(mus, logvars)
    k = mus.shape[0]
    pi = _expert_weights(weights, k, mus, normalise=True)
    if estimator == "geometric":
        mu_f, logvar_f = poe(mus, logvars, include_prior_expert=False, weights=pi)
        kls = kl_normal(mus, logvars, mu_f.unsqueeze(0), logvar_f.unsqueeze(0))  # [K,N]
        return (pi.view(-1, 1) * kls).sum(0)
    if num_samples < 1:
        raise ValueError(f"js_divergence: num_samples must be >= 1, got {num_samples}")
    eps = _randn((k, num_samples) + tuple(mus.shape[1:]), mus, generator)
    z = mus.unsqueeze(1) + torch.exp(0.5 * logvars).unsqueeze(1) * eps  # [K,S,N,L]
    log_own = log_normal(z, mus.unsqueeze(1), logvars.unsqueeze(1))  # [K,S,N]
    log_m = _log_mixture(z, mus, logvars, torch.log(pi))  # [K,S,N]
    return (pi.view(-1, 1) * (log_own - log_m).mean(1)).sum(0)


def sampled_js_surrogate(
    mu_s: Tensor,
    logvar_s: Tensor,
    mu_t: Tensor,
    logvar_t: Tensor,
    generator: torch.Generator | None = None,
    rows: Tensor | None = None,
) -> Tensor:
    """The ECMVAE release's ``compute_js_loss``: a one-sample surrogate on density *values*; [N,L] x4 -> scalar.

    One sample per element is drawn from N(mu, exp(logvar/2)) of the source and of the target
    (no gradient through the draw), each density value p = exp(log N(z; mu, var)) is taken per
    element, m = (p_s + p_t)/2, and the result is 0.5 * [sum p_s log(p_s/m) + sum p_t log(p_t/m)] / N
    (``F.kl_div(log m, p, reduction="batchmean")``). Not a divergence between the Gaussians: the
    values may exceed 1 and the estimate is random; kept only to reproduce the release. With `rows`
    (bool [N]) the sums and N are over those rows only (the draws are made for every row, as without).
    """
    for name, t in (("logvar_s", logvar_s), ("mu_t", mu_t), ("logvar_t", logvar_t)):
        if t.shape != mu_s.shape:
            raise ValueError(
                f"sampled_js_surrogate: {name} must have the shape of mu_s {tuple(mu_s.shape)}, got {tuple(t.shape)}"
            )

    def elementwise_log_density(mu: Tensor, logvar: Tensor) -> Tensor:
        z = (mu + _randn(mu.shape, mu, generator) * torch.exp(0.5 * logvar)).detach()
        return -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + math.log(2.0 * math.pi))  # [N,L]

    log_ps = elementwise_log_density(mu_s, logvar_s)
    log_pt = elementwise_log_density(mu_t, logvar_t)
    p_s, p_t = log_ps.exp(), log_pt.exp()
    log_m = torch.log(0.5 * (p_s + p_t))
    terms = p_s * (log_ps - log_m), p_t * (log_pt - log_m)  # [N,L] each
    if rows is None:
        return 0.5 * (terms[0].sum() + terms[1].sum()) / mu_s.shape[0]
    keep = rows.to(device=mu_s.device, dtype=torch.bool)[:, None]
    n = keep.sum().clamp(min=1).to(mu_s.dtype)
    return 0.5 * (torch.where(keep, terms[0], 0.0).sum() + torch.where(keep, terms[1], 0.0).sum()) / n
