"""AVSegmentor: composes the configured parts; it holds no maths of its own."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from avs import losses as L

log = logging.getLogger(__name__)

Branch = dict[str, Any]

# model.avm_loss.variant: kl = L_AVM as in the AVSBench MS3 / AVS-BG / ECMVAE code; s4_cos = the
# AVSBench S4 "sa" loss; closer_kl / closer_euclidean = the AVSBench closer_loss (visual-visual).
AVM_VARIANTS: tuple[str, ...] = ("kl", "s4_cos", "closer_kl", "closer_euclidean")
# Parts that exist only to process audio: with model.use_audio=false they are not built.
AUDIO_PARTS: tuple[str, ...] = ("audio_encoder", "fusion", "projector")


class AVSegmentor(nn.Module):
    """Audio-visual segmentor: visual backbone -> neck -> [latent] -> fusion <-> motion -> decoder.

    Training mode: `forward(batch)` returns a dict of unweighted scalar loss terms.
    Eval mode: returns `{"logits": [B,T,1,H,W]}` plus `variance`/`samples`/`latents` when asked.
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: Callable[..., nn.Module],
        decoder: Callable[..., nn.Module],
        audio_encoder: nn.Module | None = None,
        fusion: Callable[..., nn.Module] | None = None,
        motion: nn.Module | None = None,
        latent: Callable[..., nn.Module] | None = None,
        projector: Callable[..., nn.Module] | None = None,
        channels: int = 256,
        audio_dim: int = 128,
        image_size: int = 224,
        use_audio: bool = True,
        order: str = "fusion_motion",
        seg_loss: Callable[..., torch.Tensor] | str = "bce",
        seg_loss_options: dict | None = None,
        avm_loss: dict | None = None,
        projector_mask: str = "auto",
        eval_num_samples: int = 1,
    ) -> None:
        super().__init__()
        if order not in ("fusion_motion", "motion_fusion"):
            raise ValueError(f"model.order must be 'fusion_motion' or 'motion_fusion', got {order!r}")
        if projector_mask not in ("auto", "gt", "pred"):
            raise ValueError(f"model.projector_mask must be auto|gt|pred, got {projector_mask!r}")
        self.backbone = backbone
        self.use_audio = use_audio and audio_encoder is not None
        # Without audio no audio part is built (encoder, projector, audio-only fusion weights), so every
        # parameter is used each step; old checkpoints of such runs still load (_load_from_state_dict).
        self.audio_encoder = audio_encoder if self.use_audio else None
        self.neck = neck(in_channels=list(backbone.out_channels))
        self.fusion = None
        if fusion is not None:
            self.fusion = fusion(channels=channels, audio_dim=audio_dim if self.use_audio else None)
        self.motion = motion
        self.decoder = decoder(channels=channels)
        self.latent = None
        if latent is not None:
            self.latent = latent(channels=channels, audio_dim=audio_dim, image_size=image_size)
            # ECMVAE keeps a separate neck and decoder for the posterior branch (training only).
            self.neck_post = neck(in_channels=list(backbone.out_channels))
            self.decoder_post = decoder(channels=channels)
        self.projector = None
        if projector is not None and self.use_audio:
            deepest = max(1, image_size // 32)
            self.projector = projector(channels=channels, audio_dim=audio_dim, feature_size=(deepest, deepest))
        self.order = order
        self.seg_loss = L.make_seg_loss(seg_loss, seg_loss_options) if isinstance(seg_loss, str) else seg_loss
        self.avm_loss = dict(avm_loss) if avm_loss else None
        if self.avm_loss is not None and self.avm_loss.get("variant", "kl") not in AVM_VARIANTS:
            raise ValueError(
                f"model.avm_loss.variant must be one of {list(AVM_VARIANTS)}, got {self.avm_loss['variant']!r}"
            )
        self.projector_mask = projector_mask
        self.eval_num_samples = eval_num_samples
        self.audio_dim = audio_dim

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """Checkpoints of no-audio runs made before audio parts were left out still load: their
        audio-part weights (audio encoder, projector, audio-only fusion weights) are dropped with one note."""
        if not self.use_audio:
            own = set(self.state_dict(keep_vars=True))
            stale = [
                k
                for k in state_dict
                if k.startswith(prefix)
                and k[len(prefix) :] not in own
                and k[len(prefix) :].split(".", 1)[0] in AUDIO_PARTS
            ]
            for k in stale:
                del state_dict[k]
            if stale:
                log.info(
                    "model.use_audio=false builds no audio parts: ignored %d audio weights of the checkpoint (%s)",
                    len(stale),
                    ", ".join(sorted({k[len(prefix) :].split(".")[0] for k in stale})),
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------------ helpers
    def encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """[B,T,1,96,64] log-mel or [B,T,D] embedding -> [B*T,D]."""
        if audio.dim() == 5:
            if self.audio_encoder is None:
                raise ValueError("batch carries log-mel audio but model.audio_encoder is null")
            x = audio.flatten(0, 1)  # [B,T,1,96,64] -> [B*T,1,96,64]
            if getattr(self.audio_encoder, "trainable", True):
                return self.audio_encoder(x)
            with torch.no_grad():
                return self.audio_encoder(x)
        if audio.dim() == 3:
            return audio.flatten(0, 1)  # [B,T,D] -> [B*T,D]
        raise ValueError(f"batch['audio'] must be [B,T,1,96,64] or [B,T,D], got {tuple(audio.shape)}")

    def _branch(
        self,
        feats: list[torch.Tensor],
        audio: torch.Tensor | None,
        num_frames: int,
        out_size: tuple[int, int],
        neck: nn.Module,
        decoder: nn.Module,
        code: torch.Tensor | None = None,
        branch: str = "prior",
    ) -> Branch:
        """One neck -> [latent injection] -> fusion/motion -> decoder pass over [B*T,...] features."""
        maps = list(neck(feats))
        if code is not None:
            maps[-1] = self.latent.inject(maps[-1], code, branch)
        audio_feats: list = [None] * len(maps)
        if self.order == "motion_fusion" and self.motion is not None:
            maps = self.motion(maps, num_frames)
        if self.fusion is not None:
            maps, audio_feats = self.fusion(maps, audio, num_frames)
        fused = maps
        if self.order == "fusion_motion" and self.motion is not None:
            maps = self.motion(maps, num_frames)
        logits = decoder(maps, out_size)  # [B*T,1,H,W]
        return {"logits": logits, "fused": fused, "audio_feats": audio_feats, "decoded": maps}

    def _seg(self, logits: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.seg_loss(logits, masks, valid)

    def _avm(self, out: Branch) -> torch.Tensor:
        # Needs no labels: every frame counts (S4 included), as in the reference implementations.
        opts = dict(self.avm_loss or {})
        variant = opts.pop("variant", "kl")
        fused = out["fused"]
        if opts.pop("legacy_relu_maps", False):
            # AVSBench: the FPN decoder's in-place ReLU overwrites the fused maps before the loss sees them
            fused = [F.relu(f) for f in fused]
        if variant == "kl":
            return L.av_mapping_loss(out["logits"], fused, out["audio_feats"], **opts)
        if variant == "s4_cos":
            return L.av_cosine_loss(out["logits"], fused, out["audio_feats"], stages=opts.get("stages"))
        return L.av_closer_loss(
            out["logits"],
            fused,
            out["audio_feats"],
            stages=opts.get("stages"),
            normalize=bool(opts.get("normalize")),
            distance=variant.removeprefix("closer_"),
            legacy_sum=bool(opts.get("legacy_sum")),
        )

    def _consistency(self, out: Branch, audio: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor):
        from avs.models.projector import consistency_loss

        if self.projector_mask == "auto":  # GT masks when every frame is labelled, chosen on the device
            audio_hat = self.projector.forward_either(out["decoded"][-1], masks, out["logits"], valid.all())
            return consistency_loss(audio, audio_hat)
        use_gt = self.projector_mask == "gt"
        source = masks if use_gt else out["logits"]
        audio_hat = self.projector(out["decoded"][-1], source, mask_is_logits=not use_gt)
        return consistency_loss(audio, audio_hat)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Training: dict of unweighted loss scalars. Eval: {'logits': [B,T,1,H,W], ...}."""
        frames = batch["frames"]
        B, T, _, H, W = frames.shape
        x = frames.flatten(0, 1)  # [B,T,3,H,W] -> [B*T,3,H,W]
        audio = None
        if self.use_audio:
            audio = self.encode_audio(batch["audio"])  # [B*T,D]
        feats = self.backbone(x)
        if self.training:
            masks = batch["masks"].flatten(0, 1)  # [B*T,1,H,W]
            valid = batch["mask_valid"].flatten(0, 1)  # [B*T]
            if self.latent is None:
                return self._train_plain(feats, audio, T, (H, W), masks, valid)
            return self._train_latent(x, feats, audio, T, (H, W), masks, valid, batch["mask_valid"])
        return self._predict(x, feats, audio, B, T, (H, W))

    def _train_plain(self, feats, audio, T, size, masks, valid) -> dict[str, torch.Tensor]:
        out = self._branch(feats, audio, T, size, self.neck, self.decoder)
        terms = {"seg": self._seg(out["logits"], masks, valid)}
        if self.avm_loss is not None and audio is not None and self.fusion is not None:
            terms["avm"] = self._avm(out)
        if self.projector is not None and audio is not None:
            terms["consistency"] = self._consistency(out, audio, masks, valid)
        return terms

    def _posterior_masks(self, masks: torch.Tensor, clip_valid: torch.Tensor) -> torch.Tensor:
        """S4 (frame 0 labelled only): repeat frame 0's mask over T; MS3: the T masks. [B*T,1,H,W]."""
        B, T = clip_valid.shape
        m = masks.view(B, T, *masks.shape[1:])
        first = clip_valid.float().argmax(dim=1)  # first labelled frame per clip
        ref = m[torch.arange(B, device=m.device), first]  # [B,1,H,W]
        repeated = ref.unsqueeze(1).expand_as(m).reshape_as(masks)
        return torch.where(clip_valid.all(), masks, repeated)  # chosen on the device: no host sync

    def _train_latent(self, x, feats, audio, T, size, masks, valid, clip_valid) -> dict[str, torch.Tensor]:
        post_masks = self._posterior_masks(masks, clip_valid)
        state = self.latent.encode(x, audio, post_masks)
        codes = {"prior": self.latent.sample(state, "prior"), "posterior": self.latent.sample(state, "posterior")}
        prior = self._branch(feats, audio, T, size, self.neck, self.decoder, codes["prior"], "prior")
        post = self._branch(feats, audio, T, size, self.neck_post, self.decoder_post, codes["posterior"], "posterior")
        terms = {
            "seg_post": self._seg(post["logits"], masks, valid),
            "seg_prior": self._seg(prior["logits"], masks, valid),
        }
        terms.update(self.latent.losses(state, codes))
        if self.avm_loss is not None and audio is not None and self.fusion is not None:
            terms["avm"] = 0.5 * (self._avm(post) + self._avm(prior))
        if self.projector is not None and audio is not None:
            terms["consistency"] = self._consistency(post, audio, masks, valid)
        return terms

    @torch.no_grad()
    def _predict(self, x, feats, audio, B, T, size) -> dict[str, torch.Tensor]:
        if self.latent is None:
            logits = self._branch(feats, audio, T, size, self.neck, self.decoder)["logits"]
            return {"logits": logits.view(B, T, 1, *size)}
        state = self.latent.encode(x, audio, None)
        k = max(1, int(self.eval_num_samples))
        if k == 1:  # deterministic: the prior mean code (legacy_test_sample: one random code, as released)
            code = self.latent.sample(state, "prior", use_mean=not getattr(self.latent, "legacy_test_sample", False))
            logits = self._branch(feats, audio, T, size, self.neck, self.decoder, code, "prior")["logits"]
            return {"logits": logits.view(B, T, 1, *size), "latents": self.latent.export_codes(state)}
        probs = []
        for _ in range(k):
            code = self.latent.sample(state, "prior")
            out = self._branch(feats, audio, T, size, self.neck, self.decoder, code, "prior")
            probs.append(torch.sigmoid(out["logits"]))
        p = torch.stack(probs)  # [K,B*T,1,H,W]
        mean = p.mean(0).clamp(1e-6, 1 - 1e-6)
        return {
            "logits": torch.logit(mean).view(B, T, 1, *size),
            "variance": p.var(0, unbiased=False).view(B, T, 1, *size),
            "samples": p.view(k, B, T, 1, *size),
            "latents": self.latent.export_codes(state),
        }


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def parameter_groups(model: AVSegmentor) -> dict[str, int]:
    """Trainable parameter counts split by part (backbone, audio, neck, fusion, latent, motion, decoder, train-only)."""
    parts = {
        "visual_backbone": [model.backbone],
        "audio_backbone": [model.audio_encoder],
        "neck": [model.neck],
        "fusion": [model.fusion],
        "latent": [model.latent],
        "motion": [model.motion],
        "decoder": [model.decoder],
        "train_only": [getattr(model, "neck_post", None), getattr(model, "decoder_post", None), model.projector],
    }
    return {k: sum(count_parameters(m) for m in mods if m is not None) for k, mods in parts.items()}


def inference_parameters(model: AVSegmentor) -> int:
    """Trainable parameters used at inference (the prior branch; no train-only parts)."""
    groups = parameter_groups(model)
    total = sum(groups.values()) - groups["train_only"]
    if model.latent is not None and hasattr(model.latent, "inference_parameters"):
        total = total - groups["latent"] + model.latent.inference_parameters()
    return total
