"""The segmentor contract and what every method family shares; the families live in avs/models/methods/.

`model._target_` names a subclass of `Segmentor` (docs/adding_a_method.md). The base class holds the
contract (training: a dict of unweighted scalar loss terms; eval: `{"logits": [B,T,1,H,W], ...}`), the
shared parts (audio encoder, neck, fusion, motion, decoder, and the visual-to-audio projector that
any family may carry), the shared losses (segmentation, A-V mapping, consistency) and the
declarations the config checks read (`LOSS_TERMS`, `LOG_ONLY_TERMS`, `capabilities`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torch.nn import functional as F

from avs import losses as L

log = logging.getLogger(__name__)

Branch = dict[str, Any]

# model.avm_loss.variant: kl = L_AVM as in the AVSBench MS3 / AVS-BG / ECMVAE code; s4_cos = the
# AVSBench S4 "sa" loss; closer_kl / closer_euclidean = the AVSBench closer_loss (visual-visual).
AVM_VARIANTS: tuple[str, ...] = ("kl", "s4_cos", "closer_kl", "closer_euclidean")
# model.avm_loss.avss_mask (AVSS only, docs/avss.md): the map the loss pools from the class logits. soft = the
# predicted foreground probability (gradient into the logits); hard = 1[argmax != 0] (background class 0), no
# gradient; hard_release = 1[argmax != C-1], the released AVSS loss's background index, taken literally.
AVSS_AVM_MASKS: tuple[str, ...] = ("soft", "hard", "hard_release")


@dataclass(frozen=True)
class Capabilities:
    """What a segmentor class does with a given model config (read by avs/config_checks.py).

    `loss_terms`: the trained terms it returns (each needs `model.loss_weights.<term>`);
    `log_only_terms`: terms it returns for the logs only; `latent`: it draws latent codes
    (eval.num_samples > 1, trainer.record_latent_kl); `projector`: it trains the visual-to-audio
    projector; `audio_required`: None when it runs with model.use_audio=false, else why not;
    `semantic`: it trains and predicts `data.num_classes` > 1 classes (AVSS, docs/avss.md).
    """

    loss_terms: frozenset[str]
    log_only_terms: frozenset[str] = frozenset()
    latent: bool = False
    projector: bool = False
    audio_required: str | None = None
    semantic: bool = False


def _plain(value: Any) -> Any:
    """A DictConfig / ListConfig as plain Python containers (resolved); anything else unchanged."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


