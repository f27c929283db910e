"""The AVSBench baseline (Zhou et al., ECCV 2022): one neck -> TPAVI fusion -> decoder branch per frame."""

from __future__ import annotations

import torch

from avs.models.segmentor import Segmentor


class AVSBenchSegmentor(Segmentor):
    """One branch: `seg` on the labelled frames, `avm` (A-V mapping) when configured, and `consistency`
    when a visual-to-audio projector is carried (e.g. the AVS-BG table 5 "AVSBench + BG" row)."""

    LOSS_TERMS = ("seg", "avm", "consistency")
    SEMANTIC = True  # data.num_classes > 1 (AVSS): class maps, class-index masks (docs/avss.md)
    # model.release_avss / release_avss_window: per-subset tables read by the release preset's interpolations
    CONFIG_KEYS = (*Segmentor.CONFIG_KEYS, "release_avss", "release_avss_window")

    def train_terms(self, x, feats, audio, batch, T, size) -> dict[str, torch.Tensor]:
        masks = batch["masks"].flatten(0, 1)  # [B,T,1,H,W] -> [B*T,1,H,W] (AVSS: [B,T,H,W] -> [B*T,H,W])
        valid = batch["mask_valid"].flatten(0, 1)  # [B,T] -> [B*T]
        out = self._branch(feats, audio, T, size, self.neck, self.decoder)
        terms = {"seg": self._seg(out["logits"], masks, valid)}
        if self.has_avm(audio):
            terms["avm"] = self._avm(out, valid)
        terms.update(self.consistency_term(out, audio, masks, valid, batch.get("frame_valid")))
        return terms

    def predict(self, x, feats, audio, B, T, size) -> dict[str, torch.Tensor]:
        logits = self._branch(feats, audio, T, size, self.neck, self.decoder)["logits"]
        return {"logits": logits.view(B, T, self.num_classes, *size)}
