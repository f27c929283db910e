"""ECMVAE latent machinery: Gaussian latent encoders, fused codes, injection, L_diff and L_sic.

Mao et al., ICCV 2023 (ECMVAE). Layer sizes follow the released ``mm_vae_model``
(``research/ecmvae_spec.md`` §8-§9): at 224 px, L=16, C=128 the factorised module has
2,158,804 parameters (spec: 2.159 M), at L=48 3,034,964 (spec: 3.035 M).

Names map to the paper: ``s_v`` = phi_sv (visual-specific), ``s_a`` = phi_sa (audio-specific),
``c`` = phi_c (shared). Every latent is computed per frame: N = B*T rows. The segmentor calls
``encode -> sample (prior, posterior) -> inject (deepest neck map) -> losses``; see
``docs/ecmvae_notes.md`` for how the trainer weights the returned terms.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from avs.models.divergences import (
    js_divergence,
    kl_logvar,
    kl_normal,
    moe_kl,
    poe,
    reparameterize,
    sampled_js_surrogate,
)

__all__ = [
    "PAPER_LOSS_WEIGHTS",
    "RELEASED_LOSS_WEIGHTS",
    "hybrid_loss_weights",
    "Gaussian",
    "LatentState",
    "GaussianLatentEncoder",
    "BarberAgakovMI",
    "diff_loss",
    "ECMVAELatent",
]

log = logging.getLogger(__name__)

# Loss weights of the paper (Eq. 6 beta on the KL term, Eq. 8 hybrid, Eq. 13 lambda_1 / lambda_2;
# alpha_2 = 0.5 averages L_sic over the posterior and prior branches). alpha_1 of Eq. 8 is not in our
# sources: choose it in config (see hybrid_loss_weights and docs/ecmvae_notes.md).
PAPER_LOSS_WEIGHTS: dict[str, float] = {"beta": 0.1, "diff": 0.001, "sic": 0.01, "alpha2": 0.5}

# Defaults of the released config.py (--mi_loss, --diff_loss, --kl_loss, --sim_loss). No released
# file consumes them (spec §10.8). "mi" multiplies the released lld (sum over both branches, <= 0,
# to be maximised), i.e. 2*mi on our `sic` (mean over branches, minimised); "sim" is the A-V
# mapping (AVM) loss weight.
RELEASED_LOSS_WEIGHTS: dict[str, float] = {"mi": 0.001, "diff": 0.001, "kl": 0.01, "sim": 0.5}

VARIANTS = ("factorised", "no_factor", "visual_only", "ae")
DIVERGENCES = ("kl", "poe", "moe", "js", "js_sampled")
BRANCHES = ("prior", "posterior")

_LEAKY_SLOPE = 0.01  # LeakyReLU default slope used by the released encoders
_SPATIAL_EMBED = 32  # released fc_gt_vector width (audio+spatial encoders)
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
    """Distributions from `ECMVAELatent.encode`; `draws[branch]` is filled by `sample`.

    Keys of `prior` / `posterior`: "s_v", "s_a", "c" (those the variant uses). `draws[branch]`
    holds the component draws, the fused codes "sc_v"/"sc_a" (when factorised) and "code".
    """

    prior: dict[str, Gaussian]
    posterior: dict[str, Gaussian] | None = None
    draws: dict[str, dict[str, Tensor]] = field(default_factory=dict)


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

    def forward(self, sc_v: Tensor, sc_a: Tensor) -> Tensor:
        """sc_v [N,L], sc_a [N,L] -> scalar negative BA log-likelihood (mean over N, sum over M)."""
        mu = torch.tanh(self.mu(sc_v))  # [N,M]
        logvar = torch.tanh(self.logvar(sc_v))  # [N,M], variance in (e^-1, e)
        t = torch.tanh(self.target(sc_a))  # [N,M]
        nll = 0.5 * (t - mu).pow(2) * torch.exp(-logvar)
        if not self.legacy_lld:
            nll = nll + 0.5 * (logvar + math.log(2.0 * math.pi))
        return nll.sum(1).mean()


def diff_loss(x1: Tensor, x2: Tensor) -> Tensor:
    """Orthogonality L_diff (DSN style): [N,L] x2 -> scalar mean((X1~^T X2~)^2) over the LxL entries.

    Each code is centred over the batch, then every row is divided by its (detached) L2 norm
    + 1e-6, as in the released DiffLoss. Zero when the centred codes are orthogonal across the batch.
    """
    if x1.dim() != 2 or x2.dim() != 2 or x1.shape[0] != x2.shape[0]:
        raise ValueError(f"diff_loss: need two [N,L] codes, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    x1 = x1 - x1.mean(0, keepdim=True)
    x2 = x2 - x2.mean(0, keepdim=True)
    x1 = x1 / (x1.detach().norm(dim=1, keepdim=True) + _DIFF_EPS)
    x2 = x2 / (x2.detach().norm(dim=1, keepdim=True) + _DIFF_EPS)
    return (x1.t() @ x2).pow(2).mean()  # [L1,N]@[N,L2] -> [L1,L2]


class ECMVAELatent(nn.Module):
    """ECMVAE latent part: prior/posterior encoders, fused codes, deepest-level injection, losses.

    variant: ``factorised`` (ECMVAE: s_v, s_a, c; KL/divergence + L_diff + L_sic), ``no_factor``
    (CMVAE: s_v, s_a fused by one Linear; KL only), ``visual_only`` (CVAE: s_v; no audio),
    ``ae`` (factorised with deterministic codes; L_diff + L_sic, no KL).
    divergence (factorised only; see docs/ecmvae_notes.md): ``kl`` / ``js`` keep the Linear fusion
    sc = f(s, c) and put KL(post||prior) resp. the closed-form mmJSD JS on the shared code c;
    ``poe`` / ``moe`` replace the fusion by a product (with N(0,I)) resp. a mixture of the s and c
    experts and regularise the fused posterior against the fused prior (closed form / sampled).
    """

    def __init__(
        self,
        channels: int = 128,
        audio_dim: int = 128,
        latent_dim: int = 16,
        mi_dim: int = 6,
        image_size: int = 224,
        variant: str = "factorised",
        divergence: str = "js",
        noise_2d: bool = False,
        legacy_sigma: bool = False,
        legacy_lld: bool = False,
        legacy_test_sample: bool = False,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"model.latent.variant must be one of {VARIANTS}, got {variant!r}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"model.latent.divergence must be one of {DIVERGENCES}, got {divergence!r}")
        sizes = {"channels": channels, "audio_dim": audio_dim, "latent_dim": latent_dim, "mi_dim": mi_dim}
        for key, value in sizes.items():
            if value < 1:
                raise ValueError(f"model.latent.{key} must be >= 1, got {value}")
        if channels < 8:
            raise ValueError(
                f"model.latent.channels must be >= 8 (encoder base width = channels // 8), got {channels}"
            )
        if variant != "factorised" and divergence != "js":
            log.info("model.latent.divergence=%r has no effect for variant=%r (no shared code)", divergence, variant)
        self.channels = channels
        self.audio_dim = audio_dim
        self.latent_dim = latent_dim
        self.image_size = image_size
        self.variant = variant
        self.divergence = divergence
        self.noise_2d = noise_2d
        self.legacy_sigma = legacy_sigma
        # release test path: a random prior code per frame instead of the prior mean (eval K = 1)
        self.legacy_test_sample = bool(legacy_test_sample)
        self.factorised = variant in ("factorised", "ae")
        self.uses_audio = variant != "visual_only"
        # fusion of specific + shared codes: Linear (released), PoE or MoE (factorised only)
        self.fusion = divergence if variant == "factorised" and divergence in ("poe", "moe") else "linear"
        det = variant == "ae"
        base = channels // 8  # released: NECK_CHANNEL / 8 = 16
        img_widths = (base, 2 * base, 4 * base, 8 * base, 8 * base)
        av_widths = (base, 2 * base, 4 * base, 4 * base, 4 * base)
        L = latent_dim

        def image_enc(k: int) -> GaussianLatentEncoder:
            return GaussianLatentEncoder(L, k, img_widths, image_size, deterministic=det)

        def audio_spatial_enc(k: int) -> GaussianLatentEncoder:
            return GaussianLatentEncoder(
                L, k, av_widths, image_size, spatial_embed=_SPATIAL_EMBED, audio_dim=audio_dim, deterministic=det
            )

        # prior (frames [+ audio]) and posterior (frames + mask [+ audio]) encoders
        self.enc_vs = image_enc(3)
        self.enc_vs_y = image_enc(4)
        if self.uses_audio:
            self.enc_as = GaussianLatentEncoder(L, audio_dim=audio_dim, deterministic=det)
            self.enc_as_y = audio_spatial_enc(1)  # sees the mask, not the image
        if self.factorised:
            self.enc_vac = audio_spatial_enc(3)
            self.enc_vac_y = audio_spatial_enc(4)
        if self.factorised and self.fusion == "linear":
            self.sc1_prior = nn.Linear(2 * L, L)  # sc_v = f(s_v, c)
            self.sc2_prior = nn.Linear(2 * L, L)  # sc_a = f(s_a, c)
            self.sc1_posterior = nn.Linear(2 * L, L)
            self.sc2_posterior = nn.Linear(2 * L, L)
        if variant == "no_factor":
            self.sc_prior = nn.Linear(2 * L, L)
            self.sc_posterior = nn.Linear(2 * L, L)
        self.code_dim = 2 * L if self.factorised else L
        self.noise_model_prior = nn.Conv2d(channels + self.code_dim, channels, kernel_size=1)
        self.noise_model_post = nn.Conv2d(channels + self.code_dim, channels, kernel_size=1)
        if self.factorised:
            self.ba_prior = BarberAgakovMI(L, mi_dim, legacy_lld=legacy_lld)
            self.ba_post = BarberAgakovMI(L, mi_dim, legacy_lld=legacy_lld)

    # ------------------------------------------------------------------ encode
    def encode(self, frames: Tensor, audio: Tensor | None = None, masks: Tensor | None = None) -> LatentState:
        """frames [N,3,H,W], audio [N,A] | None, masks [N,1,H,W] | None -> LatentState (posterior iff masks)."""
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"ECMVAELatent.encode: frames must be [N,3,H,W], got {tuple(frames.shape)}")
        n, _, h, w = frames.shape
        if self.uses_audio:
            if audio is None:
                raise ValueError(
                    f"ECMVAELatent.encode: variant {self.variant!r} needs audio [N,{self.audio_dim}], got None"
                )
            if audio.dim() != 2 or tuple(audio.shape) != (n, self.audio_dim):
                raise ValueError(
                    f"ECMVAELatent.encode: audio must be [N,audio_dim]=[{n},{self.audio_dim}], "
                    f"got {tuple(audio.shape)}"
                )
            audio = audio.to(frames.dtype)
        prior = {"s_v": self.enc_vs(frames)}
        if self.uses_audio:
            prior["s_a"] = self.enc_as(audio=audio)
        if self.factorised:
            prior["c"] = self.enc_vac(frames, audio)
        posterior = None
        if masks is not None:
            if masks.dim() != 4 or tuple(masks.shape) != (n, 1, h, w):
                raise ValueError(
                    f"ECMVAELatent.encode: masks must be [N,1,H,W]=[{n},1,{h},{w}], got {tuple(masks.shape)}"
                )
            masks = masks.to(frames.dtype)
            xy = torch.cat([frames, masks], dim=1)  # [N,4,H,W]
            posterior = {"s_v": self.enc_vs_y(xy)}
            if self.uses_audio:
                posterior["s_a"] = self.enc_as_y(masks, audio)
            if self.factorised:
                posterior["c"] = self.enc_vac_y(xy, audio)
        return LatentState(prior=prior, posterior=posterior)

    # ------------------------------------------------------------------ sample
    def _dists(self, state: LatentState, branch: str) -> dict[str, Gaussian]:
        if branch not in BRANCHES:
            raise ValueError(f"ECMVAELatent: branch must be one of {BRANCHES}, got {branch!r}")
        if branch == "prior":
            return state.prior
        if state.posterior is None:
            raise ValueError("ECMVAELatent: no posterior in this state; call encode(..., masks=...) first")
        return state.posterior

    @staticmethod
    def _poe_joint(s: Gaussian, c: Gaussian) -> Gaussian:
        """PoE of N(0,I), the specific and the shared expert -> Gaussian [N,L]."""
        mu, logvar = poe(torch.stack([s.mu, c.mu]), torch.stack([s.logvar, c.logvar]), include_prior_expert=True)
        return Gaussian(mu, logvar)

    def sample(
        self,
        state: LatentState,
        branch: str,
        generator: torch.Generator | None = None,
        use_mean: bool = False,
    ) -> Tensor:
        """Draw the branch's latents and return the fused code [N, code_dim] that `inject` consumes."""
        dists = self._dists(state, branch)

        def draw(g: Gaussian) -> Tensor:
            if use_mean or g.logvar is None:
                return g.mu
            return reparameterize(g.mu, g.logvar, generator)

        z = {name: draw(g) for name, g in dists.items()}
        rec: dict[str, Tensor] = dict(z)
        post = branch == "posterior"
        if self.variant == "visual_only":
            code = z["s_v"]
        elif self.variant == "no_factor":
            fuse = self.sc_posterior if post else self.sc_prior
            code = fuse(torch.cat([z["s_v"], z["s_a"]], dim=1))  # [N,2L] -> [N,L]
        else:
            if self.fusion == "linear":
                f_v = self.sc1_posterior if post else self.sc1_prior
                f_a = self.sc2_posterior if post else self.sc2_prior
                sc_v = f_v(torch.cat([z["s_v"], z["c"]], dim=1))  # [N,2L] -> [N,L]
                sc_a = f_a(torch.cat([z["s_a"], z["c"]], dim=1))
            elif self.fusion == "poe":
                sc_v = draw(self._poe_joint(dists["s_v"], dists["c"]))
                sc_a = draw(self._poe_joint(dists["s_a"], dists["c"]))
            else:  # moe: one mixture component per item, uniform weights
                if use_mean:
                    sc_v = 0.5 * (z["s_v"] + z["c"])
                    sc_a = 0.5 * (z["s_a"] + z["c"])
                else:
                    pick = self._coin(z["c"], generator)  # [2,N,1] bool
                    sc_v = torch.where(pick[0], z["s_v"], z["c"])
                    sc_a = torch.where(pick[1], z["s_a"], z["c"])
            rec["sc_v"], rec["sc_a"] = sc_v, sc_a
            code = torch.cat([sc_v, sc_a], dim=1)  # [N,2L]
        rec["code"] = code
        state.draws[branch] = rec
        return code

    @staticmethod
    def _coin(ref: Tensor, generator: torch.Generator | None) -> Tensor:
        """Two fair coins per row of ref [N,L] -> bool [2,N,1] on ref's device."""
        n = ref.shape[0]
        if generator is None:
            u = torch.rand(2, n, 1, device=ref.device)
        else:
            u = torch.rand(2, n, 1, generator=generator, device=generator.device).to(ref.device)
        return u < 0.5

    # ------------------------------------------------------------------ inject
    def inject(self, feat: Tensor, code: Tensor, branch: str, generator: torch.Generator | None = None) -> Tensor:
        """Tile code [N,D] over feat [N,C,h,w], concat, 1x1 conv back to C -> [N,C,h,w]."""
        if branch not in BRANCHES:
            raise ValueError(f"ECMVAELatent.inject: branch must be one of {BRANCHES}, got {branch!r}")
        if feat.dim() != 4 or feat.shape[1] != self.channels:
            raise ValueError(
                f"ECMVAELatent.inject: feat must be [N,{self.channels},h,w] (model.latent.channels), "
                f"got {tuple(feat.shape)}"
            )
        if code.dim() != 2 or tuple(code.shape) != (feat.shape[0], self.code_dim):
            raise ValueError(
                f"ECMVAELatent.inject: code must be [N,code_dim]=[{feat.shape[0]},{self.code_dim}], "
                f"got {tuple(code.shape)}"
            )
        h, w = feat.shape[-2:]
        tiled = code.to(feat.dtype)[:, :, None, None].expand(-1, -1, h, w)  # [N,D] -> [N,D,h,w]
        if self.noise_2d and self.training:
            if generator is None:
                noise = torch.randn_like(tiled)
            else:
                noise = torch.randn(tiled.shape, generator=generator, device=generator.device, dtype=tiled.dtype)
                noise = noise.to(tiled.device)
            tiled = tiled + noise  # independent N(0,1) per position and channel
        conv = self.noise_model_post if branch == "posterior" else self.noise_model_prior
        return conv(torch.cat([feat, tiled], dim=1))  # [N,C+D,h,w] -> [N,C,h,w]

    # ------------------------------------------------------------------ losses
    def _kl(self, q: Gaussian, p: Gaussian) -> Tensor:
        """Batch-mean closed-form KL(q || p) (legacy_sigma: the released exp(logvar) scale)."""
        ls = self.legacy_sigma
        return kl_normal(q.mu, kl_logvar(q.logvar, ls), p.mu, kl_logvar(p.logvar, ls)).mean()

    def _kl_term(self, q: dict[str, Gaussian], p: dict[str, Gaussian]) -> Tensor:
        """The "kl" term from posterior q and prior p distributions (scalar, batch-mean)."""
        if self.variant == "visual_only":
            return self._kl(q["s_v"], p["s_v"])
        if self.variant == "no_factor":
            return self._kl(q["s_v"], p["s_v"]) + self._kl(q["s_a"], p["s_a"])
        if self.fusion == "poe":
            return self._kl(self._poe_joint(q["s_v"], q["c"]), self._poe_joint(p["s_v"], p["c"])) + self._kl(
                self._poe_joint(q["s_a"], q["c"]), self._poe_joint(p["s_a"], p["c"])
            )
        if self.fusion == "moe":
            total = q["c"].mu.new_zeros(())
            for s in ("s_v", "s_a"):
                total = total + moe_kl(
                    torch.stack([q[s].mu, q["c"].mu]),
                    torch.stack([q[s].logvar, q["c"].logvar]),
                    torch.stack([p[s].mu, p["c"].mu]),
                    torch.stack([p[s].logvar, p["c"].logvar]),
                ).mean()
            return total
        specific = self._kl(q["s_v"], p["s_v"]) + self._kl(q["s_a"], p["s_a"])
        if self.divergence == "kl":
            return specific + self._kl(q["c"], p["c"])
        if self.divergence == "js_sampled":  # the release's compute_js_loss(prior, posterior)
            return specific + sampled_js_surrogate(p["c"].mu, p["c"].logvar, q["c"].mu, q["c"].logvar)
        shared = js_divergence(
            torch.stack([q["c"].mu, p["c"].mu]), torch.stack([q["c"].logvar, p["c"].logvar])
        ).mean()
        return specific + shared

    def losses(self, state: LatentState, codes: dict[str, Tensor]) -> dict[str, Tensor]:
        """Unweighted scalar terms: "kl" (not ae); "diff", "sic" (factorised/ae, over the branches in codes)."""
        if state.posterior is None:
            raise ValueError("ECMVAELatent.losses: the state has no posterior; encode with masks in training")
        unknown = set(codes) - set(BRANCHES)
        if unknown:
            raise ValueError(f"ECMVAELatent.losses: codes keys must be in {BRANCHES}, got {sorted(unknown)}")
        out: dict[str, Tensor] = {}
        if self.variant != "ae":
            out["kl"] = self._kl_term(state.posterior, state.prior)
        if not self.factorised or not codes:
            return out
        diff_terms, sic_terms = [], []
        for branch in BRANCHES:
            if branch not in codes:
                continue
            rec = state.draws.get(branch)
            if rec is None:
                raise ValueError(f"ECMVAELatent.losses: call sample(state, {branch!r}) before losses")
            code = codes[branch]
            if code.dim() != 2 or code.shape[1] != self.code_dim:
                raise ValueError(
                    f"ECMVAELatent.losses: codes[{branch!r}] must be [N,{self.code_dim}], got {tuple(code.shape)}"
                )
            diff_terms.append(diff_loss(rec["s_v"], rec["c"]) + diff_loss(rec["s_a"], rec["c"]))
            sc_v, sc_a = code.split(self.latent_dim, dim=1)  # [N,2L] -> 2 x [N,L]
            heads = self.ba_post if branch == "posterior" else self.ba_prior
            sic_terms.append(heads(sc_v, sc_a))
        out["diff"] = torch.stack(diff_terms).sum()  # released: summed over both branches
        out["sic"] = torch.stack(sic_terms).mean()  # alpha_2 = 0.5 over posterior and prior
        return out

    # ------------------------------------------------------------------ exports
    def export_codes(self, state: LatentState) -> dict[str, Tensor]:
        """Prior means for t-SNE: {"s_v", "s_a", "c"} (those the variant has), each [N,L], detached."""
        return {name: g.mu.detach() for name, g in state.prior.items()}

    def inference_parameters(self) -> int:
        """Trainable parameters used at test time (prior encoders, prior fusion, prior injection)."""
        names = ("enc_vs", "enc_as", "enc_vac", "sc1_prior", "sc2_prior", "sc_prior", "noise_model_prior")
        mods = [getattr(self, n) for n in names if hasattr(self, n)]
        return sum(p.numel() for m in mods for p in m.parameters() if p.requires_grad)
