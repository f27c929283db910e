"""AVS-BG (Hao et al., AAAI 2024): the one-branch pass with the correlation motion module and the
visual-to-audio projector whose consistency loss closes the audio -> visual -> audio loop.

The projector and its consistency term are shared machinery of `Segmentor` (a component any family
can carry: ECMVAE + AVS-BG is configs/model/ecmvae_bg.yaml); this class is the family that has it
as its method and declares the config keys of its presets.
"""

from __future__ import annotations

from avs.models.methods.avsbench import AVSBenchSegmentor


class AVSBGSegmentor(AVSBenchSegmentor):
    """AVS-BG: `seg`, `avm` and `consistency` (the projector's; none when model.projector is null)."""

    LOSS_TERMS = ("seg", "avm", "consistency")
    # model.release_raw_logits: per-subset table read by the projector's legacy_raw_logits interpolation
    CONFIG_KEYS = (*AVSBenchSegmentor.CONFIG_KEYS, "release_raw_logits")