class Segmentor(nn.Module):
    """Base of every segmentor: backbone -> neck -> fusion <-> motion -> decoder, per frame of a clip.

    Training mode: `forward(batch)` returns a dict of unweighted scalar loss terms (`train_terms`).
    Eval mode: `{"logits": [B,T,1,H,W]}` plus `variance`/`samples`/`latents` when a family has them
    (`predict`). A subclass implements those two methods and declares the terms it returns.
    """

    # Every trained term the class may return; `loss_terms(model_cfg)` says which a config makes it return.
    LOSS_TERMS: ClassVar[tuple[str, ...]] = ("seg", "avm", "consistency")
    # Terms returned for the logs only: logged, never weighted nor trained.
    LOG_ONLY_TERMS: ClassVar[tuple[str, ...]] = ()
    # Keys of the model config that are not constructor arguments (read by the trainer or used in
    # interpolations): build_model leaves them out.
    CONFIG_KEYS: ClassVar[tuple[str, ...]] = ("name", "preset", "init_from", "loss_weights", "auto_weights")
    # Parts that only process audio: build_model does not build them with model.use_audio=false.
    AUDIO_ONLY_PARTS: ClassVar[tuple[str, ...]] = ("audio_encoder", "projector")
    # Top-level modules that hold audio weights (dropped from old no-audio checkpoints on load).
    AUDIO_MODULES: ClassVar[tuple[str, ...]] = ("audio_encoder", "fusion", "projector")
    # True when the class's train_terms / predict handle C = data.num_classes > 1 output maps (AVSS):
    # class-index masks [B,T,H,W] and logits [B,T,C,H,W]. A class that keeps False is refused on AVSS data.
    SEMANTIC: ClassVar[bool] = False

    def __init__(
        self,
        backbone: nn.Module,
        neck: Callable[..., nn.Module],
        decoder: Callable[..., nn.Module],
        audio_encoder: nn.Module | None = None,
        fusion: Callable[..., nn.Module] | None = None,
        motion: nn.Module | None = None,
        projector: Callable[..., nn.Module] | None = None,
        channels: int = 256,
        audio_dim: int = 128,
        image_size: int = 224,
        use_audio: bool = True,
        order: str = "fusion_motion",
        seg_loss: Callable[..., torch.Tensor] | str = "bce",
        avm_loss: Mapping | None = None,
        projector_mask: str = "auto",
        eval_num_samples: int = 1,
        num_classes: int = 1,
        semantic_seg_loss: Callable[..., torch.Tensor] | None = None,
        legacy_vid_zeroing: bool = False,
    ) -> None:
        super().__init__()
        if order not in ("fusion_motion", "motion_fusion"):
            raise ValueError(f"model.order must be 'fusion_motion' or 'motion_fusion', got {order!r}")
        if projector_mask not in ("auto", "gt", "pred"):
            raise ValueError(f"model.projector_mask must be auto|gt|pred, got {projector_mask!r}")
        self.channels, self.audio_dim, self.image_size = channels, audio_dim, image_size
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
        # data.num_classes (build_model passes it): 1 = a binary mask (S4/MS3), > 1 = AVSS class maps
        self.num_classes = int(num_classes)
        self.decoder = self.make_decoder(decoder)
        self.latent = None  # the ECMVAE family sets its latent part
        self.order = order
        self.seg_loss = L.make_seg_loss(seg_loss) if isinstance(seg_loss, str) else seg_loss
        if self.num_classes > 1:  # AVSS: model.semantic_seg_loss replaces the binary model.seg_loss
            if semantic_seg_loss is None:
                raise ValueError("data.num_classes > 1 needs model.semantic_seg_loss (e.g. avs.losses.SemanticCELoss)")
            self.seg_loss = semantic_seg_loss
        self.avm_loss = self._avm_options(avm_loss, self.num_classes)
        # AVSS release: padded frames zeroed at the neck, fusion and logits too (keep_real_frames)
        self.legacy_vid_zeroing = bool(legacy_vid_zeroing)
        self._frame_keep: torch.Tensor | None = None  # [B*T] real-frame flags during a forward, else None
        self.projector_mask = projector_mask
        self.eval_num_samples = eval_num_samples
        # built last (a family with more parts passes None here and builds it after them: same init order)
        self.projector = self.make_projector(projector)

    @staticmethod
    def _avm_options(avm_loss: Mapping | None, num_classes: int) -> dict | None:
        """model.avm_loss as a plain dict (None = off); ValueError for a variant it cannot run."""
        if not avm_loss:
            return None
        opts = dict(_plain(avm_loss))
        variant = opts["variant"]  # configs/model/base.yaml; config_upgrade fills it in older stored configs
        if variant not in AVM_VARIANTS:
            raise ValueError(f"model.avm_loss.variant must be one of {list(AVM_VARIANTS)}, got {variant!r}")
        if num_classes > 1 and variant != "kl":
            raise ValueError(
                "with data.num_classes > 1 (AVSS) model.avm_loss.variant must be kl (the released AVSS form)"
            )
        mask = opts["avss_mask"]  # configs/model/base.yaml; config_upgrade fills it in older stored configs
        if mask not in AVSS_AVM_MASKS:
            raise ValueError(f"model.avm_loss.avss_mask must be one of {list(AVSS_AVM_MASKS)}, got {mask!r}")
        if num_classes == 1 and mask != "soft":
            raise ValueError(
                f"model.avm_loss.avss_mask={mask} applies to AVSS class logits only (data.num_classes > 1); "
                "S4/MS3 use soft"
            )
        return opts

    def make_decoder(self, decoder: Callable[..., nn.Module]) -> nn.Module:
        """The decoder with `num_classes` output maps (the argument is passed only when > 1)."""
        return (
            decoder(channels=self.channels)
            if self.num_classes == 1
            else decoder(channels=self.channels, num_classes=self.num_classes)
        )

    def make_projector(self, projector: Callable[..., nn.Module] | None) -> nn.Module | None:
        """The visual-to-audio projector on the deepest map (None without one or without audio)."""
        if projector is None or not self.use_audio:
            return None
        deepest = max(1, self.image_size // 32)
        return projector(channels=self.channels, audio_dim=self.audio_dim, feature_size=(deepest, deepest))

    # ------------------------------------------------------------------ declarations
    @classmethod
    def loss_terms(cls, model_cfg: Mapping) -> set[str]:
        """The trained terms of `LOSS_TERMS` that a model built from `model_cfg` returns."""
        audio = bool(model_cfg.get("use_audio", True))
        terms = set(cls.LOSS_TERMS)
        if not (audio and model_cfg.get("avm_loss") and model_cfg.get("fusion") is not None):
            terms.discard("avm")
        if not (audio and model_cfg.get("projector") is not None):
            terms.discard("consistency")
        return terms

    @classmethod
    def capabilities(cls, model_cfg: Mapping) -> Capabilities:
        """What this class does with `model_cfg` (see `Capabilities`)."""
        terms = cls.loss_terms(model_cfg)
        return Capabilities(
            loss_terms=frozenset(terms),
            log_only_terms=frozenset(cls.LOG_ONLY_TERMS),
            projector="consistency" in terms,
            semantic=cls.SEMANTIC,
        )

    @classmethod
    def config_keys(cls) -> set[str]:
        """Keys a model config of this class may set: the constructor's parameters (followed through
        `**kwargs` into the base classes) and `CONFIG_KEYS`; backbone and image_size are passed by build_model."""
        keys = set(cls.CONFIG_KEYS)
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            params = inspect.signature(init).parameters.values()
            keys |= {p.name for p in params if p.kind in named and p.name != "self"}
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
                break
        return keys - {"backbone", "image_size", "num_classes"}

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
                and k[len(prefix) :].split(".", 1)[0] in self.AUDIO_MODULES
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

    # ------------------------------------------------------------------ semantic (AVSS) helpers
    def binary_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[N,1,H,W] logits as they are; [N,C,H,W] class logits -> the foreground logit [N,1,H,W],
        log(sum_{c>0} e^l_c) - l_0 = logit(1 - softmax(l)_0): sigmoid of it is P(label != background)."""
        if logits.shape[1] == 1:
            return logits
        return L.foreground_logit(logits)

    @staticmethod
    def hard_foreground(logits: torch.Tensor, background: int = 0) -> torch.Tensor:
        """Class logits [N,C,H,W] -> the hard foreground [N,1,H,W] in logits' dtype: 1 where the predicted
        class argmax(softmax(l)) (the metrics' rule) is not `background`, else 0. Detached: no gradient."""
        with torch.no_grad():
            labels = torch.argmax(torch.softmax(logits.float(), dim=1), dim=1, keepdim=True)
            return (labels != background).to(logits.dtype)

    def binary_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """[N,1,H,W] binary masks as they are; [N,H,W] class indices -> the foreground (label != 0) [N,1,H,W]."""
        if self.num_classes == 1:
            return masks
        return (masks != 0).unsqueeze(1).to(torch.float32)

    @staticmethod
    def zero_padded(feats: list[torch.Tensor], audio: torch.Tensor | None, frame_valid: torch.Tensor):
        """Backbone maps [B*T,C,h,w] and audio [B*T,D] times the real-frame flag [B,T] (the released vid flag):
        a padded frame's features are exactly zero and no gradient reaches the backbone through them."""
        keep = frame_valid.reshape(-1).to(feats[0].dtype)
        feats = [f * keep.view(-1, *([1] * (f.dim() - 1))) for f in feats]
        if audio is not None:
            audio = audio * keep.view(-1, 1).to(audio.dtype)
        return feats, audio

    def keep_real_frames(self, x: torch.Tensor) -> torch.Tensor:
        """x [B*T,...] times the real-frame flags when `legacy_vid_zeroing` is on and the batch has
        `frame_valid` (AVSS): the released AVSS model multiplies its neck maps, TPAVI outputs, decoder
        stages and logits by its vid flag, so a padded frame's logits are exactly zero. The decoder works
        frame by frame, so zeroing its stages changes nothing beyond zeroing the logits. Else x as it is."""
        keep = self._frame_keep
        if keep is None:
            return x
        return x * keep.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    # ------------------------------------------------------------------ shared computations
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
        inject: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Branch:
        """One neck -> [inject at the deepest map] -> fusion/motion -> decoder pass over [B*T,...] features."""
        maps = [self.keep_real_frames(m) for m in neck(feats)]
        if inject is not None:
            maps[-1] = inject(maps[-1])
        audio_feats: list = [None] * len(maps)
        if self.order == "motion_fusion" and self.motion is not None:
            maps = self.motion(maps, num_frames)
        if self.fusion is not None:
            maps, audio_feats = self.fusion(maps, audio, num_frames)
            maps = [self.keep_real_frames(m) for m in maps]
        fused = maps
        if self.order == "fusion_motion" and self.motion is not None:
            maps = self.motion(maps, num_frames)
        logits = self.keep_real_frames(decoder(maps, out_size))  # [B*T,1,H,W]
        return {"logits": logits, "fused": fused, "audio_feats": audio_feats, "decoded": maps}

    def _seg(self, logits: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.seg_loss(logits, masks, valid)

    def _avm(self, out: Branch, valid: torch.Tensor | None = None) -> torch.Tensor:
        # Needs no labels: every frame counts (S4 included), as in the reference implementations.
        # AVSS (num_classes > 1): the foreground map of the class logits, on the labelled frames only (the
        # released AVSS loss weights it by the gt flag; padded frames count in no loss).
        opts = dict(self.avm_loss or {})
        mask = opts.pop("avss_mask")
        if self.num_classes > 1:
            opts["valid"] = valid
        variant = opts.pop("variant")
        fused = out["fused"]
        if self.num_classes > 1 and mask != "soft":  # AVSS hard: the predicted foreground as a 0/1 mask
            background = 0 if mask == "hard" else self.num_classes - 1
            out, opts["mask_is_prob"] = {**out, "logits": self.hard_foreground(out["logits"], background)}, True
        else:
            out = {**out, "logits": self.binary_logits(out["logits"])}  # AVSS: the foreground map
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

    def _consistency(self, out: Branch, audio: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, rows=None):
        from avs.models.projector import consistency_loss

        masks = self.binary_masks(masks)  # AVSS: the foreground (label != 0), docs/avss.md
        out = {**out, "logits": self.binary_logits(out["logits"])}
        if self.projector_mask == "auto":  # GT masks when every frame is labelled, chosen on the device
            audio_hat = self.projector.forward_either(out["decoded"][-1], masks, out["logits"], valid.all())
            return consistency_loss(audio, audio_hat, rows)
        use_gt = self.projector_mask == "gt"
        source = masks if use_gt else out["logits"]
        audio_hat = self.projector(out["decoded"][-1], source, mask_is_logits=not use_gt)
        return consistency_loss(audio, audio_hat, rows)

    def has_avm(self, audio: torch.Tensor | None) -> bool:
        """True when the model computes the A-V mapping loss (configured, with audio and fusion)."""
        return self.avm_loss is not None and audio is not None and self.fusion is not None

    def consistency_term(self, out: Branch, audio, masks, valid, frame_valid=None) -> dict[str, torch.Tensor]:
        """{"consistency": projector loss on the supervised branch `out`} when the model carries a projector.
        AVSS: `frame_valid` [B,T] (the real frames) are the only rows of the loss (padded frames count in none)."""
        if self.projector is None or audio is None:
            return {}
        rows = frame_valid.reshape(-1).bool() if self.num_classes > 1 and frame_valid is not None else None
        return {"consistency": self._consistency(out, audio, masks, valid, rows)}

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
        if self.num_classes > 1 and "frame_valid" in batch:  # AVSS: padded frames carry nothing (as released)
            feats, audio = self.zero_padded(feats, audio, batch["frame_valid"])
            if self.legacy_vid_zeroing:
                self._frame_keep = batch["frame_valid"].reshape(-1)
        try:
            if self.training:
                return self.train_terms(x, feats, audio, batch, T, (H, W))
            with torch.no_grad():
                return self.predict(x, feats, audio, B, T, (H, W))
        finally:
            self._frame_keep = None

    def train_terms(self, x, feats, audio, batch, T: int, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Unweighted scalar loss terms. x: frames [B*T,3,H,W]; feats: backbone maps; audio: [B*T,D] or None."""
        raise NotImplementedError(f"{type(self).__name__} must implement train_terms")

    def predict(self, x, feats, audio, B: int, T: int, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """{'logits': [B,T,1,H,W], ...} (runs under torch.no_grad)."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict")


# The earlier name of the base class (type hints across the code base use it).
AVSegmentor = Segmentor


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def parameter_groups(model: Segmentor) -> dict[str, int]:
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


def inference_parameters(model: Segmentor) -> int:
    """Trainable parameters used at inference (the prior branch; no train-only parts)."""
    groups = parameter_groups(model)
    total = sum(groups.values()) - groups["train_only"]
    if model.latent is not None and hasattr(model.latent, "inference_parameters"):
        total = total - groups["latent"] + model.latent.inference_parameters()
    return total
