"""ECMVAE latent part (Mao et al., ICCV 2023): one class per variant, picked by `build_latent`.

- `FactorisedLatent` (ECMVAE): visual-specific s_v, audio-specific s_a and shared c codes, fused
  into sc_v, sc_a by a code-fusion strategy (`avs.models.code_fusion`); KL / divergence + L_diff + L_sic.
- `AutoEncoderLatent` (AE): the factorised latent with deterministic codes; L_diff + L_sic, no KL.
- `NoFactorLatent` (CMVAE): s_v and s_a fused by one Linear; KL only.
- `VisualOnlyLatent` (CVAE): s_v only, no audio; KL only.

Layer sizes follow the released ``mm_vae_model``: at 224 px, L=16, C=128 the factorised module has
2,158,804 parameters, at L=48 3,034,964. Parameter names are the released ones, so checkpoints map
1:1. Every latent is computed per frame (N = B*T rows). The segmentor calls ``encode -> sample
(prior, posterior) -> inject (deepest neck map) -> losses``; ``docs/ecmvae_notes.md`` says how the
trainer weights the returned terms.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from avs.models.code_fusion import DIVERGENCES, make_code_fusion
from avs.models.divergences import kl_logvar, kl_normal, reparameterize
from avs.models.latent_parts import (
    BRANCHES,
    PAPER_LOSS_WEIGHTS,
    RELEASED_LOSS_WEIGHTS,
    SPATIAL_EMBED,
    BarberAgakovMI,
    Gaussian,
    GaussianLatentEncoder,
    LatentState,
    diff_loss,
    free_bits_sum,
    hybrid_loss_weights,
    row_mean,
)

__all__ = [
    "PAPER_LOSS_WEIGHTS",
    "RELEASED_LOSS_WEIGHTS",
    "DIVERGENCES",
    "VARIANTS",
    "hybrid_loss_weights",
    "Gaussian",
    "LatentState",
    "GaussianLatentEncoder",
    "BarberAgakovMI",
    "diff_loss",
    "Latent",
    "VisualOnlyLatent",
    "NoFactorLatent",
    "FactorisedLatent",
    "AutoEncoderLatent",
    "build_latent",
]

log = logging.getLogger(__name__)


class Latent(nn.Module):
    """Shared prior/posterior machinery: the visual-specific code s_v, sampling, injection, KL, exports.

    Subclasses add encoders (`build_encoders` / `encode_*`), say how the drawn codes become the
    injected code (`fuse`) and which terms they add (`kl_term`, `code_losses`).
    """

    variant: str = ""
    uses_audio: bool = False
    deterministic: bool = False
    has_kl: bool = True
    code_terms: tuple[str, ...] = ()  # the terms `code_losses` returns

    @classmethod
    def terms(cls) -> tuple[str, ...]:
        """Names of the loss terms `losses` returns in training (the segmentor declares them)."""
        return (("kl",) if cls.has_kl else ()) + cls.code_terms

    def __init__(
        self,
        channels: int = 128,
        audio_dim: int = 128,
        latent_dim: int = 16,
        mi_dim: int = 6,
        image_size: int = 224,
        noise_2d: bool = False,
        legacy_sigma: bool = False,
        legacy_lld: bool = False,
        legacy_test_sample: bool = False,
        free_bits: float = 0.0,
    ) -> None:
        super().__init__()
        _check_sizes(channels=channels, audio_dim=audio_dim, latent_dim=latent_dim, mi_dim=mi_dim)
        # nats per dimension below which a code's divergence is not penalised (0 = off); its range, the
        # variant and the divergence it needs are checked once, before the run (avs.config_checks)
        self.free_bits = float(free_bits)
        self.channels = channels
        self.audio_dim = audio_dim
        self.latent_dim = latent_dim
        self.mi_dim = mi_dim
        self.image_size = image_size
        self.noise_2d = noise_2d
        self.legacy_sigma = legacy_sigma
        self.legacy_lld = legacy_lld
        # release test path: a random prior code per frame instead of the prior mean (eval K = 1)
        self.legacy_test_sample = bool(legacy_test_sample)
        base = channels // 8  # released: NECK_CHANNEL / 8 = 16
        self.img_widths = (base, 2 * base, 4 * base, 8 * base, 8 * base)
        self.av_widths = (base, 2 * base, 4 * base, 4 * base, 4 * base)
        self.build_encoders()
        self.build_fusion()
        self.code_dim = self.code_width()
        self.noise_model_prior = nn.Conv2d(channels + self.code_dim, channels, kernel_size=1)
        self.noise_model_post = nn.Conv2d(channels + self.code_dim, channels, kernel_size=1)
        self.build_heads()

    # ------------------------------------------------------------------ construction hooks
    def image_encoder(self, in_channels: int) -> GaussianLatentEncoder:
        """Conv stack over frames [+ mask] -> Gaussian [N,L]."""
        return GaussianLatentEncoder(
            self.latent_dim, in_channels, self.img_widths, self.image_size, deterministic=self.deterministic
        )

    def audio_spatial_encoder(self, in_channels: int) -> GaussianLatentEncoder:
        """[audio, embedded spatial input] -> Gaussian [N,L]."""
        return GaussianLatentEncoder(
            self.latent_dim,
            in_channels,
            self.av_widths,
            self.image_size,
            spatial_embed=SPATIAL_EMBED,
            audio_dim=self.audio_dim,
            deterministic=self.deterministic,
        )

    def build_encoders(self) -> None:
        """Prior (frames) and posterior (frames + mask) encoders of s_v."""
        self.enc_vs = self.image_encoder(3)
        self.enc_vs_y = self.image_encoder(4)

    def build_fusion(self) -> None:
        """Layers turning the drawn codes into the injected code (none here)."""

    def build_heads(self) -> None:
        """Extra loss heads (none here)."""

    def code_width(self) -> int:
        """Width of the injected code."""
        return self.latent_dim

    # ------------------------------------------------------------------ encode
    def encode(self, frames: Tensor, audio: Tensor | None = None, masks: Tensor | None = None) -> LatentState:
        """frames [N,3,H,W], audio [N,A] | None, masks [N,1,H,W] | None -> LatentState (posterior iff masks)."""
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"{self._name}.encode: frames must be [N,3,H,W], got {tuple(frames.shape)}")
        n, _, h, w = frames.shape
        if self.uses_audio:
            audio = self._checked_audio(audio, n).to(frames.dtype)
        prior = self.encode_prior(frames, audio)
        posterior = None
        if masks is not None:
            if masks.dim() != 4 or tuple(masks.shape) != (n, 1, h, w):
                raise ValueError(
                    f"{self._name}.encode: masks must be [N,1,H,W]=[{n},1,{h},{w}], got {tuple(masks.shape)}"
                )
            masks = masks.to(frames.dtype)
            posterior = self.encode_posterior(frames, torch.cat([frames, masks], dim=1), masks, audio)
        return LatentState(prior=prior, posterior=posterior)

    def _checked_audio(self, audio: Tensor | None, n: int) -> Tensor:
        if audio is None:
            raise ValueError(
                f"{self._name}.encode: variant {self.variant!r} needs audio [N,{self.audio_dim}], got None"
            )
        if audio.dim() != 2 or tuple(audio.shape) != (n, self.audio_dim):
            raise ValueError(
                f"{self._name}.encode: audio must be [N,audio_dim]=[{n},{self.audio_dim}], got {tuple(audio.shape)}"
            )
        return audio

    def encode_prior(self, frames: Tensor, audio: Tensor | None) -> dict[str, Gaussian]:
        """Prior distributions from frames [N,3,H,W] (and audio)."""
        return {"s_v": self.enc_vs(frames)}

    def encode_posterior(self, frames: Tensor, xy: Tensor, masks: Tensor, audio: Tensor | None) -> dict[str, Gaussian]:
        """Posterior distributions from frames + mask xy [N,4,H,W] (and mask, audio)."""
        return {"s_v": self.enc_vs_y(xy)}

    # ------------------------------------------------------------------ sample
    def _dists(self, state: LatentState, branch: str) -> dict[str, Gaussian]:
        if branch not in BRANCHES:
            raise ValueError(f"{self._name}: branch must be one of {BRANCHES}, got {branch!r}")
        if branch == "prior":
            return state.prior
        if state.posterior is None:
            raise ValueError(f"{self._name}: no posterior in this state; call encode(..., masks=...) first")
        return state.posterior

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
        rec["code"] = self.fuse(dists, z, branch, draw, use_mean, generator, rec)
        state.draws[branch] = rec
        return rec["code"]

    def fuse(
        self,
        dists: dict[str, Gaussian],
        z: dict[str, Tensor],
        branch: str,
        draw: Callable[[Gaussian], Tensor],
        use_mean: bool,
        generator: torch.Generator | None,
        rec: dict[str, Tensor],
    ) -> Tensor:
        """The injected code [N, code_dim] from the drawn codes z (extra draws recorded in rec)."""
        return z["s_v"]

    # ------------------------------------------------------------------ inject
    def inject(self, feat: Tensor, code: Tensor, branch: str, generator: torch.Generator | None = None) -> Tensor:
        """Tile code [N,D] over feat [N,C,h,w], concat, 1x1 conv back to C -> [N,C,h,w]."""
        if branch not in BRANCHES:
            raise ValueError(f"{self._name}.inject: branch must be one of {BRANCHES}, got {branch!r}")
        if feat.dim() != 4 or feat.shape[1] != self.channels:
            raise ValueError(
                f"{self._name}.inject: feat must be [N,{self.channels},h,w] (model.latent.channels), "
                f"got {tuple(feat.shape)}"
            )
        if code.dim() != 2 or tuple(code.shape) != (feat.shape[0], self.code_dim):
            raise ValueError(
                f"{self._name}.inject: code must be [N,code_dim]=[{feat.shape[0]},{self.code_dim}], "
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
    def kl(self, q: Gaussian, p: Gaussian, rows: Tensor | None = None) -> Tensor:
        """Batch-mean closed-form KL(q || p) (legacy_sigma: the released exp(logvar) scale); the mean is over
        the `rows` (bool [N], AVSS real frames) when given (`row_mean`).

        With `free_bits` > 0: sum_d max(free_bits, batch-mean KL_d) instead (see `free_bits_sum`).
        """
        ls = self.legacy_sigma
        args = (q.mu, kl_logvar(q.logvar, ls), p.mu, kl_logvar(p.logvar, ls))
        if not self.free_bits:
            return row_mean(kl_normal(*args), rows)
        per_dim = kl_normal(*(a.unsqueeze(-1) for a in args))  # a trailing axis of 1: the sum keeps [N,L]
        return free_bits_sum(per_dim, self.free_bits, rows)

    def kl_term(self, q: dict[str, Gaussian], p: dict[str, Gaussian], rows: Tensor | None = None) -> Tensor:
        """The "kl" term from posterior q and prior p distributions (scalar, mean over the batch or `rows`)."""
        return self.kl(q["s_v"], p["s_v"], rows)

    def code_losses(self, state: LatentState, codes: dict[str, Tensor]) -> dict[str, Tensor]:
        """Terms on the drawn codes (none here)."""
        return {}

    def losses(self, state: LatentState, codes: dict[str, Tensor]) -> dict[str, Tensor]:
        """Unweighted scalar terms: "kl" (variational variants); "diff", "sic" (factorised, over codes' branches).

        Each is a mean over the rows of `state.rows` (the real frames of AVSS clips) when it is set, else
        over all N rows."""
        if state.posterior is None:
            raise ValueError(f"{self._name}.losses: the state has no posterior; encode with masks in training")
        unknown = set(codes) - set(BRANCHES)
        if unknown:
            raise ValueError(f"{self._name}.losses: codes keys must be in {BRANCHES}, got {sorted(unknown)}")
        out: dict[str, Tensor] = {}
        if self.has_kl:
            out["kl"] = self.kl_term(state.posterior, state.prior, state.rows)
        out.update(self.code_losses(state, codes))
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

    @property
    def _name(self) -> str:
        return type(self).__name__


class VisualOnlyLatent(Latent):
    """CVAE: the prior sees the frames, the posterior frames + mask; code = s_v; no audio."""

    variant = "visual_only"


class _AudioVisualLatent(Latent):
    """Adds the audio-specific code s_a: prior from the audio, posterior from audio + mask (not the image)."""

    uses_audio = True

    def build_encoders(self) -> None:
        super().build_encoders()
        self.enc_as = GaussianLatentEncoder(self.latent_dim, audio_dim=self.audio_dim, deterministic=self.deterministic)
        self.enc_as_y = self.audio_spatial_encoder(1)  # sees the mask, not the image

    def encode_prior(self, frames: Tensor, audio: Tensor | None) -> dict[str, Gaussian]:
        out = super().encode_prior(frames, audio)
        out["s_a"] = self.enc_as(audio=audio)
        return out

    def encode_posterior(self, frames: Tensor, xy: Tensor, masks: Tensor, audio: Tensor | None) -> dict[str, Gaussian]:
        out = super().encode_posterior(frames, xy, masks, audio)
        out["s_a"] = self.enc_as_y(masks, audio)
        return out

    def kl_term(self, q: dict[str, Gaussian], p: dict[str, Gaussian], rows: Tensor | None = None) -> Tensor:
        return self.kl(q["s_v"], p["s_v"], rows) + self.kl(q["s_a"], p["s_a"], rows)


class NoFactorLatent(_AudioVisualLatent):
    """CMVAE: code = Linear([s_v, s_a]) per branch; KL on s_v and s_a."""

    variant = "no_factor"

    def build_fusion(self) -> None:
        L = self.latent_dim
        self.sc_prior = nn.Linear(2 * L, L)
        self.sc_posterior = nn.Linear(2 * L, L)

    def fuse(self, dists, z, branch, draw, use_mean, generator, rec) -> Tensor:
        fuse = self.sc_posterior if branch == "posterior" else self.sc_prior
        return fuse(torch.cat([z["s_v"], z["s_a"]], dim=1))  # [N,2L] -> [N,L]


class FactorisedLatent(_AudioVisualLatent):
    """ECMVAE: s_v, s_a and the shared c; sc_v, sc_a fused by the `divergence`'s strategy, code = [sc_v, sc_a].

    divergence (see docs/ecmvae_notes.md): ``kl`` / ``js`` / ``js_sampled`` keep the Linear fusion
    sc = f(s, c) and put KL resp. the closed-form mmJSD JS resp. the release's sampled JS on the
    shared code c; ``poe`` / ``moe`` replace the fusion by a product (with N(0,I)) resp. a mixture of
    the s and c experts and regularise the fused posterior against the fused prior.
    """

    variant = "factorised"
    code_terms = ("diff", "sic")

    def __init__(self, *args, divergence: str = "js", **kwargs) -> None:
        if divergence not in DIVERGENCES:
            raise ValueError(f"model.latent.divergence must be one of {DIVERGENCES}, got {divergence!r}")
        self.divergence = divergence
        self.code_fusion = make_code_fusion(divergence)
        super().__init__(*args, **kwargs)

    def build_encoders(self) -> None:
        super().build_encoders()
        self.enc_vac = self.audio_spatial_encoder(3)
        self.enc_vac_y = self.audio_spatial_encoder(4)

    def build_fusion(self) -> None:
        self.code_fusion.build(self, self.latent_dim)

    def build_heads(self) -> None:
        self.ba_prior = BarberAgakovMI(self.latent_dim, self.mi_dim, legacy_lld=self.legacy_lld)
        self.ba_post = BarberAgakovMI(self.latent_dim, self.mi_dim, legacy_lld=self.legacy_lld)

    def code_width(self) -> int:
        return 2 * self.latent_dim

    def encode_prior(self, frames: Tensor, audio: Tensor | None) -> dict[str, Gaussian]:
        out = super().encode_prior(frames, audio)
        out["c"] = self.enc_vac(frames, audio)
        return out

    def encode_posterior(self, frames: Tensor, xy: Tensor, masks: Tensor, audio: Tensor | None) -> dict[str, Gaussian]:
        out = super().encode_posterior(frames, xy, masks, audio)
        out["c"] = self.enc_vac_y(xy, audio)
        return out

    def fuse(self, dists, z, branch, draw, use_mean, generator, rec) -> Tensor:
        sc_v, sc_a = self.code_fusion.fuse(self, dists, z, branch, draw, use_mean, generator)
        rec["sc_v"], rec["sc_a"] = sc_v, sc_a
        return torch.cat([sc_v, sc_a], dim=1)  # [N,2L]

    def kl_term(self, q: dict[str, Gaussian], p: dict[str, Gaussian], rows: Tensor | None = None) -> Tensor:
        return self.code_fusion.kl(self, q, p, rows)

    def code_losses(self, state: LatentState, codes: dict[str, Tensor]) -> dict[str, Tensor]:
        """L_diff (summed over the branches in codes, as released) and L_sic (their mean, alpha_2 = 0.5)."""
        if not codes:
            return {}
        diff_terms, sic_terms = [], []
        for branch in BRANCHES:
            if branch not in codes:
                continue
            rec = state.draws.get(branch)
            if rec is None:
                raise ValueError(f"{self._name}.losses: call sample(state, {branch!r}) before losses")
            code = codes[branch]
            if code.dim() != 2 or code.shape[1] != self.code_dim:
                raise ValueError(
                    f"{self._name}.losses: codes[{branch!r}] must be [N,{self.code_dim}], got {tuple(code.shape)}"
                )
            rows = state.rows
            diff_terms.append(diff_loss(rec["s_v"], rec["c"], rows) + diff_loss(rec["s_a"], rec["c"], rows))
            sc_v, sc_a = code.split(self.latent_dim, dim=1)  # [N,2L] -> 2 x [N,L]
            heads = self.ba_post if branch == "posterior" else self.ba_prior
            sic_terms.append(heads(sc_v, sc_a, rows))
        return {"diff": torch.stack(diff_terms).sum(), "sic": torch.stack(sic_terms).mean()}


class AutoEncoderLatent(FactorisedLatent):
    """AE ablation: the factorised latent with deterministic codes and the Linear fusion; no KL."""

    variant = "ae"
    deterministic = True
    has_kl = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, divergence="js", **kwargs)


LATENTS: dict[str, type[Latent]] = {
    cls.variant: cls for cls in (FactorisedLatent, NoFactorLatent, VisualOnlyLatent, AutoEncoderLatent)
}
VARIANTS: tuple[str, ...] = tuple(LATENTS)


def build_latent(variant: str = "factorised", divergence: str = "js", **kwargs) -> Latent:
    """The latent class registered as `variant` (factorised | no_factor | visual_only | ae).

    `divergence` matters to the factorised variant only (the others have no shared code).
    """
    if variant not in LATENTS:
        raise ValueError(f"model.latent.variant must be one of {VARIANTS}, got {variant!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"model.latent.divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if variant == FactorisedLatent.variant:
        return FactorisedLatent(divergence=divergence, **kwargs)
    if divergence != "js":
        log.info("model.latent.divergence=%r has no effect for variant=%r (no shared code)", divergence, variant)
    return LATENTS[variant](**kwargs)


def _check_sizes(channels: int, **sizes: int) -> None:
    for key, value in {"channels": channels, **sizes}.items():
        if value < 1:
            raise ValueError(f"model.latent.{key} must be >= 1, got {value}")
    if channels < 8:
        raise ValueError(f"model.latent.channels must be >= 8 (encoder base width = channels // 8), got {channels}")
