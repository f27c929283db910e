"""ECMVAE (Mao et al., ICCV 2023): prior and posterior branches around a latent part (avs.models.latent)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from avs.models.segmentor import Capabilities, Segmentor


def _latent_class(model_cfg: Mapping) -> type | None:
    """The latent class `model.latent` builds (None when it names no shipped variant)."""
    from avs.models.latent import LATENTS

    latent = model_cfg.get("latent")
    return LATENTS.get(str(latent.get("variant", "factorised"))) if latent is not None else None


class ECMVAESegmentor(Segmentor):
    """Two branches on one backbone: the prior (used at inference) and the posterior (training only,
    its own neck and decoder), each with the latent code injected at the deepest neck map.

    Terms: `seg_post`, `seg_prior`, the latent's own (`kl`, `diff`, `sic` as its variant has them),
    `avm` (mean over both branches) and `consistency` (posterior branch) when a projector is carried.
    """

    LOSS_TERMS = ("seg_post", "seg_prior", "kl", "diff", "sic", "avm", "consistency")
    SEMANTIC = True  # data.num_classes > 1 (AVSS): the posterior encodes the foreground mask (docs/avss.md)

    def __init__(
        self,
        latent: Callable[..., nn.Module],
        projector: Callable[..., nn.Module] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(projector=None, **kwargs)
        self.latent = latent(channels=self.channels, audio_dim=self.audio_dim, image_size=self.image_size)
        neck, decoder = kwargs["neck"], kwargs["decoder"]
        self.neck_post = neck(in_channels=list(self.backbone.out_channels))
        self.decoder_post = self.make_decoder(decoder)
        self.projector = self.make_projector(projector)  # last, as the init order has always been

    @classmethod
    def loss_terms(cls, model_cfg: Mapping) -> set[str]:
        terms = super().loss_terms(model_cfg)
        latent = _latent_class(model_cfg)
        if latent is not None:
            terms -= {"kl", "diff", "sic"} - set(latent.terms())
        return terms

    @classmethod
    def capabilities(cls, model_cfg: Mapping) -> Capabilities:
        caps = super().capabilities(model_cfg)
        latent = _latent_class(model_cfg)
        needs_audio = latent is None or latent.uses_audio
        reason = None
        if needs_audio:
            variant = (model_cfg.get("latent") or {}).get("variant", "factorised")
            reason = f"model.latent.variant={variant} encodes the audio"
        return Capabilities(caps.loss_terms, caps.log_only_terms, True, caps.projector, reason, caps.semantic)

    def _posterior_masks(self, masks: torch.Tensor, clip_valid: torch.Tensor) -> torch.Tensor:
        """S4 (frame 0 labelled only): repeat frame 0's mask over T; MS3: the T masks. [B*T,1,H,W].
        AVSS: the foreground (label != 0) of each labelled frame, else of the clip's first labelled frame."""
        B, T = clip_valid.shape
        if self.num_classes > 1:
            return self._semantic_posterior_masks(self.binary_masks(masks), clip_valid)
        m = masks.view(B, T, *masks.shape[1:])
        first = clip_valid.float().argmax(dim=1)  # first labelled frame per clip
        ref = m[torch.arange(B, device=m.device), first]  # [B,1,H,W]
        repeated = ref.unsqueeze(1).expand_as(m).reshape_as(masks)
        return torch.where(clip_valid.all(), masks, repeated)  # chosen on the device: no host sync

    @staticmethod
    def _semantic_posterior_masks(fg: torch.Tensor, clip_valid: torch.Tensor) -> torch.Tensor:
        """fg [B*T,1,H,W], clip_valid [B,T] -> per frame its own mask if labelled, else the first labelled one's."""
        B, T = clip_valid.shape
        m = fg.view(B, T, *fg.shape[1:])
        first = clip_valid.float().argmax(dim=1)
        ref = m[torch.arange(B, device=m.device), first].unsqueeze(1).expand_as(m)
        keep = clip_valid.view(B, T, *([1] * (m.dim() - 2)))
        return torch.where(keep, m, ref).reshape_as(fg)

    def latent_rows(self, batch: Mapping) -> torch.Tensor | None:
        """AVSS (num_classes > 1, a batch with `frame_valid`): the real frames, bool [B*T], the only rows the
        latent terms count (docs/avss.md); else None (S4/MS3: every row, the plain means)."""
        if self.num_classes > 1 and "frame_valid" in batch:
            return batch["frame_valid"].reshape(-1).to(torch.bool)
        return None

    def _coded_branch(self, feats, audio, T, size, code, branch: str) -> dict:
        neck, decoder = (self.neck, self.decoder) if branch == "prior" else (self.neck_post, self.decoder_post)
        return self._branch(feats, audio, T, size, neck, decoder, lambda m: self.latent.inject(m, code, branch))

    def train_terms(self, x, feats, audio, batch, T, size) -> dict[str, torch.Tensor]:
        masks = batch["masks"].flatten(0, 1)  # [B,T,1,H,W] -> [B*T,1,H,W] (AVSS: [B,T,H,W] -> [B*T,H,W])
        valid = batch["mask_valid"].flatten(0, 1)  # [B*T]
        post_masks = self._posterior_masks(masks, batch["mask_valid"])
        rows = self.latent_rows(batch)
        if rows is not None:  # AVSS: a padded frame enters the latent encoders as zeros (as its features do)
            x = x * rows.view(-1, 1, 1, 1).to(x.dtype)
        state = self.latent.encode(x, audio, post_masks)
        state.rows = rows  # and no latent term counts it
        codes = {"prior": self.latent.sample(state, "prior"), "posterior": self.latent.sample(state, "posterior")}
        prior = self._coded_branch(feats, audio, T, size, codes["prior"], "prior")
        post = self._coded_branch(feats, audio, T, size, codes["posterior"], "posterior")
        terms = {
            "seg_post": self._seg(post["logits"], masks, valid),
            "seg_prior": self._seg(prior["logits"], masks, valid),
        }
        terms.update(self.latent.losses(state, codes))
        if self.has_avm(audio):
            terms["avm"] = 0.5 * (self._avm(post, valid) + self._avm(prior, valid))
        terms.update(self.consistency_term(post, audio, masks, valid, batch.get("frame_valid")))
        return terms

    def predict(self, x, feats, audio, B, T, size) -> dict[str, torch.Tensor]:
        state = self.latent.encode(x, audio, None)
        k = max(1, int(self.eval_num_samples))
        if k == 1:  # deterministic: the prior mean code (legacy_test_sample: one random code, as released)
            code = self.latent.sample(state, "prior", use_mean=not getattr(self.latent, "legacy_test_sample", False))
            logits = self._coded_branch(feats, audio, T, size, code, "prior")["logits"]
            return {"logits": logits.view(B, T, self.num_classes, *size), "latents": self.latent.export_codes(state)}
        if self.num_classes > 1:
            return self._semantic_samples(feats, audio, state, B, T, size, k)
        probs = []
        for _ in range(k):
            code = self.latent.sample(state, "prior")
            probs.append(torch.sigmoid(self._coded_branch(feats, audio, T, size, code, "prior")["logits"]))
        p = torch.stack(probs)  # [K,B*T,1,H,W]
        mean = p.mean(0).clamp(1e-6, 1 - 1e-6)
        return {
            "logits": torch.logit(mean).view(B, T, 1, *size),
            "variance": p.var(0, unbiased=False).view(B, T, 1, *size),
            "samples": p.view(k, B, T, 1, *size),
            "latents": self.latent.export_codes(state),
        }

    def _semantic_samples(self, feats, audio, state, B, T, size, k: int) -> dict[str, torch.Tensor]:
        """AVSS with eval.num_samples=k > 1: logits = log of the mean softmax over k prior codes [B,T,C,H,W];
        variance = the variance of P(foreground) over the samples [B,T,1,H,W]."""
        probs = []
        for _ in range(k):
            code = self.latent.sample(state, "prior")
            probs.append(torch.softmax(self._coded_branch(feats, audio, T, size, code, "prior")["logits"], dim=1))
        p = torch.stack(probs)  # [K,B*T,C,H,W]
        fg = 1.0 - p[:, :, :1]  # [K,B*T,1,H,W]
        return {
            "logits": p.mean(0).clamp_min(1e-12).log().view(B, T, self.num_classes, *size),
            "variance": fg.var(0, unbiased=False).view(B, T, 1, *size),
            "samples": fg.view(k, B, T, 1, *size),
            "latents": self.latent.export_codes(state),
        }
