"""Building blocks of the ECMVAE latent part: Gaussians, latent encoders, the L_sic heads, L_diff.

Layer sizes follow the released ``mm_vae_model``; `avs.models.latent` assembles them per variant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "PAPER_LOSS_WEIGHTS",
    "RELEASED_LOSS_WEIGHTS",
    "BRANCHES",
    "hybrid_loss_weights",
    "Gaussian",
    "LatentState",
    "GaussianLatentEncoder",
    "BarberAgakovMI",
    "diff_loss",
    "free_bits_sum",
    "row_mean",
    "FREE_BITS_DIVERGENCES",
]

# Loss weights of the paper (Eq. 6 beta on the KL term, Eq. 8 hybrid, Eq. 13 lambda_1 / lambda_2;
# alpha_2 = 0.5 averages L_sic over the posterior and prior branches). alpha_1 of Eq. 8 is not in our
# sources: choose it in config (see hybrid_loss_weights and docs/ecmvae_notes.md).
PAPER_LOSS_WEIGHTS: dict[str, float] = {"beta": 0.1, "diff": 0.001, "sic": 0.01, "alpha2": 0.5}

# Defaults of the released config.py (--mi_loss, --diff_loss, --kl_loss, --sim_loss). No released
# file consumes them. "mi" multiplies the released lld (sum over both branches, <= 0,
# to be maximised), i.e. 2*mi on our `sic` (mean over branches, minimised); "sim" is the A-V
# mapping (AVM) loss weight.
RELEASED_LOSS_WEIGHTS: dict[str, float] = {"mi": 0.001, "diff": 0.001, "kl": 0.01, "sim": 0.5}

BRANCHES = ("prior", "posterior")

_LEAKY_SLOPE = 0.01  # LeakyReLU default slope used by the released encoders
SPATIAL_EMBED = 32  # released fc_gt_vector width (audio+spatial encoders)
_NUM_DOWN = 5  # stride-2 convolutions per spatial encoder (224 -> 7)
_DIFF_EPS = 1e-6


def hybrid_loss_weights(
    alpha1: float,
    beta: float = PAPER_LOSS_WEIGHTS["beta"],
    diff: float = PAPER_LOSS_WEIGHTS["diff"],
    sic: float = PAPER_LOSS_WEIGHTS["sic"],
) -> dict[str, float]:
    """Per-term trainer weights for Eq. 8: alpha1*(seg_post + beta*kl) + (1-alpha1)*seg_prior + diff + sic."""
    if not 0.0 <= alpha1 <= 1.0:
        raise ValueError(f"loss alpha1 must be in [0, 1], got {alpha1}")
    return {
        "seg_post": alpha1,
        "kl": alpha1 * beta,
        "seg_prior": 1.0 - alpha1,
        "diff": diff,
        "sic": sic,
    }


@dataclass
class Gaussian:
    """Diagonal Gaussian (mu [N,L], logvar [N,L]); logvar None means a deterministic code."""

    mu: Tensor
    logvar: Tensor | None = None


@dataclass
class LatentState:
    """Distributions from a latent's `encode`; `draws[branch]` is filled by `sample`.

    Keys of `prior` / `posterior`: "s_v", "s_a", "c" (those the variant uses). `draws[branch]`
    holds the component draws, the fused codes "sc_v"/"sc_a" (when factorised) and "code".
    """

    prior: dict[str, Gaussian]
    posterior: dict[str, Gaussian] | None = None
    draws: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    # bool [N]: the rows (frames) the latent terms count, the real frames of AVSS clips (frame_valid);
    # None = every row (S4/MS3: the plain means over the N = B*T rows)
    rows: Tensor | None = None


def row_mean(values: Tensor, rows: Tensor | None = None) -> Tensor:
    """Mean over the rows of [N] (or [N,L] -> [L]) values; with `rows` (bool [N]) over the True rows only.

    rows None: `values.mean()` ([N]) / `values.mean(0)` ([N,L]), the expressions of before (S4/MS3).
    Masked arithmetic (no boolean indexing, no host sync); a row left out adds exactly 0 and gets no
    gradient; no row kept -> 0.
    """
    if rows is None:
        return values.mean() if values.dim() == 1 else values.mean(0)
    if rows.dim() != 1 or rows.shape[0] != values.shape[0]:
        raise ValueError(f"row_mean: rows must be a [N]={values.shape[0]} bool vector, got {tuple(rows.shape)}")
    keep = rows.to(device=values.device, dtype=torch.bool).view(-1, *([1] * (values.dim() - 1)))
    return torch.where(keep, values, 0.0).sum(0) / keep.sum().clamp(min=1).to(values.dtype)


# Divergences whose regulariser is a sum of closed-form per-dimension terms, so free bits can floor each
# dimension: the Linear fusion's KL on every code (kl) or KL on s_v, s_a + geometric JS on c (js), and the
# KL between the PoE-fused Gaussians (poe). js_sampled and moe are one-sample estimates of quantities
# that do not split over dimensions (density values; a mixture of diagonal Gaussians is not diagonal).
FREE_BITS_DIVERGENCES = ("kl", "js", "poe")


def free_bits_sum(per_dim: Tensor, free_bits: float, rows: Tensor | None = None) -> Tensor:
    """Free bits per dimension (Kingma et al. 2016): [N,L] divergences -> scalar sum_d max(free_bits, mean_n).

    The batch mean of each dimension (over the `rows` only, when given: see `row_mean`) is floored at
    `free_bits` nats, so a dimension below the floor gets no gradient from the regulariser: each
    dimension may carry that much information at no cost.
    """
    if per_dim.dim() != 2:
        raise ValueError(f"free_bits_sum: need per-dimension values [N,L], got {tuple(per_dim.shape)}")
    return row_mean(per_dim, rows).clamp(min=free_bits).sum()


def _down_size(size: int, num_layers: int = _NUM_DOWN) -> int:
    """Spatial size after `num_layers` Conv(k4,s2,p1) layers: floor(size / 2^num_layers)."""
    for _ in range(num_layers):
        size = (size + 2 - 4) // 2 + 1
    return size


class GaussianLatentEncoder(nn.Module):
    """Latent encoder: [conv stack on a spatial input] (+) [audio vector] -> (mu [N,L], logvar [N,L]).

    Spatial branch: 5 x (Conv 4x4 stride 2 pad 1 + BN + LeakyReLU(0.01)) with `widths`, flattened
    at the size implied by `image_size` (inputs of another size are adaptive-average-pooled to it),
    then optionally a Linear to `spatial_embed` dims. Audio branch: the raw audio vector. The
    concatenation feeds two Linear heads (mu, logvar); `deterministic` builds the mu head only.
    """

    def __init__(
        self,
        latent_dim: int,
        spatial_channels: int | None = None,
        widths: Sequence[int] = (),
        image_size: int = 224,
        spatial_embed: int | None = None,
        audio_dim: int | None = None,
        deterministic: bool = False,
    ) -> None:
        super().__init__()
        if spatial_channels is None and audio_dim is None:
            raise ValueError("GaussianLatentEncoder needs a spatial input, an audio input, or both")
        self.spatial_channels = spatial_channels
        self.audio_dim = audio_dim
        feat_dim = 0
        self.convs = None
        self.fc_gt_vector = None
        if spatial_channels is not None:
            if len(widths) != _NUM_DOWN:
                raise ValueError(f"GaussianLatentEncoder: need {_NUM_DOWN} conv widths, got {list(widths)}")
            self.grid = _down_size(image_size)
            if self.grid < 1:
                raise ValueError(f"model.latent.image_size must be >= 32 (5 stride-2 convs), got {image_size}")
            layers: list[nn.Module] = []
            c_in = spatial_channels
            for c_out in widths:
                layers += [
                    nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1),
                    nn.BatchNorm2d(c_out),
                    nn.LeakyReLU(_LEAKY_SLOPE),
                ]
                c_in = c_out
            self.convs = nn.Sequential(*layers)
            flat = c_in * self.grid * self.grid
            if spatial_embed is not None:
                self.fc_gt_vector = nn.Linear(flat, spatial_embed)
                flat = spatial_embed
            feat_dim += flat
        if audio_dim is not None:
            feat_dim += audio_dim
        self.fc1 = nn.Linear(feat_dim, latent_dim)  # mu
        self.fc2 = None if deterministic else nn.Linear(feat_dim, latent_dim)  # logvar

    def forward(self, spatial: Tensor | None = None, audio: Tensor | None = None) -> Gaussian:
        """spatial [N,k,H,W] and/or audio [N,A] -> Gaussian(mu [N,L], logvar [N,L] | None)."""
        parts: list[Tensor] = []
        if self.audio_dim is not None:  # released order: [audio, spatial embedding]
            if audio is None:
                raise ValueError("GaussianLatentEncoder: this encoder needs its audio input")
            parts.append(audio)
        if self.convs is not None:
            if spatial is None:
                raise ValueError("GaussianLatentEncoder: this encoder needs its spatial input")
            h = self.convs(spatial)  # [N,k,H,W] -> [N,c,H/32,W/32]
            if h.shape[-2:] != (self.grid, self.grid):
                h = nn.functional.adaptive_avg_pool2d(h, self.grid)  # -> [N,c,g,g]
            h = h.flatten(1)  # [N,c*g*g]
            if self.fc_gt_vector is not None:
                h = self.fc_gt_vector(h)  # [N,32]
            parts.append(h)
        h = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # [N,A+32]
        return Gaussian(self.fc1(h), None if self.fc2 is None else self.fc2(h))


class BarberAgakovMI(nn.Module):
    """L_sic heads: q(t | sc_v) = N(mu(sc_v), diag exp(logvar(sc_v))) with t = target(sc_a).

    mu, logvar and target are Linear(L -> M) + tanh (the released BA heads). forward returns the
    loss to minimise, ``-E[log q(t | sc_v)]`` = ``-(I_BA - H(t))`` with H treated as constant.
    ``legacy_lld`` drops the ``0.5*logvar + 0.5*log(2 pi)`` normaliser like the released code.
    """

    def __init__(self, latent_dim: int, mi_dim: int, legacy_lld: bool = False) -> None:
        super().__init__()
        self.mu = nn.Linear(latent_dim, mi_dim)
        self.logvar = nn.Linear(latent_dim, mi_dim)
        self.target = nn.Linear(latent_dim, mi_dim)
        self.legacy_lld = legacy_lld

    def forward(self, sc_v: Tensor, sc_a: Tensor, rows: Tensor | None = None) -> Tensor:
        """sc_v [N,L], sc_a [N,L] -> scalar negative BA log-likelihood (mean over N or the `rows`, sum over M)."""
        mu = torch.tanh(self.mu(sc_v))  # [N,M]
        logvar = torch.tanh(self.logvar(sc_v))  # [N,M], variance in (e^-1, e)
        t = torch.tanh(self.target(sc_a))  # [N,M]
        nll = 0.5 * (t - mu).pow(2) * torch.exp(-logvar)
        if not self.legacy_lld:
            nll = nll + 0.5 * (logvar + math.log(2.0 * math.pi))
        return row_mean(nll.sum(1), rows)


def diff_loss(x1: Tensor, x2: Tensor, rows: Tensor | None = None) -> Tensor:
    """Orthogonality L_diff (DSN style): [N,L] x2 -> scalar mean((X1~^T X2~)^2) over the LxL entries.

    Each code is centred over the batch, then every row is divided by its (detached) L2 norm
    + 1e-6, as in the released DiffLoss. Zero when the centred codes are orthogonal across the batch.
    With `rows` (bool [N]) the batch is those rows: centred by their mean, the other rows set to 0 (so
    they add nothing to X1~^T X2~), the same value as on the kept rows alone.
    """
    if x1.dim() != 2 or x2.dim() != 2 or x1.shape[0] != x2.shape[0]:
        raise ValueError(f"diff_loss: need two [N,L] codes, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    if rows is None:
        x1 = x1 - x1.mean(0, keepdim=True)
        x2 = x2 - x2.mean(0, keepdim=True)
    else:
        keep = rows.to(device=x1.device, dtype=torch.bool)[:, None]
        x1 = torch.where(keep, x1 - row_mean(x1, rows), 0.0)
        x2 = torch.where(keep, x2 - row_mean(x2, rows), 0.0)
    x1 = x1 / (x1.detach().norm(dim=1, keepdim=True) + _DIFF_EPS)
    x2 = x2 / (x2.detach().norm(dim=1, keepdim=True) + _DIFF_EPS)
    return (x1.t() @ x2).pow(2).mean()  # [L1,N]@[N,L2] -> [L1,L2]
